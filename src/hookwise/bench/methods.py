"""What `hookwise bench cache` runs: every hookwise step cache at its default and over a sweep, and
diffusers' implementations of the same methods at equal settings.

A `Method` is one benchmarked setting: how to apply it to the model, how to remove it, and its label.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import (
    DualBlockCache,
    FasterCache,
    FirstBlockCache,
    Forecast,
    LayerSkip,
    PyramidAttentionBroadcast,
    TaylorSeer,
    calibrate_forecast,
    calibrate_magcache,
    calibrate_teacache,
    describe,
)
from .. import apply as hw_apply
from .. import remove as hw_remove
from ..cache.forecast import FOCA_GAIN
from ..errors import ConfigError, require
from ..sampling.flow import COND, UNCOND


@dataclass
class Method:
    """One benchmarked setting: how to apply and remove it, and its label."""

    method: str
    impl: str
    setting: str
    apply: Callable[[nn.Module], Any]
    remove: Callable[[nn.Module], Any]
    cfg: str = "separate"
    default: bool = False
    configs: tuple = ()  # hookwise's configs (saved with the results)
    reset: Callable[[nn.Module], Any] | None = None  # before each sampling run (a peer that needs it)
    own_model: bool = False  # runs on a deep copy of the loaded model (a peer that patches it for good)


# ---- sweeps ---------------------------------------------------------------------------------------
# The settings both libraries run, so that hookwise and diffusers are compared at equal settings.
FIRST_BLOCK_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
TAYLOR_SETTINGS = ((1, 2), (2, 2), (1, 3), (2, 3), (2, 4))  # (order, interval)
TAYLOR_WARMUP = 3
PAB_SPATIAL_RANGES = (2, 3, 4)
FASTERCACHE_SETTINGS = ((5, 2), (3, 2), (5, None), (2, 3))  # (uncond_range, attention_range)
MAGCACHE_THRESHOLDS = (0.03, 0.06, 0.12, 0.24)
# budgets of computed steps: steps // share (4: 4x fewer block evaluations). 2 (half the steps) puts a Forecast
# point in the "<= 0.50 of the block evaluations" column, which otherwise took the // 3 point's PSNR.
FORECAST_SHARES = (6, 4, 3, 2)
FORECAST_SEARCH_RUNS = 20  # calibration runs the schedule search may make per budget
# Forecast then verify: fewer scheduled steps (steps // share), the probe block adds computes where the forecast is off.
FORECAST_VERIFY_SETTINGS = ((7, 0.05), (7, 0.15), (7, 0.4), (5, 0.05), (5, 0.15), (5, 0.4))  # (share, threshold)
# The same with the input probe (no probe block): its statistic is smaller, so are its thresholds.
FORECAST_INPUT_PROBE_SETTINGS = ((7, 0.01), (7, 0.03), (5, 0.01), (5, 0.03), (4, 0.01), (4, 0.03))  # (share, threshold)


def _hookwise(method: str, setting: str, *configs, cfg: str = "separate", default: bool = False) -> Method:
    return Method(method, "hookwise", setting, lambda m: hw_apply(m, *configs), lambda m: hw_remove(m), cfg, default, configs)


def hookwise_methods(
    model: nn.Module, calibrate: Callable[[], Any], steps: int, n_blocks: int, wanted: set[str] | None = None
) -> list[Method]:
    """Every hookwise cache at its default and over a sweep. Calibration runs `calibrate()` (which returns
    its samples) once each; the forecast's schedule search up to `FORECAST_SEARCH_RUNS` times per budget."""
    out: list[Method] = []
    wanted = wanted or set(HOOKWISE_METHODS)
    for th in FIRST_BLOCK_THRESHOLDS:
        out.append(_hookwise("first-block", f"threshold={th}", FirstBlockCache(threshold=th), default=th == 0.1))
    for th in (0.05, 0.08, 0.15, 0.3, 0.5):
        out.append(_hookwise("dual-block", f"threshold={th}", DualBlockCache(threshold=th), default=th == 0.08))
    for th in (0.15, 0.3, 0.5, 0.8):
        out.append(
            _hookwise("dual-block+taylorseer", f"threshold={th}, order=2", DualBlockCache(threshold=th), TaylorSeer(order=2))
        )
    for order, interval in TAYLOR_SETTINGS:
        out.append(
            _hookwise(
                "taylorseer",
                f"order={order}, interval={interval}",
                TaylorSeer(order=order, interval=interval, warmup=TAYLOR_WARMUP),
                default=(order, interval) == (1, 3),
            )
        )
    for order, interval in TAYLOR_SETTINGS:
        out.append(
            _hookwise(
                "taylorseer-attention",
                f"order={order}, interval={interval}",
                TaylorSeer(order=order, interval=interval, warmup=TAYLOR_WARMUP, targets="attention"),
                default=(order, interval) == (1, 3),
            )
        )
    for sr in PAB_SPATIAL_RANGES:
        out.append(
            _hookwise("pab", f"spatial_range={sr}", PyramidAttentionBroadcast(spatial_range=sr), default=sr == 2)
        )
    for ur, ar in FASTERCACHE_SETTINGS:
        out.append(
            _hookwise(
                "fastercache",
                f"uncond_range={ur}, attention_range={ar}",
                FasterCache(uncond_range=ur, attention_range=ar),
                cfg="batched",  # as diffusers', which only reuses the uncond half of a batched call
                default=(ur, ar) == (5, 2),
            )
        )
    if "magcache" in wanted:
        mag = calibrate_magcache(model, calibrate)
        for th in MAGCACHE_THRESHOLDS:
            out.append(_hookwise("magcache", f"threshold={th}", mag.replace(threshold=th, num_steps=steps), default=th == 0.06))
    if "teacache" in wanted:
        tea = calibrate_teacache(model, calibrate)
        for th in (0.05, 0.1, 0.2, 0.4):
            out.append(_hookwise("teacache", f"threshold={th}", tea.replace(threshold=th), default=th == 0.1))
    for share in FORECAST_SHARES:
        budget = max(2, steps // share)
        out.append(
            _hookwise("forecast", f"budget={budget}/{steps}, order=1", Forecast(num_steps=steps, budget=budget, order=1),
                      default=share == 4)
        )
    for share in FORECAST_SHARES:
        budget = max(2, steps // share)
        out.append(
            _hookwise("forecast-hermite", f"budget={budget}/{steps}", Forecast(num_steps=steps, budget=budget, predictor="hermite"),
                      default=share == 4)
        )
    for share, threshold in FORECAST_VERIFY_SETTINGS:
        budget = max(2, steps // share)
        out.append(
            _hookwise("forecast-verify", f"budget={budget}/{steps}, verify={threshold}",
                      Forecast(num_steps=steps, budget=budget, verify=threshold), default=(share, threshold) == (5, 0.15))
        )
    for share in FORECAST_SHARES:
        budget = max(2, steps // share)
        out.append(
            _hookwise("forecast-foca", f"budget={budget}/{steps}, gain={FOCA_GAIN}", Forecast(num_steps=steps, budget=budget, predictor="foca"),
                      default=share == 4)
        )
    for share, threshold in FORECAST_INPUT_PROBE_SETTINGS:
        budget = max(2, steps // share)
        out.append(
            _hookwise("forecast-verify-input", f"budget={budget}/{steps}, verify={threshold}, probe=input",
                      Forecast(num_steps=steps, budget=budget, verify=threshold, probe="input"), default=(share, threshold) == (5, 0.01))
        )
    if "forecast-corrector" in wanted:
        for share in FORECAST_SHARES:
            budget = max(2, steps // share)
            config = calibrate_forecast(model, calibrate, num_steps=steps, budget=budget, fit=False, search=False, blend=True)
            out.append(
                _hookwise("forecast-corrector", f"budget={budget}/{steps}, blend={config.blend:g}", config, default=share == 4)
            )
    if "forecast-calibrated" in wanted:
        for share in FORECAST_SHARES:
            budget = max(2, steps // share)
            config = calibrate_forecast(model, calibrate, num_steps=steps, budget=budget, order=1, max_runs=FORECAST_SEARCH_RUNS)
            weights = "fitted" if config.coefficients is not None else "Lagrange"
            out.append(
                _hookwise("forecast-calibrated", f"budget={budget}/{steps}, {weights}, schedule={','.join(map(str, config.schedule))}",
                          config, default=share == 4)
            )
    mid = n_blocks // 2
    out.append(_hookwise("layer-skip", f"blocks=({mid},), what=attention", LayerSkip(blocks=(mid,), what="attention")))
    out.append(_hookwise("layer-skip", f"blocks=({mid},)", LayerSkip(blocks=(mid,)), default=True))
    return out


HOOKWISE_METHODS = (
    "first-block", "dual-block", "dual-block+taylorseer", "taylorseer", "taylorseer-attention", "pab", "fastercache",
    "magcache", "teacache", "forecast", "forecast-calibrated", "forecast-hermite", "forecast-verify", "forecast-corrector",
    "forecast-foca", "forecast-verify-input", "layer-skip",
)
DIFFUSERS_METHODS = ("first-block", "taylorseer-attention", "pab", "fastercache", "magcache")


def diffusers_methods(
    model: nn.Module,
    timestep_now: Callable[[], float],
    calibrate: Callable[[], None],
    steps: int,
    wanted: set[str] | None = None,
) -> list[Method]:
    """diffusers' own caches at the same settings as the hookwise sweep (where diffusers has the method).

    `calibrate()` samples once with diffusers' branch contexts; its MagCache calibration runs it once.
    """
    # diffusers is optional: only this comparison needs it.
    dh = require("diffusers.hooks", "diffusers", "comparing with diffusers' step caches")

    def enable(config: Any) -> Callable[[nn.Module], Any]:
        return lambda m: m.enable_cache(config)

    def disable(m: nn.Module) -> None:
        m.disable_cache()

    out: list[Method] = []
    model_map = describe(model)
    for th in FIRST_BLOCK_THRESHOLDS:
        out.append(
            Method("first-block", "diffusers", f"threshold={th}", enable(dh.FirstBlockCacheConfig(threshold=th)), disable,
                   default=th == 0.05)
        )
    # The modules hookwise's attention TaylorSeer predicts, named for diffusers: its default patterns
    # ("^blocks.*attn", fully matched) match no attention module of Wan ("blocks.0.attn1"), so with them it
    # would silently cache nothing there.
    attention_paths = [re.escape(a.path) for a in model_map.attention]
    for order, interval in TAYLOR_SETTINGS:
        config = dh.TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=TAYLOR_WARMUP, max_order=order, taylor_factors_dtype=torch.float32,
            cache_identifiers=attention_paths,
        )
        out.append(
            Method("taylorseer-attention", "diffusers", f"order={order}, interval={interval}", enable(config), disable,
                   default=(order, interval) == (1, 3))
        )
    for sr in PAB_SPATIAL_RANGES:
        config = dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=sr,
            temporal_attention_block_skip_range=3,
            cross_attention_block_skip_range=5,
            spatial_attention_timestep_skip_range=(100, 800),
            temporal_attention_timestep_skip_range=(100, 800),
            cross_attention_timestep_skip_range=(100, 900),
            current_timestep_callback=timestep_now,
        )
        out.append(Method("pab", "diffusers", f"spatial_range={sr}", enable(config), disable, default=sr == 2))
    fmt = "BCFHW" if model_map.architecture == "wan" else "BCHW"
    for ur, ar in FASTERCACHE_SETTINGS:
        config = dh.FasterCacheConfig(
            spatial_attention_block_skip_range=ar,
            spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=ur,
            unconditional_batch_timestep_skip_range=(-1, 641),
            attention_weight_callback=lambda _: 0.5,
            current_timestep_callback=timestep_now,
            tensor_format=fmt,
            # diffusers splits only these keyword arguments of a batched call; FLUX also needs its pooled
            # text embedding split, without which diffusers' FasterCache fails on FLUX.
            _unconditional_conditional_input_kwargs_identifiers=[
                "hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
                "pooled_projections",
            ],
        )
        out.append(
            Method("fastercache", "diffusers", f"uncond_range={ur}, attention_range={ar}", enable(config), disable,
                   cfg="batched", default=(ur, ar) == (5, 2))
        )
    if wanted is None or "magcache" in wanted:
        ratios = _diffusers_magcache_ratios(dh, model, calibrate, steps)
        for th in MAGCACHE_THRESHOLDS:
            config = dh.MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=ratios)
            out.append(
                Method("magcache", "diffusers", f"threshold={th}", enable(config), disable, default=th == 0.06)
            )
    return out


def _diffusers_magcache_ratios(dh: Any, model: nn.Module, calibrate: Callable[[], None], steps: int) -> list[float]:
    """diffusers' MagCache calibration of `model`: its magnitude ratio per step, averaged over the CFG branches."""
    # diffusers returns no calibration result: its hooks keep the ratios in the state of each branch
    # (`MagCacheState.calibration_ratios`), print them, and clear that state when the last step ends.
    # Told one step more than `calibrate()` runs, the calibration keeps its state after the last step
    # (in calibration the step count only decides when the run ends: no step is ever skipped), and the
    # ratios are read from that state, not from the printed text.
    model.enable_cache(dh.MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
    try:
        calibrate()
        head = _diffusers_hook_of_type(model, dh.mag_cache.MagCacheHeadHook)
        per_branch = []
        for name in (COND, UNCOND):
            with model.cache_context(name):
                per_branch.append(list(head.state_manager.get_state().calibration_ratios))
    finally:
        model.disable_cache()
    lists = [ratios for ratios in per_branch if ratios]
    if not lists:
        raise ConfigError("diffusers' MagCache calibration recorded no ratios: the calibration run called no block")
    return [statistics.fmean(v) for v in zip(*lists)]


def _diffusers_hook_of_type(model: nn.Module, cls: type) -> Any:
    """The first hook of class `cls` in the diffusers hook registries of `model`'s modules."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)  # where diffusers keeps a module's registry
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, cls):
                return hook
    raise ConfigError(f"diffusers attached no {cls.__name__} to {type(model).__name__}")
