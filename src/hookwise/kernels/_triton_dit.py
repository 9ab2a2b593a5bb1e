"""Triton kernels for the elementwise and row-wise DiT patterns, forward and backward.

The patterns (each an autograd function over plain tensors):

- `norm_modulate(x, weight, bias, scale, shift, eps, rms)`: RMSNorm or LayerNorm over the last
  dimension, affine or not, with the AdaLN modulation `norm(x) * (1 + scale) + shift` fused in
  (scale / shift optional, broadcast over tokens or one per token).
- `gated_residual(x, gate, y)`: `x + gate * y`, the gate broadcast like a modulation.
- `rope_interleaved(x, cos_a, sin_a, cos_b, sin_b, seq_dim)`: rotary embedding on interleaved pairs
  (FLUX / Wan layout): `out[2i] = x[2i] cos_a - x[2i+1] sin_a`, `out[2i+1] = x[2i+1] cos_b + x[2i] sin_b`.
- `rope_half(...)`: the same on the rotate-half layout: pairs `(x[i], x[i + head_dim / 2])`.
- `gelu(x, approximate)` and `geglu(h, approximate)`: GELU (tanh or erf), and `a * gelu(g)` over the
  two halves of `h`'s last dimension; `swiglu(h)`: `a * silu(g)` over the same halves.

Every kernel computes in fp32 and stores in the input dtype. They run on CUDA, and on the CPU under
Triton's interpreter (`TRITON_INTERPRET=1` set before triton is imported), which is how the tests
check them: so they avoid what the interpreter lacks (libdevice `tanh`: tanh is written from `exp`;
no scalar `.to` on eps). Reductions across rows (weight, scale and gate gradients) are left to torch
on the per-row terms the backward kernels write.

On CUDA, Liger-Kernel's RMSNorm / LayerNorm / GELU-mul functions take the plain cases they cover
(`liger_function`), when it is installed; they do not run in the interpreter, so they are tested on
CUDA only.

This module imports triton at import: import it only where the triton backend is asked for.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ELEMENTWISE_BLOCK = 1024
_ROW_ELEMENTS = 4096  # values one row-wise program holds (rows x padded width)


# ---- device functions ----------------------------------------------------------------------------
@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1), with u clamped where tanh is +-1 in fp32 already (no overflow to inf).
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_and_grad(g, APPROX_TANH: tl.constexpr):
    """(gelu(g), gelu'(g)) in fp32."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(u)
        value = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        value = g * cdf
        grad = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return value, grad


# ---- norm + modulation ---------------------------------------------------------------------------
@triton.jit
def _norm_mod_fwd(
    X, W, B, SC, SH, Y, RSTD, MEAN,
    n_rows, n_cols, tokens, mod_sb, mod_st, eps,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # ROWS rows per program: short rows (qk norms) fill it
    cols = tl.arange(0, BLOCK)
    row_ok = row < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    at_x = row[:, None] * n_cols + cols[None, :]
    x = tl.load(X + at_x, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        var = tl.sum(x * x, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = xc * rstd[:, None]
        tl.store(MEAN + row, mean, mask=row_ok)
    tl.store(RSTD + row, rstd, mask=row_ok)
    h = xhat
    if HAS_W:
        h = h * tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_MOD:
        at = ((row // tokens) * mod_sb + (row % tokens) * mod_st)[:, None] + cols[None, :]
        s = tl.load(SC + at, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SH + at, mask=mask, other=0.0).to(tl.float32)
        h = h * (1.0 + s) + sh
    tl.store(Y + at_x, h.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_mod_bwd(
    X, W, B, SC, DY, DX, GW, GS, RSTD, MEAN,
    n_rows, n_cols, tokens, mod_sb, mod_st,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
    WANT_GW: tl.constexpr, WANT_GS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = row < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    at_x = row[:, None] * n_cols + cols[None, :]
    x = tl.load(X + at_x, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + at_x, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)[:, None]
    if RMS:
        xhat = x * rstd
    else:
        xhat = tl.where(mask, x - tl.load(MEAN + row, mask=row_ok, other=0.0)[:, None], 0.0) * rstd
    dh = dy
    if HAS_MOD:
        at = ((row // tokens) * mod_sb + (row % tokens) * mod_st)[:, None] + cols[None, :]
        s = tl.load(SC + at, mask=mask, other=0.0).to(tl.float32)
        dh = dy * (1.0 + s)
        if WANT_GS:
            h = xhat
            if HAS_W:
                h = h * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                h = h + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(GS + at_x, dy * h, mask=mask)
    dxhat = dh
    if HAS_W:
        dxhat = dh * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if WANT_GW:
            tl.store(GW + at_x, dh * xhat, mask=mask)
    dxhat = tl.where(mask, dxhat, 0.0)
    proj = (tl.sum(dxhat * xhat, axis=1) / n_cols)[:, None]
    if RMS:
        dx = rstd * (dxhat - xhat * proj)
    else:
        dx = rstd * (dxhat - (tl.sum(dxhat, axis=1) / n_cols)[:, None] - xhat * proj)
    tl.store(DX + at_x, dx.to(DX.dtype.element_ty), mask=mask)


def _rows_per_program(block: int) -> int:
    """Rows one program takes: up to 16, so a program holds at most about 4096 values."""
    return max(1, min(16, _ROW_ELEMENTS // block))


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x = x.contiguous()
    n = x.shape[-1]
    return x.view(-1, n), x.numel() // n, n


def _modulation(t: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor | None, int, int, int]:
    """`t` (broadcastable to `x` as (batch, 1 or tokens, n)) as a contiguous (batch, S, n) tensor with
    its strides per batch and per token (0 where broadcast), and the tokens per batch."""
    tokens = x.shape[-2] if x.dim() >= 2 else 1
    if t is None:
        return None, 0, 0, tokens
    if t.dim() < x.dim():
        t = t.view(*([1] * (x.dim() - t.dim())), *t.shape)
    lead = x.numel() // (x.shape[-1] * tokens)
    full = t.expand(*x.shape[:-2], t.shape[-2] if t.dim() >= 2 else 1, x.shape[-1]) if x.dim() >= 2 else t
    full = full.reshape(lead, -1, x.shape[-1]).contiguous()
    per_token = full.shape[1] == tokens and tokens > 1
    if full.shape[1] not in (1, tokens):
        raise ValueError(f"modulation of shape {tuple(t.shape)} does not broadcast over tokens of {tuple(x.shape)}")
    return full, full.stride(0), full.stride(1) if per_token else 0, tokens


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`grad` summed over the dimensions `like` was broadcast along, in `like`'s shape and dtype."""
    while grad.dim() > like.dim():
        grad = grad.sum(0)
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, like.shape)) if s == 1 and g != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.to(like.dtype)


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, eps, rms):
        x2, rows, n = _rows(x)
        if (scale is None) != (shift is None):
            raise ValueError("norm_modulate needs both scale and shift, or neither")
        if scale is not None:
            scale_b, shift_b = torch.broadcast_tensors(scale, shift)
        else:
            scale_b = shift_b = None
        sc, sb, st, tokens = _modulation(scale_b, x)
        sh = _modulation(shift_b, x)[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n)
        per = _rows_per_program(block)
        _norm_mod_fwd[(triton.cdiv(rows, per),)](
            x2, weight, bias, sc, sh, y, rstd, mean, rows, n, tokens, sb, st, float(eps),
            RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=sc is not None, ROWS=per, BLOCK=block,
        )
        ctx.save_for_backward(x2, weight, bias, sc, rstd, mean)
        ctx.meta = (rms, tokens, sb, st, x.shape, scale, shift)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, sc, rstd, mean = ctx.saved_tensors
        rms, tokens, sb, st, shape, scale, shift = ctx.meta
        rows, n = x2.shape
        dy2 = dy.contiguous().view(rows, n)
        dx = torch.empty_like(x2)
        want_gw = weight is not None and ctx.needs_input_grad[1]
        want_gs = sc is not None and ctx.needs_input_grad[3]
        gw = torch.empty(rows, n, device=x2.device, dtype=torch.float32) if want_gw else None
        gs = torch.empty(rows, n, device=x2.device, dtype=torch.float32) if want_gs else None
        block = triton.next_power_of_2(n)
        per = _rows_per_program(block)
        _norm_mod_bwd[(triton.cdiv(rows, per),)](
            x2, weight, bias, sc, dy2, dx, gw, gs, rstd, mean, rows, n, tokens, sb, st,
            RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=sc is not None,
            WANT_GW=want_gw, WANT_GS=want_gs, ROWS=per, BLOCK=block,
        )
        dw = gw.sum(0).to(weight.dtype) if want_gw else None
        db = None
        if bias is not None and ctx.needs_input_grad[2]:
            dh = dy2.float() if sc is None else (dy.float() * (1 + _bcast(scale, shape).float())).view(rows, n)
            db = dh.sum(0).to(bias.dtype)
        dscale = _reduce_to(gs.view(shape), scale) if want_gs else None
        dshift = _reduce_to(dy.float(), shift) if shift is not None and ctx.needs_input_grad[4] else None
        return dx.view(shape), dw, db, dscale, dshift, None, None


def _bcast(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.expand(shape)


def norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> torch.Tensor:
    """`norm(x) [* weight + bias] [* (1 + scale) + shift]`, RMSNorm if `rms` else LayerNorm."""
    return _NormModulate.apply(x, weight, bias, scale, shift, eps, rms)


# ---- gated residual ------------------------------------------------------------------------------
@triton.jit
def _gate_kernel(X, G, Y, OUT, numel, n_cols, tokens, g_sb, g_st, HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    row = idx // n_cols
    col = idx % n_cols
    g = tl.load(G + (row // tokens) * g_sb + (row % tokens) * g_st + col, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.load(Y + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        out = out + tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + idx, out.to(OUT.dtype.element_ty), mask=mask)


def _gate_launch(x: torch.Tensor | None, gate: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    g, sb, st, tokens = _modulation(gate, like)
    y = y.contiguous()
    out = torch.empty_like(y, dtype=like.dtype)
    numel = y.numel()
    _gate_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
        x.contiguous() if x is not None else y, g, y, out, numel, y.shape[-1], tokens, sb, st,
        HAS_X=x is not None, BLOCK=_ELEMENTWISE_BLOCK,
    )
    return out


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return _gate_launch(x, gate, y, x)

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dx = dout.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dy = _gate_launch(None, gate, dout, dout).to(y.dtype) if ctx.needs_input_grad[2] else None
        dgate = _reduce_to(dout.float() * y.float(), gate) if ctx.needs_input_grad[1] else None
        return dx, dgate, dy


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y`, the gate broadcast over tokens (or one per token)."""
    return _GatedResidual.apply(x, gate, y)


# ---- rotary embedding, interleaved pairs ----------------------------------------------------------
@triton.jit
def _rope_kernel(
    X, CA, SA, CB, SB, OUT, n_rows, seq, inner, half,
    BACKWARD: tl.constexpr, HALVES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # ROWS (head) rows per program
    i = tl.arange(0, BLOCK)
    mask = (row < n_rows)[:, None] & (i < half)[None, :]
    f = (((row // inner) % seq) * half)[:, None] + i[None, :]
    base = (row * 2 * half)[:, None]
    if HALVES:  # rotate-half: the pair is (i, i + half)
        first = base + i[None, :]
        second = first + half
    else:  # interleaved: the pair is (2i, 2i + 1)
        first = base + 2 * i[None, :]
        second = first + 1
    x0 = tl.load(X + first, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(X + second, mask=mask, other=0.0).to(tl.float32)
    ca = tl.load(CA + f, mask=mask, other=0.0).to(tl.float32)
    sa = tl.load(SA + f, mask=mask, other=0.0).to(tl.float32)
    cb = tl.load(CB + f, mask=mask, other=0.0).to(tl.float32)
    sb = tl.load(SB + f, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation
        o0 = x0 * ca + x1 * sb
        o1 = x1 * cb - x0 * sa
    else:
        o0 = x0 * ca - x1 * sa
        o1 = x1 * cb + x0 * sb
    tl.store(OUT + first, o0.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + second, o1.to(OUT.dtype.element_ty), mask=mask)


def _rope_launch(x: torch.Tensor, freqs: tuple[torch.Tensor, ...], seq_dim: int, backward: bool, halves: bool) -> torch.Tensor:
    x = x.contiguous()
    d = x.shape[-1]
    seq_dim = seq_dim % x.dim()
    seq = x.shape[seq_dim]
    inner = math.prod(x.shape[seq_dim + 1 : -1])
    out = torch.empty_like(x)
    rows = x.numel() // d
    block = triton.next_power_of_2(d // 2)
    per = _rows_per_program(2 * block)
    _rope_kernel[(triton.cdiv(rows, per),)](
        x, *freqs, out, rows, seq, inner, d // 2, BACKWARD=backward, HALVES=halves, ROWS=per, BLOCK=block,
    )
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos_a, sin_a, cos_b, sin_b, seq_dim, halves):
        freqs = tuple(f.contiguous() for f in (cos_a, sin_a, cos_b, sin_b))
        ctx.save_for_backward(*freqs)
        ctx.seq_dim, ctx.halves = seq_dim, halves
        return _rope_launch(x, freqs, seq_dim, backward=False, halves=halves)

    @staticmethod
    def backward(ctx, dout):
        return _rope_launch(dout, ctx.saved_tensors, ctx.seq_dim, backward=True, halves=ctx.halves), None, None, None, None, None, None


def rope_interleaved(
    x: torch.Tensor, cos_a: torch.Tensor, sin_a: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor, seq_dim: int
) -> torch.Tensor:
    """Rotate interleaved pairs of `x`'s last dimension; the frequencies are (seq, head_dim / 2) tables
    (no gradient) indexed by `x`'s `seq_dim`."""
    return _Rope.apply(x, cos_a, sin_a, cos_b, sin_b, seq_dim, False)


def rope_half(
    x: torch.Tensor, cos_a: torch.Tensor, sin_a: torch.Tensor, cos_b: torch.Tensor, sin_b: torch.Tensor, seq_dim: int
) -> torch.Tensor:
    """Rotate the two halves of `x`'s last dimension (rotate-half layout); tables as `rope_interleaved`'s."""
    return _Rope.apply(x, cos_a, sin_a, cos_b, sin_b, seq_dim, True)


# ---- GELU and GEGLU --------------------------------------------------------------------------------
@triton.jit
def _gelu_kernel(G, A, DY, OUT, DA, numel, n_cols, GATED: tl.constexpr, BACKWARD: tl.constexpr,
                 APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr, SILU: tl.constexpr = False):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if GATED:  # h = [a | g] per row of 2 * n_cols
        at = (idx // n_cols) * 2 * n_cols + idx % n_cols
        g = tl.load(G + at + n_cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + at, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(G + idx, mask=mask, other=0.0).to(tl.float32)
        a = 1.0
    if SILU:  # silu(g) = g * sigmoid(g); silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        sig = 1.0 / (1.0 + tl.exp(-g))
        value = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    else:
        value, grad = _gelu_and_grad(g, APPROX_TANH)
    if BACKWARD:
        dy = tl.load(DY + idx, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            tl.store(DA + at, (dy * value).to(DA.dtype.element_ty), mask=mask)
            tl.store(OUT + at + n_cols, (dy * a * grad).to(OUT.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT + idx, (dy * grad).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + idx, (a * value).to(OUT.dtype.element_ty), mask=mask)


class _Gelu(torch.autograd.Function):
    """GELU, GEGLU (`approximate` "tanh" or "none") and SwiGLU (`approximate` "silu": the gate's SiLU)."""

    @staticmethod
    def forward(ctx, h, gated, approximate):
        h = h.contiguous()
        ctx.save_for_backward(h)
        ctx.meta = (gated, approximate)
        n = h.shape[-1] // 2 if gated else h.shape[-1]
        out = torch.empty(*h.shape[:-1], n, device=h.device, dtype=h.dtype)
        numel = out.numel()
        _gelu_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
            h, h, h, out, out, numel, n, GATED=gated, BACKWARD=False, APPROX_TANH=approximate == "tanh",
            BLOCK=_ELEMENTWISE_BLOCK, SILU=approximate == "silu",
        )
        return out

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        gated, approximate = ctx.meta
        dy = dy.contiguous()
        dh = torch.empty_like(h)
        numel = dy.numel()
        _gelu_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
            h, h, dy, dh, dh, numel, dy.shape[-1], GATED=gated, BACKWARD=True, APPROX_TANH=approximate == "tanh",
            BLOCK=_ELEMENTWISE_BLOCK, SILU=approximate == "silu",
        )
        return dh, None, None


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU, `approximate` "tanh" or "none" (erf)."""
    return _Gelu.apply(x, False, approximate)


def geglu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`a * gelu(g)` for `a, g = h.chunk(2, -1)`."""
    return _Gelu.apply(h, True, approximate)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`a * silu(g)` for `a, g = h.chunk(2, -1)`."""
    return _Gelu.apply(h, True, "silu")


# ---- Liger-Kernel on CUDA ---------------------------------------------------------------------------
def liger_function(op: str):
    """Liger-Kernel's function for the plain case of `op` ("rms_norm", "layer_norm", "gelu_mul"), or None
    where Liger-Kernel is not installed."""
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction as fn
        elif op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction as fn
        elif op == "gelu_mul":
            from liger_kernel.ops.geglu import LigerGELUMulFunction as fn
        else:
            return None
    except ImportError:
        return None
    return fn
