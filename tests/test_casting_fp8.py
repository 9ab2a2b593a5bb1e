"""Layerwise casting's fp8 compute path (`compute="fp8"`): the same stored weights as the upcast path, the
matmul in fp8 with activations quantized per row or per tensor, outputs within the stated bound of the
upcast path's, training through it, a clear error where fp8 matmul is missing, and its cost."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hookwise
from hookwise.core.cost import CostContext, Placement
from hookwise.core.outputs import sample_of
from hookwise.core.techniques import technique_named
from hookwise.errors import ConfigError, HookError
from hookwise.introspect import describe
from hookwise.memory import LayerwiseCasting, Offload, casting_summary
from hookwise.memory import _fp8
from hookwise.memory._dequant import dequantize, quantize
from hookwise.memory._fp8 import activation_error_bound, fp8_linear
from hookwise.plan.footprint import footprint_from_map
from hookwise.plan.job import Job
from model_helpers import output_of, tiny_flux, tiny_wan
from offload_helpers import add_lora
from tree_helpers import Tree, x_input

MODELS = {"flux": tiny_flux, "wan": tiny_wan}
ODD = [
    (["holder", "dict"], "list", ["split", "fused", "split"], [0, 0, 2]),
    (["list"], "seq", ["fused-softmax", "fused"], [0, 1]),
]
WHOLE_MODEL_BOUND = 0.02  # relative L2 between the two paths' outputs of a whole model (measured: < 0.01)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(compute="fp8"), "scaling='channel'"),  # the default block scaling
        (dict(compute="fp8", scaling="channel", storage_dtype=torch.bfloat16), "float8_e4m3fn"),
        (dict(compute="fp8", scaling="channel", activation_scaling="block"), "activation_scaling"),
        (dict(activation_scaling="row"), "only with compute='fp8'"),
        (dict(compute="int8"), "compute='int8'"),
    ],
)
def test_bad_fp8_compute_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LayerwiseCasting(**kwargs)


def test_both_paths_store_the_same_values():
    stored = []
    for compute in ("upcast", "fp8"):
        model, _ = tiny_flux()
        hookwise.apply(model, LayerwiseCasting(scaling="channel", compute=compute))
        stored.append(model.state_dict())
        assert casting_summary(model)["compute"] == compute
    assert stored[0].keys() == stored[1].keys()
    assert all(torch.equal(stored[0][k], stored[1][k]) for k in stored[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_scaling", ["channel", "tensor", "none"])
@pytest.mark.parametrize("activation_scaling", ["row", "tensor"])
@pytest.mark.parametrize(("k", "n"), [(23, 37), (64, 48), (5, 1)])
def test_one_layer_is_within_the_stated_bound_of_the_upcast_path(dtype, weight_scaling, activation_scaling, k, n):
    g = torch.Generator().manual_seed(k * n)
    weight = torch.randn(n, k, generator=g) * 0.2
    x = (torch.randn(2, 3, k, generator=g) * torch.logspace(-3, 1, k)).to(dtype)  # columns of very different size
    x[0, 1] = 0  # an all-zero row
    bias = torch.randn(n, generator=g).to(dtype)
    storage, scale, layout = quantize(weight, torch.float8_e4m3fn, weight_scaling, 64, dtype)
    deq = dequantize(storage, scale, dtype, layout)
    upcast = nn.functional.linear(x, deq, bias)
    fp8 = fp8_linear(x, storage, scale, bias, dtype, layout, activation_scaling)
    assert fp8.dtype == dtype and fp8.shape == upcast.shape
    bound = activation_error_bound(x, deq, activation_scaling)
    # Rounding of the outputs on top: each path rounds y to `dtype` once (and the upcast path sums in it).
    eps = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    slack = eps * (upcast.float().abs() + bound) + 1e-6
    assert ((fp8.float() - upcast.float()).abs() <= bound + slack).all()
    assert torch.equal(fp8[0, 1], (bias.float() + 0 * fp8[0, 1].float()).to(dtype).expand_as(fp8[0, 1]))
    # K and N padded to a multiple of 16 (what CUDA needs) give the same values.
    padded = fp8_linear(x, storage, scale, bias, dtype, layout, activation_scaling, multiple=16)
    assert torch.allclose(padded.float(), fp8.float(), rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("activation_scaling", ["row", "tensor"])
def test_whole_models_are_within_the_stated_bound_and_offloading_changes_nothing(name, activation_scaling):
    outputs = {}
    for compute in ("upcast", "fp8"):
        model, inputs = MODELS[name]()
        extra = {"activation_scaling": activation_scaling} if compute == "fp8" else {}
        hookwise.apply(model, LayerwiseCasting(scaling="channel", compute=compute, **extra))
        with torch.no_grad():
            outputs[compute] = output_of(model, inputs)
    plain, inputs = MODELS[name]()
    with torch.no_grad():
        exact = output_of(plain, inputs)
    assert _rel(outputs["fp8"], outputs["upcast"]) < WHOLE_MODEL_BOUND
    assert _rel(outputs["fp8"], exact) < WHOLE_MODEL_BOUND + _rel(outputs["upcast"], exact)
    offloaded, _ = MODELS[name]()
    hookwise.apply(offloaded, LayerwiseCasting(scaling="channel", compute="fp8", activation_scaling=activation_scaling),
                   Offload(onload_device="cpu", granularity="block"))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(output_of(offloaded, inputs), outputs["fp8"])


def test_odd_shapes_take_the_fp8_path_within_the_bound():
    outputs = {}
    for compute in ("upcast", "fp8"):
        torch.manual_seed(0)
        model = Tree(ODD).eval()
        hookwise.apply(model, LayerwiseCasting(scaling="tensor", compute=compute, skip="none"))
        assert len(casting_summary(model)["cast"]) > 10
        torch.manual_seed(1)
        with torch.no_grad():
            outputs[compute] = model(x_input())
    assert _rel(outputs["fp8"], outputs["upcast"]) < WHOLE_MODEL_BOUND


def test_the_input_gradient_is_the_upcast_paths_and_lora_trains_through_fp8():
    model, inputs = tiny_flux()
    add_lora(model, ["to_q", "to_k", "to_v"])
    ref, _ = tiny_flux()
    add_lora(ref, ["to_q", "to_k", "to_v"])
    hookwise.apply(model, LayerwiseCasting(scaling="channel", compute="fp8"))
    hookwise.apply(ref, LayerwiseCasting(scaling="channel"))
    layer = "transformer_blocks.0.ff.net.2"
    for m in (model, ref):
        x = torch.randn(3, m.get_submodule(layer).in_features, requires_grad=True, generator=torch.Generator().manual_seed(0))
        grad_out = torch.randn(3, m.get_submodule(layer).out_features, generator=torch.Generator().manual_seed(1))
        m.get_submodule(layer)(x).backward(grad_out)
        m.grad_x = x.grad
    assert torch.equal(model.grad_x, ref.grad_x)  # the compute dtype, from the dequantized weight
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = sample_of(model(**inputs), "test").float().pow(2).mean()
        loss.backward()
        assert all(p.grad is not None for p in params)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_device_without_fp8_matmul_is_a_clear_error_at_apply_and_nothing_changes(monkeypatch):
    monkeypatch.setitem(_fp8._PROBED, "cpu", "RuntimeError: no fp8 kernel here (simulated)")
    model, inputs = tiny_flux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="compute='upcast'") as info:
        hookwise.apply(model, LayerwiseCasting(scaling="channel", compute="fp8"))
    assert "simulated" in str(info.value) and "8.9" in str(info.value)
    assert hookwise.core.list_hooks(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hookwise.apply(model, LayerwiseCasting(scaling="channel"))  # the upcast path needs no fp8 matmul


def test_weights_computed_on_a_device_without_fp8_matmul_raise_a_hook_error(monkeypatch):
    model, inputs = tiny_flux()
    hookwise.apply(model, LayerwiseCasting(scaling="channel", compute="fp8"))
    monkeypatch.setitem(_fp8._PROBED, "cpu", "RuntimeError: simulated")
    with pytest.raises(HookError, match="compute='upcast'"), torch.no_grad():
        output_of(model, inputs)


def test_the_cost_declares_the_fp8_compute_factor_and_quality():
    model, _ = tiny_flux()
    fp = footprint_from_map(describe(model))
    cost = technique_named("casting").cost
    effects = {}
    for device in ("cpu", "cuda"):
        ctx = CostContext(SimpleNamespace(vram=0, pinned_limit=0, device=device), Job(), 0, 0)
        upcast = cost.effect(Placement.resident(fp), LayerwiseCasting(scaling="channel"), ctx)
        fp8 = cost.effect(Placement.resident(fp), LayerwiseCasting(scaling="channel", compute="fp8"), ctx)
        assert fp8.device_bytes == upcast.device_bytes  # one storage format
        assert "fp8 compute" in fp8.quality[-1]
        effects[device] = (upcast, fp8)
    assert effects["cuda"][1].compute_factor < effects["cuda"][0].compute_factor
    assert effects["cpu"][1].compute_factor > 0


def test_the_planners_fake_run_takes_the_fp8_path():
    from hookwise.plan.peak import estimate_peak

    model, _ = tiny_flux()
    job = Job(height=64, width=64, text_len=24)
    report = estimate_peak(model, job, compute_device="cpu", attention_backend="math",
                           stack=[LayerwiseCasting(scaling="channel", compute="fp8")])  # fmt: skip
    assert report.method == "fake"
