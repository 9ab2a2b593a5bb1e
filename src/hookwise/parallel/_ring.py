"""Ring attention: K/V blocks passed around a process group, partial results merged by log-sum-exp.

Each member keeps its queries; at step t it attends to the K/V block that started on member
`me - t`, while that block's successor is already in flight (`batch_isend_irecv`). The partial
outputs merge exactly (online softmax): with `lse` the log-sum-exp of a partial's scores,
`out = sum_i out_i * exp(lse_i - logsumexp_i(lse_i))`. Blocks may have different lengths (uneven
splits); an empty block is passed on without being attended to.

The partial attention needs its log-sum-exp, which `scaled_dot_product_attention` does not return:
`attend_lse` uses PyTorch's own fused kernels that do (the CPU flash kernel, the CUDA efficient
kernel) and exact math elsewhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._ulysses import Traffic


def _math_lse(q, k, v, scale):
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v.float()
    return out.to(q.dtype), lse


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale) v, logsumexp of the scores over keys [B, H, Lq], float32)."""
    try:
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None, scale=scale)
            return out, lse.float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
            return out, lse[..., : q.shape[2]].float()
    except (RuntimeError, NotImplementedError):
        pass  # a shape or dtype the fused kernel refuses: exact math below
    return _math_lse(q, k, v, scale)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kv_tokens: list[int],
    group,
    me: int,
    traffic: Traffic | None = None,
) -> torch.Tensor:
    """Attention of this member's queries over every member's keys; `kv_tokens[j]`: member j's K/V length."""
    size = len(kv_tokens)
    ranks = [dist.get_global_rank(group, j) if group is not None else j for j in range(size)]
    nxt, prv = ranks[(me + 1) % size], ranks[(me - 1) % size]
    block = torch.stack([k, v]).contiguous()  # one message per step carries both
    out = lse = None
    for step in range(size):
        owner = (me - step) % size
        pending = None
        if step < size - 1:
            incoming = (me - step - 1) % size
            shape = (2, *k.shape[:2], kv_tokens[incoming], k.shape[3])
            buffer = block.new_empty(shape)
            ops = [dist.P2POp(dist.isend, block, nxt, group), dist.P2POp(dist.irecv, buffer, prv, group)]
            pending = dist.batch_isend_irecv(ops)
            if traffic is not None:
                traffic.add("ring", block.numel() * block.element_size())
        if kv_tokens[owner] > 0:
            part, part_lse = attend_lse(q, block[0], block[1], scale)
            if out is None:
                out, lse = part.float(), part_lse
            else:
                merged = torch.logaddexp(lse, part_lse)
                out = out * torch.exp(lse - merged).unsqueeze(-1) + part.float() * torch.exp(part_lse - merged).unsqueeze(-1)
                lse = merged
        if pending is not None:
            for request in pending:
                request.wait()
            block = buffer
    if out is None:  # no keys anywhere: what SDPA gives for an empty key set
        return q.new_zeros(*q.shape[:3], v.shape[3])
    return out.to(q.dtype)
