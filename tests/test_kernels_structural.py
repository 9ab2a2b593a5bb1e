"""Kernels' structural route: the gated residual and the rotary embedding of blocks no per-architecture
entry knows, found by tracing the block's own forward (torch.fx) and rewritten into the fused ops;
forward and backward equal to eager, the check at a signature's first call, blocks whose trace fails
reported, exact removal, and the FLUX / Wan / HunyuanVideo / LTX routes unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

import hookwise
from hookwise import Kernels, kernels_summary
from hookwise.core.hooks import hooks_named
from hookwise.errors import NoTargetError
from hookwise.kernels import _structural as structural
from hookwise.kernels import fused
from cache_helpers import fresh_dynamo, one_thread  # noqa: F401 - the fixtures
from kernel_helpers import gate_off_by_one_percent, FlatBlock, count_fused_calls, custom_dit, rotate_half
from model_helpers import tiny_flux, tiny_hunyuanvideo, tiny_ltx, tiny_musubi, tiny_wan
from offload_helpers import add_lora, fwd_bwd

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_close(got, expected, rtol=1e-5) -> None:
    out, grads = got
    out_e, grads_e = expected
    assert grads.keys() == grads_e.keys()
    for name, (a, b) in {"output": (out, out_e), **{k: (grads[k], grads_e[k]) for k in grads}}.items():
        bound = rtol * max(b.abs().max().item(), 1e-6)
        assert (a - b).abs().max().item() <= bound, name


class DataDependent(nn.Module):
    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.mod, self.lin = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, vec):
        if x.abs().mean() > 10:  # a branch on values: fx cannot follow it
            x = x / 10
        return x + self.mod(vec)[:, None] * self.lin(x)


class MixedDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([FlatBlock(24, 2), FlatBlock(24, 2)])
        self.refiners = nn.ModuleList([DataDependent(), DataDependent()])

    def forward(self, x, vec):
        d = 12
        angles = torch.arange(x.shape[1])[:, None] * torch.linspace(0.1, 1.0, d // 2)[None]
        halves = torch.cat([angles] * 2, -1)[None, :, None]
        for block in self.blocks:
            x = block(x, vec, halves.cos(), halves.sin())
        for block in self.refiners:
            x = block(x, vec)
        return x


def test_custom_dit_gate_and_both_rope_layouts_run_fused_forward_and_backward_equal_to_eager():
    model, inputs = custom_dit()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    blocks = [f"stages.joint.{i}" for i in range(2)] + [f"stages.flat.{i}" for i in range(2)]
    assert {p: k for p, k in summary["used"].items()} == dict.fromkeys(blocks, "structural")
    assert summary["not_reached"] == {} and summary["unmatched"] == [] and summary["rejected"] == {}
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)  # the first call: traced, checked (fused once more), run
    assert summary == kernels_summary(model)
    calls.clear()
    assert_close(fwd_bwd(model, inputs), expected)  # the rewritten forwards, cached
    # joint: 4 gates, rope on q and k (interleaved); flat (called 3 times): 1 gate, q and k (rotate-half)
    assert calls == {"gated_residual": 2 * 4 + 3, "rope_interleaved": 2 * 2, "rope_half": 3 * 2}, calls


def test_the_structural_route_runs_on_the_triton_backends_functions_too(monkeypatch):
    # Every backend goes through the same sites: a backend whose gate is off by 1% fails the check at
    # the first call, the summary says why, and the block's own forward runs.
    gate_off_by_one_percent(monkeypatch)
    model, inputs = custom_dit()
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate",), backend="eager"))
    assert kernels_summary(model)["rejected"] == {}  # nothing checked before the first call
    got = fwd_bwd(model, inputs)
    rejected = kernels_summary(model)["rejected"]
    assert sorted(rejected) == sorted([f"stages.joint.{i}" for i in range(2)] + ["stages.flat.0", "stages.flat.1"])
    assert rejected["stages.flat.0"].startswith("eager: output 0 differs from eager by")
    assert torch.equal(got[0], expected[0])


def test_a_block_whose_trace_fails_is_reported_and_runs_its_own_forward():
    model = MixedDiT()
    inputs = {"x": torch.randn(2, 7, 24), "vec": torch.randn(2, 24)}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["used"] == {"blocks.0": "structural", "blocks.1": "structural"}
    why = summary["not_reached"]["refiners.0"]
    assert why.startswith("DataDependent: no route reaches its gate / rope") and "could not be traced by torch.fx" in why
    assert sorted(summary["not_reached"]) == ["refiners.0", "refiners.1"]
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    calls.clear()
    assert_close(fwd_bwd(model, inputs), expected)
    assert calls == {"gated_residual": 2, "rope_half": 4}


def test_removal_gives_back_the_blocks_own_forwards_and_outputs():
    model, inputs = custom_dit()
    forwards = {p: "forward" in m.__dict__ for p, m in model.named_modules()}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    fwd_bwd(model, inputs)
    hookwise.remove(model)
    assert hookwise.list_hooks(model) == {} and kernels_summary(model) == {}
    assert {p: "forward" in m.__dict__ for p, m in model.named_modules()} == forwards
    out, grads = fwd_bwd(model, inputs)
    assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], v) for k, v in expected[1].items())


def test_a_call_with_other_arguments_is_traced_again_for_them():
    model = MixedDiT()
    block = model.blocks[0]
    x, vec = torch.randn(2, 7, 24), torch.randn(2, 24)
    cos, sin = torch.randn(1, 7, 1, 12), torch.randn(1, 7, 1, 12)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    for scale in (1.0, 0.25, 0.25):
        with torch.no_grad():
            torch.testing.assert_close(block(x, vec, cos, sin, scale=scale), type(block).forward(block, x, vec, cos, sin, scale=scale))
    hook = hooks_named(model, fused.HOOK_NAME, fused.StructuralHook)["blocks.0"]
    assert len(hook.rewritten) == 2 and all(hook.rewritten.values())


def test_only_ops_a_custom_dit_lacks_is_an_error_saying_why():
    model, _ = tiny_musubi()  # gates inline, no rotary embedding at all
    with pytest.raises(NoTargetError, match=r"no route reaches the inline rope of its tower blocks \(DoubleStreamBlock, SingleStreamBlock"):
        hookwise.apply(model, Kernels(ops=("rope",), backend="eager"))
    assert hookwise.list_hooks(model) == {}


@pytest.mark.parametrize("build", [tiny_flux, tiny_wan, tiny_hunyuanvideo, tiny_ltx], ids=["flux", "wan", "hunyuanvideo", "ltx"])
def test_the_per_architecture_routes_win_over_the_structural_route(build):
    model, _ = build()
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert "structural" not in summary["used"].values() and summary["not_reached"] == {}


# ---- HunyuanVideo I2V (token replace): its blocks through the structural route, its adaptive norms as sites ----
def tiny_hunyuanvideo_i2v(batch: int = 2):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type="token_replace",
    ).eval()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 3, 4, 4, generator=g),  # 3 frames: the first one's 16 tokens are replaced
        timestep=torch.randint(0, 1000, (batch,), generator=g).float(),
        encoder_hidden_states=torch.randn(batch, 12, 16, generator=g),
        pooled_projections=torch.randn(batch, 8, generator=g),
        encoder_attention_mask=torch.ones(batch, 12),
        guidance=torch.randint(0, 1000, (batch,), generator=g).float(),
    )
    return model, inputs


def test_hunyuanvideo_token_replace_blocks_are_reached_forward_and_backward_equal_to_eager():
    model, inputs = tiny_hunyuanvideo_i2v()
    assert type(model.transformer_blocks[0]).__name__ == "HunyuanVideoTokenReplaceTransformerBlock"
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["not_reached"] == {} and summary["rejected"] == {} and summary["unmatched"] == []
    used = summary["used"]
    assert used["transformer_blocks.0"] == used["single_transformer_blocks.0"] == "structural"
    assert used["transformer_blocks.0.norm1"] == used["single_transformer_blocks.0.norm"] == "adaln_token_replace"
    assert used["transformer_blocks.0.attn"] == used["single_transformer_blocks.0.attn"] == "hunyuan_rope"
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert kernels_summary(model)["rejected"] == {}
    calls.clear()
    assert_close(fwd_bwd(model, inputs), expected)
    # gates: double 6 (first-frame and other tokens apart, then text), single 2 (one per token range), refiner 2;
    # norms: the two token-replace norms (2 ranges each), norm1_context, norm_out, and the double block's inline
    # `norm2_context(c) * (1 + c_scale) + c_shift` (structural; its norm2 output is sliced per range: left as is);
    # rope: q and k of both attentions
    assert calls == {"gated_residual": 10, "norm_modulate": 7, "rope_interleaved": 4}, calls


def test_structural_blocks_compile_without_a_graph_break(fresh_dynamo):
    from torch._dynamo.utils import counters

    model, inputs = custom_dit()
    with torch.no_grad():
        expected = model(**inputs)
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"), hookwise.Compile(backend="aot_eager"))
    with torch.no_grad():
        model(**inputs)  # the first call of a hooked model runs eagerly: the blocks are traced and checked
        counters.clear()
        out = model(**inputs)
    assert counters["stats"]["unique_graphs"] > 0 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bf16_structural_blocks_pass_the_check_and_stay_within_the_bound_also_under_inference_mode():
    model, inputs = custom_dit()
    model = model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    with torch.inference_mode():
        expected = model(**inputs).float()
    hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    calls = count_fused_calls(model)
    with torch.inference_mode():  # traced and checked (outputs only: no autograd here) at this first call
        out = model(**inputs).float()
    assert kernels_summary(model)["rejected"] == {} and calls["gated_residual"] and calls["rope_half"]
    # The fused ops round once, in fp32; the eager chain rounds to bf16 after every op.
    assert (out - expected).abs().max() <= 0.05 * expected.abs().max()


class DiffusersRopeBlock(nn.Module):
    """A block calling diffusers' apply_rotary_emb (it unpacks `*x.shape`, which fx cannot trace itself)."""

    def __init__(self, dim: int = 24, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out, self.mod = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, vec, rope):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = apply_rotary_emb(q, rope)  # interleaved pairs, (seq, head_dim) tables
        k = apply_rotary_emb(k.transpose(1, 2), rope, use_real_unbind_dim=-2, sequence_dim=1).transpose(1, 2)  # halves
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x + self.mod(vec)[:, None] * self.out(a)


