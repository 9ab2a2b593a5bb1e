"""Run state: what the hooked model is doing right now (timestep, step, CFG branch, mode).

A root hook on the model records the timestep argument of each call, counts steps per branch and
notes train / eval mode. Techniques read it (caches key their state by branch and use the step); the
user never passes callbacks. There is always a branch: `"default"` unless `hookwise.branch(model,
name)` says otherwise, so nothing ever fails for want of a context.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .hooks import HookRegistry, Layer, ModelHook, reset_stateful_hooks, unwrap

logger = logging.getLogger("hookwise.core.state")

DEFAULT_BRANCH = "default"
RUN_STATE_HOOK = "hookwise.run_state"
# Names a denoiser's forward uses for its timestep, most common first.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time")


class RunState:
    """The state of the current forward of a hooked model.

    - `timestep`: the raw timestep argument of the latest call (tensor, number or None).
    - `step`: index of the current denoising step on the active branch (0 for its first call).
    - `branch`: the active CFG branch; `"default"` unless set with `hookwise.branch`.
    - `mode`: `"train"` or `"eval"` (the model's `training` flag at the latest call).
    - `run`: how many sampling runs have started; a new one begins when the timestep rises
      (sampling schedules fall), or on `new_run()`.
    - `latents`: the first tensor argument of the latest call (the noisy latents), by reference.

    A timestep that lives on an accelerator is not read at once (that would cost a host sync per
    call): it stays *pending* until someone needs it. `resolve_timestep()` reads it (one sync) and
    runs the rise check; a cache that syncs anyway for its own decision folds the read into that
    same transfer with `pending_timestep()` + `resolve_timestep(value)`. Until then `step` counts
    on as if the run continued.
    """

    def __init__(self) -> None:
        self.branch: str = DEFAULT_BRANCH
        self.timestep: Any = None
        self.mode: str = "eval"
        self.grad_enabled: bool = False
        self.calls: int = 0
        self.run: int = 0
        self._steps: dict[str, int] = {}
        self._last_t: dict[str, float] = {}
        self._new_run_listeners: list[Callable[[], None]] = []
        self.latents: torch.Tensor | None = None
        self.t_host: float | None = None  # the latest timestep as a float, when known without a sync
        self._pending: torch.Tensor | None = None  # a device timestep not read yet
        self._pending_branch: str = DEFAULT_BRANCH

    @property
    def step(self) -> int:
        return self._steps.get(self.branch, -1)

    def steps(self) -> dict[str, int]:
        """Current step index of every branch seen in this run."""
        return dict(self._steps)

    def timestep_value(self) -> float | None:
        """The latest timestep as a float (first element of a tensor). Syncs with the device if on one."""
        if self._pending is not None:
            return self.resolve_timestep()
        if self.t_host is not None:
            return self.t_host
        return _as_float(self.timestep)

    def pending_timestep(self) -> torch.Tensor | None:
        """The latest timestep as a float32 device scalar while it has not been read, else None.

        For folding the read into a transfer the caller makes anyway; pass the value read back to
        `resolve_timestep`.
        """
        if self._pending is None:
            return None
        return self._pending.reshape(-1)[0].float()

    def resolve_timestep(self, value: float | None = None) -> float | None:
        """Read a pending device timestep (one sync, or `value` when the caller read it) and check for a rise.

        When the timestep rose on the branch it was recorded on, a new run starts now (stateful
        hooks reset) and that branch's step becomes 0. Returns the timestep as a float.
        """
        pending = self._pending
        if pending is None:
            return self.t_host if self.t_host is not None else _as_float(self.timestep)
        if value is None:
            value = float(pending.reshape(-1)[0])
        self._pending = None
        self.t_host = float(value)
        branch = self._pending_branch
        if self._observe_timestep(branch, self.t_host):
            self._steps[branch] = 0  # this call counted on the old run; it is step 0 of the new one
        return self.t_host

    def _observe_timestep(self, branch: str, t: float) -> bool:
        """Record `t` as `branch`'s latest timestep; one above the previous starts a new run (returns True)."""
        last = self._last_t.get(branch)
        rose = last is not None and t > last
        if rose:
            logger.debug("hookwise: timestep rose from %s to %s on branch %r: new run", last, t, branch)
            self.new_run()
        self._last_t[branch] = t
        return rose

    def cfg_halves_equal(self) -> torch.Tensor | None:
        """A device bool scalar: the latest latents are two equal halves (batched classifier-free guidance).

        None when the batch cannot be split in two. Reading it is the caller's sync.
        """
        x = self.latents
        if x is None or x.ndim == 0 or x.shape[0] < 2 or x.shape[0] % 2:
            return None
        half = x.shape[0] // 2
        return torch.eq(x[:half], x[half:]).all()

    def on_new_run(self, fn: Callable[[], None]) -> None:
        """Call `fn` whenever a new sampling run starts."""
        self._new_run_listeners.append(fn)

    def new_run(self) -> None:
        """Start a new run: step counters restart and listeners (stateful hooks) reset."""
        self.run += 1
        self._steps.clear()
        self._last_t.clear()
        self._pending = None
        for fn in list(self._new_run_listeners):
            fn()

    def record_call(self, timestep: Any, training: bool, latents: torch.Tensor | None = None) -> None:
        """Record one call of the root model (used by the root hook)."""
        branch = self.branch
        host_t = _host_float(timestep)
        self._pending = None
        self.t_host = host_t
        self.latents = latents
        if host_t is None and isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            if timestep.device.type != "meta" and not timestep.is_complex():
                self._pending, self._pending_branch = timestep, branch
        if host_t is not None:
            self._observe_timestep(branch, host_t)
        self.timestep = timestep
        self.mode = "train" if training else "eval"
        self.grad_enabled = torch.is_grad_enabled()
        self.calls += 1
        self._steps[branch] = self._steps.get(branch, -1) + 1

    def __repr__(self) -> str:
        return (
            f"RunState(branch={self.branch!r}, step={self.step}, run={self.run}, mode={self.mode!r}, "
            f"calls={self.calls})"
        )


def _host_float(value: Any) -> float | None:
    """A float for a timestep readable without a device sync (Python number or CPU tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel() > 0:
        if not value.is_complex():
            return float(value.reshape(-1)[0])
    return None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or value.device.type == "meta":
            return None
        return float(value.reshape(-1)[0])
    return float(value)


class RunStateHook(ModelHook):
    """Outermost hook of a hooked model: records each call in its `RunState`."""

    layer = Layer.STATE

    def __init__(self, timestep_arg: str | None = None) -> None:
        self.state = RunState()
        self.timestep_arg = timestep_arg
        self._t_index: int | None = None
        self.module: nn.Module | None = None

    def on_attach(self, module: nn.Module) -> None:
        name, index = find_timestep_parameter(module, self.timestep_arg)
        self.timestep_arg, self._t_index = name, index
        self.module = module
        # A stateful hook anywhere in the model starts fresh with each sampling run. A bound method,
        # not a closure, so a deep copy of the model resets the copy's hooks.
        self.state.on_new_run(self._reset_model)

    def _reset_model(self) -> None:
        if self.module is not None:
            reset_stateful_hooks(self.module)

    # Bookkeeping in Python, kept out of compiled graphs: traced, it would break the graph on reading a
    # host timestep and make dynamo specialize on the step counters (a recompile per step).
    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        name = self.timestep_arg
        if name is None:
            t = None
        elif name in kwargs:
            t = kwargs[name]
        elif self._t_index is not None and self._t_index < len(args):
            t = args[self._t_index]
        else:
            t = None
        self.state.record_call(t, module.training, _first_tensor(args, kwargs))
        return args, kwargs


_LATENT_NAMES = ("hidden_states", "x", "img", "latents", "sample")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latents of a denoiser call: a usual keyword, else the first tensor argument."""
    for name in _LATENT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def find_timestep_parameter(module: nn.Module, name: str | None = None) -> tuple[str | None, int | None]:
    """(name, positional index) of the timestep parameter of `module.forward`.

    With `name` given it must exist; otherwise the first of `TIMESTEP_NAMES` found is used, or
    (None, None) when the forward takes no timestep.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # builtins or C extensions without a signature
        params = []
    names = [p.name for p in params]
    positional = [
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if name is not None:
        if name not in names:
            raise ConfigError(
                f"timestep_arg={name!r} is not a parameter of {type(module).__name__}.forward "
                f"(its parameters: {names}); pass one of those, or None to detect it"
            )
        chosen = name
    else:
        chosen = next((n for n in TIMESTEP_NAMES if n in names), None)
        if chosen is None:
            return None, None
    index = positional.index(chosen) if chosen in positional else None
    return chosen, index


# ---- public helpers -----------------------------------------------------------------------------
def get_run_state(model: nn.Module) -> RunState | None:
    """The `RunState` of a hooked model, or None if hookwise has not attached one."""
    hook = run_state_hook(model)
    return hook.state if hook else None


def run_state_hook(model: nn.Module) -> RunStateHook | None:
    """The root run-state hook of `model`, or None if hookwise has not attached one."""
    registry = HookRegistry.of(model)
    hook = registry.get(RUN_STATE_HOOK) if registry else None
    return hook if isinstance(hook, RunStateHook) else None


def attach_run_state(model: nn.Module, timestep_arg: str | None = None) -> RunStateHook:
    """The root run-state hook of `model`, added if missing."""
    hook = run_state_hook(model)
    if hook is not None:
        if timestep_arg is not None and hook.timestep_arg != timestep_arg:
            raise ConfigError(
                f"the model's run state already reads its timestep from {hook.timestep_arg!r}, "
                f"not {timestep_arg!r}; remove hookwise from the model first to change it"
            )
        return hook
    hook = RunStateHook(timestep_arg)
    HookRegistry.get_or_create(model).add(RUN_STATE_HOOK, hook)
    return hook


def detach_run_state(model: nn.Module) -> None:
    """Take the root run-state hook off `model`, if it has one."""
    registry = HookRegistry.of(model)
    if registry is not None:
        registry.remove(RUN_STATE_HOOK, missing_ok=True)


@contextmanager
def branch(model: nn.Module, name: str) -> Iterator[RunState]:
    """Run the calls inside the block on CFG branch `name` ("cond", "uncond", ...).

    Stateful techniques keep separate state per branch. The previous branch is restored on exit,
    also when the block raises. On a model hookwise has not touched nothing reads the branch, and the
    block simply runs.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a branch name must be a non-empty string, got {name!r}")
    state = get_run_state(unwrap(model))
    if state is None:
        logger.debug("hookwise.branch(%r) on a model without hookwise hooks: nothing reads it", name)
        state = RunState()
    previous = state.branch
    state.branch = name
    try:
        yield state
    finally:
        state.branch = previous


def new_run(model: nn.Module) -> None:
    """Tell the hooked model that a new sampling run starts (stateful hooks reset, steps restart).

    Not needed when the timestep reaches the model as a Python number or a CPU tensor: a rising
    timestep is detected as a new run automatically.
    """
    state = get_run_state(model)
    if state is not None:
        state.new_run()
