"""The module-output reuse engine behind the attention caches (PAB, FasterCache, TaylorSeer on attention).

A hook on each target module (attention modules from the model map, by kind) keeps, per CFG
branch, the module's last computed outputs. On each call a `Rule` says whether to compute or to
answer from them: reuse the last output as is (PAB) or extrapolate it (FasterCache from the last two,
TaylorSeer by a Taylor expansion over steps).
The step and timestep come from the run state; the timestep is read on the host at most once per
call, and not at all when it already is a host number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.hooks import HookRegistry
from ..errors import CompatibilityError, NoTargetError
from ._state import (
    BranchStore,
    CacheHook,
    add_cache_hook,
    remove_cache_hooks,
    resolved_step,
    run_state,
    step_timestep_1000,
)
from ._streams import map_output

RUN = object()  # `before()` says: run the module


def attention_kind(kind: str) -> str:
    """The PAB group of a model-map attention kind: self and joint attention are 'spatial'."""
    return {"self": "spatial", "joint": "spatial"}.get(kind, kind)


@dataclass
class ModuleBranch:
    outputs: list[Any] = field(default_factory=list)  # newest last, at most `keep`
    steps: list[int] = field(default_factory=list)
    signature: tuple | None = None  # input shapes of the cached outputs
    first_t: float | None = None


def _signature(args: tuple, kwargs: dict) -> tuple:
    return tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)) + tuple(
        (k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)
    )


class Rule:
    """When a module computes and what it answers otherwise."""

    keep = 1  # outputs to remember

    def compute(self, step: int, t1000: float | None, st: ModuleBranch) -> bool:
        raise NotImplementedError

    def answer(self, st: ModuleBranch, step: int, t1000: float | None) -> Any:
        return st.outputs[-1]


class ModuleReuseHook(CacheHook):
    """Answers a module's call from its recent outputs on the steps its rule allows."""

    def __init__(self, model: nn.Module, rule: Rule, timestep_scale: float | None, needs_timestep: bool) -> None:
        self.state = run_state(model)
        self.rule = rule
        self.timestep_scale = timestep_scale
        self.needs_timestep = needs_timestep
        self.store: BranchStore[ModuleBranch] = BranchStore(ModuleBranch)
        self.computed = 0
        self.reused = 0
        self._pending: tuple | None = None

    def reset(self) -> None:
        self.store.clear()

    def stats(self) -> dict[str, Any]:
        return {"computed": self.computed, "reused": self.reused}

    # Skipped by dynamo, not what it calls: a compiled module stays compiled, the cache logic is eager.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        out = self.before(args, kwargs)
        if out is RUN:
            out = self.after(next_fn(*args, **kwargs))
        return out

    @torch.compiler.disable
    def before(self, args: tuple, kwargs: dict) -> Any:
        state = self.state
        self._pending = None
        if state.mode == "train":
            return RUN
        step = resolved_step(state)  # reads a device timestep once per call (shared by every hook)
        st = self.store.get(state.branch)
        t1000 = None
        if self.needs_timestep:
            st.first_t, t1000 = step_timestep_1000(state, self.timestep_scale, st.first_t, step)
        signature = _signature(args, kwargs)
        if len(st.outputs) >= self.rule.keep and st.signature == signature and not self.rule.compute(step, t1000, st):
            self.reused += 1
            return self.rule.answer(st, step, t1000)
        self._pending = (st, step, signature)
        return RUN

    @torch.compiler.disable
    def after(self, out: Any) -> Any:
        if self._pending is None:
            return out
        st, step, signature = self._pending
        self._pending = None
        self.computed += 1
        if st.signature != signature:
            st.outputs.clear()
            st.steps.clear()
        st.signature = signature
        st.outputs.append(map_output(lambda t: t.detach(), out))
        st.steps.append(step)
        if len(st.outputs) > self.rule.keep:
            del st.outputs[0], st.steps[0]
        return out


def attach_module_hooks(
    technique: str,
    model: nn.Module,
    targets: list[tuple[str, nn.Module, Rule]],
    timestep_scale: float | None,
    needs_timestep: bool,
    what: str,
) -> list[ModuleReuseHook]:
    if not targets:
        raise NoTargetError(f"{technique}: {what}")
    for path, module, _ in targets:
        registry = HookRegistry.of(module)
        others = [h for h in (registry.hooks() if registry else []) if isinstance(h, ModuleReuseHook)]
        if others:
            raise CompatibilityError(
                f"{technique}: {path} already answers from another attention cache; use one attention-level cache "
                f"(PAB, FasterCache or TaylorSeer(targets='attention')) per model"
            )
    hooks = []
    for _, module, rule in targets:
        hook = ModuleReuseHook(model, rule, timestep_scale, needs_timestep)
        add_cache_hook(module, hook, technique)
        hooks.append(hook)
    return hooks


def detach_module_hooks(technique: str, model: nn.Module) -> None:
    remove_cache_hooks(model, technique)


class IntervalRule(Rule):
    """Compute once in `interval` steps inside the timestep `window`, always outside it; reuse the last output."""

    def __init__(self, interval: int, window: tuple[float, float] | None) -> None:
        self.interval, self.window = interval, window

    def compute(self, step: int, t1000: float | None, st: ModuleBranch) -> bool:
        return computes_at(step, t1000, self.interval, self.window)


def computes_at(step: int, t1000: float | None, interval: int, window: tuple[float, float] | None) -> bool:
    """Interval reuse in a window: compute on every `interval`-th step, and on every step outside `window`."""
    return interval <= 1 or not in_window(t1000, window) or step % interval == 0


def in_window(t1000: float | None, window: tuple[float, float] | None) -> bool:
    """Whether the timestep lies strictly inside the window (no window: always; no timestep: never)."""
    if window is None:
        return True
    if t1000 is None:
        return False
    return window[0] < t1000 < window[1]
