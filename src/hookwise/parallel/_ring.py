"""Ring attention: K/V blocks passed around a process group, partial results merged by log-sum-exp.

Each member keeps its queries; at step t it attends to the K/V block that started on member
`me - t`, while that block's successor is already in flight (`batch_isend_irecv`). The partial
outputs merge exactly (online softmax): with `lse` the log-sum-exp of a partial's scores,
`out = sum_i out_i * exp(lse_i - logsumexp_i(lse_i))`. Blocks may have different lengths (uneven
splits); an empty block is passed on without being attended to. A key-padding mask travels with
its block (the caller gives each member's mask; they are small), and a block whose keys are all
masked for a row adds nothing to that row.

Each step's local attention is an ordinary `scaled_dot_product_attention` call, so whatever
attention backend is applied to the module serves it (its hook's mode sees the call). The merge
needs the step's log-sum-exp, which that call does not return: `attend_lse` takes it from the
kernel that ran when that kernel computes one (PyTorch's fused kernels: the CPU flash kernel, the
CUDA flash / efficient / cuDNN kernels, seen at the dispatcher; the last two compute it only when
asked, which SDPA does under grad only, so the ring asks them), and otherwise computes it in
float32 from q and k (a second q k^T product, in row chunks) and says so once (`on_computed`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ._ulysses import Traffic

_aten = torch.ops.aten
_LSE_KERNELS = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
_ASKED = {_aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_cudnn_attention.default}
_CHUNK_BYTES = 64 << 20  # the most a computed log-sum-exp holds of scores at once


class _CaptureLSE(TorchDispatchMode):
    """Keeps the log-sum-exp a fused SDPA kernel returned for queries of shape (B, H, Lq, ...)."""

    supports_higher_order_operators = True  # FlexAttention is one: it runs as it would without this mode

    @classmethod
    def is_infra_mode(cls) -> bool:
        # FlexAttention compiles its eager path and dynamo refuses any other mode on the stack; this one
        # only watches (and asks two kernels for what they compute anyway), so a compiled region it does
        # not see costs nothing but the capture: the log-sum-exp is then computed
        return True

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(q.shape[:3])
        self.lse: torch.Tensor | None = None
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ASKED:  # these compute it only when asked (SDPA asks under grad): ask, at no extra cost
            if len(args) > 4:
                args = (*args[:4], True, *args[5:])
            elif "compute_log_sumexp" in kwargs:
                kwargs = {**kwargs, "compute_log_sumexp": True}
        out = func(*args, **kwargs)
        if func in _LSE_KERNELS:
            self.kernels.append(str(func.overloadpacket.__name__))
            b, h, n = self.shape
            lse = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            # the efficient kernel returns an empty one unless asked (no grad), and pads rows to 32
            if isinstance(lse, torch.Tensor) and lse.dim() >= 3 and tuple(lse.shape[:2]) == (b, h) and lse.numel() >= b * h * n:
                self.lse = lse.reshape(b, h, -1)[..., :n].float()
        else:
            packet = getattr(func, "overloadpacket", None)
            name = packet.__name__ if packet is not None else getattr(func, "__name__", str(func))
            if "attention" in name:
                self.kernels.append(str(name))
        return out


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as the additive float mask it means (a boolean one: True attends)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _computed_lse(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """logsumexp over keys of q k^T * scale (+ mask), float32, a chunk of query rows at a time."""
    bias = additive(mask, torch.float32)
    rows = max(1, _CHUNK_BYTES // max(1, 4 * q.shape[0] * q.shape[1] * k.shape[2]))
    kt = k.float().transpose(-1, -2)
    parts = []
    for start in range(0, q.shape[2], rows):
        scores = (q[:, :, start : start + rows].float() @ kt) * scale
        if bias is not None:
            scores = scores + (bias if bias.shape[-2] == 1 else bias[..., start : start + rows, :])
        parts.append(torch.logsumexp(scores, dim=-1))
    return torch.cat(parts, dim=-1)


def attend_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    on_computed: Callable[[list[str]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale + mask) v, logsumexp of the scores over keys [B, H, Lq], float32).

    The output comes from `F.scaled_dot_product_attention` (the applied attention backend, if any);
    the log-sum-exp from the kernel that ran when it returned one, else computed, after calling
    `on_computed(kernels seen)`.
    """
    capture = _CaptureLSE(q)
    with capture:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    lse = capture.lse
    if lse is None:
        if on_computed is not None:
            on_computed(capture.kernels)
        lse = _computed_lse(q, k, scale, mask)
    return out, lse


def _dead_rows(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Where a key-padding mask ([b|1, h|1, 1, Lk]) leaves a row no key: [B, H, Lq] booleans, or None."""
    if mask is None:
        return None
    valid = mask if mask.dtype == torch.bool else mask > float("-inf")
    dead = ~valid.any(dim=-1)  # [b|1, h|1, 1]
    return dead.expand(*shape) if bool(dead.any()) else None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kv_tokens: list[int],
    group,
    me: int,
    traffic: Traffic | None = None,
    masks: list[torch.Tensor | None] | None = None,
    on_computed: Callable[[list[str]], None] | None = None,
) -> torch.Tensor:
    """Attention of this member's queries over every member's keys; `kv_tokens[j]`: member j's K/V length,
    `masks[j]`: the key-padding mask of member j's block ([b|1, h|1, 1, kv_tokens[j]]) or None."""
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
            mask = masks[owner] if masks is not None else None
            part, part_lse = attend_lse(q, block[0], block[1], scale, mask, on_computed)
            part = part.float()
            dead = _dead_rows(mask, tuple(part_lse.shape))
            if dead is not None:  # no key of this block for these rows: nothing to add (kernels differ there)
                part_lse = part_lse.masked_fill(dead, float("-inf"))
                part = part.masked_fill(dead.unsqueeze(-1), 0.0)
            if out is None:
                out, lse = part, part_lse
            else:
                merged = torch.logaddexp(lse, part_lse)
                finite = torch.where(torch.isinf(merged), torch.zeros_like(merged), merged)  # rows with no key yet
                out = out * torch.exp(lse - finite).unsqueeze(-1) + part * torch.exp(part_lse - finite).unsqueeze(-1)
                lse = merged
        if pending is not None:
            for request in pending:
                request.wait()
            block = buffer
    if out is None:  # no keys anywhere: what SDPA gives for an empty key set
        return q.new_zeros(*q.shape[:3], v.shape[3])
    return out.to(q.dtype)
