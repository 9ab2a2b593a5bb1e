"""Attention memory as the kernel chosen on the compute device would spend it.

On the CPU, `scaled_dot_product_attention` may take the math path, which holds a sequence x
sequence score matrix per head; flash and memory-efficient attention never do (they keep only a
logsumexp row per query for backward). A function mode intercepts each call and runs, on the same
(fake or real) tensors, the ATen operation of the chosen backend, whose outputs and saved tensors
are those the GPU kernel allocates:

- "flash": `_scaled_dot_product_flash_attention` (output, float32 logsumexp, rng state). Flash takes
  only fp16 / bf16 and no explicit mask on CUDA; otherwise the GPU takes memory-efficient attention,
  and so does this model.
- "efficient": `_scaled_dot_product_efficient_attention` (output, float32 logsumexp padded to 32
  queries, philox seed and offset); a boolean mask becomes an additive float bias first, as in sdpa.
- "math": `_scaled_dot_product_attention_math`, whose decomposition runs op by op. On CUDA it computes
  fp16 / bf16 inputs in float32 (PyTorch's default), so with `upcast` the inputs are upcast first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import ConfigError

BACKENDS = ("flash", "efficient", "math")
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_HALF = (torch.float16, torch.bfloat16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"attention_backend={backend!r} is not a backend; use one of {', '.join(BACKENDS)}")
    return backend


class AttentionBackend(TorchFunctionMode):
    """Runs every `scaled_dot_product_attention` call as the chosen backend's ATen operation."""

    def __init__(self, backend: str, upcast_math: bool = False) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.upcast_math = upcast_math
        self.calls = 0
        self.taken: set[str] = set()  # the backends the calls really took (flash may become efficient)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        with torch._C.DisableTorchFunctionSubclass():
            return self._attend(*args, **kwargs)

    def _attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False) -> torch.Tensor:
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        backend = self.backend
        if backend == "flash" and (attn_mask is not None or query.dtype not in _HALF):
            backend = "efficient"
        self.taken.add(backend)
        if backend == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, scale=scale
            )[0]
        if backend == "efficient":
            bias = _additive(attn_mask, query.dtype)
            if bias is not None:
                bias = bias.expand(query.shape[0], query.shape[-3], query.shape[-2], key.shape[-2])
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, grad, dropout_p, is_causal, scale=scale
            )[0]
        dtype = query.dtype
        if self.upcast_math and dtype in _HALF:
            query, key, value = query.float(), key.float(), value.float()
            if attn_mask is not None and attn_mask.dtype in _HALF:
                attn_mask = attn_mask.float()
        out = torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale
        )[0]
        return out.to(dtype)


def _additive(mask: Any, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
