"""The reference LoRA trainer (`hookwise.train_lora`): learning a new class, files, resume, bases, cached latents."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hookwise
from hookwise.errors import ConfigError
from hookwise.train import FORMATS, lora_state_dict, read_lora, save_latents, train_lora
from hookwise.train.trainer import _sample_validation, _write_validation, attention_targets
from model_helpers import tiny_flux, tiny_musubi, tiny_wan
from cache_helpers import one_thread  # noqa: F401 - the fixture


pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_short_run_teaches_the_zoo_model_the_new_class_and_saves_every_format(tmp_path):
    result = train_lora("flux-shapes", tmp_path, steps=60, batch=16, validate_every=30)
    (before_new, before_old), (after_new, after_old) = result.distances["before"], result.distances["after"]
    # Before, samples of the new prompt look like the old classes; after, like the new class.
    assert before_new > before_old
    assert after_new < before_new and after_new / after_old < before_new / before_old
    assert result.learned()
    assert set(result.files) == set(FORMATS) and not result.skipped_formats
    reference = load_file(str(result.files["diffusers"]))
    for fmt in FORMATS:
        back = lora_state_dict(result.files[fmt], "diffusers")
        assert back.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(back[key], reference[key], rtol=0, atol=0)
    embedding = load_file(str(result.embedding))
    assert embedding["class_tokens"].shape == (4, 32) and embedding["class_pooled"].shape == (32,)
    assert result.grid.is_file() and [p.name for p in result.validations] == ["step-000030.png", "step-000060.png"]
    assert result.optimizer == "AdamW (torch)"
    assert result.plan and "Lora training" in result.plan
    assert (tmp_path / "training.json").is_file()


def test_resume_continues_bit_identically(tmp_path):
    kwargs = dict(steps=6, batch=4, stack=None, sample_steps=2)
    straight = train_lora("flux-shapes", tmp_path / "straight", **kwargs)
    # The first half writes validation samples in between: they must not disturb the run.
    train_lora("flux-shapes", tmp_path / "half", **{**kwargs, "steps": 3}, validate_every=1)
    resumed = train_lora("flux-shapes", tmp_path / "resumed", **kwargs, resume=tmp_path / "half")
    assert resumed.start_step == 3 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[3:]
    for name in ("lora-diffusers.safetensors", "embedding.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_resume_refuses_other_settings_and_finished_runs(tmp_path):
    train_lora("flux-shapes", tmp_path / "run", steps=2, batch=2, stack=None, sample_steps=1)
    with pytest.raises(ConfigError, match="differs in \\['rank'\\]"):
        train_lora("flux-shapes", tmp_path / "b", steps=4, batch=2, rank=4, alpha=8, stack=None, resume=tmp_path / "run")
    with pytest.raises(ConfigError, match="already did 2 steps"):
        train_lora("flux-shapes", tmp_path / "c", steps=2, batch=2, stack=None, resume=tmp_path / "run")
    with pytest.raises(ConfigError, match="no training_state.pt"):
        train_lora("flux-shapes", tmp_path / "d", steps=2, batch=2, stack=None, resume=tmp_path)


def _flux_data(folder, inputs, files: int = 2, rows: int = 3):
    """Cached latents and conditioning shaped like tiny_flux's inputs."""
    g = torch.Generator().manual_seed(1)
    for i in range(files):
        save_latents(folder / f"part{i}.safetensors", torch.randn(rows, 16, 4, generator=g),
                     encoder_hidden_states=torch.randn(rows, 24, 32, generator=g),
                     pooled_projections=torch.randn(rows, 32, generator=g),
                     shared={"img_ids": inputs["img_ids"], "txt_ids": inputs["txt_ids"]})  # fmt: skip
    return folder


@pytest.mark.parametrize("base", ["bf16", "fp8"])
def test_low_precision_bases_train_a_float32_lora(tmp_path, base):
    model, inputs = tiny_flux()
    seen = []
    result = train_lora(model, tmp_path / "out", data=_flux_data(tmp_path / "data", inputs), steps=3, batch=4, rank=2,
                        base=base, stack=None, sample_steps=1, formats=("diffusers",), progress=seen.append)  # fmt: skip
    assert [s.step for s in seen] == [1, 2, 3] and all(s.peak_bytes > 0 and s.step_seconds > 0 for s in seen)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.stack == (["casting"] if base == "fp8" else [])
    assert model.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == (
        torch.bfloat16 if base == "bf16" else torch.float8_e4m3fn
    )
    weights = load_file(str(result.files["diffusers"]))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # the up weights moved off zero


def test_attention_targets_come_from_the_map_and_complete_fused_flux_modules():
    model, _ = tiny_flux()
    targets = attention_targets(model)
    assert "transformer_blocks.0.attn.to_q" in targets and "transformer_blocks.0.attn.add_k_proj" in targets
    # FLUX's single-block linear1 fuses q, k, v and the MLP input: the MLP input comes along.
    assert "single_transformer_blocks.0.proj_mlp" in targets
    assert not any(t.startswith(("time_text_embed", "proj_out", "norm_out")) for t in targets)


