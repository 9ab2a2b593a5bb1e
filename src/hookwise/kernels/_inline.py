"""The patterns known architectures write inline, reached through their blocks and attention processors.

FLUX and Wan compute the gated residual (`x + gate * y`), Wan its AdaLN modulation
(`norm(x) * (1 + scale) + shift`), and both their rotary embedding in code that no module of its own
holds: a block's forward and an attention processor's `__call__`. Kernels reaches them through two
instance-level routes, never by patching a class:

- Block kinds (`flux_double`, `flux_single`, `wan_block`): the block's forward written again here with
  the fused ops in place of the inline expressions, computed by a hook at `Layer.REPLACE` (innermost on
  the block, so offloading, checkpointing and caches on the block wrap it as they wrapped the block's
  own forward). The block's submodules (adaptive norms, attention, feed-forward) are still called as
  modules, with whatever hooks they carry.
- Processor kinds (`flux_rope`, `wan_rope`): the attention module's processor object is replaced, on
  the instance, by a wrapper whose call is the processor's own with the fused rotary embedding; the
  hook puts the very same processor object back when it is removed.

Each function takes `ops`, a mapping of `EXPRESSIONS` names to one backend's functions, holding only
the ops the user asked for: a missing one is computed by the architecture's own inline expression. The
numerics check at apply (`fused.check_site`) compares each site with the module's own forward on
inputs of its real widths, so a diffusers release whose code differs shows up as a rejected site.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ._patterns import Kind

# Which `EXPRESSIONS` entry each op stands for inside a block forward.
BLOCK_OPS = {"gate": "gated_residual", "modulate": "norm_modulate"}
ROPE_OPS = {"rope": "rope_interleaved"}


def _gate(ops: Any, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FLUX's `x + gate * y` (in x's dtype), fused when "gated_residual" is in ops."""
    fused = ops.get("gated_residual")
    return fused(x, gate, y) if fused is not None else x + gate * y


