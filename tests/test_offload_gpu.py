"""Offloading on CUDA: exact outputs and gradients, peak VRAM within the budget, the memory ordering
leaf < block(1) < block(3) < resident, and no device-wide synchronize in steady state.

Skipped without CUDA (see conftest.py). Attention runs on the math SDPA kernel so that two runs of
the same computation are bitwise reproducible and "equal" can mean equal.
"""

import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hookwise.core.outputs import sample_of
from hookwise.memory import ComponentOffload, Offload, apply_component_offload, apply_offload, offload_report
from hookwise.memory import components_on_device, remove_offload
from cache_helpers import compile_blocks
from offload_helpers import add_lora, assert_same, fwd_bwd
from model_helpers import MusubiDiT, mlp, tiny_flux, tiny_hunyuanvideo, tiny_musubi, tiny_wan

pytestmark = pytest.mark.gpu

MODELS = {"flux": tiny_flux, "wan": tiny_wan, "hunyuanvideo": tiny_hunyuanvideo, "musubi": tiny_musubi}


def cuda_inputs(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.fixture(autouse=True)
def math_attention():
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.mark.parametrize("granularity", ["block", "leaf"])
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_outputs_and_lora_gradients_equal_the_resident_model(name, granularity):
    model, inputs = MODELS[name]()
    add_lora(model)
    resident = copy.deepcopy(model).cuda()
    inputs = cuda_inputs(inputs)
    expected = fwd_bwd(resident, inputs)
    apply_offload(model, Offload(onload_device="cuda", granularity=granularity))
    for _ in range(3):
        assert_same(fwd_bwd(model, inputs), expected)
    report = offload_report(model)
    assert report.pinned_host_bytes > 0 and report.stats["prefetch_hits"] > 0
    remove_offload(model, "cuda")
    assert_same(fwd_bwd(model, inputs), expected)


@pytest.mark.parametrize("pin", ["all", "none"])
def test_cuda_disk_and_pageable_paths_are_exact(pin, tmp_path):
    model, inputs = tiny_musubi()
    add_lora(model)
    resident = copy.deepcopy(model).cuda()
    inputs = cuda_inputs(inputs)
    expected = fwd_bwd(resident, inputs)
    apply_offload(model, Offload(onload_device="cuda", granularity="block", pin=pin))
    for _ in range(3):
        assert_same(fwd_bwd(model, inputs), expected)
    disk_model, _ = tiny_musubi()
    add_lora(disk_model)
    apply_offload(disk_model, Offload(onload_device="cuda", offload_device="disk", disk_path=str(tmp_path)))
    for _ in range(3):
        assert_same(fwd_bwd(disk_model, inputs), expected)


def big_dit(depth_single=8):
    torch.manual_seed(0)
    model = MusubiDiT(dim=512, heads=8, depth=2, depth_single=depth_single).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        img=torch.randn(1, 256, 8, generator=g),
        txt=torch.randn(1, 32, 16, generator=g),
        timesteps=torch.full((1,), 0.5),
        y=torch.randn(1, 12, generator=g),
    )
    return model, cuda_inputs(inputs)


