"""Validation sampling during training: switch a model from its training stack to an inference stack and back.

    with hookwise.validation(transformer, stack=[Offload(vram_budget="80%"), FirstBlockCache()]) as v:
        with torch.no_grad():
            images = sample(transformer, ...)
    print(v.report.summary())

`stack` is the whole stack to use inside the block: a `Stack`, a config or a list of configs. Without
one, the planner's inference stack for this machine (`make_plan(model, Job())`) is used, fitted to
the training stack (see `_planned`). The switch touches only what differs:

- a config in both stacks stays as it is (casting keeps its stored weights);
- an `Offload` in both that differs only in `vram_budget` changes its residency in place: the
  streamed groups the bigger budget has room for are held resident, copied from the host copies,
  pinned buffers or mapped files offloading already has; no file is written or hashed, nothing is
  pinned (`memory.offload.switch_residency`);
- any other difference is removed and applied (a step cache inside only: applied on enter, removed
  on exit; checkpointing outside only: removed on enter, applied again on exit). A technique whose
  removal does not give the weights back exactly (casting's rounding) is never swapped: the stacks
  must agree on it, or the switch refuses before changing anything.

Inside, the model is in eval mode. Gradients stay as the caller has them: wrap the sampling in
`torch.no_grad()` (or `torch.inference_mode()`), or offloading and checkpointing prepare for a
backward that never comes. On exit, also when the block raises, the model is back exactly: the same
parameter objects with the same values, dtypes, devices and `requires_grad`, each module's
train/eval mode, the training stack as it was applied, and the RNG state (CPU and every CUDA
device) as it was on enter, so sampling draws no random numbers from the training run. The
optimizer is not touched. The next training step is bit-identical to one taken without the
validation in between.

The switch is measured both ways (`Validation.report`): seconds, bytes copied, and the disk files
written, hashes computed and host buffers pinned, which are 0 on the in-place path.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import unwrap
from ..core.techniques import applied_configs, technique_of
from ..errors import CompatibilityError, ConfigError
from ..memory.offload import Offload, in_place_reason, offload_report, switch_residency
from ..stack import Stack, applied
from ..stack import apply as apply_stack
from ..stack import remove as remove_stack

logger = logging.getLogger("hookwise.train.validation")

# The models inside a `validation` block now (explicit context state: entered and left by the block).
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclasses.dataclass
class SwitchCost:
    """What one direction of the switch did and cost."""

    seconds: float = 0.0
    bytes_copied: int = 0  # weight bytes copied to make or undo the switch
    files_written: int = 0  # disk-offload files written
    hashes: int = 0  # disk-offload files hashed (written files are named by their hash; removal verifies)
    pins: int = 0  # host buffers pinned
    offload_seconds: float = 0.0  # of `seconds`: changing the offload residency in place
    steps: list[str] = dataclasses.field(default_factory=list)  # what was done, in order, with its time

    def summary(self) -> str:
        done = "; ".join(self.steps) or "nothing to change"
        return (
            f"{self.seconds * 1e3:.1f} ms, {self.bytes_copied / 2**20:.2f} MiB copied, {self.files_written} file(s) "
            f"written, {self.hashes} hash(es), {self.pins} pin(s): {done}"
        )


@dataclasses.dataclass
class ValidationReport:
    """The cost of entering and leaving validation, and the stacks on each side."""

    training: Stack
    inside: Stack
    enter: SwitchCost = dataclasses.field(default_factory=SwitchCost)
    exit: SwitchCost = dataclasses.field(default_factory=SwitchCost)

    def summary(self) -> str:
        return f"validation switch: enter {self.enter.summary()}; exit {self.exit.summary()}"


def _name(config: TechniqueConfig) -> str:
    return technique_of(config).name


def _layer(config: TechniqueConfig) -> int:
    return technique_of(config).layer


def _exact(config: TechniqueConfig) -> bool:
    technique = technique_of(config)
    return technique.reversible and (technique.cost is None or technique.cost.exact_undo)


def _offload_in(configs: Sequence[TechniqueConfig]) -> Offload | None:
    return next((c for c in configs if isinstance(c, Offload)), None)


def _planned(model: nn.Module, training: Sequence[TechniqueConfig]) -> list[TechniqueConfig]:
    """The planner's inference stack for this machine, fitted to the training stack.

    A technique the switch cannot undo exactly (casting) is taken as the training stack has it;
    the planner's offloading becomes the training one with the planner's budget ("100%" where the
    planner needs no offloading, the training budget where it streams everything), so the switch
    changes the residency in place.
    """
    from ..plan.job import Job
    from ..plan.plan import make_plan

    plan = make_plan(model, Job())
    proposed = list(plan.stack.configs)
    lossy_names = {_name(c) for c in [*training, *proposed] if not _exact(c)}
    chosen = [c for c in proposed if _name(c) not in lossy_names and not isinstance(c, Offload)]
    chosen += [c for c in training if _name(c) in lossy_names]
    train_offload = _offload_in(training)
    if train_offload is not None:
        planned = _offload_in(proposed)
        if planned is None:  # everything fits: hold every group resident
            chosen.append(dataclasses.replace(train_offload, vram_budget="100%"))
        elif planned.vram_budget is None:  # even sampling streams everything: keep the training residency
            chosen.append(train_offload)
        else:
            chosen.append(dataclasses.replace(train_offload, vram_budget=planned.vram_budget))
    elif _offload_in(proposed) is not None:
        chosen.append(_offload_in(proposed))
    return chosen


@dataclasses.dataclass
class _Diff:
    """How to go from the training stack to the validation one."""

    take_off: list[TechniqueConfig]  # training configs removed on enter (applied again on exit)
    put_on: list[TechniqueConfig]  # validation configs applied on enter (removed on exit)
    offload: tuple[Offload, Offload] | None  # (training, validation) offloading switched in place


def _diff(model: nn.Module, training: list[TechniqueConfig], inside: Stack) -> _Diff:
    """What differs, checked before anything changes (raises `CompatibilityError` / `ConfigError`)."""
    wanted = list(inside.configs)
    take_off = [c for c in training if c not in wanted]
    put_on = [c for c in wanted if c not in training]
    offload = None
    old, new = _offload_in(take_off), _offload_in(put_on)
    if old is not None and new is not None:
        reason = in_place_reason(model, new)
        if reason is None:
            offload = (old, new)
            take_off.remove(old)
            put_on.remove(new)
        else:
            logger.info("hookwise validation: offloading is removed and applied again (%s)", reason)
    stuck = [_name(c) for c in take_off + put_on if not _exact(c)]
    if stuck:
        raise CompatibilityError(
            f"validation would have to swap {sorted(set(stuck))}, whose removal does not give the weights back exactly "
            f"(the storage rounding stays); use the same config in the training and the validation stack"
        )
    return _Diff(take_off, put_on, offload)


def _offload_state(model: nn.Module) -> tuple[int, int, int, int]:
    """(files, files written when applied, pinned host buffers, streamed bytes) of the model's offloading;
    zeros without it."""
    try:
        report = offload_report(model)
    except ConfigError:
        return 0, 0, 0, 0
    files = [g for g in report.groups if g.file is not None]
    pinned = sum(1 for g in report.groups if g.storage == "pinned")
    streamed = sum(g.nbytes for g in report.groups if not g.resident)
    return len(files), sum(1 for g in files if not g.file_reused), pinned, streamed


def _restack(model: nn.Module, take_off: list[TechniqueConfig], put_on: list[TechniqueConfig], cost: SwitchCost) -> None:
    """Remove `take_off` and apply `put_on`; what sits above the lowest of `put_on` comes off and goes on again
    with it, so every technique is applied in canonical order as a fresh `hookwise.apply` would."""
    if not take_off and not put_on:
        return
    start, steps = time.perf_counter(), len(cost.steps)
    _restack_now(model, take_off, put_on, cost)
    cost.steps[steps:] = ["; ".join(cost.steps[steps:]) + f" ({(time.perf_counter() - start) * 1e3:.1f} ms)"]


def _restack_now(model: nn.Module, take_off: list[TechniqueConfig], put_on: list[TechniqueConfig], cost: SwitchCost) -> None:
    floor = min((_layer(c) for c in put_on), default=None)
    extra = [c for c in applied_configs(model) if floor is not None and _layer(c) > floor and not _in(c, take_off)]
    off = take_off + extra
    if off:
        files, _, _, streamed = _offload_state(model) if _offload_in(off) is not None else (0, 0, 0, 0)
        before = _weight_places(model)
        remove_stack(model, *[_name(c) for c in off])
        cost.hashes += files  # removing disk offloading verifies each file against its name
        cost.bytes_copied += streamed + _moved(before, _weight_places(model))  # streamed: copied out of the host copies
        cost.steps.append(f"removed {[_name(c) for c in take_off]}" + (f" (and {[_name(c) for c in extra]} above)" if extra else ""))
    on = put_on + extra
    if on:
        before = _weight_places(model)
        apply_stack(model, *on)
        if _offload_in(on) is not None:
            files, written, pinned, streamed = _offload_state(model)
            cost.hashes += files  # each group's file is named by the hash of its bytes
            cost.files_written += written
            cost.pins += pinned
            cost.bytes_copied += streamed  # into the new host copies or files
        cost.bytes_copied += _moved(before, _weight_places(model))
        cost.steps.append(f"applied {[_name(c) for c in put_on]}" + (f" (and {[_name(c) for c in extra]} again)" if extra else ""))


def _in(config: TechniqueConfig, configs: Sequence[TechniqueConfig]) -> bool:
    return any(config is c for c in configs)


def _weight_places(model: nn.Module) -> dict[int, tuple[torch.device, torch.dtype, int]]:
    return {id(p): (p.device, p.dtype, p.numel() * p.element_size()) for p in model.parameters()}


def _moved(before: dict[int, Any], after: dict[int, Any]) -> int:
    """Bytes of the parameters whose device or dtype changed."""
    return sum(after[k][2] for k in after if k in before and before[k][:2] != after[k][:2])


class Validation:
    """The context `hookwise.validation(model, stack)` returns; `report` tells what the switch cost."""

    def __init__(self, model: nn.Module, stack: Stack | TechniqueConfig | Sequence[TechniqueConfig] | None = None) -> None:
        root = unwrap(model)
        if not isinstance(root, nn.Module):
            raise ConfigError(f"hookwise.validation needs a torch.nn.Module, got {type(root).__name__}")
        self.model = root
        self._stack = stack
        self.report: ValidationReport | None = None
        self._undo: list[tuple[Callable[[SwitchCost], None], str]] = []
        self._saved: dict[str, Any] = {}

    # ---- entering --------------------------------------------------------------------------------
    def __enter__(self) -> Validation:
        model = self.model
        if model in _ACTIVE:
            raise ConfigError(
                "this model is inside hookwise.validation already; validation blocks do not nest: sample in the "
                "block that is open, or leave it first"
            )
        training = applied_configs(model)
        if not training:
            raise ConfigError(
                "hookwise.validation switches a model from its training stack to an inference stack, but hookwise has "
                "applied nothing to this model; apply the training stack first (hookwise.apply(model, ...)), or sample "
                "without validation() and apply the inference stack directly"
            )
        train_stack = applied(model)
        inside = self._inside(training, train_stack)
        diff = _diff(model, training, inside)
        self.report = ValidationReport(training=train_stack, inside=inside)
        cost = self.report.enter
        start = time.perf_counter()
        self._save_state()
        try:
            self._switch(diff, cost)
            model.eval()
        except BaseException:
            self._rollback(SwitchCost())
            self._restore_state()
            raise
        cost.seconds = time.perf_counter() - start
        _ACTIVE.add(model)
        logger.info("hookwise validation: entered in %.1f ms (%s)", cost.seconds * 1e3, "; ".join(cost.steps))
        return self

    def _inside(self, training: list[TechniqueConfig], train_stack: Stack) -> Stack:
        given = _planned(self.model, training) if self._stack is None else self._stack
        if isinstance(given, TechniqueConfig):
            given = [given]
        inside = Stack(*given) if not isinstance(given, Stack) else given
        if inside.map and inside.map != train_stack.map:
            raise ConfigError(
                f"the validation stack states the model map {inside.map}, the training stack {train_stack.map or 'none'}; "
                f"a model has one map: state the training one or none"
            )
        return inside

    def _switch(self, diff: _Diff, cost: SwitchCost) -> None:
        model = self.model
        if diff.take_off:
            _restack(model, diff.take_off, [], cost)
            self._undo.append((lambda c, d=diff: _restack(model, [], d.take_off, c), "apply the training techniques again"))
        if diff.offload is not None:
            old, new = diff.offload
            start = time.perf_counter()
            moved = switch_residency(model, new)
            seconds = time.perf_counter() - start
            cost.offload_seconds += seconds
            cost.bytes_copied += moved.bytes_copied
            cost.steps.append(f"offload: {len(moved.held)} group(s) held resident in place ({seconds * 1e3:.1f} ms)")
            self._undo.append((lambda c, old=old: self._release(old, c), "offload residency"))
        if diff.put_on:
            _restack(model, [], diff.put_on, cost)
            self._undo.append((lambda c, d=diff: _restack(model, d.put_on, [], c), "remove the validation techniques"))

    def _release(self, config: Offload, cost: SwitchCost) -> None:
        start = time.perf_counter()
        moved = switch_residency(self.model, config)
        seconds = time.perf_counter() - start
        cost.offload_seconds += seconds
        cost.bytes_copied += moved.bytes_copied
        cost.steps.append(
            f"offload: {len(moved.released)} group(s) streamed again, {moved.writebacks} tensor(s) written back "
            f"({seconds * 1e3:.1f} ms)"
        )

    def _save_state(self) -> None:
        model = self.model
        self._saved = {
            "modes": [(m, m.training) for m in model.modules()],
            "requires_grad": [(p, p.requires_grad) for p in model.parameters()],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        }

    def _restore_state(self) -> None:
        saved = self._saved
        for module, mode in saved["modes"]:
            module.training = mode
        for param, flag in saved["requires_grad"]:
            param.requires_grad_(flag)
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def _rollback(self, cost: SwitchCost) -> list[BaseException]:
        """Undo the switch, newest step first; keep going past failures and return them."""
        errors: list[BaseException] = []
        while self._undo:
            fn, description = self._undo.pop()
            try:
                fn(cost)
            except Exception as exc:  # one failed step must not leave the others undone
                logger.error("hookwise validation: undoing %s failed: %r", description, exc)
                errors.append(exc)
        return errors

    # ---- leaving ---------------------------------------------------------------------------------
    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        model = self.model
        cost = self.report.exit
        start = time.perf_counter()
        _ACTIVE.discard(model)
        errors = self._rollback(cost)
        self._restore_state()
        cost.seconds = time.perf_counter() - start
        logger.info("hookwise validation: left in %.1f ms (%s)", cost.seconds * 1e3, "; ".join(cost.steps))
        if errors and exc is None:
            raise CompatibilityError(
                f"leaving validation failed ({errors[0]}); the model may not be back on its training stack "
                f"(now: {applied(model)!r}): remove its techniques and apply the training stack again"
            ) from errors[0]


def validation(model: nn.Module, stack: Stack | TechniqueConfig | Sequence[TechniqueConfig] | None = None) -> Validation:
    """A context that switches `model` from its applied training stack to `stack` and back exactly.

    `stack`: the whole stack to use inside (a `Stack`, a config or a list of configs); None: the
    planner's inference stack for this machine, fitted to the training stack. See the module
    docstring for what the switch changes and what it restores; `report` on the returned object
    gives its cost both ways.
    """
    return Validation(model, stack)


__all__ = ["SwitchCost", "Validation", "ValidationReport", "validation"]
