"""Step caches for sampling: each one a technique config for `hookwise.apply`.

Block caches (they skip main-tower blocks on cached steps; one per model):
`FirstBlockCache`, `DualBlockCache`, `MagCache` (with `calibrate_magcache`), `TeaCache` (with
`calibrate_teacache`), and `TaylorSeer` (alone, or on top of one of them to extrapolate instead of
reusing). Attention caches: `PyramidAttentionBroadcast`, `FasterCache` (which also reuses the
unconditional CFG branch). `LayerSkip` drops blocks or their attention / FFN modules by index.

All of them read the timestep and step from the run state, keep their state per CFG branch, reset
with each sampling run, take their targets from `hookwise.describe`, and make at most one host
synchronization per step for their decision.
"""

from .dual_block import DualBlockCache, apply_dual_block_cache, remove_dual_block_cache
from .faster_cache import FasterCache, apply_faster_cache, remove_faster_cache
from .first_block import FirstBlockCache, apply_first_block_cache, remove_first_block_cache
from .layer_skip import LayerSkip, apply_layer_skip, remove_layer_skip
from .magcache import MagCache, apply_magcache, calibrate_magcache, remove_magcache
from .pab import PyramidAttentionBroadcast, apply_pab, remove_pab
from .taylorseer import TaylorSeer, apply_taylorseer, remove_taylorseer
from .teacache import TeaCache, apply_teacache, calibrate_teacache, remove_teacache

__all__ = [
    "DualBlockCache",
    "FasterCache",
    "FirstBlockCache",
    "LayerSkip",
    "MagCache",
    "PyramidAttentionBroadcast",
    "TaylorSeer",
    "TeaCache",
    "apply_dual_block_cache",
    "apply_faster_cache",
    "apply_first_block_cache",
    "apply_layer_skip",
    "apply_magcache",
    "apply_pab",
    "apply_taylorseer",
    "apply_teacache",
    "calibrate_magcache",
    "calibrate_teacache",
    "remove_dual_block_cache",
    "remove_faster_cache",
    "remove_first_block_cache",
    "remove_layer_skip",
    "remove_magcache",
    "remove_pab",
    "remove_taylorseer",
    "remove_teacache",
]
