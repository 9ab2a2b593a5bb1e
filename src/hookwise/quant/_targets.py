"""Which Linear leaves one `Quantize` application quantizes, with which scheme, and why others stay.

Targets are the model map's Linear leaves inside the towers (the repeated blocks), minus what the
map keeps in high precision (norms, embeddings, modulation, input / output projections, the model's
keep-in-fp32 list) with `skip="auto"`, adapters (LoRA / PEFT) always, leaves whose weight dtype a
forward reads, and leaves a scheme cannot hold (a width that is not a multiple of its group).
`modules={"regex": scheme}` then chooses per leaf: the first pattern searched in the path that
matches gives the scheme (None keeps the leaf in high precision); every pattern must match a target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, NoTargetError
from ..introspect.model_map import ModelMap, describe
from ..introspect.precision import REASON_DTYPE_READ, find_dtype_readers


@dataclass
class Targets:
    """{path: (module, scheme)} to quantize and {path: reason} of the Linear leaves kept."""

    chosen: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def _plain_linear(module: nn.Module) -> bool:
    # Subclasses qualify only if they keep the standard forward (its arithmetic is replaced).
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def choose_targets(
    model: nn.Module,
    scheme: str,
    skip: str,
    modules: tuple[tuple[str, str | None], ...],
    fits: Callable[[str, tuple[int, ...], torch.dtype], str | None],
    model_map: ModelMap | None = None,
) -> Targets:
    """Decide the targets without changing anything; raises `NoTargetError` / `ConfigError`.

    `fits(scheme, shape, dtype)` says why a weight cannot take a scheme.
    """
    model_map = model_map or describe(model)
    named = dict(model.named_modules())
    patterns = [(re.compile(p), s) for p, s in modules]
    hits = {p: 0 for p, _ in modules}
    out = Targets()
    candidates: dict[str, nn.Module] = {}
    for leaf in model_map.leaves:
        if leaf.kind != "linear":
            continue
        module = named[leaf.path]
        if leaf.block is None:
            out.kept[leaf.path] = "outside the towers"
        elif leaf.keep == "adapter":
            out.kept[leaf.path] = "adapter (LoRA / PEFT) layer"
        elif skip == "auto" and leaf.keep is not None:
            out.kept[leaf.path] = f"high precision: {leaf.keep}"
        elif not _plain_linear(module):
            # A forward set on the instance (an adapter, an observer hook) is fine: the quantized hook
            # runs it and computes the layer's own F.linear inside it (`_inner.py`).
            out.kept[leaf.path] = f"{type(module).__name__} has its own forward"
        elif not isinstance(getattr(module, "weight", None), torch.Tensor) or not module.weight.is_floating_point():
            out.kept[leaf.path] = "weight is not floating point (already quantized?)"
        else:
            candidates[leaf.path] = module
    for path, why in find_dtype_readers(model, candidates).items():
        candidates.pop(path, None)
        out.kept[path] = f"{REASON_DTYPE_READ}: {why}"
    for path, module in candidates.items():
        chosen = scheme
        for pattern, override in patterns:
            if pattern.search(path):
                hits[pattern.pattern] += 1
                chosen = override
                break
        if chosen is None:
            out.kept[path] = "modules= keeps it in high precision"
            continue
        why = fits(chosen, tuple(module.weight.shape), module.weight.dtype)
        if why is not None:
            out.kept[path] = f"{chosen} cannot hold it: {why}"
            continue
        out.chosen[path] = (module, chosen)
    unused = [p for p, n in hits.items() if n == 0]
    if unused:
        raise ConfigError(
            f"modules= pattern(s) {unused} match no quantizable Linear leaf of {type(model).__name__}; patterns are "
            f"regular expressions searched in paths such as {next(iter(candidates), 'blocks.0.attn.to_q')!r}"
        )
    if not out.chosen:
        if skip == "auto" and any(why.startswith("high precision") for why in out.kept.values()):
            hint = "use skip='none' to quantize what the map keeps in high precision"
        elif out.kept and all(why == "outside the towers" for why in out.kept.values()):
            hint = ("Quantize targets the Linear leaves of tower blocks (repeated blocks the model map finds), and "
                    "this model has none holding a Linear")  # fmt: skip
        else:
            hint = "see why each was kept above"
        raise NoTargetError(
            f"quantization found nothing to quantize in {type(model).__name__}: {len(out.kept)} Linear leaves were "
            f"kept ({_summarize(out.kept)}); {hint}"
        )
    bad = [p for p, (m, _) in out.chosen.items() if m.weight.requires_grad and m.training]
    if bad:
        raise ConfigError(
            f"{len(bad)} targeted weights are trainable in a model in training mode (e.g. {bad[0]!r}), and a "
            f"quantized weight cannot be trained. For training (QLoRA), freeze the base model first "
            f"(model.requires_grad_(False), then add LoRA); for inference, call model.eval() first"
        )
    return out


def _summarize(kept: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for why in kept.values():
        key = str(why).split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "no Linear leaves"
