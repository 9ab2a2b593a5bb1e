"""load_and_quantize: a full-precision safetensors checkpoint quantized tensor by tensor into a model built
on meta gives what load-then-quantize gives, without ever holding the full-precision model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import hookwise
from hookwise import Offload, Quantize
from hookwise.errors import ConfigError
from hookwise.plan._peak_tracker import StorageTracker

from cache_helpers import one_thread  # noqa: F401
from model_helpers import output_of, tiny_flux, tiny_sd3, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = Quantize("nf4", modules={r"\.ff\.": "int8-weight", r"to_out": "int8"})


def _factory(model, dtype=None):
    config, cls = dict(model.config), type(model)
    return lambda: cls.from_config(config).eval()


def _load_then_quantize(model, state, *configs, dtype=None):
    reference = _factory(model)()
    reference.load_state_dict(state)
    reference.requires_grad_(False)
    if dtype is not None:
        reference.to(dtype)
    hookwise.apply(reference, *configs)
    return reference


def test_the_checkpoint_is_quantized_as_it_is_read_and_equals_load_then_quantize(tmp_path):
    model, inputs = tiny_flux()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    with StorageTracker() as tracker:
        loaded = hookwise.load_and_quantize(_factory(model), path, MIXED)
    reference = _load_then_quantize(model, load_file(str(path)), MIXED)
    stored = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    # the quantized model plus what quantizing one weight takes, never the full-precision model
    assert stored < tracker.peak_bytes("cpu") <= stored + 3 * largest < full_bytes
    assert torch.equal(output_of(loaded, inputs), output_of(reference, inputs))
    before, after = reference.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert hookwise.applied(loaded) == hookwise.applied(reference)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_sharded_diffusers_folder_loads_in_bf16_and_the_rest_of_the_stack_is_applied(tmp_path):
    model, inputs = tiny_flux()
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="40KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    offload = Offload(onload_device="cpu", granularity="block")
    loaded = hookwise.load_and_quantize(
        _factory(model), tmp_path / "transformer", Quantize("int8-weight"), offload, dtype=torch.bfloat16
    )
    reference = _load_then_quantize(model, model.state_dict(), Quantize("int8-weight"), offload, dtype=torch.bfloat16)
    assert [type(c).__name__ for c in hookwise.applied(loaded)] == ["Quantize", "Offload"]
    bf16 = {k: v for k, v in loaded.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32}
    assert bf16 and all(v.dtype == torch.bfloat16 for v in bf16.values())
    bf16_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    assert torch.equal(output_of(loaded, bf16_inputs), output_of(reference, bf16_inputs))


def test_a_checkpoint_that_does_not_fit_is_an_error_before_the_meta_model_changes(tmp_path):
    model, _ = tiny_flux()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dropped = next(k for k in state if "to_q.weight" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "missing.safetensors"))
    with torch.device("meta"):
        empty = _factory(model)()
    with pytest.raises(ConfigError, match="keys missing"):
        hookwise.load_and_quantize(empty, tmp_path / "missing.safetensors", Quantize("nf4"))
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in empty.parameters())
    assert len(hookwise.applied(empty)) == 0 and not hookwise.list_hooks(empty)
    assert all(p.requires_grad for p in empty.parameters())  # not even the freezing stays
    save_file({**state, "extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ConfigError, match="1 unexpected"):
        hookwise.load_and_quantize(_factory(model), tmp_path / "extra.safetensors", Quantize("nf4"))
    save_file(state, str(tmp_path / "ok.safetensors"))
    with pytest.raises(ConfigError, match="needs a Quantize config"):
        hookwise.load_and_quantize(_factory(model), tmp_path / "ok.safetensors", Offload(onload_device="cpu"))
    with pytest.raises(ConfigError, match="built on meta"):
        hookwise.load_and_quantize(model, tmp_path / "ok.safetensors", Quantize("nf4"))
    with pytest.raises(ConfigError, match="do not exist"):
        hookwise.load_and_quantize(_factory(model), tmp_path / "nowhere.safetensors", Quantize("nf4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .safetensors"):
        hookwise.load_and_quantize(_factory(model), tmp_path / "empty", Quantize("nf4"))


def _sd3_checkpoint(tmp_path, drop=(), change=()):
    model, inputs = tiny_sd3()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    for key in change:
        state[key] = state[key] + 1.0
    save_file(state, str(tmp_path / "sd3.safetensors"))
    return model, inputs, tmp_path / "sd3.safetensors"


def _reads(monkeypatch):
    from hookwise.quant import save

    calls = []
    read = save._read
    monkeypatch.setattr(save, "_read", lambda entry, handle: calls.append(entry) or read(entry, handle))
    return calls


def test_a_buffer_left_on_meta_that_the_checkpoint_lacks_is_named_before_anything_is_read(tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel, WanTransformer3DModel

    # A persistent buffer (SD3's position embedding) is not a missing key of the checkpoint: it is on meta
    # because the model was built with its buffers there.
    model, _, path = _sd3_checkpoint(tmp_path, drop=("pos_embed.pos_embed",))
    with torch.device("meta"):
        empty = SD3Transformer2DModel.from_config(dict(model.config))
    reads = _reads(monkeypatch)
    with pytest.raises(ConfigError, match=r"(?s)1 buffers of the model are on meta.*'pos_embed.pos_embed'.*"
                       r"init_empty_weights\(include_buffers=False\)") as caught:  # fmt: skip
        hookwise.load_and_quantize(empty, path, Quantize("int8-weight"))
    assert "keys missing" not in str(caught.value)
    assert not reads and not hookwise.list_hooks(empty)
    assert all(t.device.type == "meta" for t in [*empty.parameters(), *empty.buffers()])
    # Non-persistent buffers (Wan's rope tables) are never in a checkpoint: the same error, before reading.
    wan, _ = tiny_wan()
    save_file({k: v.contiguous() for k, v in wan.state_dict().items()}, str(tmp_path / "wan.safetensors"))
    with torch.device("meta"):
        empty = WanTransformer3DModel.from_config(dict(wan.config))
    with pytest.raises(ConfigError, match=r"2 buffers of the model are on meta.*'rope.freqs_cos', 'rope.freqs_sin'"):
        hookwise.load_and_quantize(empty, tmp_path / "wan.safetensors", Quantize("int8-weight"))
    assert not reads and not hookwise.list_hooks(empty)
    # A checkpoint that holds the buffer fills it; a buffer built with values is read over from the checkpoint.
    with torch.device("meta"):
        empty = SD3Transformer2DModel.from_config(dict(model.config))
    model, inputs, path = _sd3_checkpoint(tmp_path, change=("pos_embed.pos_embed",))
    reference = output_of(_load_then_quantize(model, load_file(str(path)), Quantize("int8-weight")), inputs)
    for target in (empty, _factory(model)):
        loaded = hookwise.load_and_quantize(target, path, Quantize("int8-weight"))
        assert torch.equal(loaded.pos_embed.pos_embed, model.pos_embed.pos_embed + 1.0)
        assert torch.equal(output_of(loaded, inputs), reference)
