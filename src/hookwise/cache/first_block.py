"""First-block cache: run the first block, skip the others while its residual barely changes.

On each step the first main block runs; the relative L1 change of its residual (output - input,
over all its streams) since the last computed step is compared with `threshold`. Below it, every
other block is skipped and their last residual (or a TaylorSeer prediction of it) is added back.
The decision costs one host read per step (none with `threshold=0`, which never skips).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int
from ..core.cost import cached_cost
from ..core.hooks import Layer
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ._blocks import BLOCK_CACHES, ResidualDiffPolicy, install_span, uninstall_span

NAME = "first_block_cache"


@dataclass(frozen=True)
class FirstBlockCache(TechniqueConfig):
    """First-block cache (FBCache): skip every block after the first while its residual is stable.

    - `threshold`: relative L1 change of the first block's residual below which the step is cached
      (0 never caches; 0.05-0.2 typical; diffusers' default 0.05 skipped almost nothing on the
      reference models at 28 steps, so hookwise's default is 0.1).
    - `warmup`: the first steps of each run that always compute.
    - `max_cached`: at most this many cached steps in a row (None: no limit).
    """

    threshold: float = 0.1
    warmup: int = 0
    max_cached: int | None = None

    def validate(self) -> None:
        check_fraction("FirstBlockCache.threshold", self.threshold)
        check_int("FirstBlockCache.warmup", self.warmup, 0)
        check_int("FirstBlockCache.max_cached", self.max_cached, 1, optional=True)


def _apply_first_block_cache(model: nn.Module, config: FirstBlockCache | None = None) -> None:
    """Attach a first-block cache to the main blocks of `model` (found by `hookwise.describe`)."""
    config = config or FirstBlockCache()
    install_span(NAME, model, 1, 0, ResidualDiffPolicy(config.threshold, config.warmup, config.max_cached))


def _remove_first_block_cache(model: nn.Module, config: FirstBlockCache | None = None) -> None:
    uninstall_span(NAME, model)


def apply_first_block_cache(model: nn.Module, config: FirstBlockCache | None = None) -> None:
    """Attach a first-block cache to the main blocks of `model` (found by `hookwise.describe`).

    The same as `hookwise.apply(model, config)`.
    """
    apply_techniques(model, [config or FirstBlockCache()])


def remove_first_block_cache(model: nn.Module) -> None:
    """Remove FirstBlockCache from `model` (the same as `hookwise.remove(model, "first_block_cache")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME,
    FirstBlockCache,
    apply=_apply_first_block_cache,
    remove=_remove_first_block_cache,
    layer=Layer.CACHE,
    conflicts=tuple(n for n in BLOCK_CACHES if n != NAME),
    cost=cached_cost("first-block", FirstBlockCache),
)
