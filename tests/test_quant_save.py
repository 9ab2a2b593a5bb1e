"""save_quantized / load_quantized: the stored tensors and the stack round-trip exactly, loading never
materialises the full-precision weights, and the rest of a saved stack is applied again."""

from __future__ import annotations

import json

import pytest
import torch

import hookwise
from hookwise import Offload, Quantize
from hookwise.errors import ConfigError
from hookwise.plan._peak_tracker import StorageTracker

from cache_helpers import one_thread  # noqa: F401
from model_helpers import output_of, tiny_flux

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = Quantize("nf4", modules={r"\.ff\.": "int8-weight", r"to_out": "int8"})


def _factory(model):
    from diffusers import FluxTransformer2DModel

    config = dict(model.config)
    return lambda: FluxTransformer2DModel.from_config(config).eval()


def _saved(tmp_path, *configs):
    model, inputs = tiny_flux()
    model.requires_grad_(False)
    hookwise.apply(model, *configs)
    expected = output_of(model, inputs)
    hookwise.save_quantized(model, tmp_path / "q")
    return model, inputs, expected


def test_round_trip_is_exact_and_loading_peaks_at_the_saved_bytes(tmp_path):
    model, inputs, expected = _saved(tmp_path, MIXED)
    saved_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    full_bytes = sum(p.numel() * 4 for p in tiny_flux()[0].parameters())
    with StorageTracker() as tracker:
        loaded = hookwise.load_quantized(tmp_path / "q", _factory(model))
    # every byte allocated on the host while loading is a tensor of the file: no fp32 weight was built
    assert tracker.peak_bytes("cpu") == saved_bytes < 0.6 * full_bytes
    assert torch.equal(output_of(loaded, inputs), expected)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert hookwise.applied(loaded) == hookwise.applied(model)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_model_built_on_meta_loads_and_the_rest_of_the_stack_is_applied_again(tmp_path):
    model, inputs, expected = _saved(tmp_path, MIXED, Offload(onload_device="cpu", granularity="block"))
    stack = json.loads((tmp_path / "q" / "stack.json").read_text())
    assert [t["technique"] for t in stack["techniques"]] == ["quantization", "offload"]
    with torch.device("meta"):
        empty = _factory(model)()
    loaded = hookwise.load_quantized(tmp_path / "q", empty)
    assert loaded is empty
    assert hookwise.applied(loaded).names() == ["quantization", "offload"]
    assert torch.equal(output_of(loaded, inputs), expected)
    assert hookwise.offload_report(loaded).stats["loads"] > 0


def test_keep_original_is_not_saved_and_a_loaded_model_removes_lossily(tmp_path):
    model, inputs, expected = _saved(tmp_path, Quantize("int8-weight", keep_original=True))
    loaded = hookwise.load_quantized(tmp_path / "q", _factory(model))
    assert hookwise.applied(loaded).configs[0].keep_original is False
    with pytest.warns(UserWarning, match="rounding stays"):
        hookwise.remove(loaded)
    torch.testing.assert_close(output_of(loaded, inputs), expected, rtol=1e-4, atol=1e-5)


def test_saving_an_unquantized_model_or_loading_a_wrong_folder_is_a_clear_error(tmp_path):
    model, inputs = tiny_flux()
    with pytest.raises(ConfigError, match="no quantization is applied"):
        hookwise.save_quantized(model, tmp_path / "plain")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        hookwise.load_quantized(tmp_path / "nothing", _factory(model))
    _saved(tmp_path, Quantize("nf4"))
    from diffusers import FluxTransformer2DModel

    other = dict(model.config, num_layers=2)
    with pytest.raises(ConfigError, match="does not fit"):
        hookwise.load_quantized(tmp_path / "q", lambda: FluxTransformer2DModel.from_config(other))


def test_a_loaded_model_holds_its_own_copies_not_the_files_pages(tmp_path):
    # load_quantized reads each tensor (no memory map): overwriting the file afterwards changes nothing.
    model, inputs, expected = _saved(tmp_path, Quantize("int8-weight"))
    loaded = hookwise.load_quantized(tmp_path / "q", _factory(model))
    path = tmp_path / "q" / "model.safetensors"
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(b"\x00" * (path.stat().st_size - header))
    assert torch.equal(output_of(loaded, inputs), expected)


def test_a_file_whose_shapes_differ_is_refused_before_any_tensor_is_assigned(tmp_path):
    model, inputs, expected = _saved(tmp_path, Quantize("int8-weight"))
    from diffusers import FluxTransformer2DModel

    other = dict(model.config, joint_attention_dim=model.config.joint_attention_dim * 2)
    with torch.device("meta"):
        empty = FluxTransformer2DModel.from_config(other).eval()
    with pytest.raises(ConfigError, match=r"1 shapes differ .*context_embedder.weight"):
        hookwise.load_quantized(tmp_path / "q", empty)
    assert all(t.device.type == "meta" for t in empty.parameters())
    assert not hookwise.applied(empty).names()


def test_a_buffer_left_on_meta_is_named_before_any_tensor_is_read(tmp_path, monkeypatch):
    # Wan's rope tables are non-persistent: no saved file holds them, so a model built under
    # torch.device("meta") cannot be filled; the error says how to build it, before anything is read.
    from model_helpers import tiny_wan

    model, _ = tiny_wan()
    model.requires_grad_(False)
    hookwise.apply(model, Quantize("int8-weight"))
    hookwise.save_quantized(model, tmp_path / "q")
    with torch.device("meta"):
        bare = type(model).from_config(model.config).eval()
    from hookwise.quant import save

    monkeypatch.setattr(save, "_read", lambda *a: pytest.fail("a tensor was read before the check"))
    with pytest.raises(ConfigError, match=r"2 buffers of the model are on meta.*'rope.freqs_cos'.*include_buffers=False"):
        hookwise.load_quantized(tmp_path / "q", bare)
    assert not hookwise.list_hooks(bare) and all(t.is_meta for t in [*bare.parameters(), *bare.buffers()])