def test_a_block_calling_diffusers_apply_rotary_emb_runs_it_fused_forward_and_backward_equal_to_eager():
    torch.manual_seed(0)
    model = nn.ModuleDict({"blocks": nn.ModuleList([DiffusersRopeBlock(), DiffusersRopeBlock()])})

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x, vec):
            angles = (torch.arange(x.shape[1])[:, None] * torch.linspace(0.1, 1.0, 6)[None]).repeat_interleave(2, -1)
            for block in self.inner["blocks"]:
                x = block(x, vec, (angles.cos(), angles.sin()))
            return x

    wrapped = Wrap()
    inputs = {"x": torch.randn(2, 7, 24), "vec": torch.randn(2, 24)}
    expected = fwd_bwd(copy.deepcopy(wrapped), inputs)
    hookwise.apply(wrapped, Kernels(ops=("gate", "rope"), backend="eager"))
    summary = kernels_summary(wrapped)
    assert summary["used"] == {"inner.blocks.0": "structural", "inner.blocks.1": "structural"}, summary
    calls = count_fused_calls(wrapped)
    assert_close(fwd_bwd(wrapped, inputs), expected)
    assert kernels_summary(wrapped)["rejected"] == {}
    calls.clear()
    assert_close(fwd_bwd(wrapped, inputs), expected)
    assert calls == {"gated_residual": 2, "rope_interleaved": 2, "rope_half": 2}, calls


