"""GGUF block formats and their dequantization in torch ops (any device, vectorized, no `gguf` needed).

A GGUF quantized tensor is a uint8 array of shape `(*rows, bytes_per_row)`: each row of the weight
(its last, input dimension) is a run of fixed-size blocks, each block `block_size` weights stored in
`type_size` bytes. The formats are ggml's (`ggml-quants.c`); the arithmetic below follows the `gguf`
package's numpy `dequantize` step by step (scales widened from fp16 to fp32, the same products in the
same order, in fp32), so the values are bit-identical to it, then rounded once to the compute dtype.

Legacy types (block of 32): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. K-quants (super-block of 256 in 8 or 16
sub-blocks with packed scales): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. F32 / F16 / BF16 are plain and load as
ordinary weights; BF16 arrives as raw bytes from the reader and is viewed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError

QK_K = 256


@dataclass(frozen=True)
class GGUFType:
    """One GGUF tensor type: its ggml id, weights per block and bytes per block."""

    name: str
    id: int
    block_size: int
    type_size: int

    @property
    def quantized(self) -> bool:
        return self.name not in PLAIN

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


# ggml ids (gguf.GGMLQuantizationType values); kept here so that dequantizing needs no `gguf` import.
TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", 0, 1, 4),
        GGUFType("F16", 1, 1, 2),
        GGUFType("Q4_0", 2, 32, 18),
        GGUFType("Q4_1", 3, 32, 20),
        GGUFType("Q5_0", 6, 32, 22),
        GGUFType("Q5_1", 7, 32, 24),
        GGUFType("Q8_0", 8, 32, 34),
        GGUFType("Q2_K", 10, QK_K, 84),
        GGUFType("Q3_K", 11, QK_K, 110),
        GGUFType("Q4_K", 12, QK_K, 144),
        GGUFType("Q5_K", 13, QK_K, 176),
        GGUFType("Q6_K", 14, QK_K, 210),
        GGUFType("BF16", 30, 1, 2),
    )
}
PLAIN = ("F32", "F16", "BF16")
TYPES_BY_ID = {t.id: t for t in TYPES.values()}


def gguf_type(name: str) -> GGUFType:
    """The GGUF type called `name` ("Q4_K", "q8_0"); a clear error for one hookwise cannot dequantize."""
    t = TYPES.get(str(name).upper())
    if t is None:
        raise ConfigError(
            f"GGUF tensor type {name!r} is not supported; hookwise reads {sorted(TYPES)} "
            f"(requantize the file to one of them, e.g. with llama.cpp's llama-quantize)"
        )
    return t


# ---- per-type block dequantization: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ----
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block (little-endian fp16) as an fp32 column."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _shifted(b: torch.Tensor, shifts: tuple[int, ...], groups: int, width: int) -> torch.Tensor:
    """`b` reshaped to (n, groups, 1, width) and shifted right by each of `shifts` (a new axis 2)."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).reshape(1, 1, len(shifts), 1)
    return b.reshape(b.shape[0], groups, 1, width) >> s


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """Low nibbles then high nibbles of each run of `half` bytes (the legacy 32-weight layout)."""
    return (_shifted(qs, (0, 4), qs.shape[1] // half, half) & 0x0F).reshape(qs.shape[0], -1)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of each row of bytes, least significant first (a little-endian word)."""
    n = qh.shape[0]
    s = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 1, 8)
    return ((qh.reshape(n, -1, 1) >> s) & 1).reshape(n, -1)[:, :count]


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d, x = _f16(b[:, :2]), b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).to(torch.float32)
    return (d * q) + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    qh = _bits(b[:, 2:6], 32)
    q = (_nibbles(b[:, 6:], 16) | (qh << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qh = _bits(b[:, 4:8], 32)
    q = (_nibbles(b[:, 8:], 16) | (qh << 4)).to(torch.float32)
    return (d * q) + m


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (_shifted(qs, (0, 2, 4, 6), 2, 32) & 3).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    low = _shifted(scales[:, :8].contiguous(), (0, 4), 1, 8).reshape(n, 16)
    high = _shifted(scales[:, 8:].contiguous(), (0, 2, 4, 6), 1, 4).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = _shifted(qs, (0, 2, 4, 6), 2, 32).reshape(n, 16, 16) & 3
    qh = _shifted(hmask, tuple(range(8)), 1, 32).reshape(n, 16, 16) & 1
    qh = qh ^ 1  # a set mask bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    q = (_shifted(b[:, 16:], (0, 4), 4, 32) & 0x0F).reshape(n, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    ql = (_shifted(b[:, 48:], (0, 4), 4, 32) & 0x0F).reshape(n, -1, 32)
    qh = (_shifted(b[:, 16:48], tuple(range(8)), 1, 32) & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = (_shifted(ql, (0, 4), 2, 64) & 0x0F).reshape(n, -1, 32)
    high = (_shifted(qh, (0, 2, 4, 6), 2, 32) & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, -1).to(torch.float32)).reshape(n, QK_K)


_BLOCKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
QUANTIZED = tuple(_BLOCKS)


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype` from its GGUF bytes `raw` (uint8, any shape holding them in order).

    Computed in fp32 as the `gguf` package does, then rounded once to `dtype`.
    """
    t = gguf_type(type_name)
    if t.name in PLAIN:
        plain = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.name]
        return raw.contiguous().view(plain).reshape(shape).to(dtype)
    blocks = raw.contiguous().reshape(-1, t.type_size)
    return _BLOCKS[t.name](blocks).to(dtype).reshape(shape)


def byte_shape(shape: tuple[int, ...], type_name: str) -> tuple[int, ...]:
    """The uint8 shape that holds a weight of `shape` in `type_name`: rows of whole blocks."""
    t = gguf_type(type_name)
    if shape[-1] % t.block_size:
        raise ConfigError(
            f"a weight of shape {tuple(shape)} cannot be stored in {t.name}: its last dimension ({shape[-1]}) is not "
            f"a multiple of the block size {t.block_size}"
        )
    return (*shape[:-1], shape[-1] // t.block_size * t.type_size)
