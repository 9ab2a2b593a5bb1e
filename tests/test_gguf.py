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


# ---- loading GGUF files ---------------------------------------------------------------------------------
import copy  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from torch import nn  # noqa: E402

import hookwise  # noqa: E402
from hookwise.errors import MissingDependencyError  # noqa: E402
from model_helpers import tiny_flux  # noqa: E402

D, S = "transformer_blocks.0.", "single_transformer_blocks.0."
# The tiny Flux's keys under their BFL names (the names of the common FLUX GGUF files), written out here
# independently of hookwise's table: each BFL tensor is the listed diffusers tensors stacked on rows.
BFL_TO_DIFFUSERS = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "double_blocks.0.img_mod.lin": [D + "norm1.linear"],
    "double_blocks.0.txt_mod.lin": [D + "norm1_context.linear"],
    "double_blocks.0.img_attn.qkv": [D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"],
    "double_blocks.0.img_attn.proj": [D + "attn.to_out.0"],
    "double_blocks.0.txt_attn.qkv": [D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"],
    "double_blocks.0.txt_attn.proj": [D + "attn.to_add_out"],
    "double_blocks.0.img_mlp.0": [D + "ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": [D + "ff.net.2"],
    "double_blocks.0.txt_mlp.0": [D + "ff_context.net.0.proj"],
    "double_blocks.0.txt_mlp.2": [D + "ff_context.net.2"],
    "single_blocks.0.modulation.lin": [S + "norm.linear"],
    "single_blocks.0.linear1": [S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"],
    "single_blocks.0.linear2": [S + "proj_out"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # rows in (shift, scale) order: halves swapped
}
BFL_NORMS = {
    "double_blocks.0.img_attn.norm.query_norm.scale": D + "attn.norm_q.weight",
    "double_blocks.0.img_attn.norm.key_norm.scale": D + "attn.norm_k.weight",
    "double_blocks.0.txt_attn.norm.query_norm.scale": D + "attn.norm_added_q.weight",
    "double_blocks.0.txt_attn.norm.key_norm.scale": D + "attn.norm_added_k.weight",
    "single_blocks.0.norm.query_norm.scale": S + "attn.norm_q.weight",
    "single_blocks.0.norm.key_norm.scale": S + "attn.norm_k.weight",
}


def _swap(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]])


def write_gguf(path, tensors: dict, arch: str = "flux") -> str:
    """A .gguf file of `tensors` ({name: float32 array, or (uint8 blocks, type name)})."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            raw, type_name = value
            writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[type_name])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def flux_gguf(tmp_path, type_name: str, drop=(), arch: str = "flux"):
    """The tiny Flux written as a BFL-named GGUF file in `type_name`, and the reference model.

    Weights whose rows hold whole blocks are quantized (per diffusers tensor, then stacked: rows are
    quantized independently, so this is the quantization of the stacked tensor); the rest stay F32.
    The reference is the plain model holding exactly the dequantized values.
    """
    model, inputs = tiny_flux()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    reference_state, stored = {}, {}
    qtype = GGMLQuantizationType[type_name]
    for key, value in state.items():
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            raw = np_quantize(value, qtype)
            stored[key] = (raw, type_name)
            reference_state[key] = torch.from_numpy(np_dequantize(raw, qtype))
        else:
            stored[key] = value
            reference_state[key] = torch.from_numpy(value)
    tensors = {}
    for bfl, parts in BFL_TO_DIFFUSERS.items():
        for param in ("weight", "bias"):
            values = [stored[f"{p}.{param}"] for p in parts]
            quantized = isinstance(values[0], tuple)
            arrays = [v[0] if quantized else v for v in values]
            joined = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            if bfl == "final_layer.adaLN_modulation.1":
                joined = _swap(joined)
            tensors[f"{bfl}.{param}"] = (joined, type_name) if quantized else joined
    for bfl, key in BFL_NORMS.items():
        tensors[bfl] = state[key]
    for name in drop:
        tensors.pop(name)
    path = write_gguf(tmp_path / f"flux-{type_name}.gguf", tensors, arch)
    reference = copy.deepcopy(model)
    reference.load_state_dict(reference_state)
    return path, model, reference, inputs


def meta_flux(model):
    with torch.device("meta"):
        return type(model).from_config(model.config).eval()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# Relative L2 error of the tiny Flux's output against the plain model, per type (measured here:
# 0.0075 / 0.045 / 0.12; the bounds leave room for seeds, not for a wrong dequantization).
TYPE_ERROR = {"Q8_0": 0.02, "Q5_1": 0.15, "Q4_0": 0.3}


@pytest.mark.parametrize("type_name", ("Q8_0", "Q4_0", "Q5_1"))
def test_a_bfl_named_flux_file_loads_into_a_meta_model_and_matches_the_dequantized_reference(tmp_path, type_name):
    path, plain, reference, inputs = flux_gguf(tmp_path, type_name)
    model = meta_flux(plain)
    summary = hookwise.load_gguf(model, path)
    assert summary["key_map"] == "flux"
    assert not any(t.is_meta for t in model.state_dict().values())
    to_q = model.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.uint8 and not to_q.weight.requires_grad
    assert summary["quantized"][D + "attn.to_q"] == type_name
    assert "x_embedder" not in summary["quantized"]  # 4 input columns: not whole blocks, stored F32
    out = run(model, inputs)
    assert torch.equal(out, run(reference, inputs))
    expected = run(plain, inputs)
    error = ((out - expected).norm() / expected.norm()).item()
    assert 0 < error < TYPE_ERROR[type_name]


def test_quantized_weights_are_stored_as_their_gguf_bytes(tmp_path):
    path, plain, _, _ = flux_gguf(tmp_path, "Q4_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    quantized = hookwise.gguf_summary(model)["quantized"]
    modules = dict(model.named_modules())
    for leaf in quantized:
        module = modules[leaf]
        assert module.weight.nbytes == module.out_features * module.in_features // 32 * 18
    assert set(model.state_dict()) == set(plain.state_dict())


def test_offloading_on_top_of_a_gguf_model_streams_the_quantized_bytes_and_gives_the_same_output(tmp_path):
    path, plain, _, inputs = flux_gguf(tmp_path, "Q5_1")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    expected = run(model, inputs)
    hookwise.apply(model, hookwise.Offload(onload_device="cpu", offload_device="cpu", granularity="block"))
    assert [type(c).__name__ for c in hookwise.applied(model)] == ["GGUFFile", "Offload"]
    assert torch.equal(run(model, inputs), expected)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.uint8


def test_peft_lora_trains_on_a_gguf_base_with_gradients_only_in_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    path, plain, _, inputs = flux_gguf(tmp_path, "Q8_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    model.requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model = peft.inject_adapter_in_model(config, model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    target = torch.randn_like(run(model, inputs))
    losses = []
    for _ in range(5):
        out = model(**inputs, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0]
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_removing_the_gguf_technique_gives_the_dequantized_weights_back(tmp_path):
    path, plain, reference, inputs = flux_gguf(tmp_path, "Q4_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    with pytest.warns(UserWarning, match="not restored"):
        hookwise.remove(model)
    assert not hookwise.gguf_summary(model)["quantized"]
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(run(model, inputs), run(reference, inputs))


def _unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not hookwise.applied(model) and not hookwise.gguf_summary(model)["quantized"]


def test_a_file_missing_a_key_is_a_clear_error_that_leaves_the_model_unchanged(tmp_path):
    path, plain, _, _ = flux_gguf(tmp_path, "Q8_0", drop=("double_blocks.0.img_attn.proj.weight",))
    model = copy.deepcopy(plain)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hookwise.GGUFLoadError, match=r"missing from the file \(1\): transformer_blocks.0.attn.to_out.0.weight"):
        hookwise.load_gguf(model, path)
    _unchanged(model, before)


def test_a_file_of_another_architecture_is_a_clear_error(tmp_path):
    path, plain, _, _ = flux_gguf(tmp_path, "Q8_0", arch="wan")
    model = copy.deepcopy(plain)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hookwise.GGUFLoadError, match="holds a 'wan' model.*FluxTransformer2DModel"):
        hookwise.load_gguf(model, path)
    _unchanged(model, before)


def test_a_tensor_of_the_wrong_shape_is_listed_as_a_mismatch(tmp_path):
    model, _ = tiny_flux()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["proj_out.weight"] = np.zeros((8, 32), np.float32)
    path = write_gguf(tmp_path / "bad.gguf", state)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hookwise.GGUFLoadError, match=r"shape mismatch \(1\): proj_out.weight \(8, 32\) -> proj_out.weight \(4, 32\)"):
        hookwise.load_gguf(model, path)
    _unchanged(model, before)


def test_an_unsupported_tensor_type_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(256, 4))
    raw = np_quantize(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32), GGMLQuantizationType.TQ2_0)
    path = write_gguf(tmp_path / "tq.gguf", {"0.weight": (raw, "TQ2_0"), "0.bias": np.zeros(4, np.float32)})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(hookwise.GGUFLoadError, match="stored as TQ2_0, which hookwise cannot dequantize"):
        hookwise.load_gguf(model, path)
    _unchanged(model, before)


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_a_model_whose_keys_match_loads_k_quants_with_the_identity_map(tmp_path, type_name):
    model = nn.Sequential(nn.Linear(256, 6), nn.GELU(), nn.Linear(6, 3))
    raw = random_blocks(type_name, rows=6, blocks_per_row=1)
    tensors = {"0.weight": (raw, type_name), "0.bias": np.zeros(6, np.float16)}
    tensors.update({"2.weight": np.ones((3, 6), np.float32), "2.bias": np.zeros(3, np.float32)})
    path = write_gguf(tmp_path / "mlp.gguf", tensors, arch="mlp")
    summary = hookwise.load_gguf(model, path)
    assert summary["key_map"] == "identity" and summary["quantized"] == {"0": type_name}
    x = torch.randn(2, 256)
    weight = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType[type_name]))
    expected = torch.nn.functional.linear(x, weight)
    with torch.no_grad():
        assert torch.equal(model[0](x), expected)


def test_the_config_records_the_file_and_its_types_and_reapplies_from_a_dict(tmp_path):
    path, plain, _, inputs = flux_gguf(tmp_path, "Q8_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    (config,) = hookwise.applied(model)
    data = config.to_dict()
    assert data["technique"] == "gguf" and data["path"] == path
    assert ["double_blocks.0.img_attn.qkv.weight", "Q8_0"] in data["types"]
    again = meta_flux(plain)
    hookwise.apply(again, hookwise.GGUFFile.from_dict(data))
    assert torch.equal(run(again, inputs), run(model, inputs))
    changed = hookwise.GGUFFile.from_dict({**data, "types": [["img_in.weight", "Q4_0"]]})
    with pytest.raises(hookwise.GGUFLoadError, match="file changed"):
        hookwise.apply(meta_flux(plain), changed)


def test_loading_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError, match=r"hookwise\[gguf\]"):
        hookwise.load_gguf(nn.Linear(32, 4), tmp_path / "x.gguf")


def test_gguf_cannot_be_combined_with_layerwise_casting(tmp_path):
    path, plain, _, _ = flux_gguf(tmp_path, "Q8_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    with pytest.raises(hookwise.CompatibilityError, match="'gguf' and 'casting'|'casting' and 'gguf'"):
        hookwise.apply(model, hookwise.LayerwiseCasting())


class _FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.LayerNorm(32), nn.Linear(32, 96), nn.Linear(32, 32, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class _OddModel(nn.Module):
    """Nested containers, a fused qkv, a block registered twice and called twice, a layer never called."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict({"a": nn.ModuleList([_FusedBlock(), _FusedBlock()])})
        self.holder = nn.Module()
        self.holder.inner = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.shared = self.towers["a"][0]
        self.unused = nn.Linear(32, 32)

    def forward(self, x):
        x = self.shared(self.towers["a"][1](self.towers["a"][0](x)))
        return self.holder.inner(x)


def test_an_odd_model_loads_with_its_own_names(tmp_path):
    model = _OddModel().eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert "shared.qkv.weight" in state and "towers.a.0.qkv.weight" in state
    tensors, reference_state = {}, {}
    for key, value in state.items():
        if value.ndim == 2:
            raw = np_quantize(value, GGMLQuantizationType.Q4_1)
            tensors[key] = (raw, "Q4_1")
            reference_state[key] = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType.Q4_1))
        else:
            tensors[key] = value
            reference_state[key] = torch.from_numpy(value)
    path = write_gguf(tmp_path / "odd.gguf", tensors, arch="odd")
    reference = copy.deepcopy(model)
    reference.load_state_dict(reference_state)
    summary = hookwise.load_gguf(model, path)
    assert summary["key_map"] == "identity"
    assert model.shared is model.towers["a"][0] and model.unused.weight.dtype == torch.uint8
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