def peak_forward(model, inputs, grad=False):
    """(bytes allocated before the call, peak bytes during it), above what was allocated at the start."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.set_grad_enabled(grad):
        out = sample_of(model(**inputs), "test")
        if grad:
            out.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    return start, torch.cuda.max_memory_allocated()


def test_peak_vram_stays_within_budget_plus_activations():
    model, inputs = big_dit()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    resident = copy.deepcopy(model).cuda()
    peak_forward(resident, inputs)  # warm up kernels and the allocator
    start, peak = peak_forward(resident, inputs)
    activations = peak - start
    del resident
    torch.cuda.empty_cache()

    base = torch.cuda.memory_allocated()
    budget = weights // 2
    report = apply_offload(model, Offload(onload_device="cuda", granularity="block", vram_budget=budget))
    assert report.device_bytes <= budget
    assert torch.cuda.memory_allocated() - base <= budget
    for _ in range(3):
        _, peak = peak_forward(model, inputs)
    slack = 2 * 2**20  # allocator rounding of small tensors
    assert peak - base <= budget + activations + slack
    assert offload_report(model).stats["overflow_slots"] == 0


def test_memory_ordering_leaf_block1_block3_resident():
    peaks = {}
    for label, config in [
        ("leaf", Offload(onload_device="cuda", granularity="leaf")),
        ("block1", Offload(onload_device="cuda", granularity="block", blocks_per_group=1)),
        ("block3", Offload(onload_device="cuda", granularity="block", blocks_per_group=3)),
        ("resident", None),
    ]:
        model, inputs = big_dit()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        if config is None:
            model.cuda()
        else:
            apply_offload(model, config)
        for _ in range(2):
            _, peak = peak_forward(model, inputs)
        peaks[label] = peak - base
        del model
    assert peaks["leaf"] < peaks["block1"] < peaks["block3"] < peaks["resident"], peaks


def test_no_device_wide_synchronize_per_group_in_steady_state(monkeypatch):
    model, inputs = big_dit()
    resident = copy.deepcopy(model).cuda()
    apply_offload(model, Offload(onload_device="cuda", granularity="block", pin="all"))
    for _ in range(2):  # record the order, warm up
        peak_forward(model, inputs)
    counts = {"device": 0, "stream": 0, "event": 0}
    real = {
        "device": torch.cuda.synchronize,
        "stream": torch.cuda.Stream.synchronize,
        "event": torch.cuda.Event.synchronize,
    }

    def counting(kind):
        def call(*args, **kwargs):
            counts[kind] += 1
            return real[kind](*args, **kwargs)

        return call

    monkeypatch.setattr(torch.cuda, "synchronize", counting("device"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", counting("stream"))
    monkeypatch.setattr(torch.cuda.Event, "synchronize", counting("event"))

    def implicit_syncs(m):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.no_grad():
                    for _ in range(3):
                        m(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return len([w for w in caught if "synchroniz" in str(w.message)])

    loads = offload_report(model).stats["loads"]
    offloaded = implicit_syncs(model)
    assert offload_report(model).stats["loads"] - loads >= 3 * len(offload_report(model).streamed)  # it did stream
    assert counts == {"device": 0, "stream": 0, "event": 0}
    # Implicit synchronizations (.item(), blocking copies) are the model's own: the same count.
    assert offloaded == implicit_syncs(resident)


def test_components_only_the_active_one_holds_device_memory():
    parts = {"a": mlp(1024, 4), "b": mlp(1024, 4)}
    x = torch.randn(8, 1024, device="cuda")
    expected = {k: copy.deepcopy(v).cuda()(x) for k, v in parts.items()}
    base = torch.cuda.memory_allocated()
    apply_component_offload(parts, ComponentOffload(onload_device="cuda"))
    one = sum(p.numel() * p.element_size() for p in parts["a"].parameters())
    for name in ("a", "b", "a"):
        assert torch.equal(parts[name](x), expected[name])
        assert components_on_device(parts) == [name]
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - base < 1.5 * one


def test_full_finetune_with_offload_trainable_on_cuda():
    model, inputs = tiny_musubi()
    resident = copy.deepcopy(model).cuda()
    inputs = cuda_inputs(inputs)
    apply_offload(model, Offload(onload_device="cuda", granularity="block", offload_trainable=True))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (resident, model)]
    for _ in range(2):
        for m, opt in zip((resident, model), optimizers):
            opt.zero_grad(set_to_none=True)
            for _ in range(2):
                sample_of(m(**inputs), "test").pow(2).mean().backward()
            # The offloaded model's trainable weights and gradients are on the host for the step.
            opt.step()
    assert all(p.device.type == "cpu" for p in model.parameters())
    remove_offload(model, "cuda")
    for p, q in zip(model.parameters(), resident.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_inductor_compiled_blocks_on_streamed_cuda_weights_match_resident_compiled_blocks():
    # Both models run the same inductor kernels; only where the weights come from differs.
    torch._dynamo.reset()
    model, inputs = tiny_musubi()
    add_lora(model)
    resident = copy.deepcopy(model).cuda()
    inputs = cuda_inputs(inputs)
    for m in (resident, model):
        compile_blocks(m)
    expected = fwd_bwd(resident, inputs)
    apply_offload(model, Offload(onload_device="cuda", granularity="block"))
    for _ in range(3):
        out, grads = fwd_bwd(model, inputs)
        torch.testing.assert_close(out, expected[0])
        assert grads.keys() == expected[1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[1][name], msg=name)
    assert offload_report(model).stats["prefetch_hits"] > 0
    torch._dynamo.reset()