def _ln_modulate(ops: Any, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FLUX's `norm(x) * (1 + scale) + shift` after an nn.LayerNorm, fused when "norm_modulate" is in ops."""
    fused = ops.get("norm_modulate")
    if fused is None or not _plain_layer_norm(norm):
        return norm(x) * (1 + scale) + shift
    return fused(x, norm.weight, norm.bias, scale, shift, norm.eps, False)


def _plain_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1


# ---- FLUX blocks (diffusers FluxTransformerBlock / FluxSingleTransformerBlock) -------------------------
def _flux_double(block, ops, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb
    )
    outputs = block.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **(joint_attention_kwargs or {}),
    )
    attn_output, context_attn_output = outputs[0], outputs[1]
    hidden_states = _gate(ops, hidden_states, gate_msa.unsqueeze(1), attn_output)
    norm_hidden_states = _ln_modulate(ops, block.norm2, hidden_states, scale_mlp[:, None], shift_mlp[:, None])
    hidden_states = _gate(ops, hidden_states, gate_mlp.unsqueeze(1), block.ff(norm_hidden_states))
    if len(outputs) == 3:
        hidden_states = hidden_states + outputs[2]
    encoder_hidden_states = _gate(ops, encoder_hidden_states, c_gate_msa.unsqueeze(1), context_attn_output)
    norm_encoder_hidden_states = _ln_modulate(
        ops, block.norm2_context, encoder_hidden_states, c_scale_mlp[:, None], c_shift_mlp[:, None]
    )
    encoder_hidden_states = _gate(ops, encoder_hidden_states, c_gate_mlp.unsqueeze(1), block.ff_context(norm_encoder_hidden_states))
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux_single(block, ops, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = _gate(ops, residual, gate.unsqueeze(1), block.proj_out(hidden_states))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _flux_block_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    norm = block.norm1 if hasattr(block, "norm1") else block.norm
    dim = norm.linear.in_features
    hidden = torch.randn(2, 8, dim, generator=gen).to(device=device, dtype=dtype)
    context = torch.randn(2, 4, dim, generator=gen).to(device=device, dtype=dtype)
    temb = (torch.randn(2, dim, generator=gen) * 0.5).to(device=device, dtype=dtype)
    return (hidden, context, temb), {"image_rotary_emb": _flux_rope_tables(12, block.attn.head_dim, device, gen)}


def _flux_rope_tables(seq: int, head_dim: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of FLUX's layout: (seq, head_dim), each angle repeated for its pair, in float32."""
    angles = (torch.rand(seq, head_dim // 2, generator=gen) * 6.3).repeat_interleave(2, dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


# ---- Wan block (diffusers WanTransformerBlock) ----------------------------------------------------------
def _wan_modulate(ops: Any, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    fused = ops.get("norm_modulate")
    if fused is None or not _plain_layer_norm(norm):
        return (norm(x.float()) * (1 + scale) + shift).type_as(x)
    return fused(x, norm.weight, norm.bias, scale, shift, norm.eps, False)


def _wan_gate(ops: Any, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    fused = ops.get("gated_residual")
    return fused(x, gate, y) if fused is not None else (x.float() + y.float() * gate).type_as(x)


def _wan_block(block, ops, hidden_states, encoder_hidden_states, temb, rotary_emb):
    if temb.ndim == 4:
        chunks = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        chunks = tuple(c.squeeze(2) for c in chunks)
    else:
        chunks = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = chunks
    norm_hidden_states = _wan_modulate(ops, block.norm1, hidden_states, scale_msa, shift_msa)
    attn_output = block.attn1(norm_hidden_states, None, None, rotary_emb)
    hidden_states = _wan_gate(ops, hidden_states, gate_msa, attn_output)
    norm_hidden_states = block.norm2(hidden_states.float()).type_as(hidden_states)
    hidden_states = hidden_states + block.attn2(norm_hidden_states, encoder_hidden_states, None, None)
    norm_hidden_states = _wan_modulate(ops, block.norm3, hidden_states, c_scale_msa, c_shift_msa)
    return _wan_gate(ops, hidden_states, c_gate_msa, block.ffn(norm_hidden_states))


def _wan_block_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    dim = block.scale_shift_table.shape[-1]
    hidden = torch.randn(2, 8, dim, generator=gen).to(device=device, dtype=dtype)
    context = torch.randn(2, 4, block.attn2.to_k.in_features, generator=gen).to(device=device, dtype=dtype)
    temb = (torch.randn(2, 6, dim, generator=gen) * 0.5).to(device=device, dtype=dtype)
    return (hidden, context, temb, _wan_rope_tables(8, dim // block.attn1.heads, device, gen)), {}


def _wan_rope_tables(seq: int, head_dim: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of Wan's layout: (1, seq, 1, head_dim), each angle repeated for its pair, in float32."""
    cos, sin = _flux_rope_tables(seq, head_dim, device, gen)
    return cos[None, :, None], sin[None, :, None]


# ---- attention processors with the rotary embedding fused ---------------------------------------------
def _rope(ops: Any, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return ops["rope_interleaved"](x, *tables, 1)


def _flux_tables(image_rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    cos, sin = image_rotary_emb  # (seq, head_dim); out[2i] = x0 cos[2i] - x1 sin[2i], out[2i+1] = x1 cos[2i+1] + x0 sin[2i+1]
    return tuple(t.contiguous() for t in (cos[..., 0::2], sin[..., 0::2], cos[..., 1::2], sin[..., 1::2]))


def _helpers(processor: Any) -> Any:
    """The module that defines the processor's class (its projection helpers and dispatch function)."""
    return sys.modules[type(processor).__module__]


def original_processor(attn: nn.Module) -> Any:
    processor = attn.processor
    return processor.inner if isinstance(processor, FusedProcessor) else processor


def _flux_attention(attn, ops, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
    """diffusers' FluxAttnProcessor.__call__ with the rotary embedding fused."""
    processor = original_processor(attn)
    lib = _helpers(processor)
    query, key, value, encoder_query, encoder_key, encoder_value = lib._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
        encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        tables = _flux_tables(image_rotary_emb)
        query, key = _rope(ops, query, tables), _rope(ops, key, tables)
    hidden_states = lib.dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, backend=processor._attention_backend, parallel_config=processor._parallel_config
    )
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return hidden_states
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
    )
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def _flux_attention_example(attn: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, attn.query_dim, generator=gen).to(device=device, dtype=dtype)
    if attn.added_kv_proj_dim is None:
        return (hidden,), {"image_rotary_emb": _flux_rope_tables(8, attn.head_dim, device, gen)}
    context = torch.randn(2, 4, attn.added_kv_proj_dim, generator=gen).to(device=device, dtype=dtype)
    return (hidden, context), {"image_rotary_emb": _flux_rope_tables(12, attn.head_dim, device, gen)}


def _wan_attention(attn, ops, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
    """diffusers' WanAttnProcessor.__call__ for self-attention (no image context) with the rotary embedding fused."""
    processor = original_processor(attn)
    lib = _helpers(processor)
    query, key, value = lib._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        cos, sin = rotary_emb  # (1, seq, 1, head_dim); out[2i] = x0 cos[2i] - x1 sin[2i+1], out[2i+1] = x1 cos[2i] + x0 sin[2i+1]
        c, s = cos[0, :, 0, 0::2].contiguous(), sin[0, :, 0, 1::2].contiguous()
        query, key = _rope(ops, query, (c, s, c, s)), _rope(ops, key, (c, s, c, s))
    hidden_states = lib.dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=processor._attention_backend,
        parallel_config=processor._parallel_config if encoder_hidden_states is None else None,
    )  # fmt: skip
    hidden_states = hidden_states.flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](hidden_states))


def _wan_attention_example(attn: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, attn.to_q.in_features, generator=gen).to(device=device, dtype=dtype)
    return (hidden, None, None, _wan_rope_tables(8, attn.inner_dim // attn.heads, device, gen)), {}


class FusedProcessor:
    """An attention processor that computes its inner processor's call with the rotary embedding fused.

    Installed on one attention module instance by the Kernels hook; `inner` is the processor object the
    module had, put back as it was on removal. Its `__call__` keeps the inner processor's parameters
    (diffusers' attention modules pass on only the keyword arguments the processor's call names).
    """

    def __init__(self, inner: Any, kind: str, owner: Any) -> None:
        self.inner = inner
        self.kind = kind
        self.owner = owner  # the hook: its `ops` and `expressions`
        self._forward = INLINE_KINDS[kind].forward

    def __getattr__(self, name: str) -> Any:  # `_attention_backend`, `_parallel_config`, ...: the inner one's
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, attn: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Inside a graph being compiled, the eager expressions: the surrounding compile fuses them.
        ops = self.owner.expressions if torch.compiler.is_compiling() else self.owner.ops
        return self._forward(attn, ops, *args, **kwargs)


# ---- where they are -----------------------------------------------------------------------------------
INLINE_KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("flux_double", "gate", _flux_double, _flux_block_example),
        Kind("flux_single", "gate", _flux_single, _flux_block_example),
        Kind("wan_block", "gate", _wan_block, _wan_block_example),
        Kind("flux_rope", "rope", _flux_attention, _flux_attention_example),
        Kind("wan_rope", "rope", _wan_attention, _wan_attention_example),
    )
}
PROCESSOR_KINDS = ("flux_rope", "wan_rope")
# The ops each kind fuses (the block kinds take "gate" and "modulate"; Wan's modulation is in its block).
KIND_OPS = {
    "flux_double": ("gate", "modulate"),
    "flux_single": ("gate",),
    "wan_block": ("gate", "modulate"),
    "flux_rope": ("rope",),
    "wan_rope": ("rope",),
}
_CLASSES = {
    "flux": {"FluxTransformerBlock": "flux_double", "FluxSingleTransformerBlock": "flux_single", "FluxAttention": "flux_rope"},
    "wan": {"WanTransformerBlock": "wan_block", "WanAttention": "wan_rope"},
}
_PROCESSORS = {"flux_rope": "FluxAttnProcessor", "wan_rope": "WanAttnProcessor"}


def inline_kind(module: nn.Module, arch: str | None) -> str | None:
    """The inline kind of `module` in a model of architecture `arch`, or None."""
    cls = type(module)
    if not cls.__module__.startswith("diffusers."):
        return None
    kind = _CLASSES.get(arch or "", {}).get(cls.__name__)
    if kind in _PROCESSORS:
        processor = getattr(module, "processor", None)
        if type(processor).__name__ != _PROCESSORS[kind] or not type(processor).__module__.startswith("diffusers."):
            return None  # another processor (IP-Adapter, a user's own): its code is not this one
        if kind == "wan_rope" and (module.is_cross_attention or module.add_k_proj is not None):
            return None  # cross-attention takes no rotary embedding
    return kind


def inline_sites(model: nn.Module, arch: str | None, ops: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every block or attention module whose inline code holds one of `ops`."""
    found: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        kind = inline_kind(module, arch)
        if kind is None or id(module) in seen or not set(KIND_OPS[kind]) & set(ops):
            continue
        seen.add(id(module))
        found.append((path, module, kind))
    return found


def ops_for(kind: str, requested: tuple[str, ...], backend_ops: Any) -> dict[str, Any]:
    """The functions a site of `kind` fuses: only those of the requested ops."""
    names = {**BLOCK_OPS, **ROPE_OPS}
    return {names[op]: backend_ops[names[op]] for op in KIND_OPS[kind] if op in requested}
