"""TaylorSeer: predict what skipped blocks would have added by a Taylor expansion over steps.

Alone, it computes the first `warmup` steps and then one step in `interval`, and on the other
steps skips every main block, adding a Taylor extrapolation (order 1 or 2, from divided
differences of the last computed residuals) of each tower's residual. Combined with a block cache
(`hookwise.apply(model, DualBlockCache(...), TaylorSeer(order=2))`) the block cache decides when to
compute and TaylorSeer replaces its reuse of the last residual with the extrapolation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import Layer
from ..core.techniques import register_technique
from ..core.transaction import current_transaction
from ..errors import ConfigError
from ._blocks import IntervalPolicy, Predictor, TaylorPredictor, install_span, span_controller, uninstall_span
from ._runtime import check_int, logger

NAME = "taylorseer"
DEFAULT_INTERVAL = 3
DEFAULT_WARMUP = 3


@dataclass(frozen=True)
class TaylorSeer(TechniqueConfig):
    """TaylorSeer: Taylor extrapolation of skipped blocks' residuals over steps.

    - `order`: 1 (linear) or 2 (quadratic).
    - `interval`, `warmup`: alone, compute the first `warmup` steps and then every `interval`-th
      step (defaults 3 and 3; `interval=1` computes every step). With a block cache they must stay
      None: the block cache decides.
    """

    order: int = 1
    interval: int | None = None
    warmup: int | None = None

    def validate(self) -> None:
        if not isinstance(self.order, int) or isinstance(self.order, bool) or self.order not in (1, 2):
            raise ConfigError(f"TaylorSeer.order must be 1 or 2, got {self.order!r}")
        check_int("TaylorSeer.interval", self.interval, 1, optional=True)
        check_int("TaylorSeer.warmup", self.warmup, 0, optional=True)


def apply_taylorseer(model: nn.Module, config: TaylorSeer | None = None) -> None:
    """Alone: a span cache over all main blocks on a fixed schedule. With a block cache: its predictor."""
    config = config or TaylorSeer()
    controller = span_controller(model)
    if controller is None:
        interval = DEFAULT_INTERVAL if config.interval is None else config.interval
        warmup = DEFAULT_WARMUP if config.warmup is None else config.warmup
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


def remove_taylorseer(model: nn.Module, config: TaylorSeer | None = None) -> None:
    controller = span_controller(model)
    if controller is not None and controller.technique != NAME and getattr(controller, "taylor_attached", False):
        controller.predictor = Predictor()
        controller.taylor_attached = False
        controller.reset()
        return
    uninstall_span(NAME, model)


register_technique(
    NAME,
    TaylorSeer,
    apply=apply_taylorseer,
    remove=remove_taylorseer,
    order=Layer.CACHE + 10,  # after the block caches, so it can attach to one applied in the same call
)
