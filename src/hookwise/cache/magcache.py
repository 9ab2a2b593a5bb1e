"""MagCache: skip steps while the calibrated change of the residual's magnitude adds up to little.

The residual of the main towers (output - input) changes its magnitude from step to step by a
ratio that depends on the model and the step, not much on the prompt. A calibration run
(`calibrate_magcache`) measures these ratios; sampling then skips the towers while the
accumulated error `sum |1 - prod(ratios)|` since the last computed step stays below `threshold`,
at most `max_skip` steps in a row, never in the first `retention` fraction of the steps, reusing
the last residual. The decision needs no host read of its own (the step is a host counter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int
from ..core.hooks import Layer
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError
from ._blocks import (
    BLOCK_CACHES,
    AlwaysCompute,
    Call,
    Policy,
    Predictor,
    Residuals,
    SpanController,
    calibration_run,
    install_span,
    uninstall_span,
)
from ._state import logger, resolved_step

NAME = "magcache"


@dataclass(frozen=True)
class MagCache(TechniqueConfig):
    """MagCache: skip steps by calibrated residual-magnitude ratios (get them with `calibrate_magcache`).

    - `ratios`: per-step ratio of the residual's mean token norm to the previous step's (step 0 is 1).
    - `num_steps`: steps of the runs it is used for (None: as many as `ratios`); the ratios are
      re-sampled on the run's progress when it differs.
    - `threshold`: accumulated error allowed while skipping; `max_skip`: skipped steps in a row at
      most; `retention`: fraction of the first steps that always compute.
    """

    ratios: tuple[float, ...] | None = None
    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2
    num_steps: int | None = None

    def validate(self) -> None:
        if self.ratios is None:
            raise ConfigError(
                "MagCache needs the magnitude ratios of your model: run "
                "`config = hookwise.cache.calibrate_magcache(model, lambda: <one sampling run>)` once and "
                "apply that config (its ratios are plain numbers: store them with config.to_dict())"
            )
        if len(self.ratios) < 2 or not all(isinstance(r, (int, float)) and r > 0 and math.isfinite(r) for r in self.ratios):
            raise ConfigError(f"MagCache.ratios must be at least 2 positive numbers, got {self.ratios!r}")
        check_fraction("MagCache.threshold", self.threshold)
        check_int("MagCache.max_skip", self.max_skip, 0)
        check_fraction("MagCache.retention", self.retention)
        if self.retention > 1:
            raise ConfigError(f"MagCache.retention is a fraction of the steps in [0, 1], got {self.retention!r}")
        check_int("MagCache.num_steps", self.num_steps, 1, optional=True)


def resample_ratios(ratios: tuple[float, ...], steps: int) -> list[float]:
    """Ratios for a run of `steps` steps: the cumulative log-magnitude, interpolated on progress."""
    n = len(ratios)
    if steps == n:
        return [float(r) for r in ratios]
    if steps == 1:
        return [1.0]
    cum = [0.0]
    for r in ratios[1:]:
        cum.append(cum[-1] + math.log(r))
    pos = [i / (n - 1) for i in range(n)]

    def at(q: float) -> float:
        j = min(int(q * (n - 1)), n - 2)
        w = (q - pos[j]) / (pos[j + 1] - pos[j])
        return cum[j] * (1 - w) + cum[j + 1] * w

    values = [at(i / (steps - 1)) for i in range(steps)]
    return [1.0] + [math.exp(values[i] - values[i - 1]) for i in range(1, steps)]


@dataclass
class MagState:
    """`MagPolicy`'s state on one branch: what has accumulated since the last computed step."""

    ratio: float = 1.0  # product of the skipped steps' ratios
    steps: int = 0  # skipped steps
    err: float = 0.0  # accumulated error, sum |1 - ratio|


