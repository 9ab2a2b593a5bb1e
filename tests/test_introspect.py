import pytest
import torch
from torch import nn

import hookwise
from hookwise.introspect import describe
from model_helpers import TINY_DIFFUSERS, MusubiDiT, mlp, tiny_musubi

# (main towers in call order, number of blocks in each)
EXPECTED_TOWERS = {
    "flux": [("transformer_blocks", 1), ("single_transformer_blocks", 1)],
    "wan": [("blocks", 2)],
    "hunyuanvideo": [("transformer_blocks", 1), ("single_transformer_blocks", 1)],
    "ltx-video": [("transformer_blocks", 1)],
    "sd3": [("transformer_blocks", 4)],
    "qwen-image": [("transformer_blocks", 2)],
}


def leaf_modules(model):
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    return {path: m for path, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("arch", sorted(TINY_DIFFUSERS))
def test_map_of_tiny_diffusers_transformers(arch):
    model, _ = TINY_DIFFUSERS[arch]()
    m = describe(model)
    assert m.architecture == arch
    assert [(t.name, t.num_blocks) for t in m.main_towers] == EXPECTED_TOWERS[arch]
    assert m.timestep_arg == "timestep"
    # block sizes are the blocks' own parameter bytes
    for tower in m.towers:
        for block in tower.blocks:
            module = model.get_submodule(block.path)
            assert block.param_bytes == sum(p.numel() * p.element_size() for p in module.parameters())
            assert block.cls == tower.block_cls
    # every Linear / Conv / Embedding is a leaf, with its bytes
    leaves = leaf_modules(model)
    assert {leaf.path for leaf in m.leaves} == set(leaves)
    for leaf in m.leaves:
        assert leaf.param_bytes == sum(p.numel() * p.element_size() for p in leaves[leaf.path].parameters())
    assert m.param_count == sum(p.numel() for p in model.parameters())
    # norms and the model's own skip list keep high precision; attention projections do not
    for path, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            assert m.keep_reason(path) is not None, path
    main_blocks = {b.path for t in m.main_towers for b in t.blocks}
    for attn in m.attention:
        if attn.block in main_blocks:
            assert m.keep_reason(f"{attn.path}.to_q") is None
    assert m.keep_reason("proj_out") is not None
    castable = m.castable_leaves()
    assert castable and all(leaf.block is not None for leaf in castable)
    assert m.attention and m.ffn


def test_flux_map_details():
    model, _ = TINY_DIFFUSERS["flux"]()
    m = describe(model)
    assert m.block_classes == ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    assert m.keep_reason("transformer_blocks.0.norm1.linear") == "adaptive norm (modulation)"
    for path in ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1"):
        assert m.keep_reason(path) == "embedding", path
    kinds = {a.path: a.kind for a in m.attention}
    assert kinds == {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "self"}
    assert m.block_of("transformer_blocks.0.attn.to_q") == "transformer_blocks.0"
    assert m.block_of("proj_out") is None


def test_wan_map_keeps_fp32_list_and_finds_cross_attention():
    model, _ = TINY_DIFFUSERS["wan"]()
    m = describe(model)
    assert m.keep_reason("blocks.0.scale_shift_table") == "modulation"
    assert m.keep_reason("condition_embedder.time_embedder.linear_1") == "embedding"
    assert m.keep_reason("patch_embedding") == "embedding"
    kinds = sorted({a.kind for a in m.attention})
    assert kinds == ["cross", "self"]
    assert m.keep_reason("blocks.0.ffn.net.0.proj") is None


def test_hunyuanvideo_refiner_blocks_form_a_tower_that_is_not_main():
    model, _ = TINY_DIFFUSERS["hunyuanvideo"]()
    m = describe(model)
    refiner = m.tower("context_embedder.token_refiner.refiner_blocks")
    assert not refiner.main
    assert m.blocks[0].path == "transformer_blocks.0"  # main towers come first


def test_musubi_style_dit():
    model, _ = tiny_musubi()
    m = describe(model)
    assert m.architecture == "musubi-double-single"
    assert [(t.name, t.num_blocks) for t in m.main_towers] == [("double_blocks", 2), ("single_blocks", 3)]
    assert m.timestep_arg == "timesteps"
    assert m.keep_reason("double_blocks.0.img_mod.lin") == "modulation"
    assert m.keep_reason("single_blocks.1.modulation.lin") == "modulation"
    assert m.keep_reason("final_layer.adaLN_modulation.1") is not None
    for path in ("img_in", "txt_in", "time_in.0", "vector_in.2"):
        assert m.keep_reason(path) == "embedding", path
    assert m.keep_reason("double_blocks.0.img_attn.qkv") is None
    assert {a.path for a in m.attention} >= {"double_blocks.0.img_attn", "double_blocks.0.txt_attn"}
    assert {f.path for f in m.ffn} >= {"double_blocks.0.img_mlp", "double_blocks.0.txt_mlp"}


def test_musubi_single_tower_wan_style():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Linear(4, 4)
            self.ffn = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
            self.modulation = nn.Parameter(torch.zeros(1, 6, 4))

    class WanModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embedding = nn.Conv3d(4, 4, (1, 2, 2), stride=(1, 2, 2))
            self.text_embedding = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(4, 4)

        def forward(self, x, t, context):
            return x

    m = describe(WanModel())
    assert m.architecture == "musubi-blocks"
    assert [t.name for t in m.main_towers] == ["blocks"]
    assert m.timestep_arg == "t"
    assert m.keep_reason("blocks.0.modulation") == "modulation"
    assert m.keep_reason("head") is not None
    assert m.keep_reason("blocks.0.ffn.0") is None


def test_plain_mlp_has_no_tower_and_says_so():
    m = describe(mlp())
    assert not m.has_towers and m.towers == ()
    assert len(m.leaves) == 3 and all(leaf.keep is None for leaf in m.leaves)
    assert any("no tower" in note for note in m.notes)
    caps = {c["name"]: c["available"] for c in m.capabilities()}
    assert caps["block-level grouping"] is False and caps["leaf-level grouping"] is True
    assert m.architecture is None and m.timestep_arg is None


def test_sequential_of_blocks_and_numbered_children_and_mixed_runs():
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    class Numbered(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            for i in range(3):
                setattr(self, f"layer_{i}", block())
            self.out = nn.Linear(4, 4)

    m = describe(Numbered())
    assert [(t.name, t.num_blocks) for t in m.towers] == [("layer_*", 3)]
    assert m.towers[0].block_paths == ("layer_0", "layer_1", "layer_2")

    mixed = nn.Sequential(nn.Linear(4, 4), block(), block(), nn.Linear(4, 4), block())
    m = describe(mixed)
    assert [(t.name, t.num_blocks) for t in m.towers] == [("[1:3]", 2)]

    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[block() for _ in range(2)]))
    m = describe(nested)
    assert [(t.name, t.main) for t in m.towers] == [("1", True)]


