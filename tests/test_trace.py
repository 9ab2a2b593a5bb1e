"""The traced call structure: towers are the called block lists, attention modules are the innermost
modules in which attention ran, and the map is checked against what a forward did."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from torch import nn

from hookwise.errors import ConfigError
from hookwise.introspect import ModuleRole, check_against_trace, describe, example_inputs, trace_calls
from hookwise.introspect.specs import build_diffusers_model, get_spec, spec_names
from model_helpers import TINY_DIFFUSERS
from tree_helpers import (
    DIM,
    HEADS,
    Attn,
    FusedBlock,
    Holder,
    SplitBlock,
    Tree,
    split_heads,
    merge_heads,
    mlp,
    run_all,
    tower_paths,
    trees,
    x_input,
)

# ---- towers nested in containers ---------------------------------------------------------------
class DictStages(nn.Module):
    def __init__(self):
        super().__init__()
        stage = lambda: nn.ModuleDict(  # noqa: E731
            {"blocks": nn.ModuleList([SplitBlock(), SplitBlock()]), "down": nn.Linear(DIM, DIM)}
        )
        self.stages = nn.ModuleList([stage() for _ in range(2)])

    def forward(self, x):
        for stage in self.stages:
            x = stage["down"](run_all(stage["blocks"], x))
        return x


class SequentialStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(SplitBlock(), SplitBlock()) for _ in range(2)])

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


class DeepHolders(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Holder(b=Holder(c=Holder(blocks=nn.ModuleList([SplitBlock() for _ in range(3)]))))
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.head(run_all(self.a.b.c.blocks, x))


EXPECTED_NESTED = {
    DictStages: {"stages.0.blocks": ("stages.0.blocks.0", "stages.0.blocks.1"),
                 "stages.1.blocks": ("stages.1.blocks.0", "stages.1.blocks.1")},
    SequentialStages: {"stages.0": ("stages.0.0", "stages.0.1"), "stages.1": ("stages.1.0", "stages.1.1")},
    DeepHolders: {"a.b.c.blocks": ("a.b.c.blocks.0", "a.b.c.blocks.1", "a.b.c.blocks.2")},
}


@pytest.mark.parametrize("cls", list(EXPECTED_NESTED), ids=lambda c: c.__name__)
def test_towers_nested_in_containers_are_the_inner_block_lists_statically_and_traced(cls):
    model = cls()
    static, traced = describe(model), describe(model, x_input())
    assert tower_paths(static) == EXPECTED_NESTED[cls]
    assert tower_paths(traced) == EXPECTED_NESTED[cls]
    assert all(t.main for t in traced.towers)
    blocks = [b for blocks in EXPECTED_NESTED[cls].values() for b in blocks]
    assert {a.path for a in traced.attention} == {f"{b}.attn" for b in blocks}
    assert {f.path for f in traced.ffn} == {f"{b}.mlp" for b in blocks}
    assert check_against_trace(static, trace_calls(model, x_input())) == []


# ---- attention inside blocks --------------------------------------------------------------------
class FusedModel(nn.Module):
    def __init__(self, softmax=False):
        super().__init__()
        self.blocks = nn.ModuleList([FusedBlock(softmax) for _ in range(2)])

    def forward(self, x):
        return run_all(self.blocks, x)


@pytest.mark.parametrize("softmax", [False, True], ids=["sdpa", "softmax-qk"])
def test_block_with_fused_qkv_is_never_an_attention_module(softmax):
    model = FusedModel(softmax)
    trace = trace_calls(model, x_input())
    assert trace.attention == {"blocks.0": 1, "blocks.1": 1}  # inline, innermost open call is the block
    for m in (describe(model), describe(model, x_input())):
        assert m.attention == ()
        assert tower_paths(m) == {"blocks": ("blocks.0", "blocks.1")}
    assert any("inline" in n for n in describe(model, x_input()).notes)
    # a map that takes the block for its attention module is a disagreement naming it
    static = describe(model)
    wrong = dataclasses.replace(static, attention=(ModuleRole("blocks.0", "FusedBlock", "self", "blocks.0"),))
    problems = check_against_trace(wrong, trace)
    assert any("'blocks.0'" in p and "whole block" in p for p in problems)
    assert "describe(model, towers=[...], attention=[...])" in problems[-1]


class CrossAttentionBlock(nn.Module):
    """Named for attention, but a whole block: self-attention, cross-attention and FFN."""

    def __init__(self):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(DIM), Attn()
        self.norm2, self.cross_attn = nn.LayerNorm(DIM), Attn()
        self.norm3, self.ffn = nn.LayerNorm(DIM), mlp()

    def forward(self, x, context):
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class AttentionBlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([CrossAttentionBlock() for _ in range(2)])

    def forward(self, x, context):
        for layer in self.layers:
            x = layer(x, context)
        return x


def test_attention_named_whole_block_is_a_block_and_its_attention_and_ffn_are_found():
    model = AttentionBlockModel()
    inputs = {"x": x_input(), "context": torch.randn(1, 3, DIM)}
    roles = (("self_attn", "self"), ("cross_attn", "cross"))
    expected_attention = {f"layers.{i}.{n}": k for i in range(2) for n, k in roles}
    for m in (describe(model), describe(model, inputs)):
        assert tower_paths(m) == {"layers": ("layers.0", "layers.1")}
        assert {a.path: a.kind for a in m.attention} == expected_attention
        assert {f.path for f in m.ffn} == {"layers.0.ffn", "layers.1.ffn"}
    assert check_against_trace(describe(model), trace_calls(model, inputs)) == []


class InlineAttnParts(nn.Module):
    """musubi style: the block calls its `attn` holder's qkv / norm / proj itself; `attn` never runs."""

    def __init__(self):
        super().__init__()
        self.attn = Holder(qkv=nn.Linear(DIM, 3 * DIM), norm=nn.LayerNorm(DIM // HEADS), proj=nn.Linear(DIM, DIM))
        self.mlp = mlp()

    def forward(self, x):
        q, k, v = (self.attn.norm(split_heads(t)) for t in self.attn.qkv(x).chunk(3, dim=-1))
        x = x + self.attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.mlp(x)


class InlineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([InlineAttnParts() for _ in range(2)])

    def forward(self, x):
        return run_all(self.blocks, x)


def test_attention_computed_inline_by_the_block_leaves_no_attention_module_that_never_runs():
    model = InlineModel()
    trace = trace_calls(model, x_input())
    static = describe(model)
    assert {a.path for a in static.attention} == {"blocks.0.attn", "blocks.1.attn"}  # the static guess
    problems = check_against_trace(static, trace)
    assert any("'blocks.0.attn' never ran" in p for p in problems)
    traced = describe(model, x_input())
    assert traced.attention == () and traced.traced
    assert check_against_trace(traced, trace) == []


# ---- called, reused, uncalled, interleaved -----------------------------------------------------
class CallPattern(nn.Module):
    def __init__(self, order):
        super().__init__()
        self.order = order
        self.blocks = nn.ModuleList([SplitBlock() for _ in range(3)])

    def forward(self, x):
        for i in self.order:
            x = self.blocks[i](x)
        return x


def test_reused_block_is_one_block_called_twice():
    model = CallPattern([0, 0, 1, 2])
    trace = trace_calls(model, x_input())
    assert trace.count("blocks.0") == 2 and trace.count("blocks.1") == 1
    assert trace.parent_of("blocks.0.attn") == "blocks.0" and trace.parent_of("blocks.0") == ""
    m = describe(model, x_input())
    assert tower_paths(m) == {"blocks": ("blocks.0", "blocks.1", "blocks.2")}
    assert check_against_trace(m, trace) == []


def test_block_defined_but_never_called_is_no_block():
    model = CallPattern([0, 1])
    trace = trace_calls(model, x_input())
    traced = describe(model, x_input())
    assert tower_paths(traced) == {"blocks": ("blocks.0", "blocks.1")}
    assert {a.path for a in traced.attention} == {"blocks.0.attn", "blocks.1.attn"}
    problems = check_against_trace(describe(model), trace)
    assert any("'blocks.2'" in p and "never ran" in p for p in problems)
    assert any("'blocks.2.attn' never ran" in p for p in problems)
    # limited to what a technique hooked, the unused block is no concern
    assert check_against_trace(describe(model), trace, targets=["blocks.0", "blocks.1"]) == []


def test_block_that_runs_outside_its_towers_order_is_reported():
    model = CallPattern([0, 2, 1])
    problems = check_against_trace(describe(model), trace_calls(model, x_input()))
    assert any("'blocks.1'" in p and "outside its tower's order" in p for p in problems)


class Interleaved(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.down = nn.ModuleList([FusedBlock() for _ in range(2)])
        self.mid = nn.LayerNorm(DIM)
        self.up = nn.ModuleList([SplitBlock() for _ in range(2)])

    def forward(self, x):
        x = self.embed(x)
        for d, u in zip(self.down, reversed(self.up)):
            x = self.mid(d(x))
            x = u(x) if u is self.up[0] else x
        return run_all(self.up, x)


def test_towers_interleaved_with_other_modules():
    model = Interleaved()
    trace = trace_calls(model, x_input())
    m = describe(model, x_input())
    assert tower_paths(m) == {"down": ("down.0", "down.1"), "up": ("up.0", "up.1")}
    assert [t.name for t in m.main_towers] == ["down", "up"]
    assert {a.path for a in m.attention} == {"up.0.attn", "up.1.attn"}
    assert check_against_trace(m, trace) == []
    assert trace.order.index("mid") < trace.order.index("up.0")


# ---- the trace itself --------------------------------------------------------------------------
def test_trace_leaves_no_hooks_even_when_the_forward_fails():
    model = CallPattern([0, 1])

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    trace_calls(model, x_input())
    assert hooks() == 0
    with pytest.raises(RuntimeError):
        trace_calls(model, torch.randn(1, 4, DIM + 1))
    assert hooks() == 0
    assert torch.is_grad_enabled()


def test_trace_on_meta_needs_meta_inputs_and_never_moves_the_model():
    with torch.device("meta"):
        model = DeepHolders()
    trace = trace_calls(model, torch.zeros(1, 4, DIM, device="meta"))
    assert trace.attention == {f"a.b.c.blocks.{i}.attn": 1 for i in range(3)}
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ConfigError, match="meta"):
        trace_calls(model, x_input())


def test_trace_to_dict_is_json():
    trace = trace_calls(CallPattern([0, 1]), x_input())
    data = json.loads(json.dumps(trace.to_dict()))
    assert data["calls"][0] == ["", None] and data["attention"]["blocks.0.attn"] == 1


# ---- user-stated map ---------------------------------------------------------------------------
def test_stated_towers_and_attention_win_and_serialize():
    model = InlineModel()
    m = describe(model, x_input(), towers=["blocks"], attention=["blocks.0", "blocks.1"])
    assert tower_paths(m) == {"blocks": ("blocks.0", "blocks.1")}
    assert [a.path for a in m.attention] == ["blocks.0", "blocks.1"]
    assert m.overrides == {"towers": ("blocks",), "attention": ("blocks.0", "blocks.1")}
    data = json.loads(json.dumps(m.to_dict()))
    assert data["overrides"] == {"towers": ["blocks"], "attention": ["blocks.0", "blocks.1"]}
    again = describe(model, **data["overrides"])
    assert tower_paths(again) == tower_paths(m) and again.attention == m.attention
    # stated attention is the user's word: only whether it ran is checked
    assert check_against_trace(m, trace_calls(model, x_input())) == []


def test_stated_paths_are_validated():
    model = DeepHolders()
    with pytest.raises(ConfigError, match=r"no module 'a.b.blocks'.*a\.b\.c\.blocks"):
        describe(model, towers=["a.b.blocks"])
    with pytest.raises(ConfigError, match="no module 'nope'"):
        describe(model, attention=["nope"])
    with pytest.raises(ConfigError, match="list of module paths"):
        describe(model, towers="a.b.c.blocks")
    with pytest.raises(ConfigError, match="holds no blocks"):
        describe(model, towers=["head"])


# ---- known architectures ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["flux", "wan"])
def test_known_architectures_trace_on_meta_to_their_static_map(arch):
    with torch.device("meta"):
        model, _ = TINY_DIFFUSERS[arch]()
    inputs = example_inputs(model)
    assert all(t.is_meta for t in inputs.values())
    static, traced = describe(model), describe(model, inputs)
    assert traced.traced and not static.traced
    assert traced.towers == static.towers
    assert traced.attention == static.attention and traced.attention
    assert traced.ffn == static.ffn
    assert check_against_trace(static, trace_calls(model, inputs)) == []


# ---- property: random module trees ------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_traced_map_finds_exactly_the_called_towers_and_attention_modules(towers):
    model = Tree(towers)
    expected_towers, expected_attention = {}, set()
    for (path, _, calls), (_, _, blocks, _) in zip(model.plan, towers):
        called = sorted(set(calls))
        expected_towers[path] = tuple(f"{path}.{i}" for i in called)
        expected_attention |= {f"{path}.{i}.attn" for i in called if blocks[i] == "split"}
    m = describe(model, x_input())
    assert tower_paths(m) == expected_towers
    assert {a.path for a in m.attention} == expected_attention
    assert check_against_trace(m, trace_calls(model, x_input())) == []
    static = describe(model)
    assert set(tower_paths(static)) == set(expected_towers)  # statically too, the inner lists


_FEW_LAYERS = {"num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1}


@pytest.mark.parametrize("name", spec_names())
def test_every_shipped_spec_has_example_inputs_that_trace_its_map_on_meta(name):
    """Each shipped architecture (at full width, few layers) runs its example inputs on `meta`."""
    spec = get_spec(name)
    config = {k: (min(v, _FEW_LAYERS[k]) if k in _FEW_LAYERS else v) for k, v in spec.config.items()}
    model = build_diffusers_model(spec.diffusers_class, config, torch.bfloat16)
    inputs = example_inputs(model)
    traced = describe(model, inputs)
    assert traced.traced and traced.towers and traced.attention
    assert all(len(t.blocks) <= 2 for t in traced.towers)
    assert check_against_trace(describe(model), trace_calls(model, inputs)) == []
