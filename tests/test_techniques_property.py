"""Every technique on random module trees (towers nested 1-4 deep in containers of every kind, fused
and split qkv, blocks reused or never called): it either works exactly (the first call gives the
plain model's output, offloading also its gradients; casting within its storage rounding) or raises
a clear hookwise error; never a silent wrong result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import hookwise
from hookwise.errors import HookwiseError
from tree_helpers import Tree, trees, x_input


def _fresh(towers):
    torch.manual_seed(0)
    model = Tree(towers)
    torch.manual_seed(1)
    return model, x_input()


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out**2).mean().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _apply_and_call(model, x, config, backward: bool):
    """(output, grads) under `config`, or None when hookwise refused with its own error."""
    try:
        hookwise.apply(model, config)
        if backward:
            return _forward_backward(model, x)
        with torch.no_grad():
            return model(x), {}
    except HookwiseError:
        return None
    finally:
        if hookwise.applied(model):
            hookwise.remove(model)


EXACT = {
    "offload-block": (lambda: hookwise.Offload(onload_device="cpu", granularity="block"), True),
    "offload-leaf": (lambda: hookwise.Offload(onload_device="cpu", granularity="leaf"), True),
    "first-block-cache": (lambda: hookwise.FirstBlockCache(), False),
    "dual-block-cache": (lambda: hookwise.DualBlockCache(), False),
    "taylorseer": (lambda: hookwise.TaylorSeer(), False),
    "pab": (lambda: hookwise.PyramidAttentionBroadcast(), False),
}

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", list(EXACT))
@SETTINGS
@given(towers=trees())
def test_each_technique_is_exact_on_its_first_call_or_refuses(name, towers):
    make, backward = EXACT[name]
    model, x = _fresh(towers)
    if backward:
        plain = _forward_backward(model, x)
    else:
        with torch.no_grad():
            plain = (model(x), {})
    got = _apply_and_call(model, x, make(), backward)
    if got is None:
        return
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    assert got[1].keys() == plain[1].keys()
    for key in plain[1]:
        torch.testing.assert_close(got[1][key], plain[1][key], rtol=0, atol=0, msg=f"gradient of {key}")
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain[0], rtol=0, atol=0, msg="after remove")


@SETTINGS
@given(towers=trees())
def test_casting_stays_within_its_storage_rounding_or_refuses(towers):
    model, x = _fresh(towers)
    with torch.no_grad():
        plain = model(x)
    got = _apply_and_call(model, x, hookwise.LayerwiseCasting(storage_dtype=torch.float8_e4m3fn), False)
    if got is None:
        return
    error = (got[0] - plain).norm() / plain.norm()
    assert error < 0.2, f"relative error {error:.3f} is more than fp8 storage explains"


@SETTINGS
@given(towers=trees())
def test_layer_skip_of_attention_only_ever_drops_attention_modules(towers):
    model, x = _fresh(towers)
    attention = {a.path for a in hookwise.describe(model, x).attention}
    try:
        hookwise.apply(model, hookwise.LayerSkip(blocks=(0,), what="attention"))
    except HookwiseError:
        return
    try:
        hooked = {path for path, names in hookwise.list_hooks(model).items() if path and names}
        with torch.no_grad():
            out = model(x)  # the first call checks the hooked targets against what ran
    except HookwiseError:
        return
    finally:
        hookwise.remove(model)
    assert hooked <= attention, f"LayerSkip dropped {sorted(hooked - attention)}, which are not attention modules that ran"
    assert torch.isfinite(out).all()