class MagPolicy(Policy):
    """Skips while the accumulated error of the calibrated ratios stays below the threshold (decides before
    the first block: MagCache spans every main block)."""

    def __init__(self, config: MagCache) -> None:
        self.config = config
        self.steps = config.num_steps or len(config.ratios)
        self.ratios = resample_ratios(config.ratios, self.steps)
        self.keep = int(config.retention * self.steps + 0.5)

    def new_policy_state(self) -> MagState:
        return MagState()

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        step = resolved_step(ctrl.state)
        st: MagState = ctrl.store.get(call.branch).policy
        if step < self.keep:
            return True
        ratio = self.ratios[step] if step < len(self.ratios) else 1.0
        acc_ratio = st.ratio * ratio
        acc_steps = st.steps + 1
        acc_err = st.err + abs(1.0 - acc_ratio)
        if self.config.threshold > 0 and acc_err <= self.config.threshold and acc_steps <= self.config.max_skip:
            st.ratio, st.steps, st.err = acc_ratio, acc_steps, acc_err
            return False
        st.ratio, st.steps, st.err = 1.0, 0, 0.0
        return True


def _apply_magcache(model: nn.Module, config: MagCache) -> None:
    """Attach MagCache over all main blocks of `model`."""
    install_span(NAME, model, 0, 0, MagPolicy(config))


def _remove_magcache(model: nn.Module, config: MagCache | None = None) -> None:
    uninstall_span(NAME, model)


class _MagRecorder(Predictor):
    """Keeps the last residual (so nothing is skipped) and records the token-norm ratio per step."""

    def __init__(self) -> None:
        self.ratios: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self.ctrl: SpanController | None = None

    def update(self, memory: Residuals, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        prev = memory.by_segment.get(seg)
        if prev is not None:
            for now, before in zip(residual, prev):
                if now is None or before is None or now.shape != before.shape:
                    continue
                norm_now = now.float().flatten(2).norm(dim=-1) if now.ndim > 3 else now.float().norm(dim=-1)
                norm_before = before.float().flatten(2).norm(dim=-1) if before.ndim > 3 else before.float().norm(dim=-1)
                ratio = float((norm_now / norm_before.clamp_min(1e-8)).mean())
                self.ratios.setdefault((self.ctrl.call.branch, step), []).append((ratio, now.numel()))
        super().update(memory, seg, residual, step)


def calibrate_magcache(model: nn.Module, run: Callable[[], Any], **settings: Any) -> MagCache:
    """Measure `model`'s residual-magnitude ratios over one sampling run made by `run()`.

    Nothing is skipped during the run. Returns a `MagCache` with the ratios (averaged over CFG
    branches) and `settings` (threshold, max_skip, retention...). Remove any block cache first.
    """
    recorder = _MagRecorder()
    calibration_run("calibrate_magcache", model, run, AlwaysCompute(), recorder)
    steps = max((s for _, s in recorder.ratios), default=0) + 1
    if steps < 2:
        raise ConfigError("calibrate_magcache: the run made fewer than 2 steps; pass a function that samples a whole run")
    ratios = [1.0]
    for s in range(1, steps):
        entries = [e for (b, st), es in recorder.ratios.items() if st == s for e in es]
        if not entries:
            ratios.append(1.0)
            continue
        total = sum(w for _, w in entries)
        ratios.append(sum(r * w for r, w in entries) / total)
    logger.info("magcache: calibrated %d ratios: %s", len(ratios), [round(r, 4) for r in ratios])
    return MagCache(ratios=tuple(round(r, 6) for r in ratios), **settings)


def apply_magcache(model: nn.Module, config: MagCache) -> None:
    """Attach MagCache over all main blocks of `model`; the same as `hookwise.apply(model, config)`."""
    apply_techniques(model, [config])


def remove_magcache(model: nn.Module) -> None:
    """Remove MagCache from `model` (the same as `hookwise.remove(model, "magcache")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME,
    MagCache,
    apply=_apply_magcache,
    remove=_remove_magcache,
    layer=Layer.CACHE,
    conflicts=tuple(n for n in BLOCK_CACHES if n != NAME),
)
