"""GGUF tensor names: how a file's names map to a model's state-dict keys, per architecture.

Common GGUF files of diffusion transformers (the ComfyUI-GGUF ones) keep the reference code's names:
FLUX's BFL names (`double_blocks.0.img_attn.qkv.weight`, a fused q/k/v), Wan's original names
(`blocks.0.self_attn.q.weight`). A `GGUFKeyMap` turns one file name into the model keys it fills:
one key, or several that the file's tensor is split into along its first dimension (rows: output
features), in order, sized by the model's own tensors. Module names reuse the architecture's LoRA
name table (`architectures.py`: the same BFL / Wan module names); parameters that are not a
module's `weight` / `bias` (norm scales, modulation tables) have their own renames here.

The identity map is used for a file whose names already are the model's keys. This module only
answers name questions; `hookwise.quant.gguf` reads and splits the tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import ConfigError
from .architectures import architecture_named
from .lora_keys import LoraNameRule, group_of_original

# Prefixes that checkpoints of the same model carry depending on the tool that wrote them.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


@dataclass(frozen=True)
class KeyTarget:
    """The model keys one file tensor fills: split along its first dimension in this order."""

    file_key: str
    keys: tuple[str, ...]
    weights: tuple[int, ...]  # relative sizes of the parts, used only without the model's own shapes
    swap_halves: bool = False  # the file's two row halves are the other way round (BFL's final shift/scale)


@dataclass(frozen=True)
class GGUFKeyMap:
    """One architecture's file names: `general.architecture` values, module rules and parameter renames."""

    name: str
    file_architectures: tuple[str, ...]  # values of the file's `general.architecture` this map reads
    modules: tuple[LoraNameRule, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()  # (file parameter, model parameter), `{n}` a block index

    @cached_property
    def _rename_res(self) -> tuple[tuple[re.Pattern, str], ...]:
        out = []
        for original, target in self.renames:
            parts = original.split("{n}")
            out.append((re.compile("^" + r"(?P<n>\d+)".join(re.escape(p) for p in parts) + "$"), target))
        return tuple(out)

    def target(self, file_key: str) -> KeyTarget | None:
        """The model keys `file_key` fills under this map, or None if the map has no name for it."""
        key = strip_prefix(file_key)
        if self.name == "identity":
            return KeyTarget(file_key, (key,), (1,))
        for pattern, template in self._rename_res:
            m = pattern.match(key)
            if m:
                n = m.groupdict().get("n")
                return KeyTarget(file_key, (template.replace("{n}", n) if n else template,), (1,))
        module, _, param = key.rpartition(".")
        if not module or param not in ("weight", "bias"):
            return None
        group = group_of_original(self.modules, module)
        if group is None:
            return None
        keys = tuple(f"{m}.{param}" for m in group.modules)
        return KeyTarget(file_key, keys, group.weights, group.swap_halves)


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


_FLUX_RENAMES = (
    ("double_blocks.{n}.img_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_q.weight"),
    ("double_blocks.{n}.img_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_k.weight"),
    ("double_blocks.{n}.txt_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_added_q.weight"),
    ("double_blocks.{n}.txt_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_added_k.weight"),
    ("single_blocks.{n}.norm.query_norm.scale", "single_transformer_blocks.{n}.attn.norm_q.weight"),
    ("single_blocks.{n}.norm.key_norm.scale", "single_transformer_blocks.{n}.attn.norm_k.weight"),
)

# Original Wan: norm3 is the cross-attention norm (diffusers' norm2); modulation tables renamed.
_WAN_RENAMES = tuple(
    (f"blocks.{{n}}.{o}.{p}", f"blocks.{{n}}.{d}.{p}")
    for o, d in (
        ("self_attn.norm_q", "attn1.norm_q"),
        ("self_attn.norm_k", "attn1.norm_k"),
        ("cross_attn.norm_q", "attn2.norm_q"),
        ("cross_attn.norm_k", "attn2.norm_k"),
        ("cross_attn.norm_k_img", "attn2.norm_added_k"),
        ("norm3", "norm2"),
        ("norm2", "norm3"),
    )
    for p in ("weight", "bias")
) + (
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("head.modulation", "scale_shift_table"),
    *(
        (f"img_emb.proj.{i}.{p}", f"condition_embedder.image_embedder.{d}.{p}")
        for i, d in (("0", "norm1"), ("4", "norm2"))
        for p in ("weight", "bias")
    ),
)

IDENTITY = GGUFKeyMap("identity", ())


def _maps() -> dict[str, GGUFKeyMap]:
    return {
        "flux": GGUFKeyMap("flux", ("flux",), architecture_named("flux").lora_names, _FLUX_RENAMES),
        "wan": GGUFKeyMap("wan", ("wan",), architecture_named("wan").lora_names, _WAN_RENAMES),
    }


KEY_MAPS: dict[str, GGUFKeyMap] = {**_maps(), "identity": IDENTITY}


def key_map_named(name: str) -> GGUFKeyMap:
    """The key map called `name` ("flux", "wan", "identity")."""
    found = KEY_MAPS.get(name)
    if found is None:
        raise ConfigError(f"no GGUF key map named {name!r}; known: {sorted(KEY_MAPS)} (or 'auto')")
    return found