def test_a_diffusers_transformer_trains_from_cached_latents(tmp_path):
    model, inputs = tiny_flux()
    data = _flux_data(tmp_path / "data", inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_lora(model, tmp_path / "out", data=data, steps=4, batch=4, rank=2, validate_every=2, sample_steps=2)
    assert set(result.files) == set(FORMATS) and len(result.losses) == 4
    lora, fmt = read_lora(result.files["kohya"], model=model)
    assert fmt == "kohya" and "single_transformer_blocks.0.proj_mlp" in lora
    sampled = load_file(str(result.validations[0]))["latents"]
    assert sampled.shape == (4, 16, 4) and torch.isfinite(sampled).all()
    # The base weights are frozen: only the adapter trained.
    for name, p in model.named_parameters():
        if "lora_" not in name:
            base = name.replace(".base_layer", "")
            assert torch.equal(p, before[base]), name


def test_a_wan_transformer_and_a_musubi_style_model_train_from_cached_latents(tmp_path):
    model, inputs = tiny_wan()
    g = torch.Generator().manual_seed(2)
    save_latents(tmp_path / "wan" / "a.safetensors", torch.randn(2, 4, 2, 16, 16, generator=g),
                 encoder_hidden_states=torch.randn(2, 12, 16, generator=g), timestep_scale=1000.0)  # fmt: skip
    result = train_lora(model, tmp_path / "wan-out", data=tmp_path / "wan", steps=2, batch=2, rank=2, sample_steps=2)
    assert {"diffusers", "peft", "kohya", "bfl"} == set(result.files)
    assert all(torch.isfinite(torch.tensor(result.losses)))

    # A reference-code model: fused qkv Linears, other argument names, a plain tensor output.
    musubi, inputs = tiny_musubi()
    save_latents(tmp_path / "musubi" / "a.safetensors", torch.randn(2, 16, 8, generator=g),
                 txt=torch.randn(2, 6, 16, generator=g), y=torch.randn(2, 12, generator=g),
                 input_arg="img", timestep_arg="timesteps")  # fmt: skip
    result = train_lora(musubi, tmp_path / "musubi-out", data=tmp_path / "musubi", steps=2, batch=2, rank=2,
                        stack=None, sample_steps=2, formats=("diffusers", "peft"))  # fmt: skip
    assert len(result.losses) == 2 and set(result.files) == {"diffusers", "peft"}
    assert any(".qkv" in k for k in load_file(str(result.files["diffusers"])))


def test_validation_samples_switch_to_the_inference_stack_and_leave_the_run_bit_identical(tmp_path):
    # Training streams half the weights; validation samples hold them resident under a step cache.
    kwargs = dict(steps=4, batch=4, sample_steps=2, stack=[hookwise.Offload(onload_device="cpu", vram_budget="50%")])
    plain = train_lora("flux-shapes", tmp_path / "plain", **kwargs)
    inside = [hookwise.Offload(onload_device="cpu", vram_budget="100%"), hookwise.FirstBlockCache()]
    switched = train_lora("flux-shapes", tmp_path / "switched", **kwargs, validate_every=1, validation_stack=inside)
    assert switched.losses == plain.losses
    assert len(switched.switches) == 4 and len(plain.switches) == 1  # every validation went through the switch
    for report in switched.switches:
        assert report.inside.configs == tuple(inside) or list(report.inside.configs) == inside
        for cost in (report.enter, report.exit):
            assert cost.files_written == cost.hashes == cost.pins == 0
    a, b = (load_file(str(tmp_path / n / "lora-diffusers.safetensors")) for n in ("plain", "switched"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="validation_stack"):
        train_lora("flux-shapes", tmp_path / "bad", steps=1, batch=2, validation_stack="fast")


def test_validation_samples_leave_the_training_mode_as_it_was(tmp_path):
    from hookwise.train._lora_tasks import ZooTask
    from hookwise.zoo import load_reference

    task = ZooTask(load_reference("flux-shapes"), sample_steps=2)
    model = task.transformer.train()
    path = _write_validation(task, model, tmp_path / "v", title="t", per_class=2)
    assert path.suffix == ".png" and path.is_file() and model.training
    model.eval()
    pixels = _sample_validation(task, model, [task.new_label, 0])
    assert not model.training and pixels.shape == (2, 3, 16, 16)
    assert not torch.is_grad_enabled() or not pixels.requires_grad


def test_bad_arguments_say_what_to_do(tmp_path):
    model, _ = tiny_flux()
    with pytest.raises(ConfigError, match="pass data="):
        train_lora(model, tmp_path)
    with pytest.raises(ConfigError, match="no cached latents"):
        train_lora(model, tmp_path, data=tmp_path)
    with pytest.raises(ConfigError, match="video model"):
        train_lora("wan-moving", tmp_path)
    with pytest.raises(ConfigError, match="base="):
        train_lora("flux-shapes", tmp_path, base="fp4")
    with pytest.raises(ConfigError, match="unknown \\['safetensors'\\]"):
        train_lora("flux-shapes", tmp_path, formats=("safetensors",))
    with pytest.raises(hookwise.HookwiseError, match="optimizer="):
        train_lora("flux-shapes", tmp_path, steps=1, batch=2, stack=None, optimizer="sgd")


def test_the_train_lora_command_trains_and_resumes(tmp_path, capsys):
    from hookwise.cli import main

    args = ["train-lora", "--steps", "2", "--batch", "2", "--stack", "none", "--sample-steps", "1", "--formats", "diffusers,bfl"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args[:2], "3", *args[3:], "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "optimizer: AdamW (torch)" in err and "before / after grid" in err
    assert (tmp_path / "b" / "lora-bfl.safetensors").is_file() and not (tmp_path / "b" / "lora-kohya.safetensors").exists()
