"""Helpers for the Kernels tests: count the calls of the fused functions the kernel hooks hold, and a
custom DiT of shapes the known models do not have (for the structural route)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hookwise.core.hooks import hooks_named
from hookwise.kernels import fused


def count_fused_calls(model: nn.Module) -> dict[str, int]:
    """Wrap every Kernels hook's fused functions (module, block, processor and structural hooks) with a call counter.

    Returns the counts by function name ("norm_modulate", "gated_residual", ...), filled as the model runs.
    A module listed at several paths is wrapped once.
    """
    calls: dict[str, int] = {}

    def wrap(name, fn):
        def counted(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)

        return counted

    hooks = hooks_named(model, fused.HOOK_NAME, (fused.KernelHook, fused.ProcessorHook, fused.StructuralHook)).values()
    for hook in {id(h): h for h in hooks}.values():
        hook.ops = {name: wrap(name, fn) for name, fn in hook.ops.items()}
    return calls


# ---- a custom DiT of shapes the known models do not have ---------------------------------------------
def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs, written as reference code does (x: batch, heads, seq, head_dim; tables: seq, head_dim)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class JointBlock(nn.Module):
    """Two streams, fused qkv per stream, interleaved rope on (seq, head_dim) tables, gates from a modulation."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, 4 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ctx_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ctx_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, x, ctx, vec, rope):
        g1, g2, c1, c2 = self.mod(F.silu(vec)).chunk(4, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        cq, ck, cv = self.ctx_qkv(self.norm(ctx)).view(b, ctx.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        cos, sin = rope
        q, k = rope_pairs(q, cos, sin), rope_pairs(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, d)
        ca, a = a[:, : ctx.shape[1]], a[:, ctx.shape[1] :]
        x = x + g1[:, None] * self.out(a)
        ctx = ctx + c1[:, None] * self.ctx_out(ca)
        x = x + g2[:, None] * self.mlp(self.norm(x))
        ctx = c2.unsqueeze(1) * self.mlp(self.norm(ctx)) + ctx
        return x, ctx


class FlatBlock(nn.Module):
    """One stream, rotate-half rope on (batch, seq, heads, head_dim) with (1, seq, 1, head_dim) tables."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(dim, dim)
        self.norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, vec, cos, sin, scale: float = 1.0):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=None)
        gate = self.mod(vec)[:, None] * scale
        return x + gate * self.out(a.transpose(1, 2).reshape(b, n, d))


class CustomDiT(nn.Module):
    """Towers in a container nested in a container, one block reused twice, one (outside the towers) never
    called: a never-run block inside a tower is a map mismatch hookwise raises on for every technique."""

    def __init__(self, dim: int = 24, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.x_in, self.c_in, self.t_in = nn.Linear(6, dim), nn.Linear(5, dim), nn.Linear(4, dim)
        self.stages = nn.ModuleDict({"joint": nn.ModuleList([JointBlock(dim, heads) for _ in range(2)]),
                                     "flat": nn.ModuleList([FlatBlock(dim, heads) for _ in range(2)])})  # fmt: skip
        self.spare = FlatBlock(dim, heads)
        self.head = nn.Linear(dim, 6)

    def forward(self, x, context, t):
        x, ctx, vec = self.x_in(x), self.c_in(context), self.t_in(t)
        d = x.shape[-1] // self.heads
        seq = ctx.shape[1] + x.shape[1]
        angles = torch.arange(seq)[:, None] * torch.linspace(0.1, 1.0, d // 2)[None]
        pairs = angles.repeat_interleave(2, -1)
        for block in self.stages["joint"]:
            x, ctx = block(x, ctx, vec, (pairs.cos(), pairs.sin()))
        halves = torch.cat([angles[: x.shape[1]]] * 2, -1)[None, :, None]
        flat = self.stages["flat"]
        for block in (flat[0], flat[1], flat[0]):  # flat[0] twice
            x = block(x, vec, halves.cos().to(x.dtype), halves.sin().to(x.dtype), scale=0.5)
        return self.head(x)


def custom_dit(batch: int = 2):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(batch, 10, 6, generator=g), context=torch.randn(batch, 3, 5, generator=g),
                  t=torch.randn(batch, 4, generator=g))  # fmt: skip
    return CustomDiT().eval(), inputs


def gate_off_by_one_percent(monkeypatch) -> None:
    """Every Kernels backend's gated residual made 1% off eager, so the numerics check rejects it."""
    from hookwise.kernels import _patterns as patterns
    from hookwise.kernels import fused

    def off(backend, device):
        ops = dict(patterns.EXPRESSIONS)
        ops["gated_residual"] = lambda x, g, y: patterns.gated_residual(x, g, y) * 1.01
        return ops

    monkeypatch.setattr(fused, "backend_ops", off)
