"""TaylorSeer: predict what skipped work would have produced by a Taylor expansion over steps.

Alone (`targets="blocks"`), it computes the first `warmup` steps and then one step in `interval`,
and on the other steps skips every main block, adding a Taylor extrapolation (order 1 or 2, from
divided differences of the last computed residuals) of each tower's residual. With
`targets="attention"` the blocks run and every attention module's output is extrapolated instead
(as diffusers' TaylorSeer does), which saves less but changes less. Combined with a block cache
(`hookwise.apply(model, DualBlockCache(...), TaylorSeer(order=2))`) the block cache decides when to
compute and TaylorSeer replaces its reuse of the last residual with the extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import TechniqueConfig, check_int
from ..core.cost import cached_cost
from ..core.hooks import Layer, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import current_transaction
from ..errors import ConfigError
from ..introspect.model_map import describe
from ._blocks import IntervalPolicy, Predictor, TaylorPredictor, install_span, span_controller, taylor_schedule, uninstall_span
from ._reuse import ModuleBranch, Rule, attach_module_hooks, detach_module_hooks
from ._state import logger
from ._streams import map_output

NAME = "taylorseer"
DEFAULT_INTERVAL = 3
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class TaylorSeer(TechniqueConfig):
    """TaylorSeer: Taylor extrapolation of skipped blocks' residuals over steps.

    - `order`: 1 (linear) or 2 (quadratic).
    - `interval`, `warmup`: alone, compute the first `warmup` steps and then one step in
      `interval`, the first one step after the warmup (defaults 3 and 3; `interval=1` computes
      every step). With a block cache they must stay
      None: the block cache decides.
    - `targets`: "blocks" (skip the main blocks, predict their residual) or "attention" (run the
      blocks, predict each attention module's output).
    """

    order: int = 1
    interval: int | None = None
    warmup: int | None = None
    targets: str = "blocks"

    def validate(self) -> None:
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2):
            raise ConfigError(f"TaylorSeer.order must be 1 or 2, got {self.order!r}")
        if self.targets not in ("blocks", "attention"):
            raise ConfigError(f"TaylorSeer.targets must be 'blocks' or 'attention', got {self.targets!r}")
        check_int("TaylorSeer.interval", self.interval, 1, optional=True)
        check_int("TaylorSeer.warmup", self.warmup, 0, optional=True)


class TaylorRule(Rule):
    """Extrapolates a module's output over steps from its last computed outputs: a Taylor expansion
    whose derivatives are backward differences between consecutive computed steps (TaylorSeer)."""

    def __init__(self, order: int, interval: int, warmup: int) -> None:
        self.keep = order + 1
        self.interval, self.warmup = interval, warmup

    def compute(self, step: int, t1000: float | None, st: ModuleBranch) -> bool:
        return taylor_schedule(step, self.interval, self.warmup)

    def answer(self, st: ModuleBranch, step: int, t1000: float | None) -> Any:
        steps = st.steps

        def expand(*ys: torch.Tensor) -> torch.Tensor:
            # derivative k at the newest point: the backward difference of derivative k-1 between the two
            # newest points where derivative k-1 is known, over the newest gap
            derivs = [y.float() for y in ys]  # order 0, oldest first
            terms = [derivs[-1]]
            for k in range(1, len(ys)):
                derivs = [(derivs[i + 1] - derivs[i]) / (steps[i + k] - steps[i + k - 1]) for i in range(len(derivs) - 1)]
                terms.append(derivs[-1])
            d = step - steps[-1]
            value = terms[0]
            for k in range(1, len(terms)):
                value = value + terms[k] * (d**k / math.factorial(k))
            return value.to(ys[-1].dtype)

        return map_output(expand, *st.outputs)


def _apply_taylorseer(model: nn.Module, config: TaylorSeer | None = None) -> None:
    """Alone: a span cache over all main blocks on a fixed schedule. With a block cache: its predictor."""
    config = config or TaylorSeer()
    interval = DEFAULT_INTERVAL if config.interval is None else config.interval
    warmup = DEFAULT_WARMUP if config.warmup is None else config.warmup
    if config.targets == "attention":
        model = unwrap(model)
        targets = [
            (r.path, model.get_submodule(r.path), TaylorRule(config.order, interval, warmup)) for r in describe(model).attention
        ]
        attach_module_hooks(NAME, model, targets, None, False, "the model map lists no attention module")
        return
    controller = span_controller(model)
    if controller is None:
        ctrl = install_span(NAME, model, 0, 0, IntervalPolicy(interval, warmup))
        ctrl.predictor = TaylorPredictor(config.order)
        return
    if config.interval is not None or config.warmup is not None:
        raise ConfigError(
            f"TaylorSeer.interval / warmup schedule TaylorSeer alone; combined with {controller.technique!r} the block "
            f"cache decides when to compute. Leave them None (got interval={config.interval}, warmup={config.warmup})"
        )
    previous = controller.predictor
    controller.predictor = TaylorPredictor(config.order)
    controller.taylor_attached = True
    controller.reset()
    logger.debug("taylorseer: predicting the residuals skipped by %s (order %d)", controller.technique, config.order)
    txn = current_transaction()
    if txn is not None:

        def undo() -> None:
            controller.predictor = previous
            controller.taylor_attached = False
            controller.reset()

        txn.on_rollback(undo, "TaylorSeer predictor")


def _remove_taylorseer(model: nn.Module, config: TaylorSeer | None = None) -> None:
    detach_module_hooks(NAME, model)
    controller = span_controller(model)
    if controller is not None and controller.technique != NAME and controller.taylor_attached:
        controller.predictor = Predictor()
        controller.taylor_attached = False
        controller.reset()
        return
    uninstall_span(NAME, model)


def apply_taylorseer(model: nn.Module, config: TaylorSeer | None = None) -> None:
    """Attach TaylorSeer: alone, a span cache on a fixed schedule; with a block cache, its predictor.

    The same as `hookwise.apply(model, config)`.
    """
    apply_techniques(model, [config or TaylorSeer()])


def remove_taylorseer(model: nn.Module) -> None:
    """Remove TaylorSeer from `model` (the same as `hookwise.remove(model, "taylorseer")`)."""
    remove_techniques(model, [NAME])


register_technique(
    NAME,
    TaylorSeer,
    apply=_apply_taylorseer,
    remove=_remove_taylorseer,
    layer=Layer.CACHE_PREDICTOR,
    cost=cached_cost("taylorseer", lambda: TaylorSeer(order=1, interval=3, warmup=3)),  # as the harness ran it
)
