"""TeaCache: skip steps while the (rescaled) change of the first block's inputs adds up to little.

TeaCache estimates how much the model output changes from how much its (timestep-modulated) input
changed, through a polynomial fitted per model. The modulated input sits inside model-specific
code, so hookwise reads what every mapped model has: the first main block's tensor inputs (the
latent stream, the timestep embedding, the text stream). The indicator is the sum of their
relative L1 changes since the previous step; `calibrate_teacache` fits the polynomial from it to
the relative change of the towers' residual. Steps are skipped while the accumulated rescaled
indicator stays below `threshold`; the last residual is reused (or extrapolated, with TaylorSeer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int
from ..core.hooks import Layer
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError
from ._blocks import BLOCK_CACHES, Call, Policy, Predictor, Residuals, SpanController, calibration_run, install_span, uninstall_span
from ._state import host_values, logger
from ._streams import Key, rel_l1, tensor_inputs

NAME = "teacache"


@dataclass(frozen=True)
class TeaCache(TechniqueConfig):
    """TeaCache: skip steps while the accumulated, rescaled change of the first block's inputs is small.

    - `threshold`: accumulated rescaled change below which steps are skipped (0 never skips).
    - `coefficients`: polynomial (highest power first) from the input change to the output change;
      get them with `calibrate_teacache`. None: the raw input change.
    - `warmup`: steps of each run that always compute; `max_cached`: cached steps in a row at most.
    """

    threshold: float = 0.1
    coefficients: tuple[float, ...] | None = None
    warmup: int = 1
    max_cached: int | None = None

    def validate(self) -> None:
        check_fraction("TeaCache.threshold", self.threshold)
        if self.coefficients is not None and (
            len(self.coefficients) == 0
            or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in self.coefficients)
        ):
            raise ConfigError(f"TeaCache.coefficients must be finite numbers (highest power first), got {self.coefficients!r}")
        check_int("TeaCache.warmup", self.warmup, 1)
        check_int("TeaCache.max_cached", self.max_cached, 1, optional=True)


def input_change(args: tuple, kwargs: dict, before: dict) -> torch.Tensor | None:
    """Sum over the tensor inputs of their relative L1 change since `before` (None if not comparable)."""
    now = tensor_inputs(args, kwargs)
    if not before or now.keys() != before.keys() or any(now[k].shape != before[k].shape for k in now):
        return None
    return sum(rel_l1([now[k]], [before[k]]) for k in now)


def _polyval(coefficients: tuple[float, ...] | None, x: float) -> float:
    if coefficients is None:
        return x
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


@dataclass
class TeaState:
    """TeaCache's state on one branch: the first block's inputs at the previous step and the rescaled
    change accumulated since the last computed step."""

    inputs: dict[Key, torch.Tensor] | None = None  # None: no previous step in this run
    acc: float = 0.0


class TeaPolicy(Policy):
    """Skips while the accumulated rescaled change of the first block's inputs stays below the threshold
    (decides before the first block: TeaCache spans every main block)."""

    def __init__(self, config: TeaCache) -> None:
        self.config = config

    def new_policy_state(self) -> TeaState:
        return TeaState()

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        st: TeaState = ctrl.store.get(call.branch).policy
        change = input_change(args, kwargs, st.inputs or {}) if self.config.threshold > 0 else None
        host = host_values(ctrl.state, change) if change is not None else host_values(ctrl.state)
        branch = ctrl.store.get(call.branch)  # a new run may have begun
        st = branch.policy
        fresh = st.inputs is None
        st.inputs = {k: v.detach() for k, v in tensor_inputs(args, kwargs).items()}
        if change is None or fresh or ctrl.state.step < self.config.warmup:
            st.acc = 0.0
            return True
        acc = st.acc + _polyval(self.config.coefficients, host[0])
        max_cached = self.config.max_cached
        if acc < self.config.threshold and (max_cached is None or branch.consecutive < max_cached):
            st.acc = acc
            return False
        st.acc = 0.0
        return True


def _apply_teacache(model: nn.Module, config: TeaCache | None = None) -> None:
    """Attach TeaCache over all main blocks of `model`."""
    install_span(NAME, model, 0, 0, TeaPolicy(config or TeaCache()))


def _remove_teacache(model: nn.Module, config: TeaCache | None = None) -> None:
    uninstall_span(NAME, model)


class _TeaRecorder(Policy, Predictor):
    """Computes every step; records (input change, residual change) pairs per branch and step."""

    def __init__(self) -> None:
        self.x: dict[tuple[str, int], float] = {}
        self.y: dict[tuple[str, int], float] = {}
        self.ctrl: SpanController | None = None

    def new_policy_state(self) -> TeaState:
        return TeaState()

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        st: TeaState = ctrl.store.get(call.branch).policy
        change = input_change(args, kwargs, st.inputs or {})
        step = ctrl.state.step
        if change is not None:
            self.x[(call.branch, step)] = float(change)
        st.inputs = {k: v.detach() for k, v in tensor_inputs(args, kwargs).items()}
        return True

    def update(self, memory: Residuals, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        prev = memory.by_segment.get(seg)
        if prev is not None:
            pairs = [(a, b) for a, b in zip(residual, prev) if a is not None and b is not None and a.shape == b.shape]
            if pairs:
                key = (self.ctrl.call.branch, step)
                value = float(rel_l1([a for a, _ in pairs], [b for _, b in pairs]))
                self.y[key] = self.y.get(key, 0.0) + value / self.ctrl.segments
        Predictor.update(self, memory, seg, residual, step)


def calibrate_teacache(model: nn.Module, run: Callable[[], Any], degree: int = 2, **settings: Any) -> TeaCache:
    """Fit TeaCache's rescaling polynomial for `model` over one sampling run made by `run()`.

    Nothing is skipped. Returns a `TeaCache` with the fitted `coefficients` and `settings`
    (threshold, warmup, max_cached). Remove any block cache first.
    """
    check_int("calibrate_teacache degree", degree, 1)
    recorder = _TeaRecorder()
    calibration_run("calibrate_teacache", model, run, recorder, recorder)
    keys = sorted(k for k in recorder.x if k in recorder.y)
    if len(keys) <= degree:
        raise ConfigError(
            f"calibrate_teacache: {len(keys)} usable steps for a degree-{degree} fit; sample a longer run"
        )
    x = np.array([recorder.x[k] for k in keys])
    y = np.array([recorder.y[k] for k in keys])
    coefficients = tuple(round(float(c), 8) for c in np.polyfit(x, y, degree))
    logger.info("teacache: fitted %s on %d steps", coefficients, len(keys))
    return TeaCache(coefficients=coefficients, **settings)


def apply_teacache(model: nn.Module, config: TeaCache | None = None) -> None:
    """Attach TeaCache over all main blocks of `model`; the same as `hookwise.apply(model, config)`."""
    apply_techniques(model, [config or TeaCache()])


def remove_teacache(model: nn.Module) -> None:
    """Remove TeaCache from `model` (the same as `hookwise.remove(model, "teacache")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME,
    TeaCache,
    apply=_apply_teacache,
    remove=_remove_teacache,
    layer=Layer.CACHE,
    conflicts=tuple(n for n in BLOCK_CACHES if n != NAME),
)
