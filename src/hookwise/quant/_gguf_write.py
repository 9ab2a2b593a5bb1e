"""Quantizing float arrays to GGUF blocks and writing GGUF files (the machinery of `save_gguf`).

The `gguf` package (0.19) quantizes the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) from numpy but
only dequantizes the K-quants. The K-quant quantizers here (Q4_K, Q5_K, Q6_K) write the super-block
layouts that the package's `dequantize` (and `_gguf_dequant.py`) read, with a straightforward search:

- Q4_K / Q5_K (256 weights = 8 sub-blocks of 32; `w = d*sc[j]*q - dmin*m[j]`, q of 4 / 5 bits, sc and
  m of 6 bits): per sub-block, the offset is its minimum (clamped to <= 0), rounded on the fp16
  `dmin / 63` grid; the step is the smallest on the fp16 `d / 63` grid that covers the sub-block's
  maximum above that offset (scales rounded up, so nothing above the range is clipped).
- Q6_K (256 weights = 16 sub-blocks of 16; `w = d*sc[j]*(q - 32)`, q of 6 bits, sc int8): per
  sub-block the step is the smallest on the fp16 `d / 127` grid that holds its largest magnitude in 31
  steps.

Then each weight is rounded to the nearest level. Bound (tested): every weight is within half its
sub-block's step of its value (and, for Q4_K / Q5_K, within half of `dmin`'s fp16 value below the offset).
This is not llama.cpp's optimised search (`make_qkx2_quants` / `make_qx_quants` try candidate scales
and minimise a weighted squared error), so the error is somewhat larger than a llama-quantize file of
the same type; the format is the same, and any GGUF reader loads the result.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ..errors import ConfigError, require
from ._gguf_dequant import QK_K, TYPES, gguf_type

K_QUANTIZED = ("Q4_K", "Q5_K", "Q6_K")
LEGACY_QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
WRITABLE = (*LEGACY_QUANTIZED, *K_QUANTIZED)


def _f16_up(x: np.ndarray) -> np.ndarray:
    """`x` (float32, >= 0) rounded to an fp16 value >= x (so a grid built on it covers x)."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (an all-zero sub-block)."""
    out = np.zeros(np.broadcast(a, b).shape, np.float32)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _scale_min_q(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: (d, dmin) fp16 per block, (sc, m) 6-bit per sub-block, q per weight."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    low = np.minimum(x.min(axis=-1), 0.0)  # (n, 8): the offset is subtracted, so it is <= 0
    dmin = _f16_up((-low).max(axis=-1, keepdims=True) / 63)
    dmin32 = dmin.astype(np.float32)
    m = np.clip(np.rint(_div(-low, dmin32)), 0, 63).astype(np.uint8)
    offset = dmin32 * m.astype(np.float32)  # what dequantization subtracts, in fp32 as it computes it
    need = np.maximum(x.max(axis=-1) + offset, 0.0) / levels  # the step that covers the sub-block
    d = _f16_up(need.max(axis=-1, keepdims=True) / 63)
    d32 = d.astype(np.float32)
    sc = np.clip(np.ceil(_div(need, d32)), 0, 63).astype(np.uint8)
    step = d32 * sc.astype(np.float32)
    q = np.clip(np.rint(_div(x + offset[..., None], step[..., None])), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q.reshape(n, QK_K)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins in 12 bytes (the inverse of `get_scale_min`)."""
    lo_d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    lo_m = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    mixed = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo_d, lo_m, mixed], axis=-1).astype(np.uint8)


def _nibble_pairs(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2i (low nibbles) and 2i+1 (high nibbles) of 32 weights in 32 bytes each."""
    n = q.shape[0]
    low4 = (q & 0x0F).reshape(n, 4, 2, 32)
    return (low4[:, :, 0] | (low4[:, :, 1] << 4)).reshape(n, 128)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_q(blocks, 15)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scale_min(sc, m), _nibble_pairs(q)], axis=-1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_q(blocks, 31)
    n = q.shape[0]
    high = ((q >> 4) & 1).reshape(n, 8, 32)
    qh = np.zeros((n, 32), np.uint8)
    for j in range(8):  # sub-block j's fifth bit is bit j of each byte
        qh |= high[:, j] << j
    parts = [d.view(np.uint8), dmin.view(np.uint8), _pack_scale_min(sc, m), qh, _nibble_pairs(q)]
    return np.concatenate(parts, axis=-1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    need = np.abs(x).max(axis=-1) / 31  # (n, 16): the largest magnitude in 31 steps
    d = _f16_up(need.max(axis=-1, keepdims=True) / 127)
    d32 = d.astype(np.float32)
    sc = np.clip(np.ceil(_div(need, d32)), 0, 127).astype(np.int8)
    step = d32 * sc.astype(np.float32)
    q = (np.clip(np.rint(_div(x, step[..., None])), -32, 31) + 32).astype(np.uint8).reshape(n, QK_K)
    low4 = (q & 0x0F).reshape(n, 2, 2, 64)
    ql = (low4[:, :, 0] | (low4[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=-1)


_K = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """`values` (float, last dimension a multiple of the type's block) as GGUF blocks: uint8 of shape
    `(*rows, bytes_per_row)`, what a GGUF file stores for it. K-quants by hookwise, legacy types by `gguf`."""
    t = gguf_type(type_name)
    if t.name not in WRITABLE:
        raise ConfigError(f"hookwise writes GGUF types {list(WRITABLE)}, not {t.name}")
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0 or values.shape[-1] % t.block_size:
        raise ConfigError(
            f"an array of shape {values.shape} cannot be stored in {t.name}: its last dimension is not a multiple "
            f"of the block size {t.block_size}"
        )
    if not np.isfinite(values).all():
        raise ConfigError(f"an array of shape {values.shape} holds inf or NaN values, which {t.name} cannot store")
    if t.name in _K:
        blocks = _K[t.name](values.reshape(-1, t.block_size))
        return blocks.reshape(*values.shape[:-1], values.shape[-1] // t.block_size * t.type_size)
    gguf = require("gguf", "gguf", "writing GGUF files")
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[t.name])


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray | tuple[np.ndarray, str]], arch: str) -> None:
    """A GGUF file of `tensors`: {name: float array (F32 / F16), or (uint8 blocks, type name)}."""
    gguf = require("gguf", "gguf", "writing GGUF files")
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        for name, value in tensors.items():
            if isinstance(value, tuple):
                raw, type_name = value
                writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[TYPES[type_name].name])
            else:
                writer.add_tensor(name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
