"""The storage format of layerwise casting: quantize a weight once, dequantize it at every use.

A stored weight is `storage_dtype` values plus, for the scaled modes, a scale in the compute dtype
(one per tensor, per output channel, or per `block` input columns of each output channel).
Dequantizing is `stored.to(dtype) * scale`, broadcast per mode.

Eagerly that is two kernels and a compute-dtype temporary: on a GPU it moves 7 bytes per weight
element (read 1, write 2; read 2, write 2) before the matmul reads the weight. A `Dequantizer` that
uses generated kernels (on CUDA with Triton by default, on every device with `fused=True`) runs the
same expression through `torch.compile` instead: one kernel (Triton on CUDA, C++ on the CPU) that
reads 1 byte and writes 2. The values are the same bit for bit (both
round the fp32 product of an exactly representable stored value and a compute-dtype scale once),
so the choice changes speed only.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch

try:
    from torch.utils._triton import has_triton
except ImportError:  # pragma: no cover - a torch without it
    has_triton = None

logger = logging.getLogger("hookwise.memory.casting")


@dataclass(frozen=True)
class Layout:
    """How one leaf's weight is stored (the scaling actually used: block may fall back to channel)."""

    scaling: str
    shape: tuple[int, ...]
    block: int = 0

    def scale_shape(self) -> tuple[int, ...]:
        out, rest = self.shape[0], self.shape[1:]
        if self.scaling == "tensor":
            return ()
        if self.scaling == "channel":
            return (out, *([1] * len(rest)))
        if self.scaling == "block":
            return (out, rest[0] // self.block)
        return ()


def quantize(
    weight: torch.Tensor, storage_dtype: torch.dtype, scaling: str, block: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, Layout]:
    """(stored weight, scale or None, layout). Scales are rounded to `scale_dtype` before use."""
    shape = tuple(weight.shape)
    fmax = torch.finfo(storage_dtype).max
    if scaling == "block" and (weight.dim() != 2 or shape[1] % block != 0):
        scaling = "channel"  # the width does not divide into blocks (or a conv): one scale per output channel
    layout = Layout(scaling, shape, block if scaling == "block" else 0)
    if scaling == "none":
        return weight.detach().clamp(-fmax, fmax).to(storage_dtype), None, layout
    w = weight.detach().float()
    if scaling == "tensor":
        amax = w.abs().amax()
    elif scaling == "channel":
        amax = w.abs().flatten(1).amax(1).view(layout.scale_shape())
    else:
        amax = w.view(shape[0], shape[1] // block, block).abs().amax(-1)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).to(scale_dtype)
    if layout.scaling == "block":
        scaled = w.view(shape[0], shape[1] // block, block) / scale.float().unsqueeze(-1)
        stored = scaled.clamp(-fmax, fmax).to(storage_dtype).view(shape)
    else:
        stored = (w / scale.float()).clamp(-fmax, fmax).to(storage_dtype)
    return stored, scale, layout


# The three expressions, shared by the eager and the generated path.
def _cast(storage: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return storage.to(dtype)


def _scaled(storage: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return storage.to(dtype) * scale.to(dtype)


def _blocks(storage: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    out, n = scale.shape
    return (storage.to(dtype).view(out, n, block) * scale.to(dtype).unsqueeze(-1)).view(storage.shape)


def _expression(
    storage: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, layout: Layout
) -> tuple[Callable[..., torch.Tensor], tuple]:
    if scale is None:
        return _cast, (storage, dtype)
    if layout.scaling == "block":
        return _blocks, (storage, scale, dtype, layout.block)
    return _scaled, (storage, scale, dtype)


def dequantize(storage: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, layout: Layout) -> torch.Tensor:
    """The compute-dtype weight, with eager ops."""
    fn, args = _expression(storage, scale, dtype, layout)
    return fn(*args)


_GENERATED: dict[tuple, Callable[..., torch.Tensor]] = {}  # compiled lazily, once per key


def _generated(fn: Callable[..., torch.Tensor], storage: torch.Tensor, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The compiled `fn` for this storage dtype, compute dtype and device (and shape, on the CPU)."""
    # On the CPU, inductor vectorizes fixed shapes far better than symbolic ones (3 ms vs 27 ms for a
    # block-scaled 3072 x 3072 weight here), so each weight shape gets a kernel of its own; a
    # Triton kernel serves every size equally well, so on CUDA one kernel serves all shapes.
    static = storage.device.type == "cpu"
    key = (fn, storage.dtype, dtype, storage.device.type, tuple(storage.shape) if static else None)
    compiled = _GENERATED.get(key)
    if compiled is None:
        # A copy of `fn` with a code object of its own: dynamo keeps a bounded number of compiled
        # variants per code object and then silently runs it uncompiled, so a process that mixes
        # dtypes, devices or shapes must not share one.
        tag = "_".join(str(v).removeprefix("torch.") for v in key[1:4])
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name)
        compiled = _GENERATED[key] = torch.compile(copy, dynamic=not static, fullgraph=True)
    return compiled


class Dequantizer:
    """Dequantizes the stored weights of one application of casting: generated kernels or eager ops.

    `fused`: True (kernels on every device), False (eager ops), None (kernels on CUDA with Triton).
    The choice is made per call from the weight's device, so a model cast on the CPU and streamed
    to a GPU by offloading gets the kernels where it computes. The first failure to generate a
    kernel on a device type (no compiler there, a backend error) is logged once and the eager ops
    take over there. Inside a graph that is being compiled, the eager expression is traced instead:
    the surrounding compilation fuses it.
    """

    def __init__(self, fused: bool | None) -> None:
        self.fused = fused
        self.failed: dict[str, str] = {}  # device type -> why generating a kernel failed there
        self._use: dict[str, bool] = {}

    def uses_kernels(self, device: torch.device) -> bool:
        """Whether weights on `device` are dequantized by generated kernels."""
        use = self._use.get(device.type)
        if use is None:
            use = self._use[device.type] = self.fused is not False and (bool(self.fused) or fused_available(device))
        return use

    def __call__(self, storage: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, layout: Layout) -> torch.Tensor:
        fn, args = _expression(storage, scale, dtype, layout)
        if not torch.compiler.is_compiling() and self.uses_kernels(storage.device):
            # Plain tensors: dynamo keeps the shapes of Parameters static, which would defeat the
            # dynamic-shape kernels on CUDA (one compile per shape).
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            try:
                return _generated(fn, storage, dtype)(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager ops give the same values
                kind = storage.device.type
                self._use[kind] = False
                self.failed[kind] = f"{type(exc).__name__}: {_first_line(exc)}"
                logger.warning(
                    "hookwise casting: could not generate the fused dequantize kernel on %s (%s); using eager ops "
                    "there (same values, more memory traffic). Pass fused=False to skip the attempt",
                    kind, self.failed[kind],
                )
        return fn(*args)


def probe_fused(device: torch.device, storage_dtype: torch.dtype, compute_dtype: torch.dtype, block: int) -> str | None:
    """Generate (and so cache) the kernels on `device`; None if that worked, else why it did not."""
    try:
        gen = torch.Generator().manual_seed(0)
        storage = torch.randn(4, 2 * block, generator=gen).to(device=device, dtype=storage_dtype)
        scales = (torch.rand(4, 2, generator=gen) + 0.5).to(device=device, dtype=compute_dtype)
        for fn, args in (
            (_cast, (storage, compute_dtype)),
            (_scaled, (storage, scales[:, :1].contiguous(), compute_dtype)),
            (_blocks, (storage, scales, compute_dtype, block)),
        ):
            if not torch.equal(_generated(fn, storage, compute_dtype)(*args), fn(*args)):
                return f"the generated {fn.__name__.strip('_')} kernel disagrees with the eager ops"
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who decides
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def fused_available(device: torch.device) -> bool:
    """Whether `fused=None` turns fusion on for weights on `device` (CUDA with Triton)."""
    if device.type != "cuda":
        return False
    return has_triton is not None and bool(has_triton())


def dequant_linear_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of x, grad of bias) of `x @ dequant(W).T + b` for an autograd function that saved the
    stored weight and its scale: the input's gradient in the gradient's dtype from the weight
    dequantized again (no full-precision weight was kept), the weight itself frozen."""
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        storage, scale = ctx.saved_tensors
        weight = ctx.dequant(storage, scale, grad_out.dtype, ctx.layout)
        grad_x = grad_out.matmul(weight).to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_bias
