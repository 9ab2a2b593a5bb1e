"""The numerics check of Kernels' sites: a fused forward against the module's own, outputs and gradients.

- `check_site`: at apply, on inputs of the module's real widths, dtype and device (2 x 8 tokens) built
  by its kind's `example` (the module sites of `_patterns.py`, the blocks and processors of `_inline.py`).
- `check_call`: for the structural route (`_structural.py`), at a block's first call of each call
  signature, on the first sample of that call's real inputs (all of them where a slice does not run).

Both compare with `TOLERANCE`: the largest absolute difference at most `rtol` times the largest
absolute eager value, per compute dtype, for the outputs and for the gradients of the inputs and the
module's trainable parameters. Either returns None, or why the fused forward is not to be used.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._inline import INLINE_KINDS
from ._patterns import KINDS

# rtol per compute dtype: max |fused - eager| <= rtol * max |eager|, for outputs and each gradient.
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
ALL_KINDS = {**KINDS, **INLINE_KINDS}


def module_dtype_device(module: nn.Module, fallback: tuple[torch.dtype, torch.device]) -> tuple[torch.dtype, torch.device]:
    for p in module.parameters():
        if p.is_floating_point() and p.dtype.itemsize >= 2 and p.numel():
            return p.dtype, p.device
    return fallback


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _worst(fused: list[torch.Tensor], eager: list[torch.Tensor], rtol: float, what: str) -> str | None:
    for i, (a, b) in enumerate(zip(fused, eager)):
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            return f"{what} {i} differs in shape or dtype ({_desc(a)} vs eager {_desc(b)})"
        scale = b.float().abs().max().item() if b.numel() else 0.0
        diff = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
        if not diff <= rtol * max(scale, 1e-6):  # also catches nan
            return f"{what} {i} differs from eager by {diff:.3g} (bound {rtol:g} x {scale:.3g})"
    return None


def _desc(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _compare(module: nn.Module, eager: Callable[..., Any], fused: Callable[..., Any], args: tuple, kwargs: dict,
             dtype: torch.dtype, mark: bool = True) -> str | None:  # fmt: skip
    """None if `fused(*args, **kwargs)` matches `eager(...)` in outputs and gradients (of the top-level
    floating tensor arguments, or with `mark=False` of those that require one, and of the module's
    trainable parameters) within `TOLERANCE`, else why not."""
    rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    # Gradients for the top-level tensor arguments; tensors inside tuples (rotary tables) are constants.
    top = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
    inputs = [t.requires_grad_() for t in top if t.is_floating_point()] if mark else [t for t in top if t.requires_grad]
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        devices = sorted({t.device.index for t in top if t.device.type == "cuda"} - {None})
        with torch.random.fork_rng(devices=devices):
            state = torch.random.get_rng_state()
            eager_out = _tensors(eager(*args, **kwargs))
            torch.random.set_rng_state(state)
            fused_out = _tensors(fused(*args, **kwargs))
        why = _worst(fused_out, eager_out, rtol, "output")
        if why:
            return why
        grad_of = [t for t in eager_out if t.requires_grad]
        if not grad_of or torch.is_inference_mode_enabled():
            return None
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(t.shape, generator=gen).to(t) for t in grad_of]
        wrt = inputs + params
        eager_g = torch.autograd.grad(grad_of, wrt, cotangents, allow_unused=True)
        fused_g = torch.autograd.grad([t for t in fused_out if t.requires_grad], wrt, cotangents, allow_unused=True)
    return _worst(list(fused_g), list(eager_g), rtol, "gradient")


def _failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_site(module: nn.Module, kind: str, ops: dict[str, Callable[..., torch.Tensor]], dtype: torch.dtype,
               device: torch.device) -> str | None:
    """None if the fused forward of `module` matches its own forward within `TOLERANCE`, else why not."""
    spec = ALL_KINDS[kind]
    try:
        args, kwargs = spec.example(module, dtype, device)
        return _compare(module, partial(type(module).forward, module), partial(spec.forward, module, ops), args, kwargs, dtype)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is a reason not to use it
        return _failure(exc)


def _inputs_like(args: tuple, kwargs: dict, sample: bool) -> tuple[tuple, dict]:
    """Detached copies of a call's tensors (the first sample of the batch where `sample`). A copy takes a
    gradient where its tensor had one, and where it is an activation (batched like the first tensor
    argument, batch > 1); tables without one (rotary embeddings) stay constants, as in the call."""
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()), None)
    batch = first.shape[0] if first is not None else 0

    def copy(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        batched = t.dim() >= 2 and t.shape[0] == batch > 1
        grad = t.is_floating_point() and (t.requires_grad or batched)
        if sample and batched:
            t = t[:1]
        return t.detach().clone().requires_grad_(grad)

    return pytree.tree_map(copy, (args, kwargs))


def check_call(module: nn.Module, fused: Callable[..., Any], args: tuple, kwargs: dict) -> str | None:
    """The structural route's check at a block's first call of a signature: the rewritten forward
    against the block's own on the first sample of the real inputs (all of them where that fails)."""
    dtype, _ = module_dtype_device(module, (torch.float32, torch.device("cpu")))
    eager = partial(type(module).forward, module)
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()), None)
    tries = (True, False) if first is not None and first.shape[0] > 1 else (False,)
    why = None
    for sample in tries:
        try:
            return _compare(module, eager, fused, *_inputs_like(args, kwargs, sample), dtype, mark=False)
        except torch.OutOfMemoryError:
            # Unlike the check at apply, this one runs inside the user's forward: no memory for it means
            # the block keeps its own forward (said in the summary), not a failed call.
            return "out of memory while checking on the first sample; the block runs its own forward"
        except Exception as exc:  # noqa: BLE001 - the slice may not run; the whole call then
            why = _failure(exc)
    return why
