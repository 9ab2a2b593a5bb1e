"""GGUF: dequantization per type, loading a .gguf file into a model, the kernels, and bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as np_dequantize  # noqa: E402
from gguf.quants import quantize as np_quantize  # noqa: E402

from hookwise.quant import _gguf_dequant as dq  # noqa: E402

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Where each type keeps its fp16 scales (byte offsets in a block): K-quant blocks generated at random
# get finite scales there, so that every value is a number the comparison can check.
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random valid raw GGUF blocks of a K-quant type (random bits, finite fp16 scales)."""
    t = dq.TYPES[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * blocks_per_row, t.type_size), dtype=np.uint8)
    for offset in _F16_FIELDS[type_name]:
        scale = rng.uniform(-0.05, 0.05, rows * blocks_per_row).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * t.type_size)


def legacy_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np_quantize(rng.standard_normal((rows, cols)).astype(np.float32), GGMLQuantizationType[type_name])


def raw_for(type_name: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    if type_name in LEGACY:
        return legacy_blocks(type_name, rows, blocks * 32, seed)
    return random_blocks(type_name, rows, blocks, seed)


@pytest.mark.parametrize("type_name", LEGACY + K_QUANTS)
def test_torch_dequantization_is_bit_identical_to_the_gguf_package(type_name):
    t = dq.TYPES[type_name]
    raw = raw_for(type_name, rows=6, blocks=3)
    expected = np_dequantize(raw, GGMLQuantizationType[type_name])
    shape = (6, 3 * t.block_size)
    got = dq.dequantize(torch.from_numpy(raw), type_name, shape, torch.float32)
    assert got.shape == shape and got.dtype == torch.float32
    assert np.isfinite(expected).all()
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("type_name", ("Q8_0", "Q4_K"))
def test_dequantization_rounds_once_to_the_compute_dtype(type_name):
    raw = torch.from_numpy(raw_for(type_name, rows=2, blocks=2))
    t = dq.TYPES[type_name]
    full = dq.dequantize(raw, type_name, (2, 2 * t.block_size), torch.float32)
    half = dq.dequantize(raw, type_name, (2, 2 * t.block_size), torch.bfloat16)
    assert torch.equal(half, full.to(torch.bfloat16))


def test_plain_types_are_viewed_not_converted():
    w = torch.randn(3, 8)
    for name, dtype in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        raw = w.to(dtype).view(torch.uint8)
        assert torch.equal(dq.dequantize(raw, name, (3, 8), torch.float32), w.to(dtype).float())


def test_an_unsupported_type_is_a_clear_error():
    from hookwise.errors import ConfigError

    with pytest.raises(ConfigError, match="IQ2_XXS.*not supported.*Q4_K"):
        dq.gguf_type("IQ2_XXS")
    with pytest.raises(ConfigError, match="not a multiple of the block size 32"):
        dq.byte_shape((4, 48), "Q8_0")
