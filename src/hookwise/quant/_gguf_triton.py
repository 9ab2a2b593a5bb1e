"""Triton kernels that dequantize GGUF blocks on CUDA: one program per run of blocks, one kernel per type.

Each output element reads the bytes its block holds for it (a nibble, a high bit, a packed scale)
and computes in fp32 exactly as the torch ops of `_gguf_dequant.py` do, the same products in the
same order; kernels are compiled without fused multiply-add so that GPU results keep that rounding.
The values equal the torch ops' (tested on the CPU under `TRITON_INTERPRET=1`, on CUDA when present).
Imported only where Triton is installed; `available()` says whether the kernels can run here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gguf_dequant import dequantize as torch_dequantize
from ._gguf_dequant import gguf_type

SUPPORTED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_BLOCKS_PER_PROGRAM = {32: 32, 256: 4}


def available() -> bool:
    """Whether the kernels can run: on CUDA, or anywhere under the Triton interpreter."""
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _byte(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(ptr, offs, mask):
    """The little-endian fp16 at byte `offs`, as fp32."""
    bits = _byte(ptr, offs, mask) | (_byte(ptr, offs + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _signed(b):
    return tl.where(b >= 128, b - 256, b)


@triton.jit
def _dequant_kernel(
    raw_ptr, out_ptr, n_blocks,
    KIND: tl.constexpr, TYPE_SIZE: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr, OUT_BF16: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blk = pid * NB + tl.arange(0, NB)[:, None]  # (NB, 1) block indices
    j = tl.arange(0, BS)[None, :]  # (1, BS) element index within a block
    mask = (blk < n_blocks) & (j >= 0)
    base = blk.to(tl.int64) * TYPE_SIZE
    if KIND == 0:  # Q8_0
        d = _half(raw_ptr, base, mask)
        x = _signed(_byte(raw_ptr, base + 2 + j, mask)).to(tl.float32)
        y = x * d
    elif KIND == 1:  # Q4_0
        d = _half(raw_ptr, base, mask)
        q = (_byte(raw_ptr, base + 2 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        y = d * (q - 8).to(tl.float32)
    elif KIND == 2:  # Q4_1
        d = _half(raw_ptr, base, mask)
        m = _half(raw_ptr, base + 2, mask)
        q = (_byte(raw_ptr, base + 4 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        y = (d * q.to(tl.float32)) + m
    elif KIND == 3:  # Q5_0
        d = _half(raw_ptr, base, mask)
        qh = (_byte(raw_ptr, base + 2 + j // 8, mask) >> (j % 8)) & 1
        ql = (_byte(raw_ptr, base + 6 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        y = d * ((ql | (qh << 4)) - 16).to(tl.float32)
    elif KIND == 4:  # Q5_1
        d = _half(raw_ptr, base, mask)
        m = _half(raw_ptr, base + 2, mask)
        qh = (_byte(raw_ptr, base + 4 + j // 8, mask) >> (j % 8)) & 1
        ql = (_byte(raw_ptr, base + 8 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        y = (d * (ql | (qh << 4)).to(tl.float32)) + m
    elif KIND == 5:  # Q2_K: scales[16], qs[64], d, dmin
        s = j // 16
        sc = _byte(raw_ptr, base + s, mask)
        d = _half(raw_ptr, base + 80, mask)
        dmin = _half(raw_ptr, base + 82, mask)
        dl = d * (sc & 0x0F).to(tl.float32)
        ml = dmin * (sc >> 4).to(tl.float32)
        q = (_byte(raw_ptr, base + 16 + (j // 128) * 32 + (j % 32), mask) >> (((j % 128) // 32) * 2)) & 3
        y = dl * q.to(tl.float32) - ml
    elif KIND == 6:  # Q3_K: hmask[32], qs[64], scales[12], d
        s = j // 16
        low = (_byte(raw_ptr, base + 96 + (s % 8), mask) >> ((s // 8) * 4)) & 0x0F
        high = (_byte(raw_ptr, base + 104 + (s % 4), mask) >> ((s // 4) * 2)) & 0x03
        sc = (low | (high << 4)) - 32
        d = _half(raw_ptr, base + 108, mask)
        dl = d * sc.to(tl.float32)
        ql = (_byte(raw_ptr, base + 32 + (j // 128) * 32 + (j % 32), mask) >> (((j % 128) // 32) * 2)) & 3
        qh = ((_byte(raw_ptr, base + (j % 32), mask) >> (j // 32)) & 1) ^ 1
        y = dl * (ql - (qh << 2)).to(tl.float32)
    elif KIND == 7 or KIND == 8:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32],) qs[128]
        s = j // 32
        lo = s % 4
        a = _byte(raw_ptr, base + 4 + lo, mask)  # scales[s % 4]
        b = _byte(raw_ptr, base + 8 + lo, mask)  # scales[4 + s % 4]
        c = _byte(raw_ptr, base + 12 + lo, mask)  # scales[8 + s % 4]
        first = s < 4
        sc = tl.where(first, a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(first, b & 0x3F, (c >> 4) | ((b >> 2) & 0x30))
        d = _half(raw_ptr, base, mask) * sc.to(tl.float32)
        dm = _half(raw_ptr, base + 2, mask) * mn.to(tl.float32)
        qs_at = 16 + 32 * (KIND - 7)  # Q5_K's high bits come first
        q = (_byte(raw_ptr, base + qs_at + (j // 64) * 32 + (j % 32), mask) >> ((s % 2) * 4)) & 0x0F
        if KIND == 8:
            q = q | (((_byte(raw_ptr, base + 16 + (j % 32), mask) >> s) & 1) << 4)
        y = d * q.to(tl.float32) - dm
    else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d
        h = j // 128
        ql = (_byte(raw_ptr, base + h * 64 + (j % 64), mask) >> (((j % 128) // 64) * 4)) & 0x0F
        qh = (_byte(raw_ptr, base + 128 + h * 32 + (j % 32), mask) >> (((j % 128) // 32) * 2)) & 0x03
        sc = _signed(_byte(raw_ptr, base + 192 + j // 16, mask)).to(tl.float32)
        d = _half(raw_ptr, base + 208, mask) * sc
        y = d * ((ql | (qh << 4)) - 32).to(tl.float32)
    if OUT_BF16:
        # Round to nearest even by hand: every backend (the interpreter's included) then agrees with torch.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + blk.to(tl.int64) * BS + j, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + blk.to(tl.int64) * BS + j, y.to(out_ptr.dtype.element_ty), mask=mask)


_KIND = {name: i for i, name in enumerate(SUPPORTED)}


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype` from its GGUF bytes, by a Triton kernel (same values as the torch ops)."""
    t = gguf_type(type_name)
    if type_name not in _KIND:
        return torch_dequantize(raw, type_name, shape, dtype)
    raw = raw.contiguous()
    n_blocks = raw.numel() // t.type_size
    # Computed in fp32 and rounded once to `dtype` on store (round to nearest even, as torch's .to()).
    out = torch.empty(n_blocks * t.block_size, dtype=dtype, device=raw.device)
    nb = _BLOCKS_PER_PROGRAM[t.block_size]
    _dequant_kernel[(triton.cdiv(n_blocks, nb),)](
        raw, out, n_blocks, KIND=_KIND[type_name], TYPE_SIZE=t.type_size, BS=t.block_size, NB=nb,
        OUT_BF16=dtype == torch.bfloat16, enable_fp_fusion=False,
    )  # fmt: skip
    return out.reshape(shape)
