"""Ulysses: all-to-all between "every head, my tokens" and "my heads, every token" on one process group.

Tensors are in SDPA layout `[batch, heads, tokens, head_dim]`. Heads are split across the group as
`torch.tensor_split` splits them (uneven head counts work), and each member's token count may differ
(uneven sequence splits work): the exchange flattens each chunk, so `all_to_all_single` moves chunks of
any size. `sent` accumulates the bytes this rank sent to the others.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def head_sizes(heads: int, size: int) -> list[int]:
    return [len(c) for c in torch.arange(heads).tensor_split(size)]


class Traffic:
    """Bytes this rank sent to other ranks, by kind of exchange."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(n)

    def total(self) -> int:
        return sum(self.bytes.values())


def _exchange(chunks: list[torch.Tensor], shapes: list[tuple[int, ...]], group, me: int, traffic: Traffic | None) -> list[torch.Tensor]:
    """Send chunks[j] to member j; receive from member j a tensor of shapes[j]."""
    send = torch.cat([c.reshape(-1) for c in chunks])
    in_sizes = [c.numel() for c in chunks]
    out_sizes = [int(torch.Size(s).numel()) for s in shapes]
    recv = send.new_empty(sum(out_sizes))
    dist.all_to_all_single(recv, send, out_sizes, in_sizes, group=group)
    if traffic is not None:
        traffic.add("ulysses", (send.numel() - in_sizes[me]) * send.element_size())
    return [part.view(shape) for part, shape in zip(recv.split(out_sizes), shapes)]


def scatter_heads(x: torch.Tensor, tokens: list[int], group, me: int, traffic: Traffic | None = None) -> torch.Tensor:
    """[B, H, tokens[me], D] -> [B, my heads, sum(tokens), D] (members' tokens in member order)."""
    b, h, _, d = x.shape
    heads = head_sizes(h, len(tokens))
    chunks = [c.contiguous() for c in x.split(heads, dim=1)]
    parts = _exchange(chunks, [(b, heads[me], n, d) for n in tokens], group, me, traffic)
    return torch.cat(parts, dim=2)


def gather_heads(x: torch.Tensor, tokens: list[int], heads_total: int, group, me: int, traffic: Traffic | None = None) -> torch.Tensor:
    """The inverse of `scatter_heads`: [B, my heads, sum(tokens), D] -> [B, H, tokens[me], D]."""
    b, _, _, d = x.shape
    heads = head_sizes(heads_total, len(tokens))
    chunks = [c.contiguous() for c in x.split(tokens, dim=2)]
    parts = _exchange(chunks, [(b, h, tokens[me], d) for h in heads], group, me, traffic)
    return torch.cat(parts, dim=1)
