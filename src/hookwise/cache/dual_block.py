"""Dual-block cache (DBCache): the first `front` blocks decide, the last `back` blocks always refresh.

Like the first-block cache, but the decision reads the residual of the first `front` blocks (a
steadier signal than one block), and the last `back` blocks run on every step, so the output
is refined from the cached middle's estimate instead of taken from it as is. `warmup` steps
compute at the start of each run; at most `max_cached` steps in a row are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int
from ..core.cost import cached_cost
from ..core.hooks import Layer
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ._blocks import BLOCK_CACHES, ResidualDiffPolicy, install_span, uninstall_span

NAME = "dual_block_cache"


@dataclass(frozen=True)
class DualBlockCache(TechniqueConfig):
    """Dual-block cache: `front` blocks decide, `back` blocks always run, the middle is cached.

    - `front` / `back`: blocks computed on every step at the start / end of the main towers.
    - `threshold`: relative L1 change of the front blocks' residual below which the middle is cached.
    - `warmup`: steps of each run that always compute; `max_cached`: cached steps in a row at most.
    """

    front: int = 1
    back: int = 1
    threshold: float = 0.08
    warmup: int = 2
    max_cached: int | None = None

    def validate(self) -> None:
        check_int("DualBlockCache.front", self.front, 1)
        check_int("DualBlockCache.back", self.back, 0)
        check_fraction("DualBlockCache.threshold", self.threshold)
        check_int("DualBlockCache.warmup", self.warmup, 0)
        check_int("DualBlockCache.max_cached", self.max_cached, 1, optional=True)


def _apply_dual_block_cache(model: nn.Module, config: DualBlockCache | None = None) -> None:
    """Attach a dual-block cache to the main blocks of `model`."""
    config = config or DualBlockCache()
    policy = ResidualDiffPolicy(config.threshold, config.warmup, config.max_cached)
    install_span(NAME, model, config.front, config.back, policy)


def _remove_dual_block_cache(model: nn.Module, config: DualBlockCache | None = None) -> None:
    uninstall_span(NAME, model)


def apply_dual_block_cache(model: nn.Module, config: DualBlockCache | None = None) -> None:
    """Attach a dual-block cache to the main blocks of `model`; the same as `hookwise.apply(model, config)`."""
    apply_techniques(model, [config or DualBlockCache()])


def remove_dual_block_cache(model: nn.Module) -> None:
    """Remove DualBlockCache from `model` (the same as `hookwise.remove(model, "dual_block_cache")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME,
    DualBlockCache,
    apply=_apply_dual_block_cache,
    remove=_remove_dual_block_cache,
    layer=Layer.CACHE,
    conflicts=tuple(n for n in BLOCK_CACHES if n != NAME),
    cost=cached_cost("dual-block", DualBlockCache),
)