def test_towers_at_any_depth_and_main_ones_are_the_shallowest():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Inner()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3)])

    m = describe(Outer())
    assert {t.name: t.main for t in m.towers} == {"encoder.layers": False, "blocks": True}
    assert m.main_towers[0].name == "blocks"


def test_meta_model_is_mapped_without_allocating_and_sizes_match():
    model, _ = TINY_DIFFUSERS["flux"]()
    real = describe(model)
    with torch.device("meta"):
        meta_model, _ = TINY_DIFFUSERS["flux"]()
    assert all(p.is_meta for p in meta_model.parameters())
    meta = describe(meta_model)
    assert meta.device == "meta"
    assert meta.param_bytes == real.param_bytes
    assert [b.param_bytes for b in meta.blocks] == [b.param_bytes for b in real.blocks]
    assert [leaf.param_bytes for leaf in meta.leaves] == [leaf.param_bytes for leaf in real.leaves]


def test_lora_adapter_layers_are_never_castable():
    peft = pytest.importorskip("peft")
    model, _ = tiny_musubi()
    config = peft.LoraConfig(r=4, target_modules=["qkv", "proj"])
    lora_model = peft.inject_adapter_in_model(config, model)
    m = describe(lora_model)
    adapters = [leaf for leaf in m.leaves if "lora_" in leaf.path]
    assert adapters and all(leaf.keep == "adapter" for leaf in adapters)
    assert not any("lora_" in leaf.path for leaf in m.castable_leaves())


def test_map_serializes_to_json_compatible_dict():
    import json

    model, _ = tiny_musubi()
    data = describe(model).to_dict()
    text = json.dumps(data)
    back = json.loads(text)
    assert back["architecture"] == "musubi-double-single"
    assert back["towers"][0]["num_blocks"] == 2
    assert {c["name"] for c in back["capabilities"]} >= {"block-level grouping", "castable weights"}


def test_forcing_an_architecture_and_mapping_structurally():
    model = MusubiDiT()
    assert describe(model, architecture=None).architecture is None
    forced = describe(model, architecture="flux")
    assert forced.architecture == "flux"
    assert any("expected towers" in n for n in forced.notes)
    with pytest.raises(hookwise.ConfigError, match="unknown architecture"):
        describe(model, architecture="nope")


def test_describe_unwraps_torch_compile():
    model, _ = tiny_musubi()
    compiled = torch.compile(model, backend="eager")
    assert describe(compiled).model_cls == "MusubiDiT"


def _block_parts():
    return dict(norm1=nn.LayerNorm(4), mlp=nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)))


def test_containers_of_block_lists_are_searched_through_never_taken_for_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.GELU()

    class Holder(nn.Module):  # no forward: only holds the list
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    class Stages(nn.Module):
        def __init__(self):
            super().__init__()
            self.dicts = nn.ModuleList([nn.ModuleDict({"blocks": nn.ModuleList([Block(), Block()])}) for _ in range(2)])
            self.seqs = nn.ModuleList([nn.Sequential(Block(), Block()) for _ in range(2)])
            self.deep = Holder(Holder(Holder(nn.ModuleList([Block(), Block()]))))

    m = describe(Stages())
    assert {t.name for t in m.towers} == {
        "dicts.0.blocks", "dicts.1.blocks", "seqs.0", "seqs.1", "deep.inner.inner.inner",
    }
    assert all(b.cls == "Block" for b in m.blocks)


def test_whole_blocks_are_never_attention_modules():
    class FusedBlock(nn.Module):  # fused qkv next to norms and MLP: attention is inline in the block
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)
            for name, module in _block_parts().items():
                setattr(self, name, module)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class TransformerAttentionBlock(nn.Module):  # named for attention, holds attention and FFN
        def __init__(self):
            super().__init__()
            self.attn1, self.attn2 = SelfAttention(), SelfAttention()
            for name, module in _block_parts().items():
                setattr(self, name, module)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fused = nn.ModuleList([FusedBlock() for _ in range(2)])
            self.named = nn.ModuleList([TransformerAttentionBlock() for _ in range(2)])

    m = describe(Model())
    assert [t.name for t in m.towers] == ["fused", "named"]
    assert {a.path: a.kind for a in m.attention} == {
        "named.0.attn1": "self", "named.0.attn2": "cross", "named.1.attn1": "self", "named.1.attn2": "cross",
    }
    assert {f.path for f in m.ffn} == {f"{t}.{i}.mlp" for t in ("fused", "named") for i in range(2)}
