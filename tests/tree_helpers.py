"""Module trees for the map and technique tests: attention blocks of several styles (separate
attention module, fused qkv computed inline by sdpa or softmax(q @ k^T)), plain containers, and a
hypothesis strategy for random trees of towers nested in containers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

DIM = 8
HEADS = 2


def split_heads(t):
    b, n, d = t.shape
    return t.view(b, n, HEADS, d // HEADS).transpose(1, 2)


def merge_heads(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def softmax_attention(q, k, v):
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return logits.softmax(dim=-1) @ v


class Attn(nn.Module):
    """A separate attention module: projections and the attention itself in its own forward."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.to_out = nn.Linear(DIM, DIM)

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


def mlp():
    return nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))


class SplitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attn()
        self.norm2, self.mlp = nn.LayerNorm(DIM), mlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FusedBlock(nn.Module):
    """A block with a fused qkv Linear: attention is computed inline in the block's own forward."""

    def __init__(self, softmax: bool = False):
        super().__init__()
        self.softmax = softmax
        self.norm1, self.qkv, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm2, self.mlp = nn.LayerNorm(DIM), mlp()

    def forward(self, x):
        q, k, v = (split_heads(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        attend = softmax_attention if self.softmax else F.scaled_dot_product_attention
        x = x + self.proj(merge_heads(attend(q, k, v)))
        return x + self.mlp(self.norm2(x))


class Holder(nn.Module):
    """A plain container: holds modules, has no forward."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def run_all(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def x_input():
    return torch.randn(1, 4, DIM)


def tower_paths(m):
    return {t.name: t.block_paths for t in m.towers}


class Tree(nn.Module):
    """Towers under random containers; forward calls each tower's chosen blocks in its order."""

    def __init__(self, towers):
        super().__init__()
        self.plan = []  # (list path, kind, call order)
        for t, (wrappers, kind, blocks, calls) in enumerate(towers):
            items = [SplitBlock() if b == "split" else FusedBlock(b == "fused-softmax") for b in blocks]
            node = nn.Sequential(*items) if kind == "seq" else nn.ModuleList(items)
            suffix = ""
            for wrapper in reversed(wrappers):
                if wrapper == "list":
                    node, suffix = nn.ModuleList([nn.Linear(1, 1), node]), ".1" + suffix
                elif wrapper == "dict":
                    node, suffix = nn.ModuleDict({"inner": node}), ".inner" + suffix
                else:
                    node, suffix = Holder(inner=node), ".inner" + suffix
            name = f"part{chr(97 + t)}"
            setattr(self, name, node)
            self.plan.append((name + suffix, kind, calls))

    def forward(self, x):
        for path, kind, calls in self.plan:
            blocks = self.get_submodule(path)
            if kind == "seq":
                x = blocks(x)
            else:
                for i in calls:
                    x = blocks[i](x)
        return x


@st.composite
def trees(draw):
    towers = []
    for _ in range(draw(st.integers(1, 3))):
        wrappers = draw(st.lists(st.sampled_from(["list", "dict", "holder"]), min_size=1, max_size=4))
        kind = draw(st.sampled_from(["list", "seq"]))
        # one block class per tower; fused blocks compute attention by sdpa or by softmax(q @ k^T)
        fused = draw(st.sampled_from(["fused", "fused-softmax"]))
        kinds = draw(st.sampled_from([["split"], [fused], ["fused", "fused-softmax"]]))
        blocks = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=3))
        n = len(blocks)
        if kind == "seq":
            calls = list(range(n))
        else:
            called = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
            calls = []
            for i in range(n):
                if called[i]:
                    calls += [i] * draw(st.integers(1, 2))  # some blocks reused
        towers.append((wrappers, kind, blocks, calls))
    return towers
