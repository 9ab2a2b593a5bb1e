"""Shared machinery of the step caches: run state, per-branch state, one host sync, targets, structure.

- The timestep and step come from the model's `RunState` (attached by `hookwise.apply`); no cache
  takes callbacks.
- Every cache keeps its state in a `BranchStore`, one entry per CFG branch (`hookwise.branch`), so
  cond and uncond never share state; a batched-CFG call is one branch whose tensors hold both halves.
- State resets with each new sampling run: cache hooks are `stateful` and the run state resets them
  when the timestep rises (or on `hookwise.new_run`).
- `host_values()` reads a cache's decision scalars and, when it is still on the device, the run's
  timestep in one transfer: a step costs at most one host synchronization per cache.
- Blocks' inputs and outputs are matched into *streams* (`StreamMap`), so a skipped block can return
  its inputs in its own output structure, whatever the model (FLUX returns `(encoder, hidden)`, Wan
  returns `hidden`, musubi-style blocks return `(img, txt)`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

import torch
from torch import nn

from ..core.hooks import HookRegistry, Layer, ModelHook, iter_registries, unwrap
from ..core.state import RunState, attach_run_state, get_run_state
from ..errors import ConfigError, NoTargetError
from ..introspect.model_map import ModelMap, describe

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


# ---- structure: streams of a block ---------------------------------------------------------------
Key = tuple[str, Any]  # ("a", position) or ("k", name)


def tensor_inputs(args: tuple, kwargs: dict) -> dict[Key, torch.Tensor]:
    out: dict[Key, torch.Tensor] = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out[("a", i)] = a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[("k", k)] = v
    return out


def input_of(key: Key, args: tuple, kwargs: dict) -> torch.Tensor:
    kind, where = key
    return args[where] if kind == "a" else kwargs[where]


@dataclass(frozen=True)
class StreamMap:
    """How a block's output is built from its inputs.

    `container`: "tensor", "tuple" or "list"; `slots`: per output element, the input key it
    continues (a residual stream), or None (not a stream: the cached value is reused);
    `constants`: non-tensor output elements, returned as they were.
    """

    container: str
    slots: tuple[Key | None, ...]
    constants: tuple[Any, ...]

    def values(self, output: Any) -> list[Any]:
        return [output] if self.container == "tensor" else list(output)

    def build(self, values: list[Any]) -> Any:
        if self.container == "tensor":
            return values[0]
        return tuple(values) if self.container == "tuple" else list(values)

    @property
    def streams(self) -> list[int]:
        """Indices of output elements that continue an input stream."""
        return [i for i, key in enumerate(self.slots) if key is not None]


def infer_stream_map(where: str, args: tuple, kwargs: dict, output: Any) -> StreamMap:
    """Match each tensor of a block's output with the input it continues (same shape and dtype).

    Ties (two inputs of the same shape) go to the input closest to the output, read once per block.
    """
    if isinstance(output, torch.Tensor):
        container, outs = "tensor", [output]
    elif isinstance(output, (tuple, list)):
        container, outs = ("tuple" if isinstance(output, tuple) else "list"), list(output)
    else:
        raise ConfigError(
            f"block {where} returns a {type(output).__name__}; step caches need blocks that return a tensor "
            f"or a tuple of tensors. Apply the cache to a model whose blocks do, or use an attention-level cache (PAB)"
        )
    inputs = tensor_inputs(args, kwargs)
    slots: list[Key | None] = []
    constants: list[Any] = []
    used: set[Key] = set()
    for out in outs:
        constants.append(None if isinstance(out, torch.Tensor) else out)
        if not isinstance(out, torch.Tensor):
            slots.append(None)
            continue
        candidates = [k for k, v in inputs.items() if k not in used and v.shape == out.shape and v.dtype == out.dtype]
        if len(candidates) > 1:
            with torch.no_grad():
                distance = [float((out.float() - inputs[k].float()).abs().mean()) for k in candidates]
            candidates = [candidates[min(range(len(candidates)), key=distance.__getitem__)]]
        key = candidates[0] if candidates else None
        if key is not None:
            used.add(key)
        slots.append(key)
    if not any(k is not None for k in slots):
        raise ConfigError(
            f"no output of block {where} has the shape of one of its inputs, so it is not a residual block a step "
            f"cache can skip (output shapes {[tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]})"
        )
    return StreamMap(container, tuple(slots), tuple(constants))


def identity_output(smap: StreamMap, args: tuple, kwargs: dict, cached: list[Any] | None) -> Any:
    """A skipped block's output: its input streams in its output structure (cached values elsewhere)."""
    values = []
    for i, key in enumerate(smap.slots):
        if key is not None:
            values.append(input_of(key, args, kwargs))
        elif smap.constants[i] is not None or cached is None:
            values.append(smap.constants[i])
        else:
            values.append(cached[i])
    return smap.build(values)


def rel_l1(now: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """Relative L1 change, sum |now - before| / sum |before| over all tensors, as a device scalar."""
    num = sum((a.float() - b.float()).abs().sum() for a, b in zip(now, before))
    den = sum(b.float().abs().sum() for b in before)
    return num / den.clamp_min(1e-12)


# ---- targets --------------------------------------------------------------------------------------
def main_blocks(model: nn.Module, technique: str) -> tuple[ModelMap, list[tuple[str, nn.Module]]]:
    """The main towers' blocks of `model` in call order, from the model map. Raises when there are none."""
    model = unwrap(model)
    mmap = describe(model)
    blocks = [(b.path, model.get_submodule(b.path)) for t in mmap.main_towers for b in t.blocks]
    if not blocks:
        raise NoTargetError(
            f"{technique}: {type(model).__name__} has no tower of repeated blocks "
            f"({'; '.join(mmap.notes) or 'nothing found'}), so a block cache has nothing to skip; "
            f"check `hookwise.describe(model)` or use an attention-level cache"
        )
    return mmap, blocks


def tower_of(mmap: ModelMap) -> dict[str, str]:
    """Block path -> name of its tower."""
    return {b.path: t.name for t in mmap.main_towers for b in t.blocks}


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
