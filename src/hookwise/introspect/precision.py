"""Which modules keep high precision: norms, embeddings, modulation, input / output projections.

Rules, in the order they are tried for each module (the first that matches gives the reason):

1. by type: normalization layers (any class with "norm" in its name, which covers adaptive norms
   and their modulation Linear), embeddings (any class with "embed" in its name, `nn.Embedding`);
2. by name: the last path component names a modulation, a norm or an embedding;
3. input / output projections: top-level modules named like `proj_in`, `proj_out`, `final_layer`;
4. the model's own lists: a diffusers model's `_keep_in_fp32_modules` (path components) and
   `_skip_layerwise_casting_patterns` (regular expressions searched in the path);
5. the known architecture's extra patterns.

Only the outermost matching module is reported; everything below it inherits the reason.
Parameters held directly by a non-leaf module (Wan's `scale_shift_table`) are reported by path too.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

_EMBED_NAME = re.compile(
    r"^(pos_embed|patch_embed|patch_embedding|x_embedder|img_in|txt_in|context_embedder|time_embed"
    r"|time_embedding|time_embedder|time_text_embed|timestep_embedder|time_in|vector_in|guidance_in"
    r"|condition_embedder|text_embedding|text_embedder|time_projection|caption_projection|rope|pos_emb"
    r"|adaln_single|t_embedder|y_embedder)$"
)
_NORM_NAME = re.compile(r"norm")
_MOD_NAME = re.compile(r"^(modulation|adaLN_modulation|adaln_modulation|img_mod|txt_mod|scale_shift_table)$")
_IO_NAME = re.compile(r"^(proj_in|proj_out|final_layer|head|out_proj|norm_out|patchify_proj|out_layer)$")

REASON_MODEL = "model's keep-in-fp32 / skip list"
REASON_ARCH = "architecture default"
REASON_NORM = "norm"
REASON_ADANORM = "adaptive norm (modulation)"
REASON_EMBED = "embedding"
REASON_MOD = "modulation"
REASON_IO = "input / output projection"


def _model_rules(model: nn.Module) -> tuple[list[str], list[re.Pattern]]:
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    skip = [re.compile(p) for p in (getattr(model, "_skip_layerwise_casting_patterns", None) or [])]
    return keep, skip


def module_reason(
    path: str,
    module: nn.Module,
    *,
    keep: Iterable[str],
    skip: Iterable[re.Pattern],
    arch_patterns: Iterable[re.Pattern],
    in_tower: bool,
) -> str | None:
    """Why `module` at `path` keeps high precision, or None."""
    if not path:
        return None
    parts = path.split(".")
    last = parts[-1]
    cls = type(module).__name__.lower()
    if "norm" in cls and ("ada" in cls or "modulat" in cls):
        return REASON_ADANORM
    if isinstance(module, _NORM_TYPES) or "norm" in cls:
        return REASON_NORM
    if isinstance(module, nn.Embedding) or "embed" in cls:
        return REASON_EMBED
    if _MOD_NAME.match(last):
        return REASON_MOD
    if _NORM_NAME.search(last.lower()):
        return REASON_NORM
    if _EMBED_NAME.match(last):
        return REASON_EMBED
    if not in_tower and len(parts) == 1 and _IO_NAME.match(last):
        return REASON_IO
    if any(k in parts for k in keep) or any(p.search(path) for p in skip):
        return REASON_MODEL
    if any(p.search(path) for p in arch_patterns):
        return REASON_ARCH
    return None


def param_reason(path: str, *, keep: Iterable[str], skip: Iterable[re.Pattern]) -> str | None:
    """Why a parameter held directly by a non-leaf module keeps high precision, or None."""
    parts = path.split(".")
    if _MOD_NAME.match(parts[-1]):
        return REASON_MOD
    if any(k in parts for k in keep) or any(p.search(path) for p in skip):
        return REASON_MODEL
    return None


def find_high_precision(
    model: nn.Module, *, arch_patterns: Iterable[str] = (), tower_blocks: Iterable[str] = ()
) -> dict[str, str]:
    """{path: reason} for the outermost modules (and direct parameters) that keep high precision."""
    keep, skip = _model_rules(model)
    arch = [re.compile(p) for p in arch_patterns]
    blocks = set(tower_blocks)
    found: dict[str, str] = {}
    covered: set[str] = set()
    for path, module in model.named_modules():
        prefixes = _prefixes(path)
        if covered.intersection(prefixes):
            continue
        in_tower = bool(blocks.intersection(prefixes))
        reason = module_reason(path, module, keep=keep, skip=skip, arch_patterns=arch, in_tower=in_tower)
        if reason is not None:
            found[path] = reason
            covered.add(path)
            continue
        if next(module.children(), None) is not None:
            for name, _ in module.named_parameters(recurse=False):
                full = f"{path}.{name}" if path else name
                preason = param_reason(full, keep=keep, skip=skip)
                if preason is not None:
                    found[full] = preason
    return found


def _prefixes(path: str) -> list[str]:
    """`path` and every ancestor path of it ("a.b.c" -> ["a", "a.b", "a.b.c"])."""
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
