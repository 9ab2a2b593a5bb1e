"""Kernels' structural route on the CPU: a custom DiT (no per-architecture entry) forward and forward + backward.

The model: `--blocks` pre-norm blocks of width `--dim` written as reference code does (fused qkv, rotate-half
rope on (1, seq, 1, head_dim) tables, `x + gate * y` residuals from a modulation), float32, `--tokens` tokens.
Variants, each a deep copy of the same weights, in one process, one run:

- eager: the plain model;
- structural eager: `Kernels(ops=("gate", "rope"), backend="eager")`: the blocks' traced, rewritten
  forwards with the eager expressions (what the route itself costs: the hook, the call signature, the
  per-call checks of each fused site);
- structural compile: the same with `backend="compile"` (each fused op a `torch.compile`-generated kernel);
- whole-model compile: `torch.compile(model)` (inductor fuses the same elementwise chains on its own).

Each variant is warmed up (trace, check, compiles: the time is reported apart), then `--repeats` rounds run
every variant once in turn (forward under no_grad, then forward + backward of every parameter), so a change
of load hits every variant alike; the table gives medians and ratios to eager, and the load average.

    python benchmarks/kernels_structural.py [--dim 512] [--heads 8] [--blocks 4] [--tokens 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import hookwise
from hookwise import Kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 2 * dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x, vec, cos, sin):
        g1, g2 = self.mod(F.silu(vec)).chunk(2, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + g1[:, None] * self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + g2[:, None] * self.mlp(self.norm2(x))


class DiT(nn.Module):
    def __init__(self, dim: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(blocks)])

    def forward(self, x, vec):
        d = x.shape[-1] // self.heads
        angles = torch.arange(x.shape[1])[:, None] * torch.logspace(0, -4, d // 2)[None]
        angles = torch.cat([angles, angles], -1)[None, :, None]
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, vec, cos, sin)
        return x


def make(name: str, base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    if name == "structural eager":
        hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="eager"))
    elif name == "structural compile":
        hookwise.apply(model, Kernels(ops=("gate", "rope"), backend="compile"))
    elif name == "whole-model compile":
        model = torch.compile(model)
    return model


def step(model: nn.Module, inputs: dict, backward: bool) -> float:
    start = time.perf_counter()
    if backward:
        model(**inputs).square().mean().backward()
    else:
        with torch.no_grad():
            model(**inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = DiT(args.dim, args.heads, args.blocks).eval()
    inputs = {"x": torch.randn(1, args.tokens, args.dim), "vec": torch.randn(1, args.dim)}
    print(f"load before: {open('/proc/loadavg').read().strip()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    names = ("eager", "structural eager", "structural compile", "whole-model compile")
    models, warm = {}, {}
    for name in names:
        start = time.perf_counter()
        models[name] = make(name, base)
        for backward in (False, True, False, True):
            step(models[name], inputs, backward)
        warm[name] = time.perf_counter() - start
        if name.startswith("structural"):
            summary = hookwise.kernels_summary(models[name])
            assert summary["rejected"] == {} and set(summary["used"].values()) == {"structural"}, summary
    times = {(n, b): [] for n in names for b in (False, True)}
    for _ in range(args.repeats):
        for backward in (False, True):
            for name in names:
                times[(name, backward)].append(step(models[name], inputs, backward))
    print(f"load after: {open('/proc/loadavg').read().strip()}")
    print(f"{'variant':<22}{'forward s':>10}{'x eager':>9}{'fwd+bwd s':>11}{'x eager':>9}{'warm-up s':>11}")
    for name in names:
        f, fb = (statistics.median(times[(name, b)]) for b in (False, True))
        f0, fb0 = (statistics.median(times[("eager", b)]) for b in (False, True))
        print(f"{name:<22}{f:>10.3f}{f / f0:>9.2f}{fb:>11.3f}{fb / fb0:>9.2f}{warm[name]:>11.1f}")


if __name__ == "__main__":
    main()
