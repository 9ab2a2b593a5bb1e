"""The fp8 compute path of layerwise casting: a Linear's matmul in fp8 on its stored weight.

Casting stores a weight as fp8 values with a scale per tensor or per output channel (`_dequant.py`).
The upcast path dequantizes that weight to the compute dtype and multiplies there. This path keeps
the stored values as they are and quantizes the *activation* instead, dynamically at every call:

    x (M x K, compute dtype) -> x_q = round_e4m3(x / s_x),  s_x = amax / 448  (per row or per tensor)
    y = (x_q @ W_q^T) * s_x * s_w + b        (torch._scaled_mm: fp8 inputs, float32 accumulation)

So both paths read the same stored weight and scales; they differ only in the rounding of the
activation to e4m3 (3 mantissa bits: a relative error of at most 2^-4 per element, or 2^-10 * s_x
in e4m3's subnormal range) and in where the sums are rounded. Per output element that bounds the
difference of the two paths by

    |y_fp8 - y_upcast| <= sum_k |W[n, k]| * (2^-4 |x[m, k]| + 2^-10 s_x[m])  +  rounding of y

(`activation_error_bound`). Block scales (one per 64 input columns) sit inside the sum over the
columns, which an fp8 matmul does in one go: this path takes tensor or channel scales only.

`torch._scaled_mm` runs on the CPU (any shape, row-major x, column-major W^T, float32 scales) and on
CUDA GPUs with fp8 tensor cores (compute capability 8.9+), where K and N must be multiples of 16
(both are padded with zeros here when they are not: zeros add nothing to the sums) and row-wise
scales take a bfloat16 output (other outputs get unit scales and the scales applied after, in
float32). Whether a device runs it at all is probed once per device (`fp8_matmul_failure`).

Backward (LoRA training through a cast base): the gradient with respect to the input is computed in
the compute dtype from the dequantized weight, as on the upcast path; nothing but the stored
weight and its scale is saved for it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ._dequant import Layout, dequant_linear_backward

ACTIVATION_DTYPE = torch.float8_e4m3fn  # activations are quantized to e4m3 (the more precise fp8 format)
ACTIVATION_SCALINGS = ("row", "tensor")
FP8_WEIGHTS = (torch.float8_e4m3fn, torch.float8_e5m2)  # the stored formats torch._scaled_mm multiplies
SCALINGS = ("tensor", "channel", "none")  # weight scalings the fp8 matmul can apply
_FMAX = torch.finfo(ACTIVATION_DTYPE).max
_REL = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest
_SUBNORMAL = 2.0**-10  # half the spacing of e4m3's subnormals (2^-9), in units of the scale
_CUDA_MULTIPLE = 16  # torch._scaled_mm on CUDA: K and N divisible by 16

_PROBED: dict[str, str | None] = {}  # device -> why it cannot run fp8 matmul (None: it can)


def quantize_activation(x2d: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale: (M, 1) per row or () per tensor) of a 2-D activation."""
    xf = x2d.float()
    amax = xf.abs().amax(dim=1, keepdim=True) if scaling == "row" else xf.abs().amax()
    scale = torch.where(amax > 0, amax / _FMAX, torch.ones_like(amax))
    return (xf / scale).clamp(-_FMAX, _FMAX).to(ACTIVATION_DTYPE), scale


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if rows == 0 and cols == 0:
        return t
    # F.pad has no fp8 kernel: pad the bytes.
    return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)


def fp8_linear(
    x: torch.Tensor, storage: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
    compute_dtype: torch.dtype, layout: Layout, activation_scaling: str, multiple: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """y = x @ dequant(W).T + b with the matmul in fp8 (see the module docstring); y in `compute_dtype`.

    `multiple`: pad K and N to a multiple of it (default: 16 on CUDA, none elsewhere)."""
    n, k = storage.shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    xq, sx = quantize_activation(x2d, activation_scaling)
    if scale is None:
        sw = torch.ones((), dtype=torch.float32, device=storage.device)
    elif layout.scaling == "channel":
        sw = scale.float().reshape(1, n)
    else:
        sw = scale.float().reshape(())
    rowwise = sx.dim() == 2 or sw.dim() == 2
    step = multiple if multiple is not None else (_CUDA_MULTIPLE if storage.device.type == "cuda" else 1)
    pad_k, pad_n = -k % step, -n % step
    xq = _pad(xq, 0, pad_k)
    wq = _pad(storage, pad_n, pad_k)
    if pad_n and sw.dim() == 2:
        sw = F.pad(sw, (0, pad_n), value=1.0)
    native = not rowwise or storage.device.type != "cuda" or compute_dtype == torch.bfloat16
    if native:
        if rowwise:  # row-wise scaling takes both scales row-wise: (M, 1) and (1, N)
            sx = sx.reshape(-1, 1).expand(m, 1).contiguous()
            sw = sw.reshape(1, -1).expand(1, n + pad_n).contiguous()
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=compute_dtype)
    else:
        one = torch.ones((), dtype=torch.float32, device=storage.device)
        y = torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = (y * sx * sw).to(compute_dtype)
    if pad_n:
        y = y[:, :n]
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.reshape(*lead, n)


def activation_error_bound(x: torch.Tensor, weight: torch.Tensor, activation_scaling: str) -> torch.Tensor:
    """The bound on |y_fp8 - y_upcast| per output element from quantizing the activation (float32;
    `weight` the dequantized weight). The rounding of y itself comes on top."""
    k = weight.shape[1]
    x2d = x.reshape(-1, k).float()
    _, sx = quantize_activation(x2d, activation_scaling)
    per_x = _REL * x2d.abs() + _SUBNORMAL * sx
    return (per_x @ weight.float().abs().t()).reshape(*x.shape[:-1], weight.shape[0])


def fp8_matmul_failure(device: torch.device) -> str | None:
    """Why `device` cannot run an fp8 matmul (`torch._scaled_mm`), or None when it can; probed once."""
    key = str(device)
    if device.type == "meta":
        return None
    if key not in _PROBED:
        try:
            with unset_fake_temporarily():  # probe the real device, also inside the planner's fake run
                a = torch.ones(16, 16, device=device).to(ACTIVATION_DTYPE)
                one = torch.ones((), dtype=torch.float32, device=device)
                out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
                ok = bool((out == 16).all())
            _PROBED[key] = None if ok else "torch._scaled_mm gave wrong values"
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who raises
            text = str(exc).strip().splitlines()
            _PROBED[key] = f"{type(exc).__name__}: {text[0] if text else ''}"
    return _PROBED[key]


class Fp8LinearFn(torch.autograd.Function):
    """y = x @ dequant(W).T + b with the matmul in fp8, saving only the stored weight and its scale."""

    @staticmethod
    def forward(ctx: Any, x, storage, scale, bias, compute_dtype, layout, dequant, activation_scaling):
        ctx.layout, ctx.x_dtype, ctx.dequant = layout, x.dtype, dequant
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(storage, scale)
        return fp8_linear(x, storage, scale, bias, compute_dtype, layout, activation_scaling)

    @staticmethod
    def backward(ctx: Any, grad_out):
        # In the compute dtype from the dequantized weight, as the upcast path does.
        grad_x, grad_bias = dequant_linear_backward(ctx, grad_out)
        return grad_x, None, None, grad_bias, None, None, None, None

