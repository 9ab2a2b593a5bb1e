"""hookwise's GGUF writer: K-quant quantizers (Q4_K, Q5_K, Q6_K) and `save_gguf`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as np_dequantize  # noqa: E402

import hookwise  # noqa: E402
from hookwise.errors import ConfigError, NoTargetError  # noqa: E402
from hookwise.quant import _gguf_dequant as dq  # noqa: E402
from hookwise.quant._gguf_write import K_QUANTIZED, quantize  # noqa: E402
from model_helpers import MusubiDiT  # noqa: E402


def awkward_rows(seed: int = 0) -> np.ndarray:
    """Rows of 4 super-blocks: Gaussian, with an all-zero, an all-positive, an all-negative, a constant,
    an outlier and a tiny-valued super-block among them."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((24, 1024)) * 0.05).astype(np.float32)
    x[0, :256] = 0.0
    x[1, :256] = np.abs(x[1, :256])
    x[2, :256] = -np.abs(x[2, :256])
    x[3, :256] = 0.7
    x[4, 17] = 3.0
    x[5, :256] *= 1e-4
    x[6, :32] = 0.0  # one sub-block of zeros beside non-zero ones
    return x


@pytest.mark.parametrize("type_name", K_QUANTIZED)
def test_k_quant_blocks_dequantize_bit_identically_in_the_gguf_package_and_in_hookwise(type_name):
    x = awkward_rows()
    raw = quantize(x, type_name)
    t = dq.TYPES[type_name]
    assert raw.dtype == np.uint8 and raw.shape == (24, 1024 // t.block_size * t.type_size)
    theirs = np_dequantize(raw, GGMLQuantizationType[type_name])
    ours = dq.dequantize(torch.from_numpy(raw), type_name, x.shape, torch.float32).numpy()
    assert np.isfinite(theirs).all()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def _steps(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per weight: the step of its sub-block and the fp16 `dmin` of its super-block (0 for Q6_K), read
    back from the blocks as the dequantization reads them."""
    t = dq.TYPES[type_name]
    b = raw.reshape(-1, t.type_size)
    if type_name == "Q6_K":
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        step = d * b[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16) sub-blocks of 16
        return np.repeat(np.abs(step), 16, axis=1), np.zeros((b.shape[0], 256), np.float32)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, _ = dq._k_scale_min(torch.from_numpy(b[:, 4:16].copy()))
    step = d * sc.numpy().astype(np.float32)  # (n, 8) sub-blocks of 32
    return np.repeat(step, 32, axis=1), np.repeat(dmin, 256, axis=1)


# Relative RMS error on Gaussian weights (measured 0.079 / 0.039 / 0.020; the bounds leave room for
# seeds, not for a wrong level: one bit less would double them).
RELATIVE_RMS = {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.023}


@pytest.mark.parametrize("type_name", K_QUANTIZED)
def test_k_quant_round_trip_error_is_within_half_a_step_of_each_sub_block(type_name):
    x = awkward_rows(seed=1)
    raw = quantize(x, type_name)
    back = np_dequantize(raw, GGMLQuantizationType[type_name])
    step, dmin = _steps(raw, type_name)
    err = np.abs(back - x).reshape(-1, 256)
    bound = 0.5 * np.maximum(step, dmin) * (1 + 1e-5) + 1e-7 * np.abs(x).reshape(-1, 256) + 1e-12
    assert (err <= bound).all(), f"worst excess {np.max(err - bound)}"
    assert np.array_equal(back[0, :256], np.zeros(256, np.float32))  # zeros stay exact
    assert np.allclose(back[3, :256], 0.7, rtol=1e-3)
    gaussian = x[8:]
    rel = np.sqrt(((back[8:] - gaussian) ** 2).mean() / (gaussian**2).mean())
    assert rel <= RELATIVE_RMS[type_name]


def test_k_quants_are_finer_the_more_bits_they_have():
    x = awkward_rows(seed=2)[8:]
    errors = [np.abs(np_dequantize(quantize(x, t), GGMLQuantizationType[t]) - x).mean() for t in K_QUANTIZED]
    assert errors[0] > errors[1] > errors[2]


def test_quantizing_a_width_that_is_not_whole_super_blocks_or_a_non_finite_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a multiple of the block size 256"):
        quantize(np.zeros((2, 320), np.float32), "Q4_K")
    bad = np.zeros((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ConfigError, match="inf or NaN"):
        quantize(bad, "Q6_K")
    with pytest.raises(ConfigError, match="writes GGUF types"):
        quantize(np.zeros((1, 256), np.float32), "Q2_K")


def wide_dit() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = MusubiDiT(in_channels=8, dim=256, heads=2, depth=1, depth_single=1, txt_dim=16, vec_dim=12).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(img=torch.randn(1, 16, 8, generator=g), txt=torch.randn(1, 6, 16, generator=g),
                  timesteps=torch.full((1,), 0.7), y=torch.randn(1, 12, generator=g))  # fmt: skip
    return model, inputs


@pytest.mark.parametrize("type_name", ("Q6_K", "Q4_K"))
def test_save_gguf_writes_k_quants_that_load_gguf_reads_back_into_a_meta_model(tmp_path, type_name):
    model, inputs = wide_dit()
    path = tmp_path / f"dit-{type_name}.gguf"
    types = hookwise.save_gguf(model, path, type_name)
    quantized = {k for k, v in types.items() if v == type_name}
    # The towers' Linears (input 256 or 768 wide), not the modulation the map keeps in high precision.
    assert "double_blocks.0.img_attn.qkv.weight" in quantized and "single_blocks.0.linear2.weight" in quantized
    assert not any("mod" in k for k in quantized) and types["img_in.weight"] == "F32"
    with torch.device("meta"):
        loaded = MusubiDiT(in_channels=8, dim=256, heads=2, depth=1, depth_single=1, txt_dim=16, vec_dim=12).eval()
    summary = hookwise.load_gguf(loaded, path)
    assert set(summary["quantized"].values()) == {type_name} and len(summary["quantized"]) == len(quantized)
    reference = MusubiDiT(in_channels=8, dim=256, heads=2, depth=1, depth_single=1, txt_dim=16, vec_dim=12).eval()
    state = model.state_dict()
    for key in quantized:  # the reference holds exactly the file's dequantized values
        raw = quantize(state[key].numpy(), type_name)
        state[key] = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType[type_name]))
    reference.load_state_dict(state)
    with torch.no_grad():
        got, expected, exact = loaded(**inputs), reference(**inputs), model(**inputs)
    assert torch.equal(got, expected)
    assert (got - exact).norm() / exact.norm() < {"Q6_K": 0.03, "Q4_K": 0.12}[type_name]


def test_save_gguf_refuses_a_model_without_its_weights_and_writes_nothing(tmp_path):
    model, _ = wide_dit()
    hookwise.save_gguf(model, tmp_path / "q8.gguf", "Q8_0")
    loaded = MusubiDiT(in_channels=8, dim=256, heads=2, depth=1, depth_single=1, txt_dim=16, vec_dim=12).eval()
    hookwise.load_gguf(loaded, tmp_path / "q8.gguf")
    with pytest.raises(ConfigError, match="cannot write .*uint8.*full-precision weights"):
        hookwise.save_gguf(loaded, tmp_path / "again.gguf", "Q8_0")
    assert not (tmp_path / "again.gguf").exists()
    narrow = MusubiDiT().eval()  # 32 wide: no row holds a 256-weight super-block
    with pytest.raises(NoTargetError, match="multiples of 256"):
        hookwise.save_gguf(narrow, tmp_path / "narrow.gguf", "Q4_K")
    with pytest.raises(ConfigError, match="writes types"):
        hookwise.save_gguf(model, tmp_path / "x.gguf", "Q2_K")


def test_save_gguf_writes_bfloat16_tensors_as_bf16(tmp_path):
    model, inputs = wide_dit()
    model = model.to(torch.bfloat16)
    types = hookwise.save_gguf(model, tmp_path / "bf16.gguf", "Q8_0")
    assert types["img_in.weight"] == "BF16" and types["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    with torch.device("meta"):
        loaded = MusubiDiT(in_channels=8, dim=256, heads=2, depth=1, depth_single=1, txt_dim=16, vec_dim=12)
    hookwise.load_gguf(loaded.to(torch.bfloat16).eval(), tmp_path / "bf16.gguf")
    assert torch.equal(loaded.img_in.weight, model.img_in.weight)