# ---- AdaLN modulation written inline: norm(x) * (1 + scale) + shift ------------------------------------------
class ModulatedBlock(nn.Module):
    """Modulation in each spelling (module LayerNorm / RMSNorm without affine, F.layer_norm, F.rms_norm; both
    orders of the add and the mul; `1 + scale` and `scale + 1`), two gates and a rotate-half rope."""

    def __init__(self, dim: int = 24, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(dim, 8 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.RMSNorm(dim, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.out2, self.out3 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, vec, cos, sin):
        sh1, sc1, g1, sh2, sc2, g2, sh3, sc3 = self.ada(F.silu(vec))[:, None].chunk(8, dim=-1)
        b, n, d = x.shape
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + g1 * self.out(a.transpose(1, 2).reshape(b, n, d))
        x = x + g2 * self.ff(sh2 + (sc2 + 1) * self.norm2(x))
        h3 = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (sc3 + 1) + sh3
        h4 = sh3 + (1 + sc3) * F.rms_norm(x, (d,), eps=1e-6)
        return x + self.out2(h3) + self.out3(h4)


class OnlyModulation(nn.Module):
    """Its only pattern is the modulation: `scalar=True` modulates by one number per sample, which the fused
    op does not take (a modulation must span the width): the site computes the expression itself."""

    def __init__(self, dim: int = 24, scalar: bool = False) -> None:
        super().__init__()
        self.scalar = scalar
        self.ada, self.norm, self.lin = nn.Linear(dim, 2 * dim), nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, dim)

    def forward(self, x, vec):
        shift, scale = self.ada(vec).unsqueeze(1).chunk(2, dim=-1)
        if self.scalar:
            scale = scale.mean(-1, keepdim=True)
        return self.lin(self.norm(x) * (1 + scale) + shift)


class Tower(nn.Module):
    def __init__(self, *blocks: nn.Module, rope: bool = True) -> None:
        super().__init__()
        self.rope = rope
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, vec):
        angles = torch.arange(x.shape[1])[:, None] * torch.linspace(0.1, 1.0, 6)[None]
        halves = torch.cat([angles] * 2, -1)[None, :, None]
        for block in self.blocks:
            x = block(x, vec, halves.cos(), halves.sin()) if self.rope else block(x, vec)
        return x


