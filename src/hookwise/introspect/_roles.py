"""The static rules of the model map: what kind of leaf a module is, whether it is an attention or a
feed-forward module, and which kind of attention, from its class, its projections and its name.
A traced forward (`trace.py`) confirms or corrects what these rules find."""

from __future__ import annotations

import re

from torch import nn

LEAF_TYPES: dict[str, tuple[type, ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "embedding": (nn.Embedding,),
}
# A path part that marks an adapter layer (LoRA / PEFT): such leaves are never cast or quantized.
ADAPTER_PART = re.compile(r"^(lora_[A-Za-z_]+|lokr_.*|loha_.*|ia3_.*|adapter.*)$")
FFN_NAME = re.compile(r"^(ff|ff_context|ffn|mlp|img_mlp|txt_mlp|feed_forward|proj_mlp|ff_norm)$")
CROSS_NAME = re.compile(r"^(attn2|cross_attn|cross_attention|attn_cross|audio_cross_attn)$")


def leaf_kind(module: nn.Module) -> str | None:
    for kind, types in LEAF_TYPES.items():
        if isinstance(module, types):
            return kind
    return None


def named_attention(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return "attention" in cls and "processor" not in cls


def attention_like(module: nn.Module) -> bool:
    if named_attention(module):
        return True
    return (hasattr(module, "to_q") and hasattr(module, "to_k")) or isinstance(getattr(module, "qkv", None), nn.Linear)


def holds_block_parts(module: nn.Module) -> bool:
    """Whether `module` holds what only a whole block holds: a feed-forward, or an attention module of its own."""
    for name, sub in module.named_modules():
        if name and ((is_ffn(name, sub) and leaf_kind(sub) is None) or attention_like(sub)):
            return True
    return False


def is_attention(path: str, module: nn.Module, block_paths: set[str]) -> bool:
    """The static rule: attention-like by class or projections, and not a whole block.

    A block that holds a fused `qkv` Linear next to its norms and MLP computes attention inline; it is
    no attention module (reusing its output would drop the residual stream), nor is a class named
    `...AttentionBlock` that holds its own attention and feed-forward modules.
    """
    if not attention_like(module) or holds_block_parts(module):
        return False
    return path not in block_paths or named_attention(module)


def attention_kind(path: str, module: nn.Module) -> str:
    last = path.rsplit(".", 1)[-1]
    if getattr(module, "is_cross_attention", False) or CROSS_NAME.match(last):
        return "cross"
    if getattr(module, "add_q_proj", None) is not None or getattr(module, "add_k_proj", None) is not None:
        return "joint"
    if "temp" in last.lower():
        return "temporal"
    return "self"


def is_ffn(path: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    if any(k in cls for k in ("feedforward", "mlp", "ffn")):
        return True
    return bool(FFN_NAME.match(path.rsplit(".", 1)[-1]))
