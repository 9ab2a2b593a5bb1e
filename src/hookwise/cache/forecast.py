"""Forecast: compute the block stack on a schedule of steps, forecast the residual of the others.

The main towers run on the steps of a *schedule* (data: a tuple of step indices, or the
front-loaded rule `front_loaded(num_steps, budget, power)`: dense early where the trajectory
changes fastest, sparse late). On every other step all main blocks are skipped and each tower's
residual (output - input) is forecast from its residuals at the last computed steps, as a weighted
sum `sum_j w_j R(c_j)`:

- with no fitted coefficients, `w` are the Lagrange weights of the polynomial through the last
  `order + 1` computed steps, evaluated at the current step (no fitting; order 0 reuses);
- with `coefficients` (fitted per model by `calibrate_forecast` in seconds from one calibration
  run: a least-squares fit, ridge-pulled to the Lagrange weights, of each skipped step's residual
  on the computed ones), `w` are that step's fitted weights. They are plain numbers saved with the
  stack, like the schedule;
- with `predictor="hermite"`, `w` are those of the cubic Hermite extrapolation through the last two
  computed steps, each with the finite-difference slope of the residual ending there (three steps);
- `blend` (the corrector) mixes the forecast with the last computed residual:
  `(1 - blend) * forecast + blend * R(c_last)`; `calibrate_forecast(..., blend=True)` fits it in closed
  form on the recording run;
- with `predictor="foca"` (predict, then correct, as FoCa does), the forecast is `level + slope * (s - c)`
  from the last computed step `c`; each computed step first checks the forecast it would have made there
  and corrects the slope by `gain` times that error per step: `slope += gain * (R(c) - forecast(c)) / gap`.
  With gain 1 this is the linear (order 1) forecast; a gain above 1 carries part of the slope's last
  change into the next gap (`FOCA_GAIN`, 1.15: the best on the calibration classes). Its state is the level and slope, not a
  list of nodes.

`calibrate_forecast` also chooses the schedule for a budget of computed steps (`_schedule.py`:
a search on the calibration run's own PSNR). The decision is the step index, so it costs no host
read beyond resolving the timestep; the state is per CFG branch; with every step in the schedule
the model computes exactly as without the cache.

Forecast, then verify (`verify=threshold`), with `probe="block"`: the first main block runs at every step as a probe. On a
step the schedule skips, its residual is forecast from its own residuals at the computed steps with
the same weights as the rest of the stack, and the relative L1 error of that forecast against the
probe's real residual is the decision statistic: above `threshold` the rest of the stack computes,
else the forecast stands. A step computed that way re-anchors the forecast (later forecasts are shifted
by the forecast's error there) rather than becoming an extrapolation node: two close nodes would
extrapolate a noisy slope far. The statistic stays a device scalar
until the one host transfer of the step, which also reads a device timestep (`host_values`): skipping
work is a host decision, so one read per skipped-step candidate is the floor; schedule steps read
nothing more than the timestep. `verify=0` computes every step (exact). With `probe="input"` no block
runs as a probe: the statistic is the relative L1 error of the first main block's input (its first tensor
argument: the token stream) against that input extrapolated linearly from the last two computed steps; it
costs a few element-wise operations instead of a block, with the same single read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig, check_int
from ..core.cost import cached_cost
from ..core.hooks import Layer
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError
from ._blocks import BLOCK_CACHES, Call, Policy, Predictor, SpanController, install_span, uninstall_span
from ._schedule import blended, front_loaded, hermite_weights, lagrange_weights
from ._state import host_values, resolved_step
from ._streams import rel_l1, tensor_inputs

NAME = "forecast"
PREDICTORS = ("lagrange", "hermite", "foca")
PROBES = ("block", "input")
FOCA_GAIN = 1.15  # predictor="foca"'s default gain: the calibration classes' pick (BENCHMARKS.md); never chosen on the evaluated classes


@dataclass(frozen=True)
class Forecast(TechniqueConfig):
    """Forecast the main towers' residual on the steps a schedule skips.

    - `num_steps`: steps of the sampling runs the schedule is for; later steps always compute.
    - `schedule`: the computed steps (step 0 included); None: `budget` steps by the front-loaded
      rule (`power` > 1 packs them early; 1, the default, spaces them evenly, which measured best
      without a search on the zoo models). Neither: every step computes (exact).
    - `order`: forecast from the last `order + 1` computed steps (Lagrange polynomial of that order,
      or that many fitted weights); 1 (linear) measured best with Lagrange's weights.
    - `coefficients`: per step, the fitted weights of the last computed residuals (oldest first; an
      empty tuple for a computed step or to use the Lagrange weights there). Made by
      `calibrate_forecast`, for this schedule.
    - `predictor`: "lagrange" (the polynomial of `order`), "hermite" (cubic Hermite through the last
      two computed steps with finite-difference slopes: uses the last three) or "foca" (a level and a
      slope; each computed step corrects the slope by `gain` times the forecast's error there).
    - `gain`: "foca"'s correction gain in (0, 2] (None: `FOCA_GAIN`; 1: the linear forecast).
    - `blend`: in [0, 1], the corrector's weight of the last computed residual (0: the plain forecast).
    - `verify`: None, or the threshold of the probe's forecast error (relative L1) above which a step
      the schedule skips computes after all; the first block then runs at every step.
    - `probe`: what verify compares: "block" (the first block's residual, run at every step) or "input"
      (the first block's input against its linear extrapolation: no block runs as a probe).
    """

    num_steps: int = 28
    schedule: tuple[int, ...] | None = None
    budget: int | None = None
    power: float = 1.0
    order: int = 1
    coefficients: tuple[tuple[float, ...], ...] | None = None
    predictor: str = "lagrange"
    blend: float = 0.0
    verify: float | None = None
    gain: float | None = None
    probe: str = "block"

    def validate(self) -> None:
        if self.predictor not in PREDICTORS:
            raise ConfigError(f"Forecast.predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.probe not in PROBES:
            raise ConfigError(f"Forecast.probe must be one of {PROBES}, got {self.probe!r}")
        if self.probe != "block" and self.verify is None:
            raise ConfigError(f"Forecast.probe={self.probe!r} is what verify= compares; set verify=<threshold> with it")
        if self.gain is not None:
            if self.predictor != "foca":
                raise ConfigError(f"Forecast.gain is the gain of predictor='foca'; got predictor={self.predictor!r} (drop gain)")
            if not isinstance(self.gain, (int, float)) or isinstance(self.gain, bool) or not 0 < self.gain <= 2:
                raise ConfigError(f"Forecast.gain must be a number in (0, 2] (1: the linear forecast), got {self.gain!r}")
        if self.predictor == "foca":
            if self.order != 1 or self.coefficients is not None or self.blend:
                raise ConfigError(
                    "Forecast(predictor='foca') is first order (a level and a corrected slope): it takes order=1, no "
                    "coefficients and no blend (its gain is its corrector)"
                )
            if self.verify is not None and self.probe == "block":
                raise ConfigError(
                    "Forecast(predictor='foca', verify=...) needs probe='input': the block probe forecasts its own "
                    "residual with Lagrange's or Hermite's weights"
                )
        if not isinstance(self.blend, (int, float)) or isinstance(self.blend, bool) or not 0 <= self.blend <= 1:
            raise ConfigError(f"Forecast.blend must be a number in [0, 1] (0: no corrector), got {self.blend!r}")
        if self.verify is not None and (
            not isinstance(self.verify, (int, float)) or isinstance(self.verify, bool) or not 0 <= self.verify < math.inf
        ):
            raise ConfigError(f"Forecast.verify must be None or a threshold >= 0 (0: every step computes), got {self.verify!r}")
        check_int("Forecast.num_steps", self.num_steps, 1)
        check_int("Forecast.order", self.order, 0)
        check_int("Forecast.budget", self.budget, 1, optional=True)
        if not isinstance(self.power, (int, float)) or isinstance(self.power, bool) or not 0 < self.power <= 8:
            raise ConfigError(f"Forecast.power must be a number in (0, 8], got {self.power!r}")
        if self.schedule is not None and self.budget is not None:
            raise ConfigError("Forecast takes a `schedule` or a `budget` (the front-loaded rule), not both")
        if self.schedule is not None:
            steps = tuple(self.schedule)
            if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < self.num_steps for s in steps):
                raise ConfigError(
                    f"Forecast.schedule must be step indices in [0, {self.num_steps}) (num_steps={self.num_steps}), got {self.schedule!r}"
                )
            if list(steps) != sorted(set(steps)) or steps[0] != 0:
                raise ConfigError(f"Forecast.schedule must be increasing, without repeats, starting at step 0; got {self.schedule!r}")
            object.__setattr__(self, "schedule", steps)
        if self.budget is not None and self.budget > self.num_steps:
            raise ConfigError(f"Forecast.budget={self.budget} is more than num_steps={self.num_steps}")
        if self.coefficients is not None:
            coefs = tuple(tuple(float(w) for w in row) for row in self.coefficients)
            if len(coefs) != self.num_steps:
                raise ConfigError(f"Forecast.coefficients needs one row per step ({self.num_steps}), got {len(coefs)}")
            computed = set(self.computed_steps())
            for s, row in enumerate(coefs):
                if row and (s in computed or len(row) > self.nodes()):
                    raise ConfigError(
                        f"Forecast.coefficients[{s}] has {len(row)} weights: a computed step takes none and a skipped one at "
                        f"most {'order + 1 = ' if self.predictor != 'hermite' else ''}{self.nodes()}; fit them for this schedule with calibrate_forecast"
                    )
            object.__setattr__(self, "coefficients", coefs)

    def nodes(self) -> int:
        """How many of the last computed steps a forecast reads."""
        return max(self.order + 1, 3) if self.predictor == "hermite" else self.order + 1

    def computed_steps(self) -> tuple[int, ...]:
        """The steps where the blocks run."""
        if self.schedule is not None:
            return self.schedule
        if self.budget is not None:
            return front_loaded(self.num_steps, self.budget, self.power)
        return tuple(range(self.num_steps))


class _OnSchedule(Policy):
    """What both Forecast policies share: the schedule's steps, and computing in full past `num_steps`
    (said once per application: a longer run is not an error, but it saves nothing there)."""

    def __init__(self, config: Forecast) -> None:
        self.computed = frozenset(config.computed_steps())
        self.num_steps = config.num_steps
        self.warned = False

    def past_schedule(self, step: int) -> bool:
        if step >= self.num_steps and not self.warned:
            self.warned = True
            warnings.warn(
                f"hookwise: Forecast(num_steps={self.num_steps}) reached step {step}: the run is longer than its "
                f"schedule, and every step from {self.num_steps} on computes in full. Set num_steps to the run's "
                f"steps (or calibrate_forecast for them)",
                stacklevel=3,
            )
        return step >= self.num_steps


class SchedulePolicy(_OnSchedule):
    """Computes on the schedule's steps (and past `num_steps`); decides before the first block."""

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        step = resolved_step(ctrl.state)
        return self.past_schedule(step) or step in self.computed


@dataclass
class History:
    """The forecast's state on one branch: per segment, (step, residual) at the last computed steps."""

    by_segment: dict[int, list[tuple[int, list[torch.Tensor | None]]]] = field(default_factory=dict)
    # per segment, (step, residual) of the latest step computed off the schedule (verify): it re-anchors the forecast
    anchor: dict[int, tuple[int, list[torch.Tensor | None]]] = field(default_factory=dict)


class ForecastPredictor(Predictor):
    """Weighted sum of the last computed residuals: fitted weights where given, else Lagrange's or Hermite's;
    then the corrector's blend with the last one."""

    name = "forecast"

    def __init__(
        self,
        order: int,
        coefficients: tuple[tuple[float, ...], ...] | None,
        predictor: str = "lagrange",
        blend: float = 0.0,
        schedule: frozenset[int] | None = None,
    ) -> None:
        self.keep = max(order + 1, 3) if predictor == "hermite" else order + 1
        self.coefficients = coefficients
        self.base = hermite_weights if predictor == "hermite" else lagrange_weights
        self.blend = blend
        # With verify: a step computed off the schedule does not become an extrapolation node (two close nodes
        # would extrapolate a noisy slope far); it shifts the forecast by its error there (an anchor).
        self.schedule = schedule

    def new_predictor_state(self) -> History:
        return History()

    def update(self, memory: History, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        hist = memory.by_segment.setdefault(seg, [])
        anchor = memory.anchor.get(seg)
        if (hist and hist[-1][0] >= step) or (anchor is not None and anchor[0] >= step):
            hist.clear()  # a new run on the same state: start over
            memory.anchor.pop(seg, None)
        if self.schedule is not None and step not in self.schedule and hist:
            memory.anchor[seg] = (step, residual)
            return
        memory.anchor.pop(seg, None)
        hist.append((step, residual))
        del hist[: -self.keep]

    def ready(self, memory: History, segments: int) -> bool:
        return len(memory.by_segment) == segments

    def weights(self, steps: list[int], step: int) -> list[float]:
        row = self.coefficients[step] if self.coefficients is not None and step < len(self.coefficients) else ()
        if row and len(row) <= len(steps):
            return blended([0.0] * (len(steps) - len(row)) + list(row), self.blend)
        return blended(self.base(steps, step), self.blend)

    def predict(self, memory: History, seg: int, step: int) -> list[torch.Tensor | None]:
        hist = memory.by_segment[seg]
        steps = [s for s, _ in hist]
        weights = self.weights(steps, step)
        anchor = memory.anchor.get(seg)
        if anchor is not None:  # forecast(step) + (R(anchor) - forecast(anchor))
            weights = [w - a for w, a in zip(weights, self.weights(steps, anchor[0]))]
        out: list[torch.Tensor | None] = []
        for k, first in enumerate(hist[-1][1]):
            terms = [(w, r[k]) for w, (_, r) in zip(weights, hist) if w != 0.0]
            if anchor is not None:
                terms.append((1.0, anchor[1][k]))
            if first is None or any(r is None or r.shape != first.shape for _, r in terms):
                out.append(first)  # a stream that changed shape: reuse its last residual
                continue
            value = torch.zeros_like(first, dtype=torch.float32)
            for w, r in terms:
                value.add_(r.float(), alpha=w)
            out.append(value.to(first.dtype))
        return out


@dataclass
class Trend:
    """The FoCa predictor's state on one branch: per segment, (step, level, slope) at the last computed step."""

    by_segment: dict[int, tuple[int, list[torch.Tensor | None], list[torch.Tensor | None] | None]] = field(default_factory=dict)


class FocaPredictor(Predictor):
    """Predict, then correct: `level + slope * (s - c)`; at the next computed step the slope is corrected by
    `gain` times the forecast's error there, per step of the gap (gain 1: the linear forecast)."""

    name = "foca"

    def __init__(self, gain: float) -> None:
        self.gain = gain

    def new_predictor_state(self) -> Trend:
        return Trend()

    def update(self, memory: Trend, seg: int, residual: list[torch.Tensor | None], step: int) -> None:
        last = memory.by_segment.get(seg)
        if last is None or last[0] >= step:  # the first computed step, or a new run on the same state
            memory.by_segment[seg] = (step, residual, None)
            return
        s0, level, slope = last
        gap = step - s0
        new: list[torch.Tensor | None] = []
        for k, r in enumerate(residual):
            l = level[k] if k < len(level) else None
            d = slope[k] if slope is not None and k < len(slope) else None
            if r is None or l is None or l.shape != r.shape:
                new.append(None)
            elif d is None or d.shape != r.shape:
                new.append((r.float() - l.float()) / gap)
            else:  # slope + gain * (R - (level + slope * gap)) / gap
                new.append(d + (r.float() - l.float() - d * gap) * (self.gain / gap))
        memory.by_segment[seg] = (step, residual, new)

    def ready(self, memory: Trend, segments: int) -> bool:
        return len(memory.by_segment) == segments

    def predict(self, memory: Trend, seg: int, step: int) -> list[torch.Tensor | None]:
        s0, level, slope = memory.by_segment[seg]
        out: list[torch.Tensor | None] = []
        for k, l in enumerate(level):
            d = slope[k] if slope is not None and k < len(slope) else None
            out.append(l if l is None or d is None else (l.float() + d * (step - s0)).to(l.dtype))
        return out


class InputPolicy(_OnSchedule):
    """Forecast, then verify with no probe block: a step the schedule skips computes when the first block's input
    (its first tensor argument) is off its linear extrapolation from the last two computed steps (after one computed
    step: off that step's input) by more than the threshold (relative L1, read with the timestep)."""

    def __init__(self, config: Forecast) -> None:
        super().__init__(config)
        self.threshold = float(config.verify)

    def new_policy_state(self) -> list[tuple[int, torch.Tensor]]:
        return []  # (step, first input) at the last two computed steps

    def before_first(self, ctrl: SpanController, call: Call, args: tuple, kwargs: dict) -> bool:
        state = ctrl.state
        tentative = state.step  # counted per call; a device timestep read below may still start a new run
        inputs = list(tensor_inputs(args, kwargs).values())
        x = inputs[0].detach() if inputs else None
        nodes = ctrl.store.get(call.branch).policy
        error = None
        if (
            self.threshold > 0 and x is not None and tentative not in self.computed and tentative < self.num_steps
            and nodes and all(v.shape == x.shape for _, v in nodes)
        ):
            weights = lagrange_weights([n for n, _ in nodes], tentative)  # one node: the input's change since then
            extrapolated = sum(w * v for w, (_, v) in zip(weights, nodes))
            error = rel_l1([extrapolated], [x])  # |extrapolated - input| / |input|, still on the device
        host = host_values(state, error) if error is not None else host_values(state)
        step = state.step
        compute = self.past_schedule(step) or error is None or step != tentative or step in self.computed or host[0] > self.threshold
        if compute and x is not None:
            nodes = ctrl.store.get(call.branch).policy  # a new run may have begun
            if nodes and nodes[-1][0] >= step:
                nodes.clear()
            nodes.append((step, x))
            del nodes[:-2]
        return compute


class VerifyPolicy(_OnSchedule):
    """Forecast, then verify: the first block is the probe; a step the schedule skips computes when the
    forecast of the probe's residual is off by more than the threshold (relative L1, read with the timestep)."""

    def __init__(self, config: Forecast, head: ForecastPredictor) -> None:
        super().__init__(config)
        self.threshold = float(config.verify)
        self.head = head  # forecasts the probe's residual with the stack's weights

    def new_policy_state(self) -> History:
        return History()  # the probe's residuals at the computed steps

    def after_head(self, ctrl: SpanController, call: Call, residual: list[torch.Tensor]) -> bool:
        state = ctrl.state
        tentative = state.step  # counted per call; a device timestep read below may still start a new run
        memory = ctrl.store.get(call.branch).policy
        hist = memory.by_segment.get(0)
        error = None
        if self.threshold > 0 and tentative not in self.computed and tentative < self.num_steps and hist:
            predicted = self.head.predict(memory, 0, tentative)
            if len(predicted) == len(residual) and all(p is not None and p.shape == r.shape for p, r in zip(predicted, residual)):
                error = rel_l1(predicted, residual)  # |forecast - probe| / |probe|, still on the device
        host = host_values(state, error) if error is not None else host_values(state)
        step = state.step
        if self.past_schedule(step) or error is None or step != tentative or step in self.computed:
            return True
        return host[0] > self.threshold

    def decided(self, ctrl: SpanController, call: Call, compute: bool, residual: list[torch.Tensor]) -> None:
        if compute:
            self.head.update(ctrl.store.get(call.branch).policy, 0, list(residual), ctrl.state.step)


def _predictor(config: Forecast) -> Predictor:
    # With the block probe a step computed off the schedule re-anchors the forecast; with the input probe it is a
    # node like the others (measured better there: BENCHMARKS.md).
    schedule = frozenset(config.computed_steps()) if config.verify is not None and config.probe == "block" else None
    if config.predictor == "foca":
        return FocaPredictor(FOCA_GAIN if config.gain is None else float(config.gain))
    return ForecastPredictor(config.order, config.coefficients, config.predictor, config.blend, schedule)


def _apply_forecast(model: nn.Module, config: Forecast | None = None) -> None:
    """A span cache over every main block of `model`, computing on the schedule (with `verify`: after a probe)."""
    config = config or Forecast()
    predictor = _predictor(config)  # stateless (its state lives in the span's memory): the probe shares it
    if config.verify is None:
        ctrl = install_span(NAME, model, 0, 0, SchedulePolicy(config))
    elif config.probe == "input":
        ctrl = install_span(NAME, model, 0, 0, InputPolicy(config))
    else:
        ctrl = install_span(NAME, model, 1, 0, VerifyPolicy(config, predictor))
    ctrl.predictor = predictor


def _remove_forecast(model: nn.Module, config: Forecast | None = None) -> None:
    uninstall_span(NAME, model)


def apply_forecast(model: nn.Module, config: Forecast | None = None) -> None:
    """Attach Forecast to the main blocks of `model`; the same as `hookwise.apply(model, config)`."""
    apply_techniques(model, [config or Forecast()])


def remove_forecast(model: nn.Module) -> None:
    """Remove Forecast from `model` (the same as `hookwise.remove(model, "forecast")`)."""
    remove_techniques(model, [NAME])


def calibrate_forecast(
    model: nn.Module,
    run: Callable[[], Any],
    *,
    num_steps: int,
    budget: int | None = None,
    schedule: tuple[int, ...] | None = None,
    order: int = 1,
    fit: bool = True,
    search: bool = True,
    max_runs: int = 40,
    predictor: str = "lagrange",
    blend: bool = False,
    verify: float | None = None,
) -> Forecast:
    """A `Forecast` for `model`, from calibration runs made by `run()` (one whole sampling run that
    returns its samples: pixels or latents).

    - `fit`: fit the forecast weights (else `predictor`'s: Lagrange's or Hermite's).
    - `blend`: with `fit=False`, fit the corrector's blend with the last computed residual (closed form).
    - `verify`: the returned config's probe threshold (the search itself runs without the probe).
    - `schedule` given: fit for it; else `budget` computed steps, starting from the front-loaded rule
      and, with `search`, improved by a search whose objective is the PSNR of `run()`'s samples
      against the uncached ones (at most `max_runs` runs of `run()`).
    Use calibration prompts / seeds that you do not evaluate on. Remove any block cache first. The
    recording run keeps every step's residual of every tower (float32, on the model's device) until
    it ends: about `num_steps` times one block's output per CFG branch.
    """
    from ._schedule import calibrate_schedule  # the search and fit machinery

    if blend and fit:
        raise ConfigError("calibrate_forecast: blend=True fits the corrector of the unfitted weights; pass fit=False with it")
    Forecast(num_steps=num_steps, order=order, predictor=predictor, verify=verify)  # validate before any run
    if predictor == "foca" and (fit or blend):
        raise ConfigError(
            "calibrate_forecast(predictor='foca') searches the schedule only (its gain is its corrector): pass fit=False "
            "and no blend"
        )
    weights = _predictor(Forecast(num_steps=num_steps, order=order, predictor=predictor)).weights if blend else None
    found = calibrate_schedule(
        NAME, model, run, Forecast, num_steps=num_steps, budget=budget, schedule=schedule, order=order,
        fit=fit, search=search, max_runs=max_runs, extra={"predictor": predictor},
        blend_weights=weights, keep=Forecast(order=order, predictor=predictor).nodes(),
    )
    return found.replace(verify=verify) if verify is not None else found


register_technique(
    NAME,
    Forecast,
    apply=_apply_forecast,
    remove=_remove_forecast,
    layer=Layer.CACHE,
    # TaylorSeer would replace the forecast as the span's predictor: one predictor per block cache.
    conflicts=(*(n for n in BLOCK_CACHES if n != NAME), "taylorseer"),
    # offered by the planner once the shipped harness rows hold its default ("budget=7/28, order=1")
    cost=cached_cost("forecast", lambda: Forecast(num_steps=28, budget=7)),
)