def modulated_tower() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 7, 24), "vec": torch.randn(2, 24)}
    return Tower(ModulatedBlock(), ModulatedBlock()), inputs


def test_inline_modulation_runs_fused_with_gate_and_rope_forward_and_backward_equal_to_eager():
    model, inputs = modulated_tower()
    add_lora(model)
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"))
    summary = kernels_summary(model)
    assert summary["used"] == {"blocks.0": "structural", "blocks.1": "structural"}
    assert summary["not_reached"] == {} and summary["unmatched"] == [] and summary["rejected"] == {}
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    assert kernels_summary(model)["rejected"] == {}
    calls.clear()
    norm_calls: list[str] = []
    for block in model.blocks:
        for norm in (block.norm1, block.norm2):
            norm.register_forward_hook(lambda module, args, out: norm_calls.append(type(module).__name__))
    assert_close(fwd_bwd(model, inputs), expected)
    # per block: four modulations (module LayerNorm / RMSNorm, F.layer_norm, F.rms_norm), two gates, rope on q and k
    assert calls == {"norm_modulate": 2 * 4, "gated_residual": 2 * 2, "rope_half": 2 * 2}, calls
    assert norm_calls == []  # the fused op computes the norm: the norm modules' own calls are gone


def test_modulation_sites_are_counted_as_modulation_never_as_gates():
    block = ModulatedBlock()
    assert structural.find_structural(block, ("gate", "modulate", "rope")) == structural.Found(gate=2, rope=2, modulate=4)
    assert structural.find_structural(block, ("gate",)) == structural.Found(gate=2)
    assert structural.find_structural(OnlyModulation(), ("gate", "rope")) == structural.Found()


def test_a_block_whose_only_pattern_is_modulation_is_reached_and_removal_is_exact():
    torch.manual_seed(0)
    model, inputs = Tower(OnlyModulation(), OnlyModulation(), rope=False), {"x": torch.randn(2, 5, 24), "vec": torch.randn(2, 24)}
    with pytest.raises(NoTargetError, match=r"no route reaches the inline gate of its tower blocks \(OnlyModulation"):
        hookwise.apply(model, Kernels(ops=("gate",), backend="eager"))  # its modulation is no gate
    assert hookwise.list_hooks(model) == {}
    forwards = {p: "forward" in m.__dict__ for p, m in model.named_modules()}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("modulate",), backend="eager"))
    summary = kernels_summary(model)
    assert summary["used"] == {"blocks.0": "structural", "blocks.1": "structural"} and summary["not_reached"] == {}
    calls = count_fused_calls(model)
    assert_close(fwd_bwd(model, inputs), expected)
    calls.clear()
    assert_close(fwd_bwd(model, inputs), expected)
    assert calls == {"norm_modulate": 2}
    hookwise.remove(model)
    assert hookwise.list_hooks(model) == {} and kernels_summary(model) == {}
    assert {p: "forward" in m.__dict__ for p, m in model.named_modules()} == forwards
    out, grads = fwd_bwd(model, inputs)
    assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], v) for k, v in expected[1].items())


def test_a_modulation_the_fused_op_does_not_take_computes_its_own_expression_per_call():
    torch.manual_seed(0)
    model = Tower(OnlyModulation(scalar=True), OnlyModulation(), rope=False)
    inputs = {"x": torch.randn(2, 5, 24), "vec": torch.randn(2, 24)}
    expected = fwd_bwd(copy.deepcopy(model), inputs)
    hookwise.apply(model, Kernels(ops=("modulate",), backend="eager"))
    calls = count_fused_calls(model)
    fwd_bwd(model, inputs)
    calls.clear()
    out, grads = fwd_bwd(model, inputs)
    assert kernels_summary(model)["rejected"] == {}
    assert calls == {"norm_modulate": 1}  # blocks.0: one scale per sample, computed as written
    assert torch.equal(out, expected[0]) and all(torch.equal(grads[k], v) for k, v in expected[1].items())


def test_modulated_structural_blocks_compile_without_a_graph_break(fresh_dynamo):
    from torch._dynamo.utils import counters

    model, inputs = modulated_tower()
    with torch.no_grad():
        expected = model(**inputs)
    hookwise.apply(model, Kernels(ops=("gate", "modulate", "rope"), backend="eager"), hookwise.Compile(backend="aot_eager"))
    with torch.no_grad():
        model(**inputs)  # the first call of a hooked model runs eagerly: the blocks are traced and checked
        counters.clear()
        out = model(**inputs)
    assert kernels_summary(model)["rejected"] == {}
    assert counters["stats"]["unique_graphs"] > 0 and sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
