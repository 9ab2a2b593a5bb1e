"""Which leaves layerwise casting stores in the low-precision dtype, which it keeps (and why), and the
compute dtype: decided from the model map before anything changes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NoTargetError
from ..introspect.model_map import ModelMap, describe
from ..introspect.paths import prefixes
from ..introspect.precision import REASON_ADANORM, REASON_DTYPE_READ, REASON_MOD, find_dtype_readers
from ._cast_ops import CONV_FUNCS

MODULATION = (REASON_ADANORM, REASON_MOD)


def check_compute(storage: torch.dtype, compute: torch.dtype) -> None:
    """Refuse a compute dtype that is narrower than the storage dtype, cannot compute, or equals it."""
    if compute.itemsize < storage.itemsize:
        raise ConfigError(
            f"compute_dtype={compute} is smaller than storage_dtype={storage}: weights would lose precision "
            f"in compute; use a compute dtype at least as wide as the storage dtype (float32, bfloat16, float16)"
        )
    if not compute.is_floating_point or compute.itemsize < 2:
        raise ConfigError(f"compute_dtype={compute} cannot compute; use float32, bfloat16 or float16")
    if compute == storage:
        raise ConfigError(f"storage_dtype and compute_dtype are both {storage}: casting would save nothing")


@dataclass
class CastTargets:
    """The leaves one application casts, the leaves it keeps (and why), and the compute dtype."""

    targets: dict[str, nn.Module]
    skipped: dict[str, str]  # path -> reason
    compute_dtype: torch.dtype


def _castable(module: nn.Module) -> bool:
    if type(module) is nn.Linear or type(module) in CONV_FUNCS:
        return True
    # Subclasses are castable only if they keep the standard forward (we replace its arithmetic).
    for base in (nn.Linear, *CONV_FUNCS):
        if isinstance(module, base) and type(module).forward is base.forward:
            return True
    return False


def cast_targets(model: nn.Module, config: Any, model_map: ModelMap | None = None) -> CastTargets:
    """Decide which leaves `config` (a `LayerwiseCasting`) casts, without changing anything. Raises on bad input."""
    model_map = model_map or describe(model)
    modules = dict(model.named_modules())
    patterns = [re.compile(p) for p in config.skip_patterns]
    pattern_hits = {p.pattern: 0 for p in patterns}
    class_hits = {c: 0 for c in config.skip_classes}
    candidates: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for leaf in model_map.leaves:
        if leaf.kind not in ("linear", "conv"):
            continue
        module = modules[leaf.path]
        if leaf.keep == "adapter":
            skipped[leaf.path] = "adapter (LoRA / PEFT) layer"
            continue
        if config.skip == "auto" and leaf.keep is not None:
            if not (config.cast_modulation and leaf.keep in MODULATION and leaf.block is not None):
                skipped[leaf.path] = f"high precision: {leaf.keep}"
                continue
        matched = [p.pattern for p in patterns if p.search(leaf.path)]
        if matched:
            for p in matched:
                pattern_hits[p] += 1
            skipped[leaf.path] = f"skip pattern {matched[0]!r}"
            continue
        lineage = {type(modules[a]).__name__ for a in ["", *prefixes(leaf.path)]}
        classes = [c for c in config.skip_classes if c in lineage]
        if classes:
            for c in classes:
                class_hits[c] += 1
            skipped[leaf.path] = f"skip class {classes[0]!r}"
            continue
        if not _castable(module):
            skipped[leaf.path] = f"{type(module).__name__} has its own forward"
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            skipped[leaf.path] = "weight is not floating point"
            continue
        if weight.dtype == config.storage_dtype or "weight_scale" in module._buffers:
            skipped[leaf.path] = "already stored in the storage dtype"
            continue
        candidates[leaf.path] = module
    unused = [p for p, n in pattern_hits.items() if n == 0] + [c for c, n in class_hits.items() if n == 0]
    if unused:
        raise ConfigError(
            f"skip pattern(s) / class(es) {unused} match no castable Linear / Conv leaf of "
            f"{type(model).__name__}; check the spelling (patterns are searched in paths like "
            f"{next(iter(candidates), 'blocks.0.attn.to_q')!r})"
        )
    for path, why in find_dtype_readers(model, candidates).items():
        candidates.pop(path, None)
        skipped[path] = f"{REASON_DTYPE_READ}: {why}"
    if not candidates:
        raise NoTargetError(
            f"layerwise casting found nothing to cast in {type(model).__name__}: {len(skipped)} leaves were "
            f"kept ({_summarize(skipped)}); use skip='none' or cast_modulation=True if that is intended"
        )
    compute = config.compute_dtype or _dominant_dtype(candidates)
    check_compute(config.storage_dtype, compute)
    bad = [p for p, m in candidates.items() if m.weight.requires_grad and m.training]
    if bad:
        raise ConfigError(
            f"{len(bad)} targeted weights are trainable in a model in training mode (e.g. {bad[0]!r}), and a "
            f"weight stored in {config.storage_dtype} cannot be trained. For training, freeze the base model "
            f"first (model.requires_grad_(False), then add LoRA) or keep these modules with skip_patterns; "
            f"for inference, call model.eval() or model.requires_grad_(False) before casting"
        )
    return CastTargets(candidates, skipped, compute)


def _summarize(skipped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for why in skipped.values():
        key = why.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no Linear / Conv leaves"


def _dominant_dtype(modules: dict[str, nn.Module]) -> torch.dtype:
    totals: dict[torch.dtype, int] = {}
    for m in modules.values():
        totals[m.weight.dtype] = totals.get(m.weight.dtype, 0) + m.weight.numel()
    return max(totals, key=totals.get)