# The tiny Wan's keys under the original Wan names, written out here: (original prefix, diffusers prefix).
WAN_ORIGINAL = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
] + [
    (f"blocks.{n}.{o}", f"blocks.{n}.{d}")
    for n in range(2)
    for o, d in [
        *((f"self_attn.{a}.", f"attn1.{b}.") for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
        *((f"cross_attn.{a}.", f"attn2.{b}.") for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
        ("self_attn.norm_q.", "attn1.norm_q."),
        ("self_attn.norm_k.", "attn1.norm_k."),
        ("cross_attn.norm_q.", "attn2.norm_q."),
        ("cross_attn.norm_k.", "attn2.norm_k."),
        ("norm3.", "norm2."),
        ("ffn.0.", "ffn.net.0.proj."),
        ("ffn.2.", "ffn.net.2."),
        ("modulation", "scale_shift_table"),
    ]
]


def test_an_original_named_wan_file_loads_into_the_diffusers_wan(tmp_path):
    from model_helpers import tiny_wan

    model, inputs = tiny_wan()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors, reference_state = {}, {}
    for key, value in state.items():
        original = next(o + key[len(d) :] for o, d in WAN_ORIGINAL if key.startswith(d))
        if value.ndim == 2 and value.shape[1] % 32 == 0:
            raw = np_quantize(value, GGMLQuantizationType.Q8_0)
            tensors[original] = (raw, "Q8_0")
            reference_state[key] = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType.Q8_0))
        else:
            tensors[original] = value.astype(np.float16) if value.ndim > 2 else value
            reference_state[key] = torch.from_numpy(tensors[original].astype(np.float32))
    path = write_gguf(tmp_path / "wan.gguf", tensors, arch="wan")
    reference = copy.deepcopy(model)
    reference.load_state_dict(reference_state)
    with torch.device("meta"):
        bare = type(model).from_config(model.config).eval()
    with pytest.raises(hookwise.GGUFLoadError, match=r"(?s)rope.freqs_cos \(a non-persistent buffer on meta\).*include_buffers=False"):
        hookwise.load_gguf(bare, path)
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights(include_buffers=False):
        meta_wan = type(model).from_config(model.config).eval()
    summary = hookwise.load_gguf(meta_wan, path)
    assert summary["key_map"] == "wan"
    # The time embedder's dtype is read by its parent's forward: its weight is dequantized at load.
    assert set(summary["quantized"]) == {"blocks.0.ffn.net.2", "blocks.1.ffn.net.2"}
    assert summary["types"]["condition_embedder.time_embedder.linear_1.weight"] == "Q8_0"
    target = run(reference, inputs)
    assert torch.equal(run(meta_wan, inputs), target)


