"""Pyramid Attention Broadcast: reuse attention outputs across steps, by kind, inside a timestep window.

Attention outputs change slowly in the middle of sampling, cross-attention slowest, then temporal,
then spatial attention. PAB computes each attention module on one step in `*_range` (per CFG
branch) while the timestep is inside its window, and broadcasts the last output on the others.
Kinds come from the model map: self and joint attention are "spatial", attention over time is
"temporal", attention to the text is "cross". Windows are in diffusers' 0..1000 timestep scale.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import TechniqueConfig, check_int, check_range
from ..core.cost import cached_cost
from ..core.hooks import Layer, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError
from ..introspect.model_map import describe
from ._reuse import IntervalRule, attach_module_hooks, attention_kind, detach_module_hooks

NAME = "pab"


@dataclass(frozen=True)
class PyramidAttentionBroadcast(TechniqueConfig):
    """Pyramid Attention Broadcast (PAB): compute attention every N steps, broadcast it in between.

    - `spatial_range`, `temporal_range`, `cross_range`: compute each kind once in this many steps
      (1: always; None: leave that kind alone). Self and joint attention count as spatial.
    - `*_window`: (low, high) timesteps (0..1000 scale) inside which reuse happens; None: every step.
    - `timestep_scale`: factor from the model's timestep argument to 0..1000 (None: 1000 when a
      run's first timestep is at most 1, as for FLUX, else 1).
    """

    spatial_range: int | None = 2
    temporal_range: int | None = 3
    cross_range: int | None = 5
    spatial_window: tuple[float, float] | None = (100.0, 800.0)
    temporal_window: tuple[float, float] | None = (100.0, 800.0)
    cross_window: tuple[float, float] | None = (100.0, 900.0)
    timestep_scale: float | None = None

    def validate(self) -> None:
        for kind in ("spatial", "temporal", "cross"):
            check_int(f"PyramidAttentionBroadcast.{kind}_range", getattr(self, f"{kind}_range"), 1, optional=True)
            check_range(f"PyramidAttentionBroadcast.{kind}_window", getattr(self, f"{kind}_window"))
        if all(getattr(self, f"{k}_range") is None for k in ("spatial", "temporal", "cross")):
            raise ConfigError("PyramidAttentionBroadcast: every *_range is None, so nothing would be reused; set one")
        if self.timestep_scale is not None and not self.timestep_scale > 0:
            raise ConfigError(f"PyramidAttentionBroadcast.timestep_scale must be > 0 or None, got {self.timestep_scale!r}")


def _apply_pab(model: nn.Module, config: PyramidAttentionBroadcast | None = None) -> None:
    """Hook every attention module of `model` whose kind has a range set."""
    config = config or PyramidAttentionBroadcast()
    model = unwrap(model)
    model_map = describe(model)
    targets = []
    for role in model_map.attention:
        kind = attention_kind(role.kind)
        interval = getattr(config, f"{kind}_range")
        if interval is None:
            continue
        targets.append((role.path, model.get_submodule(role.path), IntervalRule(interval, getattr(config, f"{kind}_window"))))
    kinds = sorted({attention_kind(r.kind) for r in model_map.attention})
    attach_module_hooks(
        NAME,
        model,
        targets,
        config.timestep_scale,
        needs_timestep=any(getattr(config, f"{k}_window") is not None for k in ("spatial", "temporal", "cross")),
        what=(
            f"no attention module of a kind with a range set (the model's attention kinds: {kinds or 'none found'}); "
            f"set the range of one of these kinds"
        ),
    )


def _remove_pab(model: nn.Module, config: PyramidAttentionBroadcast | None = None) -> None:
    detach_module_hooks(NAME, model)


def apply_pab(model: nn.Module, config: PyramidAttentionBroadcast | None = None) -> None:
    """Hook every attention module of `model` whose kind has a range set.

    The same as `hookwise.apply(model, config)`.
    """
    apply_techniques(model, [config or PyramidAttentionBroadcast()])


def remove_pab(model: nn.Module) -> None:
    """Remove PyramidAttentionBroadcast from `model` (the same as `hookwise.remove(model, "pab")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME, PyramidAttentionBroadcast, apply=_apply_pab, remove=_remove_pab, layer=Layer.CACHE, conflicts=("faster_cache",),
    cost=cached_cost("pab", PyramidAttentionBroadcast),
)
