"""LoRA files: every format round-trips exactly on tiny FLUX / Wan models; unmatched keys are a clear error."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from hookwise.errors import NoTargetError
from hookwise.train.lora_io import FORMATS, load_lora, lora_from_model, read_lora, save_lora
from model_helpers import output_of, tiny_flux, tiny_wan


def _with_lora(model: nn.Module, seed: int = 1) -> nn.Module:
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.inject_adapter_in_model(config, model)


def _same(a, b) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].down, b[name].down), name
        assert torch.equal(a[name].up, b[name].up), name
        assert a[name].scale == b[name].scale, name


@pytest.mark.parametrize("build", [tiny_flux, tiny_wan], ids=["flux", "wan"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_exactly(build, fmt, tmp_path):
    model = _with_lora(build()[0])
    source = lora_from_model(model)
    path = tmp_path / "lora.safetensors"
    save_lora(model, path, format=fmt)
    with_model, _ = read_lora(path, model=build()[0])
    _same(source, with_model)
    without_model, _ = read_lora(path)
    _same(source, without_model)


def test_loaded_lora_gives_the_saved_models_output(tmp_path):
    model, inputs = tiny_flux()
    model = _with_lora(model)
    expected = output_of(model, inputs)
    for fmt in FORMATS:
        save_lora(model, tmp_path / f"{fmt}.safetensors", format=fmt)
        fresh = tiny_flux()[0]
        load_lora(tmp_path / f"{fmt}.safetensors", fresh)
        torch.testing.assert_close(output_of(fresh, inputs), expected)


def test_keys_matching_no_module_are_an_error_naming_them(tmp_path):
    save_lora(_with_lora(tiny_flux()[0]), tmp_path / "flux.safetensors", format="kohya")
    with pytest.raises(NoTargetError, match="lora_unet|double_blocks") as err:
        read_lora(tmp_path / "flux.safetensors", model=tiny_wan()[0])
    assert "kohya" in str(err.value)


def test_diffusers_file_loads_through_diffusers_with_the_same_output(tmp_path):
    model, inputs = tiny_flux()
    save_lora(_with_lora(model), tmp_path / "lora.safetensors", format="diffusers")
    ours = tiny_flux()[0]
    load_lora(tmp_path / "lora.safetensors", ours)
    theirs = tiny_flux()[0]
    theirs.load_lora_adapter(str(tmp_path), weight_name="lora.safetensors", prefix="transformer")
    torch.testing.assert_close(output_of(theirs, inputs), output_of(ours, inputs))


def test_kohya_file_loads_through_diffusers_flux_loader(tmp_path):
    from diffusers import FluxPipeline

    model, inputs = tiny_flux()
    # diffusers' kohya FLUX reader assumes full-size single blocks, so the LoRA sits on the double block.
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("transformer_blocks.")]
    torch.manual_seed(1)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), model)
    save_lora(model, tmp_path / "kohya.safetensors", format="kohya")
    ours = tiny_flux()[0]
    load_lora(tmp_path / "kohya.safetensors", ours)
    state, alphas = FluxPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"), return_alphas=True)
    theirs = tiny_flux()[0]
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=theirs)
    torch.testing.assert_close(output_of(theirs, inputs), output_of(ours, inputs))


def test_diffusers_to_kohya_to_diffusers_gives_identical_tensors(tmp_path):
    from hookwise.train.lora_io import lora_state_dict

    save_lora(_with_lora(tiny_flux()[0]), tmp_path / "a.safetensors", format="diffusers")
    kohya = lora_state_dict(tmp_path / "a.safetensors", "kohya")
    save_lora(kohya, tmp_path / "b.safetensors", format="diffusers", architecture="flux")
    a, b = lora_state_dict(tmp_path / "a.safetensors"), lora_state_dict(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hotswap_under_casting_equals_a_fresh_load(tmp_path):
    import hookwise
    from hookwise.train.lora_io import hotswap_lora

    model, inputs = tiny_flux()
    save_lora(_with_lora(model), tmp_path / "first.safetensors", format="diffusers")
    second = _with_lora(tiny_flux()[0], seed=7)
    save_lora(second, tmp_path / "second.safetensors", format="kohya")
    fresh = tiny_flux()[0]
    load_lora(tmp_path / "second.safetensors", fresh)
    hookwise.apply(fresh, hookwise.LayerwiseCasting())
    running = tiny_flux()[0]
    load_lora(tmp_path / "first.safetensors", running)
    hookwise.apply(running, hookwise.LayerwiseCasting())
    before = output_of(running, inputs)
    # The stack stays on: the swap copies into the resident LoRA weights.
    hotswap_lora(running, tmp_path / "second.safetensors")
    after = output_of(running, inputs)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, output_of(fresh, inputs))
