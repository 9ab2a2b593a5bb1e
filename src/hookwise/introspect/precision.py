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

One more reason depends on the layers a technique would change: `find_dtype_readers` finds, among
candidate leaves, those whose weight dtype some forward reads (`x.to(self.proj.weight.dtype)`), from
the source of their ancestors' forwards; casting keeps them in high precision (`REASON_DTYPE_READ`).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable

from torch import nn

from .paths import join, prefixes

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
REASON_DTYPE_READ = "dtype read"


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
        lineage = prefixes(path)
        if covered.intersection(lineage):
            continue
        in_tower = bool(blocks.intersection(lineage))
        reason = module_reason(path, module, keep=keep, skip=skip, arch_patterns=arch, in_tower=in_tower)
        if reason is not None:
            found[path] = reason
            covered.add(path)
            continue
        if next(module.children(), None) is not None:
            for name, _ in module.named_parameters(recurse=False):
                full = join(path, name)
                preason = param_reason(full, keep=keep, skip=skip)
                if preason is not None:
                    found[full] = preason
    return found


# ---- dtype reads ----------------------------------------------------------------------------------
# A forward that reads a weight's dtype (`x.to(self.proj.weight.dtype)`, `next(self.embedder.
# parameters()).dtype`, a model's `.dtype`) would see a storage dtype if that weight were cast, so
# the module it reads keeps high precision (REASON_DTYPE_READ). Found in the source of forwards.
_WEIGHT_DTYPE_READ = re.compile(r"((?:self|attn|module)(?:\.\w+|\[\d+\])*)\.weight\.dtype")
_PARAMS_DTYPE_READ = re.compile(
    r"(next\((?:iter\()?)?((?:self|attn|module)(?:\.\w+|\[\d+\])*)\.parameters\(\)\)*\.dtype"
)


def _source(fn: Any) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


def _forward_sources(module: nn.Module) -> list[str]:
    """Source of the module's forward, and of its attention processor's __call__ if it has one."""
    sources = [_source(type(module).forward)]
    processor = getattr(module, "processor", None)
    if processor is not None and not isinstance(processor, nn.Module):
        sources.append(_source(type(processor).__call__))
    return sources


def _relative(expr: str) -> str:
    """`self.to_k_ip[0]` -> `to_k_ip.0`; `attn.to_q` -> `to_q`; `self` -> ``."""
    parts = re.split(r"\.|\[(\d+)\]", expr)
    parts = [p for p in parts if p]
    return ".".join(parts[1:])


def find_dtype_readers(model: nn.Module, candidates: dict[str, nn.Module]) -> dict[str, str]:
    """{leaf path: why} for candidate leaves whose weight dtype some forward reads."""
    found: dict[str, str] = {}
    if not candidates:
        return found
    paths = list(candidates)
    ancestors: set[str] = {""}
    for path in paths:
        ancestors.update(prefixes(path))
    modules = dict(model.named_modules())
    cache: dict[Any, list[str]] = {}

    def mark(target: str, why: str, first_only: bool) -> None:
        if first_only:  # next(iter(x.parameters())).dtype reads the first parameter only
            owner = _first_floating_owner(modules.get(target))
            if owner is not None:
                full = join(target, owner)
                if full in candidates:
                    found.setdefault(full, why)
            return
        for path in paths:
            if path == target or path.startswith(target + "."):
                found.setdefault(path, why)

    for apath, module in modules.items():
        if apath not in ancestors:
            continue
        key = (type(module), type(getattr(module, "processor", None)))
        if key not in cache:
            cache[key] = _forward_sources(module)
        for source in cache[key]:
            for match in _WEIGHT_DTYPE_READ.finditer(source):
                rel = _relative(match.group(1))
                target = join(apath, rel)
                mark(target, f"{type(module).__name__}.forward reads {match.group(0)}", first_only=False)
            for match in _PARAMS_DTYPE_READ.finditer(source):
                rel = _relative(match.group(2))
                target = join(apath, rel)
                why = f"{type(module).__name__}.forward reads {match.group(0)}"
                mark(target, why, first_only=match.group(1) is not None)
    # A model-level `.dtype` property (diffusers, transformers) reports its first floating parameter.
    root = model
    if isinstance(getattr(type(root), "dtype", None), property):
        keep = getattr(root, "_keep_in_fp32_modules", None) or []
        for name, param in root.named_parameters():
            if keep and any(k in name for k in keep):
                continue
            if param.is_floating_point():
                owner = name.rsplit(".", 1)[0]
                if owner in candidates:
                    found.setdefault(owner, f"{type(root).__name__}.dtype reports this layer's weight dtype")
                break
    return found


def _first_floating_owner(module: nn.Module | None) -> str | None:
    """Relative path of the module owning `module`'s first floating-point parameter."""
    if module is None:
        return None
    for name, param in module.named_parameters():
        if param.is_floating_point():
            return name.rsplit(".", 1)[0] if "." in name else ""
    return None
