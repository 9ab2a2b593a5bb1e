"""Step caches for sampling: each one a technique config for `hookwise.apply`.

Techniques, one file each (a config, its validation, its registration):

- `first_block.py` (`FirstBlockCache`), `dual_block.py` (`DualBlockCache`), `magcache.py` (`MagCache`,
  `calibrate_magcache`), `teacache.py` (`TeaCache`, `calibrate_teacache`): block caches that skip
  main-tower blocks on cached steps, one per model.
- `taylorseer.py` (`TaylorSeer`): alone, or on top of a block cache to extrapolate instead of
  reusing; with `targets="attention"`, an attention cache.
- `pab.py` (`PyramidAttentionBroadcast`), `faster_cache.py` (`FasterCache`, which also reuses the
  unconditional CFG branch): attention caches.
- `forecast.py` (`Forecast`, `calibrate_forecast`): computes the main towers on a schedule of steps
  (dense early, sparse late) and forecasts the others' residual from the last computed ones
  (Lagrange extrapolation, or weights fitted per model); the calibration also searches the schedule
  for a budget of computed steps.
- `layer_skip.py` (`LayerSkip`): drops blocks or their attention / FFN modules by index.

Machinery, private to this folder (no technique imports another technique's file):

- `_state.py`: run state, per-branch state, the one host sync per step, the cache hooks' names and
  `cache_stats`.
- `_streams.py`: how a module's outputs continue its inputs (stream maps) and `map_output`.
- `_blocks.py`: the block-span engine behind the block caches (policies, predictors, targets).
- `_reuse.py`: the module-output reuse engine behind the attention caches.
- `_schedule.py`: schedules of computed steps, forecast weights (Lagrange, fitted) and the schedule search.

All of them read the timestep and step from the run state, keep their state per CFG branch, reset
with each sampling run, take their targets from `hookwise.describe`, and make at most one host
synchronization per step for their decision. `cache_stats(model)` says what each has done.
"""

from ._state import cache_stats
from .dual_block import DualBlockCache, apply_dual_block_cache, remove_dual_block_cache
from .forecast import Forecast, apply_forecast, calibrate_forecast, remove_forecast
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
    "Forecast",
    "FirstBlockCache",
    "LayerSkip",
    "MagCache",
    "PyramidAttentionBroadcast",
    "TaylorSeer",
    "TeaCache",
    "apply_dual_block_cache",
    "apply_faster_cache",
    "apply_forecast",
    "apply_first_block_cache",
    "apply_layer_skip",
    "apply_magcache",
    "apply_pab",
    "apply_taylorseer",
    "apply_teacache",
    "cache_stats",
    "calibrate_forecast",
    "calibrate_magcache",
    "calibrate_teacache",
    "remove_dual_block_cache",
    "remove_faster_cache",
    "remove_forecast",
    "remove_first_block_cache",
    "remove_layer_skip",
    "remove_magcache",
    "remove_pab",
    "remove_taylorseer",
    "remove_teacache",
]
