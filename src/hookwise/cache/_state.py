"""Shared machinery of the step caches: run state, per-branch state, one host sync, the hooks' names.

- The timestep and step come from the model's `RunState` (attached by `hookwise.apply`); no cache
  takes callbacks.
- Every cache keeps its state in a `BranchStore`, one entry per CFG branch (`hookwise.branch`, a
  diffusers pipeline's `cache_context`, or the call order of CFG as two calls with no branch named),
  so cond and uncond never share state; a batched-CFG call is one branch whose tensors hold both halves.
- State resets with each new sampling run: cache hooks are `stateful` and the run state resets them
  when the timestep rises or a branch repeats its run's first timestep (or on `hookwise.new_run`).
- `host_values()` reads a cache's decision scalars and, when it is still on the device, the run's
  timestep in one transfer: a step costs at most one host synchronization per cache. Under context
  parallelism the run state's `reduce_decisions` first reduces the scalars across the processes (one
  collective), so each process decides on the same values.
- Cache hooks are named "hookwise.cache.<technique>"; `cache_stats(model)` gathers their counters.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Generic, Hashable, TypeVar

import torch
from torch import nn

from ..core.hooks import HookRegistry, Layer, ModelHook, iter_registries, unwrap
from ..core.state import RunState, attach_run_state, get_run_state

logger = logging.getLogger("hookwise.cache")

T = TypeVar("T")

# Hook names are "hookwise.cache.<technique>"; one technique never adds two hooks to a module.
HOOK_PREFIX = "hookwise.cache."


def hook_name(technique: str) -> str:
    return HOOK_PREFIX + technique


def run_state(model: nn.Module) -> RunState:
    """The run state of `model`, attached if missing (for `apply_<cache>` called without `hookwise.apply`)."""
    state = get_run_state(unwrap(model))
    return state if state is not None else attach_run_state(unwrap(model)).state


class BranchStore(Generic[T]):
    """Per-branch state objects, created on first use by `factory()`."""

    __slots__ = ("_factory", "_states")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._states: dict[Hashable, T] = {}

    def get(self, branch: Hashable) -> T:
        state = self._states.get(branch)
        if state is None:
            state = self._states[branch] = self._factory()
        return state

    def peek(self, branch: Hashable) -> T | None:
        return self._states.get(branch)

    def branches(self) -> list[Hashable]:
        return list(self._states)

    def clear(self) -> None:
        self._states.clear()


def host_values(state: RunState, *values: torch.Tensor) -> list[float]:
    """Read device scalars to the host in one transfer, folding in a pending timestep.

    Returns the floats of `values` in order; a pending timestep is resolved with the same transfer
    (which may start a new run: callers re-read their per-branch state afterwards).
    """
    pending = state.pending_timestep()
    parts = [v.detach().reshape(1).float() for v in values]
    if parts and state.reduce_decisions is not None:  # several processes: one collective, same decision on each
        parts = list(state.reduce_decisions(torch.cat(parts)).split(1))
    if pending is not None:
        parts.append(pending.reshape(1))
    if not parts:
        return []
    device = parts[0].device
    if any(p.device != device for p in parts):
        parts = [p.cpu() for p in parts]
    host = torch.cat(parts).tolist()
    if pending is not None:
        state.resolve_timestep(host.pop())
    return host


def resolved_step(state: RunState) -> int:
    """The step of the current call on its branch, after reading a pending timestep (at most one sync)."""
    if state._pending is not None:
        state.resolve_timestep()
    return state.step


def timestep_1000(state: RunState, scale: float | None, first_t: float | None) -> float | None:
    """The current timestep in the 0..1000 convention of diffusers' schedulers.

    `scale` multiplies the model's timestep argument; None guesses it from the run's first
    timestep `first_t`: a model whose first timestep is at most 1 takes sigmas in [0, 1] (FLUX),
    otherwise timesteps in [0, 1000] (Wan, SD3).
    """
    t = state.timestep_value()
    if t is None:
        return None
    if scale is None:
        scale = 1000.0 if first_t is not None and first_t <= 1.0 + 1e-6 else 1.0
    return t * scale


def step_timestep_1000(state: RunState, scale: float | None, first_t: float | None, step: int) -> tuple[float | None, float | None]:
    """(first_t, t1000) for a hook that keeps its run's first timestep: `first_t` is taken anew at step 0
    (or while unknown), then the current timestep is put on the 0..1000 scale with it (`timestep_1000`)."""
    if first_t is None or step == 0:
        first_t = state.timestep_value()
    return first_t, timestep_1000(state, scale, first_t)


def remove_cache_hooks(model: nn.Module, technique: str) -> int:
    """Remove every hook `technique` added to `model`; returns how many."""
    name = hook_name(technique)
    count = 0
    for _, registry in list(iter_registries(unwrap(model))):
        if name in registry:
            registry.remove(name)
            count += 1
    return count


def find_hooks(model: nn.Module, cls: type) -> list[tuple[str, ModelHook]]:
    """(module path, hook) for every hook of class `cls` in `model`."""
    out = []
    for path, registry in iter_registries(unwrap(model)):
        for hook in registry.hooks():
            if isinstance(hook, cls):
                out.append((path, hook))
    return out


def add_cache_hook(module: nn.Module, hook: ModelHook, technique: str) -> None:
    HookRegistry.get_or_create(module).add(hook_name(technique), hook)


class CacheHook(ModelHook):
    """Base of cache hooks: outermost technique layer, stateful (reset with each sampling run)."""

    layer = Layer.CACHE
    stateful = True

    def stats(self) -> dict[str, Any]:
        """This hook's counters for `cache_stats` (the hooks of one technique are merged)."""
        return {}


def cache_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What each step cache on `model` has done, by technique name.

    Block caches (first-block, dual-block, TaylorSeer, MagCache, TeaCache): `predictor` ("reuse" or
    "taylor": TaylorSeer extrapolates for it) and `branches`: per CFG branch of the current run, the
    `computed` and `cached` steps. Attention caches (PAB, FasterCache, TaylorSeer on attention):
    `computed` and `reused` module calls since they were applied, over all their modules. FasterCache's
    CFG reuse: `batched` (batched CFG detected; None before the first call of a run) and
    `uncond_skipped` (unconditional predictions answered without a call). LayerSkip: `skipped` calls.
    """
    out: dict[str, dict[str, Any]] = {}
    for _, registry in iter_registries(unwrap(model)):
        for name in registry.names(order="inner"):
            if not name.startswith(HOOK_PREFIX):
                continue
            merged = out.setdefault(name[len(HOOK_PREFIX) :], {})
            for key, value in registry.get(name).stats().items():
                if key in merged and isinstance(value, int) and not isinstance(value, bool):
                    merged[key] += value  # counters of the technique's hooks on several modules add up
                else:
                    merged.setdefault(key, value)
    return out