# ---- the Triton kernels ---------------------------------------------------------------------------------
_INTERPRETED = """
import os, sys
assert os.environ["TRITON_INTERPRET"] == "1"
sys.path.insert(0, {tests!r})
import torch
from hookwise.quant import _gguf_triton as tr, _gguf_dequant as dq
from test_gguf import raw_for
assert tr.available()
bad = []
for name in tr.SUPPORTED:
    t = dq.TYPES[name]
    raw = torch.from_numpy(raw_for(name, rows=3, blocks=5 if t.block_size == 32 else 2))
    shape = (3, raw.shape[1] // t.type_size * t.block_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if not torch.equal(tr.dequantize(raw, name, shape, dtype), dq.dequantize(raw, name, shape, dtype)):
            bad.append((name, str(dtype)))
print("MISMATCHES", bad)
"""


def test_triton_kernels_under_the_interpreter_equal_the_torch_ops():
    """Run in a child process: TRITON_INTERPRET must be set before triton is imported, and not leak here."""
    import os
    import subprocess

    pytest.importorskip("triton")
    tests = os.path.dirname(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(hookwise.__path__[0]), env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", _INTERPRETED.format(tests=tests)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MISMATCHES []" in result.stdout, result.stdout[-2000:]
    assert os.environ.get("TRITON_INTERPRET") != "1"


def test_asking_for_triton_kernels_without_triton_names_the_extra(tmp_path, monkeypatch):
    import hookwise.quant as quant

    monkeypatch.setitem(sys.modules, "hookwise.quant._gguf_triton", None)
    monkeypatch.delattr(quant, "_gguf_triton", raising=False)
    path, plain, _, _ = flux_gguf(tmp_path, "Q8_0")
    model = meta_flux(plain)
    with pytest.raises(MissingDependencyError, match=r"hookwise\[triton\]"):
        hookwise.load_gguf(model, path, kernels="triton")
    assert not hookwise.applied(model)


@pytest.mark.gpu
@pytest.mark.parametrize("type_name", LEGACY + K_QUANTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_triton_kernels_on_cuda_equal_the_torch_ops(type_name, dtype):
    from hookwise.quant import _gguf_triton as tr

    t = dq.TYPES[type_name]
    raw = torch.from_numpy(raw_for(type_name, rows=64, blocks=8)).cuda()
    shape = (64, 8 * t.block_size)
    assert torch.equal(tr.dequantize(raw, type_name, shape, dtype), dq.dequantize(raw, type_name, shape, dtype))


@pytest.mark.gpu
def test_a_gguf_model_on_cuda_gives_the_same_output_with_triton_kernels_and_torch_ops(tmp_path):
    path, plain, _, inputs = flux_gguf(tmp_path, "Q4_0")
    cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
    outputs = []
    for kernels in ("triton", "torch"):
        model = meta_flux(plain)
        hookwise.load_gguf(model, path, device="cuda", kernels=kernels)
        outputs.append(run(model, cuda_inputs))
    assert torch.equal(outputs[0], outputs[1])


# ---- cost declaration -----------------------------------------------------------------------------------
def test_the_cost_declaration_shrinks_the_leaves_the_file_quantizes_by_their_bytes_per_weight(tmp_path):
    from hookwise.core.cost import CostContext, Placement
    from hookwise.core.techniques import technique_named
    from hookwise.plan.footprint import footprint_from_map
    from hookwise.quant.gguf import bytes_per_weight

    assert bytes_per_weight("Q8_0") == 34 / 32 and bytes_per_weight("Q4_K") == 144 / 256
    path, plain, _, _ = flux_gguf(tmp_path, "Q4_0")
    fp = footprint_from_map(hookwise.describe(plain))
    before = Placement.resident(fp)
    cost = technique_named("gguf").cost
    ctx = CostContext(hardware=None, job=None, device_room=0, ram_room=0)
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    (config,) = hookwise.applied(model)
    after = cost.effect(before, config, ctx)
    leaves = {leaf.path: leaf for leaf in after.footprint.leaves}
    to_q = leaves[D + "attn.to_q"]
    assert to_q.nbytes == 32 * 32 // 32 * 18 + 32 * 4  # Q4_0 blocks + the float32 bias
    assert leaves["x_embedder"].nbytes == dict((leaf.path, leaf) for leaf in fp.leaves)["x_embedder"].nbytes
    assert after.device_bytes < before.device_bytes and after.compute_factor > 1
    assert after.quality == ("gguf Q4_0 (8.6% weight error)",)
    assert cost.options(before, ctx) == []  # a file is the user's choice: the planner proposes none
    unknown = cost.effect(before, hookwise.GGUFFile(path=path), ctx)
    assert unknown.footprint == fp and "type map is unknown" in unknown.notes[0]


def test_the_readme_gguf_example_runs(tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("### GGUF files")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    path, plain, reference, inputs = flux_gguf(tmp_path, "Q4_0")
    namespace = {"config": plain.config}
    exec(code.replace('"flux1-dev-Q4_0.gguf"', repr(path)), namespace)
    transformer = namespace["transformer"]
    assert hookwise.gguf_summary(transformer)["quantized"][D + "attn.to_q"] == "Q4_0"
    assert next(p for p in transformer.parameters() if p.is_floating_point()).dtype == torch.bfloat16
    inputs = {k: v.to(torch.bfloat16) if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()}
    assert torch.isfinite(run(transformer, inputs)).all()


def test_loading_a_file_under_offloading_already_applied_is_refused_and_one_apply_call_orders_them(tmp_path):
    path, plain, _, inputs = flux_gguf(tmp_path, "Q8_0")
    model = meta_flux(plain)
    hookwise.load_gguf(model, path)
    expected = run(model, inputs)
    offloaded = copy.deepcopy(plain)
    hookwise.apply(offloaded, hookwise.Offload(onload_device="cpu", offload_device="cpu", granularity="block"))
    with pytest.raises(hookwise.CompatibilityError, match=r"load the GGUF file before applying \['offload'\]"):
        hookwise.load_gguf(offloaded, path)
    both = meta_flux(plain)
    offload = hookwise.Offload(onload_device="cpu", offload_device="cpu", granularity="block")
    hookwise.apply(both, offload, hookwise.GGUFFile(path=path))
    assert hookwise.applied(both).names() == ["gguf", "offload"]
    assert torch.equal(run(both, inputs), expected)


def test_a_forward_set_on_the_instance_computes_from_the_blocks_inside_it(tmp_path):
    """kohya-style LoRA set before loading: `layer.forward = lora_forward`, calling the class forward inside."""
    raw = legacy_blocks("Q8_0", 8, 64)
    path = write_gguf(tmp_path / "one.gguf", {"0.weight": (raw, "Q8_0"), "0.bias": np.zeros(8, np.float32)}, "x")
    x = torch.randn(3, 64)
    weight = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType.Q8_0))
    model = nn.Sequential(nn.Linear(64, 8))
    org_forward = model[0].forward
    model[0].forward = lambda x: org_forward(x) * 2
    hookwise.load_gguf(model, path)
    with torch.no_grad():
        assert torch.equal(model(x), torch.nn.functional.linear(x, weight) * 2)
    other = nn.Sequential(nn.Linear(64, 8))
    other[0].forward = lambda x: x[..., :8]  # never computes the layer: an error, not uint8 arithmetic
    hookwise.load_gguf(other, path)
    with pytest.raises(hookwise.HookError, match="never computes the layer's own operation"):
        other(x)


def test_training_through_a_gguf_layer_saves_only_its_blocks_for_backward(tmp_path):
    raw = legacy_blocks("Q4_0", 16, 64)
    path = write_gguf(tmp_path / "one.gguf", {"0.weight": (raw, "Q4_0"), "0.bias": np.zeros(16, np.float32)}, "x")
    model = nn.Sequential(nn.Linear(64, 16))
    hookwise.load_gguf(model, path)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    assert [t.dtype for t in saved] == [torch.uint8]  # the blocks; no dequantized fp32 weight
    out.sum().backward()
    weight = torch.from_numpy(np_dequantize(raw, GGMLQuantizationType.Q4_0))
    assert torch.allclose(x.grad, weight.sum(0).expand(3, -1))
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_a_persistent_buffer_on_meta_that_the_file_lacks_is_named_as_one(tmp_path):
    from model_helpers import tiny_sd3

    model, _ = tiny_sd3()
    tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != "pos_embed.pos_embed"}
    path = write_gguf(tmp_path / "sd3.gguf", tensors, arch="sd3")
    with torch.device("meta"):
        bare = type(model).from_config(model.config).eval()
    with pytest.raises(hookwise.GGUFLoadError, match=r"(?s)missing from the file \(1\): pos_embed.pos_embed \(a buffer "
                       r"on meta\)\n.*include_buffers=False"):  # fmt: skip
        hookwise.load_gguf(bare, path)
    assert not hookwise.list_hooks(bare) and all(t.is_meta for t in [*bare.parameters(), *bare.buffers()])
