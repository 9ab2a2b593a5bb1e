"""Run state: what the hooked model is doing right now (timestep, step, CFG branch, mode).

A root hook on the model records the timestep argument of each call, counts steps per branch and
notes train / eval mode. Techniques read it (caches key their state by branch and use the step); the
user never passes callbacks. There is always a branch: `"default"` unless `hookwise.branch(model,
name)` says otherwise, so nothing ever fails for want of a context.

Branches without user code:
- diffusers models: their pipelines mark CFG calls with `transformer.cache_context("cond")`; while
  the run state is attached, that method of the instance also enters `hookwise.branch` (an instance
  override, undone exactly when the run state comes off).
- CFG as two calls with no branch set: a call that gets the very same input tensor, unchanged, at the
  same timestep as the call before it is another branch of the same step. The calls of one step are
  told apart by their order: the first is on `"default"`, the second on `"default.1"`, and so on
  (`auto_branch(i)`), so each keeps its own cache state.

Runs: a new sampling run starts when the timestep rises on a branch, or when a branch repeats the first
timestep of its run with new inputs (back-to-back one-step runs, a validation loop at a fixed `t`).
A timestep repeated in the middle of a run (Heun-style samplers) continues it. In training mode
neither the repeat rule nor the call-order branches apply: training calls the model at random
timesteps, and caches do nothing there.
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
from .overrides import override_method, restore_method

logger = logging.getLogger("hookwise.core.state")

DEFAULT_BRANCH = "default"
RUN_STATE_HOOK = "hookwise.run_state"
CACHE_CONTEXT = "cache_context"  # diffusers' method that names the CFG branch of the calls inside it
# Names a denoiser's forward uses for its timestep, most common first.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time")


class RunState:
    """The state of the current forward of a hooked model.

    - `timestep`: the raw timestep argument of the latest call (tensor, number or None).
    - `step`: index of the current denoising step on the active branch (0 for its first call).
    - `branch`: the active CFG branch: the one set with `hookwise.branch` (or diffusers'
      `cache_context`), else `auto_branch(i)` for the i-th call of a two-call CFG step, else `"default"`.
    - `mode`: `"train"` or `"eval"` (the model's `training` flag at the latest call).
    - `run`: how many sampling runs have started; a new one begins when the timestep rises
      (sampling schedules fall), when a branch repeats its run's first timestep, or on `new_run()`.
    - `latents`: the main input of the latest call (the noisy latents) when it is one tensor, by
      reference; None when the model was given something else (a list of latents) or nothing.

    A timestep that lives on an accelerator is not read at once (that would cost a host sync per
    call): it stays *pending* until someone needs it. `resolve_timestep()` reads it (one sync) and
    runs the rise check; a cache that syncs anyway for its own decision folds the read into that
    same transfer with `pending_timestep()` + `resolve_timestep(value)`. Until then `step` counts
    on as if the run continued.
    """

    def __init__(self) -> None:
        self._explicit: str | None = None  # the branch set by `hookwise.branch`, if any
        self._auto: int = 0  # index of the current call within a two-call CFG step
        self._previous: tuple | None = None  # (inputs, their versions, host timestep, auto index) of the last call
        self.timestep: Any = None
        self.mode: str = "eval"
        self.grad_enabled: bool = False
        self.calls: int = 0
        self.run: int = 0
        self._steps: dict[str, int] = {}
        self._last_t: dict[str, float] = {}
        self._first_t: dict[str, float] = {}
        self._new_run_listeners: list[Callable[[], None]] = []
        self.latents: torch.Tensor | None = None
        self.t_host: float | None = None  # the latest timestep as a float, when known without a sync
        self._pending: torch.Tensor | None = None  # a device timestep not read yet
        self._pending_branch: str = DEFAULT_BRANCH
        self._pending_sampling: bool = True
        # Set by a technique that runs the model on several processes (context parallelism): maps the
        # stacked decision statistics of a step cache to their values over all processes, so every
        # process makes the same decision. None: one process.
        self.reduce_decisions: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def branch(self) -> str:
        if self._explicit is not None:
            return self._explicit
        return auto_branch(self._auto)

    @branch.setter
    def branch(self, name: str | None) -> None:
        # None (or leaving a context) hands the branch back to automatic detection.
        self._explicit = name

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
        if self._observe_timestep(branch, self.t_host, self._pending_sampling):
            self._steps[branch] = 0  # this call counted on the old run; it is step 0 of the new one
        return self.t_host

    def _observe_timestep(self, branch: str, t: float, sampling: bool) -> bool:
        """Record `t` as `branch`'s latest timestep; returns True when it starts a new run.

        A new run: `t` is above the branch's previous timestep (sampling schedules fall), or, while
        sampling, it repeats the first timestep of the branch's run (the same call again means a
        new run; a repeat later in a schedule, as Heun's, does not).
        """
        last = self._last_t.get(branch)
        rose = last is not None and t > last
        repeated = sampling and not rose and self._first_t.get(branch) == t
        if rose or repeated:
            why = "rose" if rose else "repeated the run's first timestep"
            logger.debug("hookwise: timestep %s (%s -> %s) on branch %r: new run", why, last, t, branch)
            self.new_run()
        self._first_t.setdefault(branch, t)
        self._last_t[branch] = t
        return rose or repeated

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
        self._first_t.clear()
        self._pending = None
        for fn in list(self._new_run_listeners):
            fn()

    def record_call(
        self,
        timestep: Any,
        training: bool,
        latents: torch.Tensor | None = None,
        inputs: tuple[torch.Tensor, ...] = (),
    ) -> None:
        """Record one call of the root model (used by the root hook).

        `latents`: the main input when it is one tensor; `inputs`: the tensors of the main input
        (one latent, or the latents of a list), which tell a second CFG call of the same step.
        """
        host_t = _host_float(timestep)
        sampling = not training
        if not inputs and latents is not None:
            inputs = (latents,)
        if sampling and self._explicit is None:
            self._auto = self._call_order(inputs, timestep, host_t)
        else:
            self._auto, self._previous = 0, None
        branch = self.branch
        self._pending = None
        self.t_host = host_t
        self.latents = latents
        if host_t is None and isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            if timestep.device.type != "meta" and not timestep.is_complex():
                self._pending, self._pending_branch, self._pending_sampling = timestep, branch, sampling
        if host_t is not None:
            self._observe_timestep(branch, host_t, sampling)
        self.timestep = timestep
        self.mode = "train" if training else "eval"
        self.grad_enabled = torch.is_grad_enabled()
        self.calls += 1
        self._steps[branch] = self._steps.get(branch, -1) + 1

    def _call_order(self, inputs: tuple[torch.Tensor, ...], timestep: Any, host_t: float | None) -> int:
        """Index of this call within its step when no branch is set: one more than the previous call's
        when it gets the same input, unchanged, at the same timestep (CFG as two calls); else 0."""
        previous, self._previous = self._previous, None
        index = 0
        if previous is not None and inputs and timestep is not None:
            before, versions, before_t, before_index = previous
            if before_t == host_t and _same_inputs(inputs, before, versions):
                index = before_index + 1
        if inputs:
            self._previous = (inputs, tuple(x._version for x in inputs), host_t, index)
        return index

    def __repr__(self) -> str:
        if self._pending is not None:
            t = "pending"  # on the device and not read yet: printing must not sync
        else:
            value = self.t_host if self.t_host is not None else _as_float(self.timestep)
            t = None if value is None else round(value, 6)
        return (
            f"RunState(timestep={t}, step={self.step}, branch={self.branch!r}, run={self.run}, "
            f"mode={self.mode!r}, calls={self.calls})"
        )


def auto_branch(index: int) -> str:
    """The branch of the `index`-th call of a step in CFG as calls with no branch set (0: `"default"`)."""
    return DEFAULT_BRANCH if index == 0 else f"{DEFAULT_BRANCH}.{index}"


def _same_inputs(now: tuple[torch.Tensor, ...], before: tuple[torch.Tensor, ...], versions: tuple[int, ...]) -> bool:
    """`now` are the tensors `before`, not written since (same objects and versions), or equal copies on the host.

    Copies on an accelerator are not compared: that would cost a sync per call.
    """
    if len(now) != len(before):
        return False
    for x, y, version in zip(now, before, versions):
        if x is y:
            if x._version != version:
                return False
        elif not (x.device.type == "cpu" and y.device.type == "cpu" and x.shape == y.shape and torch.equal(x, y)):
            return False
    return True


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
    """Outermost hook of a hooked model: records each call in its `RunState`.

    On a diffusers model (one with a `cache_context` method) it also makes that method of the
    instance enter `hookwise.branch`, so the branches its pipelines name reach the run state.
    """

    layer = Layer.STATE

    def __init__(self, timestep_arg: str | None = None) -> None:
        self.state = RunState()
        self.timestep_arg = timestep_arg
        self._t_index: int | None = None
        self._x_name: str | None = None
        self._x_index: int | None = None
        self._told_list = False
        self.module: nn.Module | None = None

    def on_attach(self, module: nn.Module) -> None:
        name, index = find_timestep_parameter(module, self.timestep_arg)
        self.timestep_arg, self._t_index = name, index
        self._x_name, self._x_index = find_latent_parameter(module, name)
        self.module = module
        # A stateful hook anywhere in the model starts fresh with each sampling run. A bound method,
        # not a closure, so a deep copy of the model resets the copy's hooks.
        self.state.on_new_run(self._reset_model)
        if _has_cache_context(module):
            override_method(module, CACHE_CONTEXT, _cache_context_with_branch, owner=RUN_STATE_HOOK)

    def on_detach(self, module: nn.Module) -> None:
        restore_method(module, CACHE_CONTEXT, owner=RUN_STATE_HOOK, missing_ok=True)

    def _reset_model(self) -> None:
        if self.module is not None:
            reset_stateful_hooks(self.module)

    # Bookkeeping in Python, kept out of compiled graphs: traced, it would break the graph on reading a
    # host timestep and make dynamo specialize on the step counters (a recompile per step).
    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        t = _argument(args, kwargs, self.timestep_arg, self._t_index)
        main = _argument(args, kwargs, self._x_name, self._x_index)
        if self._x_name is None and main is None:
            main = _first_tensor(args, kwargs, t)
        if isinstance(main, torch.Tensor):
            latents, inputs = main, (main,)
        elif isinstance(main, (list, tuple)) and main and all(isinstance(x, torch.Tensor) for x in main):
            latents, inputs = None, tuple(main)
            if not self._told_list:
                self._told_list = True
                logger.info(
                    "hookwise: %s takes its latents as a list of %d tensors, so the run state records no "
                    "latents and FasterCache cannot detect batched CFG on it; run CFG as two calls (or "
                    "name the branches with hookwise.branch) to reuse the unconditional branch",
                    type(module).__name__, len(main),
                )
        else:
            latents, inputs = None, ()
        self.state.record_call(t, module.training, latents, inputs)
        return args, kwargs


def _argument(args: tuple, kwargs: dict, name: str | None, index: int | None) -> Any:
    """The value of parameter `name` (at positional `index`) in one call, or None if not given."""
    if name is None:
        return None
    if name in kwargs:
        return kwargs[name]
    if index is not None and index < len(args):
        return args[index]
    return None


_LATENT_NAMES = ("hidden_states", "x", "img", "latents", "sample")


def _first_tensor(args: tuple, kwargs: dict, timestep: Any) -> torch.Tensor | None:
    """The latents of a call to a forward without named parameters: its first tensor that is not the timestep."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value is not timestep:
            return value
    return None


def find_latent_parameter(module: nn.Module, timestep: str | None = None) -> tuple[str | None, int | None]:
    """(name, positional index) of the main input of `module.forward`: the noisy latents.

    A usual name (`hidden_states`, `x`, `img`, `latents`, `sample`) if the forward has one, else its
    first parameter that is not the timestep; (None, None) when the forward names no parameter.
    """
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    names = [p.name for p in named]
    chosen = next((n for n in _LATENT_NAMES if n in names), None)
    if chosen is None:
        chosen = next((n for n in names if n != timestep), None)
    if chosen is None:
        return None, None
    positional = [
        p.name for p in named if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return chosen, positional.index(chosen) if chosen in positional else None


def _has_cache_context(module: nn.Module) -> bool:
    # diffusers' CacheMixin defines it on the class; an instance attribute is someone else's override.
    return callable(getattr(type(module), CACHE_CONTEXT, None)) and CACHE_CONTEXT not in module.__dict__


@contextmanager
def _cache_context_with_branch(module: nn.Module, name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
    """diffusers' `cache_context(name, ...)` of the module's class, inside `hookwise.branch(module, name)`."""
    with getattr(type(module), CACHE_CONTEXT)(module, name, *args, **kwargs):
        if isinstance(name, str) and name:
            with branch(module, name):
                yield
        else:
            yield


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
    previous = state._explicit  # not `state.branch`: outside any context the branch stays automatic
    state.branch = name
    try:
        yield state
    finally:
        state.branch = previous


def new_run(model: nn.Module) -> None:
    """Tell the hooked model that a new sampling run starts (stateful hooks reset, steps restart).

    Not needed when the timestep reaches the model as a Python number or a CPU tensor: a rising
    timestep, or a branch repeating its run's first timestep, is detected as a new run
    automatically. Needed when a run starts at or below where the previous one ended.
    """
    state = get_run_state(model)
    if state is not None:
        state.new_run()
