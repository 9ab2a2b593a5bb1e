"""The patterns known architectures write inline, reached through their blocks and attention processors.

FLUX, Wan, HunyuanVideo and LTX-Video compute the gated residual (`x + gate * y`), some of their AdaLN
modulation (`norm(x) * (1 + scale) + shift`: Wan's, LTX's, and the second one of a FLUX / HunyuanVideo
double block), and their rotary embedding in code that no module of its own holds: a block's forward
and an attention processor's `__call__`. Kernels reaches them through two instance-level routes, never
by patching a class:

- Block kinds (`flux_double`, `flux_single`, `wan_block`, `hunyuan_double`, `hunyuan_single`,
  `hunyuan_refiner`, `ltx_block`): the block's forward written again here with the fused ops in place
  of the inline expressions, computed by a hook at `Layer.REPLACE` (innermost on the block, so
  offloading, checkpointing and caches on the block wrap it as they wrapped the block's own forward).
  The block's submodules (adaptive norms, attention, feed-forward) are still called as modules, with
  whatever hooks they carry.
- Processor kinds (`flux_rope`, `wan_rope`, `hunyuan_rope`, `ltx_rope`): the attention module's
  processor object is replaced, on the instance, by a wrapper whose call is the processor's own with
  the fused rotary embedding; the hook puts the very same processor object back when it is removed.

Each function takes `ops`, a mapping of `EXPRESSIONS` names to one backend's functions, holding only
the ops the user asked for: a missing one is computed by the architecture's own inline expression. The
numerics check at apply (`fused.check_site`) compares each site with the module's own forward on
inputs of its real widths, so a diffusers release whose code differs shows up as a rejected site.
Blocks of other classes (a custom DiT, HunyuanVideo's token-replace variants) take the structural route
(`_structural.py`) for their gate, modulation and rope; what no route reaches is listed under `not_reached`.
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


def _adaln_block_inputs(block: nn.Module, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> tuple:
    """(hidden, context, temb) of 8 image and 4 text tokens for a block whose AdaLN norm is `norm1` / `norm`."""
    norm = block.norm1 if hasattr(block, "norm1") else block.norm
    dim = norm.linear.in_features
    hidden = torch.randn(2, 8, dim, generator=gen).to(device=device, dtype=dtype)
    context = torch.randn(2, 4, dim, generator=gen).to(device=device, dtype=dtype)
    temb = (torch.randn(2, dim, generator=gen) * 0.5).to(device=device, dtype=dtype)
    return hidden, context, temb


def _flux_block_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    inputs = _adaln_block_inputs(block, dtype, device, gen)
    return inputs, {"image_rotary_emb": _flux_rope_tables(12, block.attn.head_dim, device, gen)}


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


# ---- HunyuanVideo blocks (diffusers HunyuanVideoTransformerBlock / ...SingleTransformerBlock / token refiner) ---
def _hunyuan_double(block, ops, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None, *args, **kwargs):
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb
    )
    attn_output, context_attn_output = block.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        attention_mask=attention_mask,
        image_rotary_emb=freqs_cis,
    )
    hidden_states = _gate(ops, hidden_states, gate_msa.unsqueeze(1), attn_output)
    encoder_hidden_states = _gate(ops, encoder_hidden_states, c_gate_msa.unsqueeze(1), context_attn_output)
    norm_hidden_states = _ln_modulate(ops, block.norm2, hidden_states, scale_mlp[:, None], shift_mlp[:, None])
    norm_encoder_hidden_states = _ln_modulate(
        ops, block.norm2_context, encoder_hidden_states, c_scale_mlp[:, None], c_shift_mlp[:, None]
    )
    ff_output = block.ff(norm_hidden_states)
    context_ff_output = block.ff_context(norm_encoder_hidden_states)
    hidden_states = _gate(ops, hidden_states, gate_mlp.unsqueeze(1), ff_output)
    encoder_hidden_states = _gate(ops, encoder_hidden_states, c_gate_mlp.unsqueeze(1), context_ff_output)
    return hidden_states, encoder_hidden_states


def _hunyuan_single(block, ops, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None, *args, **kwargs):
    text_seq_length = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    attn_output, context_attn_output = block.attn(
        hidden_states=norm_hidden_states[:, :-text_seq_length, :],
        encoder_hidden_states=norm_hidden_states[:, -text_seq_length:, :],
        attention_mask=attention_mask,
        image_rotary_emb=image_rotary_emb,
    )
    attn_output = torch.cat([attn_output, context_attn_output], dim=1)
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = _gate(ops, residual, gate.unsqueeze(1), block.proj_out(hidden_states))
    return hidden_states[:, :-text_seq_length, :], hidden_states[:, -text_seq_length:, :]


def _hunyuan_refiner(block, ops, hidden_states, temb, attention_mask=None):
    norm_hidden_states = block.norm1(hidden_states)
    attn_output = block.attn(hidden_states=norm_hidden_states, encoder_hidden_states=None, attention_mask=attention_mask)
    gate_msa, gate_mlp = block.norm_out(temb)
    hidden_states = _gate(ops, hidden_states, gate_msa, attn_output)
    ff_output = block.ff(block.norm2(hidden_states))
    return _gate(ops, hidden_states, gate_mlp, ff_output)


def _hunyuan_block_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden, context, temb = _adaln_block_inputs(block, dtype, device, gen)
    # The rotary embedding covers the video tokens only (the processor leaves the text tokens as they are).
    return (hidden, context, temb, None, _flux_rope_tables(8, block.attn.inner_dim // block.attn.heads, device, gen)), {}


def _hunyuan_refiner_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, block.norm1.normalized_shape[0], generator=gen).to(device=device, dtype=dtype)
    temb = (torch.randn(2, block.norm_out.linear.in_features, generator=gen) * 0.5).to(device=device, dtype=dtype)
    return (hidden, temb), {}


def _hunyuan_attention(attn, ops, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
    """diffusers' HunyuanVideoAttnProcessor2_0.__call__ with the rotary embedding fused."""
    processor = original_processor(attn)
    lib = _helpers(processor)
    if attn.add_q_proj is None and encoder_hidden_states is not None:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
    key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        tables = _flux_tables(image_rotary_emb)  # (seq, head_dim), FLUX's interleaved layout
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]  # the text tokens at the end take no rotation
            query = torch.cat([_rope(ops, query[:, :-text], tables), query[:, -text:]], dim=1)
            key = torch.cat([_rope(ops, key[:, :-text], tables), key[:, -text:]], dim=1)
        else:
            query, key = _rope(ops, query, tables), _rope(ops, key, tables)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([query, encoder_query], dim=1)
        key = torch.cat([key, encoder_key], dim=1)
        value = torch.cat([value, encoder_value], dim=1)
    hidden_states = lib.dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )  # fmt: skip
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is not None:
        text = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-text], hidden_states[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def _hunyuan_attention_example(attn: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, attn.query_dim, generator=gen).to(device=device, dtype=dtype)
    context_width = attn.add_q_proj.in_features if attn.add_q_proj is not None else attn.query_dim
    context = torch.randn(2, 4, context_width, generator=gen).to(device=device, dtype=dtype)
    return (hidden, context), {"image_rotary_emb": _flux_rope_tables(8, attn.inner_dim // attn.heads, device, gen)}


# ---- LTX-Video block (diffusers LTXVideoTransformerBlock) -----------------------------------------------
def _rms_modulate(ops: Any, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LTX's `rms_norm(x) * (1 + scale) + shift` after a diffusers RMSNorm, fused when "norm_modulate" is in ops."""
    fused = ops.get("norm_modulate")
    plain = type(norm).__name__ == "RMSNorm" and type(norm).__module__.startswith("diffusers.")
    if fused is None or not plain:
        return norm(x) * (1 + scale) + shift
    return fused(x, norm.weight, norm.bias, scale, shift, norm.eps, True)


def _ltx_block(block, ops, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, encoder_attention_mask=None):
    batch_size = hidden_states.size(0)
    num_ada_params = block.scale_shift_table.shape[0]
    ada_values = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(
        batch_size, temb.size(1), num_ada_params, -1
    )
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_values.unbind(dim=2)
    norm_hidden_states = _rms_modulate(ops, block.norm1, hidden_states, scale_msa, shift_msa)
    attn_hidden_states = block.attn1(hidden_states=norm_hidden_states, encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
    hidden_states = _gate(ops, hidden_states, gate_msa, attn_hidden_states)
    attn_hidden_states = block.attn2(
        hidden_states, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None, attention_mask=encoder_attention_mask
    )
    hidden_states = hidden_states + attn_hidden_states
    norm_hidden_states = _rms_modulate(ops, block.norm2, hidden_states, scale_mlp, shift_mlp)
    return _gate(ops, hidden_states, gate_mlp, block.ff(norm_hidden_states))


def _ltx_rope_tables(batch: int, seq: int, width: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of LTX's layout: (batch, seq, heads * head_dim), each angle repeated for its pair, in float32."""
    angles = (torch.rand(batch, seq, width // 2, generator=gen) * 6.3).repeat_interleave(2, dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def _ltx_block_example(block: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    dim = block.scale_shift_table.shape[-1]
    hidden = torch.randn(2, 8, dim, generator=gen).to(device=device, dtype=dtype)
    context = torch.randn(2, 4, block.attn2.to_k.in_features, generator=gen).to(device=device, dtype=dtype)
    temb = (torch.randn(2, 1, block.scale_shift_table.numel(), generator=gen) * 0.5).to(device=device, dtype=dtype)
    return (hidden, context, temb, _ltx_rope_tables(2, 8, block.attn1.inner_dim, device, gen)), {}


def _ltx_rope(ops: Any, x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LTX's rotation of (batch, seq, heads * head_dim) by tables of (batch or 1, seq, heads * head_dim)."""
    cos, sin = freqs
    tables = (cos[..., 0::2], sin[..., 0::2], cos[..., 1::2], sin[..., 1::2])
    batch, seq, width = x.shape
    if cos.dim() == 3 and cos.shape[0] == batch and batch > 1:  # one table per sample: the batch joins the sequence
        flat = tuple(t.reshape(batch * seq, width // 2).contiguous() for t in tables)
        return _rope(ops, x.reshape(1, batch * seq, width), flat).view(batch, seq, width)
    return _rope(ops, x, tuple(t.reshape(seq, width // 2).contiguous() for t in tables))


def _ltx_attention(attn, ops, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
    """diffusers' LTXVideoAttnProcessor.__call__ with the rotary embedding fused."""
    processor = original_processor(attn)
    lib = _helpers(processor)
    batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(encoder_hidden_states))
    value = attn.to_v(encoder_hidden_states)
    if image_rotary_emb is not None:
        query, key = _ltx_rope(ops, query, image_rotary_emb), _ltx_rope(ops, key, image_rotary_emb)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    hidden_states = lib.dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )  # fmt: skip
    hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](hidden_states))


def _ltx_attention_example(attn: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 8, attn.query_dim, generator=gen).to(device=device, dtype=dtype)
    return (hidden, None, None, _ltx_rope_tables(2, 8, attn.inner_dim, device, gen)), {}


class FusedProcessor:
    """An attention processor that computes its inner processor's call with the rotary embedding fused.

    Installed on one attention module instance by the Kernels hook; `inner` is the processor object the
    module had, put back as it was on removal. The FLUX / Wan / LTX attention modules pass the rotary
    embedding by position; HunyuanVideo's generic `Attention` passes on only the keywords its processor's
    `__call__` names, which `HunyuanFusedProcessor` names (a `__call__` on the instance would break
    dynamo's trace of the block).
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


class HunyuanFusedProcessor(FusedProcessor):
    """FusedProcessor for HunyuanVideo's attention: diffusers' generic `Attention` passes on only the
    keyword arguments its processor's `__call__` names (by its signature), so this one names them."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:  # fmt: skip
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def fused_processor(inner: Any, kind: str, owner: Any) -> FusedProcessor:
    """The processor object a ProcessorHook installs for a site of `kind`."""
    return (HunyuanFusedProcessor if kind == "hunyuan_rope" else FusedProcessor)(inner, kind, owner)


# ---- where they are -----------------------------------------------------------------------------------
INLINE_KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("flux_double", "gate", _flux_double, _flux_block_example),
        Kind("flux_single", "gate", _flux_single, _flux_block_example),
        Kind("wan_block", "gate", _wan_block, _wan_block_example),
        Kind("hunyuan_double", "gate", _hunyuan_double, _hunyuan_block_example),
        Kind("hunyuan_single", "gate", _hunyuan_single, _hunyuan_block_example),
        Kind("hunyuan_refiner", "gate", _hunyuan_refiner, _hunyuan_refiner_example),
        Kind("ltx_block", "gate", _ltx_block, _ltx_block_example),
        Kind("flux_rope", "rope", _flux_attention, _flux_attention_example),
        Kind("wan_rope", "rope", _wan_attention, _wan_attention_example),
        Kind("hunyuan_rope", "rope", _hunyuan_attention, _hunyuan_attention_example),
        Kind("ltx_rope", "rope", _ltx_attention, _ltx_attention_example),
    )
}
PROCESSOR_KINDS = ("flux_rope", "wan_rope", "hunyuan_rope", "ltx_rope")
# The ops each kind fuses (the block kinds take "gate" and, where the block writes it inline, "modulate").
KIND_OPS = {
    "flux_double": ("gate", "modulate"),
    "flux_single": ("gate",),
    "wan_block": ("gate", "modulate"),
    "hunyuan_double": ("gate", "modulate"),
    "hunyuan_single": ("gate",),
    "hunyuan_refiner": ("gate",),
    "ltx_block": ("gate", "modulate"),
    "flux_rope": ("rope",),
    "wan_rope": ("rope",),
    "hunyuan_rope": ("rope",),
    "ltx_rope": ("rope",),
}
_CLASSES = {
    "flux": {"FluxTransformerBlock": "flux_double", "FluxSingleTransformerBlock": "flux_single", "FluxAttention": "flux_rope"},
    "wan": {"WanTransformerBlock": "wan_block", "WanAttention": "wan_rope"},
    "hunyuanvideo": {
        "HunyuanVideoTransformerBlock": "hunyuan_double",
        "HunyuanVideoSingleTransformerBlock": "hunyuan_single",
        "HunyuanVideoIndividualTokenRefinerBlock": "hunyuan_refiner",
        "Attention": "hunyuan_rope",
    },
    "ltx-video": {"LTXVideoTransformerBlock": "ltx_block", "LTXAttention": "ltx_rope"},
}
_PROCESSORS = {
    "flux_rope": "FluxAttnProcessor",
    "wan_rope": "WanAttnProcessor",
    "hunyuan_rope": "HunyuanVideoAttnProcessor2_0",
    "ltx_rope": "LTXVideoAttnProcessor",
}
# The architectures with routes, for the summary's account of the blocks none reaches.
ROUTED = "FLUX, Wan, HunyuanVideo and LTX-Video blocks (diffusers classes)"


def inline_kind(module: nn.Module, arch: str | None, path: str = "") -> str | None:
    """The inline kind of `module` (at `path`) in a model of architecture `arch`, or None."""
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
        if kind == "ltx_rope" and path.rsplit(".", 1)[-1] != "attn1":
            return None  # LTX's cross-attention (attn2) takes no rotary embedding
    return kind


def inline_sites(model: nn.Module, arch: str | None, ops: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    """(path, module, kind) of every block or attention module whose inline code holds one of `ops`."""
    found: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        kind = inline_kind(module, arch, path)
        if kind is None or id(module) in seen or not set(KIND_OPS[kind]) & set(ops):
            continue
        seen.add(id(module))
        found.append((path, module, kind))
    return found


def ops_for(kind: str, requested: tuple[str, ...], backend_ops: Any) -> dict[str, Any]:
    """The functions a site of `kind` fuses: only those of the requested ops."""
    names = {**BLOCK_OPS, **ROPE_OPS}
    return {names[op]: backend_ops[names[op]] for op in KIND_OPS[kind] if op in requested}
