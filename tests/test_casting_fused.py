"""Fused dequantization: the generated kernel gives the eager ops' values bit for bit, in forward and
backward, under an outer compile, and falls back (or refuses, when asked for) with a clear message.

On the CPU the kernels are C++ from inductor; `fused=True` asks for them here (the default turns
fusion on for CUDA only). Each test counts dynamo's compiled frames, so a silent fall back to the
uncompiled function would fail it.
"""

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import hookwise
from hookwise.core.outputs import sample_of
from hookwise.errors import ConfigError
from hookwise.memory import LayerwiseCasting, casting_summary
from hookwise.memory import _dequant as dequant_mod
from cache_helpers import compile_blocks, one_thread  # noqa: F401 - the fixture
from offload_helpers import add_lora, fwd_bwd
from model_helpers import tiny_musubi


pytestmark = pytest.mark.usefixtures("one_thread")


def compiled_frames() -> int:
    return counters["stats"]["unique_graphs"]


def conv_weight(shape, dtype):
    w = torch.randn(shape) / shape[1] ** 0.5
    w[:2] *= 8
    return w.to(dtype)


@pytest.mark.parametrize(
    "storage,compute",
    [
        (torch.float8_e4m3fn, torch.bfloat16),
        (torch.float8_e5m2, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
    ids=lambda d: str(d).removeprefix("torch."),
)
def test_generated_kernels_give_the_eager_values_bit_for_bit(storage, compute):
    torch.manual_seed(0)
    deq = dequant_mod.Dequantizer(True)
    shapes = [(96, 128), (24, 12, 3, 3)]  # blocks of 64; a conv (per channel)
    before = compiled_frames()
    for scaling in ("none", "tensor", "channel", "block"):
        for shape in shapes:
            w = conv_weight(shape, compute)
            stored, scale, layout = dequant_mod.quantize(w, storage, scaling, 64, compute)
            fused = deq(stored, scale, compute, layout)
            eager = dequant_mod.dequantize(stored, scale, compute, layout)
            assert fused.dtype == eager.dtype == compute and fused.shape == w.shape
            assert torch.equal(fused, eager), (scaling, shape, (fused.float() - eager.float()).abs().max())
    assert deq.fused  # no fall back happened
    assert compiled_frames() > before


def test_fused_cast_model_trains_with_the_eager_values_and_gradients():
    model, inputs = tiny_musubi()
    add_lora(model)
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(fused=False))
    hookwise.apply(model, LayerwiseCasting(fused=True))
    assert casting_summary(model)["fused"] is True and casting_summary(eager)["fused"] is False
    expected = fwd_bwd(eager, inputs)
    for _ in range(2):
        out, grads = fwd_bwd(model, inputs)
        assert torch.equal(out, expected[0])
        assert grads.keys() == expected[1].keys() and grads
        assert all(torch.equal(grads[k], expected[1][k]) for k in grads)
    assert casting_summary(model)["fused_failed"] == {}


def test_fused_kernels_read_offloaded_weights_in_their_slots():
    # Streamed groups sit at offsets of a shared uint8 slot; the kernels read those views.
    from hookwise import Offload

    model, inputs = tiny_musubi()
    add_lora(model)
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(fused=False))
    expected = fwd_bwd(eager, inputs)
    hookwise.apply(model, LayerwiseCasting(fused=True), Offload(onload_device="cpu", granularity="block"))
    for _ in range(2):
        out, grads = fwd_bwd(model, inputs)
        assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], expected[1][k]) for k in expected[1])
    assert casting_summary(model)["fused_failed"] == {}
    assert hookwise.offload_report(model).stats["loads"] > 0


def test_default_is_eager_off_cuda_and_compiles_nothing():
    model, inputs = tiny_musubi()
    before = compiled_frames()
    hookwise.apply(model, LayerwiseCasting())
    sample_of(model(**inputs), "test")
    assert casting_summary(model)["fused"] is None
    assert compiled_frames() == before


def test_the_choice_is_made_per_device_where_the_weight_is_used(monkeypatch):
    # A model cast on the CPU and streamed to a GPU by offloading gets the kernels on the GPU.
    monkeypatch.setattr(dequant_mod, "fused_available", lambda device: device.type == "cuda")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto, on, off = (dequant_mod.Dequantizer(f) for f in (None, True, False))
    assert [auto.uses_kernels(cuda), auto.uses_kernels(cpu)] == [True, False]
    assert [on.uses_kernels(cuda), on.uses_kernels(cpu)] == [True, True]
    assert [off.uses_kernels(cuda), off.uses_kernels(cpu)] == [False, False]


def test_fused_true_where_kernels_cannot_be_generated_raises_and_applies_nothing(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found")

    monkeypatch.setattr(dequant_mod, "_generated", no_compiler)
    model, _ = tiny_musubi()
    before = {n: p.dtype for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"fused=True.*no working C\+\+ compiler.*fused=None"):
        hookwise.apply(model, LayerwiseCasting(fused=True))
    assert {n: p.dtype for n, p in model.named_parameters()} == before
    assert casting_summary(model)["cast"] == []


def test_a_kernel_that_fails_later_falls_back_to_eager_ops_with_one_warning(monkeypatch, caplog):
    model, inputs = tiny_musubi()
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(fused=False))
    hookwise.apply(model, LayerwiseCasting(fused=True))

    def broken(*args, **kwargs):
        raise RuntimeError("backend failed for this shape")

    monkeypatch.setattr(dequant_mod, "_generated", broken)
    with caplog.at_level(logging.WARNING, logger="hookwise.memory.casting"):
        for _ in range(2):
            assert torch.equal(sample_of(model(**inputs), "test"), sample_of(eager(**inputs), "test"))
    warned = [r for r in caplog.records if "fused dequantize" in r.getMessage()]
    assert len(warned) == 1 and "backend failed for this shape" in warned[0].getMessage()
    assert "backend failed for this shape" in casting_summary(model)["fused_failed"]["cpu"]


def test_fused_under_compiled_blocks_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, inputs = tiny_musubi()
    add_lora(model)
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(fused=False))
    expected = fwd_bwd(eager, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, backend=counter)
    hookwise.apply(model, LayerwiseCasting(fused=True))
    out, grads = fwd_bwd(model, inputs)
    assert counter.frame_count > 0  # the blocks' graphs hold the traced expression
    assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], expected[1][k]) for k in expected[1])
    torch._dynamo.reset()


def test_fused_must_be_none_or_a_bool():
    with pytest.raises(ConfigError, match="fused='yes'"):
        LayerwiseCasting(fused="yes")


@pytest.mark.gpu
def test_default_on_cuda_generates_kernels_with_the_eager_values_forward_and_backward():
    model, inputs = tiny_musubi()
    add_lora(model)
    model = model.cuda().to(torch.bfloat16)
    inputs = {k: v.cuda().to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    eager = copy.deepcopy(model)
    hookwise.apply(eager, LayerwiseCasting(fused=False))
    hookwise.apply(model, LayerwiseCasting())
    expected = fwd_bwd(eager, inputs)
    before = compiled_frames()
    out, grads = fwd_bwd(model, inputs)  # backward runs on autograd's device thread
    assert compiled_frames() > before
    assert torch.equal(out, expected[0])
    assert all(torch.equal(grads[k], expected[1][k]) for k in expected[1])
    assert casting_summary(model)["fused_failed"] == {}

