"""cache-dit's caches in `hookwise bench cache`: DBCache, TaylorSeer, DBCache + TaylorSeer, and its FoCa
calibrator (alone on TaylorSeer's schedules, and behind DBCache), at settings next to hookwise's
(first-block thresholds, TaylorSeer's orders and intervals).

cache-dit (`pip install cache-dit`, optional: only this comparison needs it) patches the `forward` of the
transformer instance and of some of its blocks when enabled and leaves them patched after
`disable_cache`, so its runs go to a deep copy of the loaded model (same weights), counted with plain
PyTorch forward pre-hooks rather than hookwise hooks. Its context is refreshed before each sampling run,
as diffusers' caches are reset: its own refresh after `num_inference_steps` carries state into the next
run (a second run of the same setting differs from the first without it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import require
from .methods import FIRST_BLOCK_THRESHOLDS, TAYLOR_SETTINGS, TAYLOR_WARMUP, Method

CACHE_DIT_METHODS = ("dbcache", "dbcache+taylorseer", "taylorseer", "dbcache+foca", "foca")


def _taylor_mask(steps: int, interval: int, warmup: int) -> list[int]:
    """1 where a step computes on TaylorSeer's schedule (hookwise's rule: the warmup steps, then one in
    `interval` starting one step after the warmup), as cache-dit's static step mask."""
    return [int(interval <= 1 or s < warmup or (s - warmup - 1) % interval == 0) for s in range(steps)]


def cache_dit_methods(steps: int, wanted: set[str] | None = None) -> list[Method]:
    """cache-dit's DBCache (first block decides, `Fn_compute_blocks=1, Bn_compute_blocks=0`, warmup as
    hookwise's TaylorSeer), DBCache + its TaylorSeer calibrator (order 1, cache-dit's preset), and TaylorSeer
    alone (a static step mask on hookwise TaylorSeer's schedule; cache-dit always computes at least the
    first block), and the same two with cache-dit's FoCa calibrator (forecast, then calibrate; it has no
    settings) instead of TaylorSeer. CFG as two calls (`enable_separate_cfg=True`)."""
    cd = require("cache_dit", "cache-dit", "comparing with cache-dit's caches")
    wanted = set(CACHE_DIT_METHODS) if wanted is None else wanted

    def method(name: str, setting: str, cache: Any, calibrator: Any = None, default: bool = False) -> Method:
        def apply(m: nn.Module) -> None:
            cd.enable_cache(m, cache_config=cache, calibrator_config=calibrator)

        def reset(m: nn.Module) -> None:
            cd.refresh_context(m, cache_config=cache, calibrator_config=calibrator)

        return Method(name, "cache-dit", setting, apply, cd.disable_cache, default=default, reset=reset, own_model=True)

    def db(threshold: float, **extra: Any) -> Any:
        return cd.DBCacheConfig(
            num_inference_steps=steps, Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
            max_warmup_steps=TAYLOR_WARMUP, enable_separate_cfg=True, **extra,
        )

    out: list[Method] = []
    if "dbcache" in wanted:
        for th in FIRST_BLOCK_THRESHOLDS:
            out.append(method("dbcache", f"F1B0, threshold={th}", db(th), default=th == 0.1))
    if "dbcache+taylorseer" in wanted:
        for th in FIRST_BLOCK_THRESHOLDS[1:]:
            out.append(method("dbcache+taylorseer", f"F1B0, threshold={th}, order=1", db(th),
                              cd.TaylorSeerCalibratorConfig(taylorseer_order=1), default=th == 0.2))
    if "taylorseer" in wanted:
        for order, interval in TAYLOR_SETTINGS:
            mask = _taylor_mask(steps, interval, TAYLOR_WARMUP)
            cache = db(0.0, steps_computation_mask=mask, steps_computation_policy="static")
            out.append(method("taylorseer", f"order={order}, interval={interval} (static mask, F1B0)", cache,
                              cd.TaylorSeerCalibratorConfig(taylorseer_order=order), default=(order, interval) == (1, 3)))
    if "dbcache+foca" in wanted:
        for th in FIRST_BLOCK_THRESHOLDS[1:]:
            out.append(method("dbcache+foca", f"F1B0, threshold={th}", db(th), cd.FoCaCalibratorConfig(), default=th == 0.2))
    if "foca" in wanted:
        for interval in sorted({interval for _, interval in TAYLOR_SETTINGS}):
            mask = _taylor_mask(steps, interval, TAYLOR_WARMUP)
            cache = db(0.0, steps_computation_mask=mask, steps_computation_policy="static")
            out.append(method("foca", f"interval={interval} (static mask, F1B0)", cache, cd.FoCaCalibratorConfig(),
                              default=interval == 3))
    return out
