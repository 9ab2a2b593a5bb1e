"""Attention backends: each attention module's `scaled_dot_product_attention` calls routed to a chosen kernel.

Where the routing happens: a hook on each attention module of the model map (the innermost module in
which attention is computed; for a block that computes attention inline, with no attention module of
its own, the block) enters a `TorchFunctionMode` for the duration of that module's forward, as
casting does for its leaves. The mode catches `F.scaled_dot_product_attention` (diffusers' native
dispatch ends there too) and runs the call on the backend chosen for the module, so nothing outside
the hooked modules changes: another model in the process, or this model's other modules, compute as
before, and removing the technique gives back each forward exactly.

How a backend is chosen, once per call shape (shapes, dtype, device, mask, causal, training):

1. The module's backends are tried in order (`backend="flex"` is `["flex", "sdpa"]`: the module's own
   call is always the last resort). A backend whose declared constraints refuse the real call's
   arguments (`_attn_backends.Backend.refuse`: dtype, head dim, mask, GQA, causal, sequence length,
   device, package) is passed over, with one warning per backend and reason; in training mode (grad
   enabled and an input requiring grad) a backend without a backward on the device is never chosen.
2. At its first use on a shape, the backend's output is compared with the float32 math SDPA
   computed on a slice of the same inputs (batch 0, two query heads, the first 32 query rows, all
   keys). An error beyond the backend's stated tolerance disables it for this application, with a
   warning, and the next backend computes the call.
3. `"auto"` takes every installed backend that accepts the call, checks each, times a few calls of
   each (no grad) and keeps the fastest that passed, for that shape.

Inside a compiled graph (regional `Compile`, a compiled model) the eager machinery (timing, the
numerics check, warnings) cannot run, and nothing may break the block's graph. A chain of PyTorch SDPA
kernels becomes `sdpa_kernel(kernels, set_priority=True)` around the module's forward, traced into
the block's graph (PyTorch takes the first kernel that accepts the call, the module's own call last;
kernels an eager check disabled are left out), and "auto" runs the module's own call, which the
compiler lowers. A chain naming another library's kernel (flex, flash-attn, Sage, xFormers) is traced
too (`_TracedRoute`): each call takes the first installed backend of the chain whose declared
constraints accept the traced arguments, else the module's own call; FlexAttention becomes the
graph's flex HOP, which the block's compile lowers. The call counts of the summary count eager calls only.

`attention_summary(model)` gives each module's backends, the choice per shape and the reasons for
every backend passed over, the errors measured and the times.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..core.config import TechniqueConfig, check_int
from ..core.cost import SpeedFigure, speed_cost
from ..core.hooks import Layer, ModelHook, add_hook, hooks_named, iter_registries, remove_hook, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError, NoTargetError
from ..introspect.sites import attention_sites
from ._attn_backends import AttnCall, Backend, backend_named, backend_names, probe_slice, reference, relative_error

logger = logging.getLogger("hookwise.kernels.attention")

NAME = "attention"
HOOK_NAME = "hookwise.attention"
FALLBACK = "sdpa"  # the module's own call: every chain ends with it
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


def _spec(value: Any, where: str) -> str | tuple[str, ...]:
    """One module's backend setting, checked: 'auto', a backend name, or a list of names."""
    if isinstance(value, str):
        if value != "auto":
            backend_named(value)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        if "auto" in value:
            raise ConfigError(f"{where}={list(value)!r}: 'auto' stands alone, not in a list of backends")
        for name in value:
            backend_named(name)
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}={list(value)!r} names a backend twice")
        return tuple(value)
    raise ConfigError(
        f"{where}={value!r}: use 'auto', a backend name or a list of them, tried in order (known: {', '.join(backend_names())})"
    )


@dataclass(frozen=True)
class Attention(TechniqueConfig):
    """Route each attention module's `scaled_dot_product_attention` to a chosen backend.

    - `backend`: `"auto"` (the fastest installed backend that passes the numerics check, measured
      once per shape), a backend name (`"sdpa-flash"`, `"flex"`, `"flash-attn-2"`, ...: see
      `hookwise.kernels.attention_backends()`), a list of names tried in order, or a dict from tower
      names or regular expressions (searched in module paths) to one of those, for different
      backends per tower (`{"single_transformer_blocks": "flex", "transformer_blocks": "auto"}`);
      modules no key matches are left alone, and each key must match a module. A module's own call
      (`"sdpa"`) always follows the named backends as the last resort.
    - `check`: compare each backend's output with the math reference at its first use per shape.
    - `repeats`: timed calls per backend when `"auto"` measures a shape.
    """

    backend: Any = "auto"
    check: bool = True
    repeats: int = 3

    def __post_init__(self) -> None:
        value = self.backend
        if isinstance(value, Mapping):
            if not value:
                raise ConfigError("Attention(backend={}): give at least one tower or pattern, or a single backend")
            normal: dict[str, Any] = {}
            for key, spec in value.items():
                if not isinstance(key, str) or not key:
                    raise ConfigError(f"Attention(backend=...): key {key!r} must be a tower name or a module path pattern")
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"Attention(backend=...): key {key!r} is not a valid regular expression: {exc}") from exc
                normal[key] = _spec(spec, f"Attention(backend[{key!r}])")
            object.__setattr__(self, "backend", normal)
        else:
            object.__setattr__(self, "backend", _spec(value, "Attention(backend)"))
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.check, bool):
            raise ConfigError(f"Attention(check={self.check!r}): use True or False")
        check_int("Attention.repeats", self.repeats, 1)

    def __hash__(self) -> int:  # the dict form is not hashable as is
        return hash((type(self), repr(self.to_dict())))


def _chains(config: Attention, sites: dict[str, str | None]) -> dict[str, tuple[str, ...]]:
    """{site path: its backends in order ('auto' alone, or names ending with the fallback)}."""
    def chain(spec: str | tuple[str, ...]) -> tuple[str, ...]:
        if spec == "auto":
            return ("auto",)
        names = (spec,) if isinstance(spec, str) else tuple(spec)
        return names if names[-1] == FALLBACK else (*names, FALLBACK)

    if not isinstance(config.backend, dict):
        return {path: chain(config.backend) for path in sites}
    towers = {t for t in sites.values() if t}
    out: dict[str, tuple[str, ...]] = {}
    matched: dict[str, int] = {key: 0 for key in config.backend}
    for path, tower in sites.items():
        for key, spec in config.backend.items():
            # a tower name matches that tower's modules only ("transformer_blocks" is not a pattern
            # for "single_transformer_blocks.0.attn"); any other key is searched in the path
            if key == tower or (key not in towers and re.search(key, path)):
                out[path] = chain(spec)
                matched[key] += 1
                break
    unmatched = [k for k, n in matched.items() if n == 0]
    if unmatched:
        raise NoTargetError(
            f"Attention(backend=...): {unmatched} match no attention module; use a tower name ({sorted(towers)}) or a "
            f"regular expression found in one of the attention module paths (e.g. {list(sites)[:3]})"
        )
    return out


# ---- the decision per call shape ------------------------------------------------------------------------
@dataclass
class Decision:
    """What was chosen for one call shape on one chain of backends, and why."""

    shape: str
    chain: tuple[str, ...]
    chosen: str = FALLBACK
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was passed over
    errors: dict[str, float] = field(default_factory=dict)  # backend -> relative error vs the math reference
    times_ms: dict[str, float] = field(default_factory=dict)  # "auto": backend -> best time of a call
    probe: str = ""  # the slice the numerics were checked on
    modules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape, "chain": list(self.chain), "chosen": self.chosen, "skipped": dict(self.skipped),
            "errors": dict(self.errors), "times_ms": dict(self.times_ms), "probe": self.probe,
            "modules": list(self.modules),
        }  # fmt: skip


class _Refused(Exception):
    """A backend could not serve a call (its constraints, an error it raised, or wrong numerics)."""


@dataclass
class AttentionRecord:
    """One application of the technique: shared by its hooks; holds the decisions and what was disabled."""

    config: Attention
    decisions: dict[tuple, Decision] = field(default_factory=dict)
    disabled: dict[str, str] = field(default_factory=dict)  # backend -> why (numerics)
    warned: set[tuple[str, str]] = field(default_factory=set)

    def attend(self, hook: AttentionHook, call: AttnCall) -> torch.Tensor:
        key = (hook.chain, call.key_of())
        decision = self.decisions.get(key)
        if decision is not None and decision.chosen not in self.disabled:
            if hook.path not in decision.modules:
                decision.modules.append(hook.path)
            return backend_named(decision.chosen).call(call)
        decision = Decision(call.describe(), hook.chain, modules=[hook.path])
        out = self._decide(decision, call)
        self.decisions[key] = decision
        return out

    # -- helpers ----------------------------------------------------------------------------------
    def _warn(self, backend: str, reason: str, shape: str, then: str) -> None:
        """One warning per backend and reason in this application (the summary lists every shape)."""
        if (backend, reason) in self.warned:
            return
        self.warned.add((backend, reason))
        warnings.warn(
            f"hookwise attention: backend {backend!r} cannot serve {shape} ({reason}); using {then!r} instead",
            stacklevel=2,
        )

    def _why_not(self, backend: Backend, call: AttnCall) -> str | None:
        if backend.name in self.disabled:
            return self.disabled[backend.name]
        return backend.refuse(call)

    def _checked(self, backend: Backend, call: AttnCall, decision: Decision) -> torch.Tensor:
        """The backend's output on `call`, checked against the math reference at this first use."""
        try:
            out = backend.call(call)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError, ValueError, TypeError, ImportError) as exc:
            raise _Refused(f"failed on this call ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc
        if not self.config.check or call.symbolic or backend.name == "sdpa-math" or call.dropout_p > 0:
            return out
        index, decision.probe = probe_slice(call)
        error = relative_error(out[index], reference(call, index))
        decision.errors[backend.name] = error
        tolerance = backend.tolerance_for(call.dtype)
        if not error <= tolerance:
            reason = (f"disagrees with the math reference by {error:.3g} (relative to the largest output, on "
                      f"{decision.probe}), over its tolerance {tolerance:g}")  # fmt: skip
            self.disabled[backend.name] = f"disabled: {reason}"
            raise _Refused(reason)
        return out

    def _decide(self, decision: Decision, call: AttnCall) -> torch.Tensor:
        if decision.chain == ("auto",):
            return self._auto(decision, call)
        names = decision.chain
        for i, name in enumerate(names):
            backend = backend_named(name)
            last = i == len(names) - 1
            reason = None if last else self._why_not(backend, call)
            if reason is None:
                try:
                    out = backend.call(call) if last else self._checked(backend, call, decision)
                except _Refused as refused:
                    reason = str(refused)
                else:
                    decision.chosen = name
                    logger.info("hookwise attention: %s on %s for %s", name, decision.shape, decision.modules[0])
                    return out
            decision.skipped[name] = reason
            self._warn(name, reason, decision.shape, names[i + 1])
        raise AssertionError("unreachable: the chain ends with the module's own call")

    def _auto(self, decision: Decision, call: AttnCall) -> torch.Tensor:
        """Check every installed backend that accepts the call, time them, keep the fastest that passed."""
        best: tuple[float, str, torch.Tensor | None] | None = None
        for name in backend_names():
            backend = backend_named(name)
            reason = self._why_not(backend, call)
            if reason is not None:
                decision.skipped[name] = reason
                continue
            try:
                with torch.no_grad():
                    probe = replace(call, query=call.query.detach(), key=call.key.detach(), value=call.value.detach())
                    out = self._checked(backend, probe, decision)
                    elapsed = self._time(backend, probe) if not call.symbolic else 0.0
            except _Refused as refused:
                decision.skipped[name] = str(refused)
                if name in self.disabled:
                    self._warn(name, str(refused), decision.shape, "the fastest other backend")
                continue
            decision.times_ms[name] = elapsed * 1e3
            if best is None or elapsed < best[0]:
                best = (elapsed, name, out)
            if call.symbolic:
                break  # nothing to measure on meta / fake tensors: the first that accepts the call
        if best is None:
            decision.chosen = FALLBACK
            return backend_named(FALLBACK).call(call)
        decision.chosen = best[1]
        logger.info("hookwise attention auto: %s on %s (%s)", best[1], decision.shape, decision.times_ms)
        if call.needs_grad or best[2] is None:
            return backend_named(best[1]).call(call)  # again, with the autograd graph
        return best[2]

    def _time(self, backend: Backend, call: AttnCall) -> float:
        cuda = call.device.type == "cuda"
        times = []
        for _ in range(self.config.repeats):
            if cuda:
                torch.cuda.synchronize(call.device)
            start = time.perf_counter()
            backend.call(call)
            if cuda:
                torch.cuda.synchronize(call.device)
            times.append(time.perf_counter() - start)
        return min(times)


# ---- the hook ----------------------------------------------------------------------------------------
class _Route(TorchFunctionMode):
    """While a hooked module's forward runs: its `scaled_dot_product_attention` calls go to its backend."""

    def __init__(self, hook: AttentionHook) -> None:
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            self.hook.routed += 1
            return self.hook.record.attend(self.hook, AttnCall.from_args(args, kwargs))
        return func(*args, **kwargs)


class _TracedRoute(TorchFunctionMode):
    """Inside a graph being compiled, for a chain naming another library's kernel: each attention call
    goes to the first backend of the chain whose declared constraints accept it (checked on the traced
    arguments: shapes, dtype, mask, training), else to the module's own call. Nothing is timed, checked
    or warned about inside a graph; backends an eager check disabled are left out.

    `Tensor.unflatten` / `Tensor.split` are Python methods that end in `super()` calls, which dynamo
    cannot trace under a mode: they are computed here by the view / split they stand for.
    """

    def __init__(self, backends: tuple[Backend, ...]) -> None:
        super().__init__()
        self.backends = backends

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SDPA:
            call = AttnCall.from_args(args, kwargs)
            for backend in self.backends:
                if backend.refuse_call(call) is None:
                    return backend.call(call)
            return func(*args, **kwargs)
        if func is torch.Tensor.unflatten:
            return _unflatten(*args, **kwargs)
        if func is torch.Tensor.split:
            return _split(*args, **kwargs)
        return func(*args, **kwargs)


def _unflatten(x: torch.Tensor, dim: int, sizes: Any) -> torch.Tensor:
    dim = dim % x.dim()
    return x.reshape(*x.shape[:dim], *sizes, *x.shape[dim + 1 :])


def _split(x: torch.Tensor, split_size: Any, dim: int = 0) -> tuple[torch.Tensor, ...]:
    if isinstance(split_size, int):
        length = x.shape[dim]
        split_size = [min(split_size, length - start) for start in range(0, length, split_size)] or [0]
    return x.split_with_sizes(list(split_size), dim)


_SDPA_KERNELS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}  # fmt: skip


def _traced_kernels(chain: tuple[str, ...], disabled: Mapping[str, str]) -> list[SDPBackend] | None:
    """The PyTorch SDPA kernels, in priority order, that a compiled graph uses for `chain`; None when
    the chain names a backend that is not one (those run eagerly, between graphs).

    Inside a graph nothing can be timed, checked against the reference or warned about, so a chain of
    SDPA kernels becomes `sdpa_kernel(..., set_priority=True)` around the module's forward: PyTorch
    takes the first kernel that accepts the call, as the eager chain would, with the module's own call
    (every other kernel) last; backends disabled by an eager numerics check are left out. "auto" runs
    the module's own call, which the compiler lowers itself (it measured nothing to choose by).
    """
    if chain == ("auto",):
        return []
    if any(name != FALLBACK and name not in _SDPA_KERNELS for name in chain):
        return None
    kernels = [_SDPA_KERNELS[n] for n in chain if n in _SDPA_KERNELS and n not in disabled]
    if FALLBACK in chain:
        kernels += [k for k in _SDPA_KERNELS.values() if k not in kernels]
    return kernels


class AttentionHook(ModelHook):
    """On one attention module: routes its attention calls to its chain of backends."""

    layer = Layer.KERNEL

    def __init__(self, record: AttentionRecord, path: str, chain: tuple[str, ...]) -> None:
        self.record = record
        self.path = path
        self.chain = chain
        self.calls = 0  # forwards of the module
        self.routed = 0  # attention calls routed
        # The chain's installed backends, known before any trace (the package check imports).
        self.installed = tuple(n for n in chain if n not in ("auto", FALLBACK) and backend_named(n).unavailable() is None)

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced with the block: no graph break at the attention module
            kernels = _traced_kernels(self.chain, self.record.disabled)
            if kernels is None:  # another library's kernel (flex, flash-attn, Sage, xFormers)
                backends = tuple(backend_named(n) for n in self.installed if n not in self.record.disabled)
                with _TracedRoute(backends):
                    return next_fn(*args, **kwargs)
            if not kernels:
                return next_fn(*args, **kwargs)
            with sdpa_kernel(kernels, set_priority=True):
                return next_fn(*args, **kwargs)
        return self._eager(next_fn, *args, **kwargs)

    # Eager inside compiled code for chains of other libraries' kernels: dynamo cannot trace the
    # mode through the tensor methods that diffusers' processors call (`Tensor.unflatten`'s `super()`).
    @torch.compiler.disable
    def _eager(self, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        with _Route(self):
            return next_fn(*args, **kwargs)


# ---- apply / remove / summary -------------------------------------------------------------------------
def _apply_attention(model: nn.Module, config: Attention) -> None:
    model = unwrap(model)
    sites = attention_sites(model)
    if not sites:
        raise NoTargetError(
            f"Attention found no attention module in this {type(model).__name__}: the model map has none and no "
            f"tower block computes attention inline; state them with hookwise.apply(model, Attention(), "
            f"attention=[module paths]) (see hookwise.describe(model))"
        )
    chains = _chains(config, sites)
    for chain in set(chains.values()):
        named = [n for n in chain if n not in ("auto", FALLBACK)]
        if named and all(backend_named(n).unavailable() for n in named):
            backend_named(named[0]).require()  # none of the backends asked for is installed: say how to get one
    record = AttentionRecord(config)
    modules = dict(model.named_modules())
    seen: set[int] = set()
    for path, chain in chains.items():
        module = modules[path]
        if id(module) in seen:  # one module reached by two paths: one hook
            continue
        seen.add(id(module))
        add_hook(module, AttentionHook(record, path, chain), HOOK_NAME)


def _remove_attention(model: nn.Module, config: Attention | None = None) -> int:
    count = 0
    for _, registry in list(iter_registries(unwrap(model))):
        if isinstance(registry.get(HOOK_NAME), AttentionHook):
            remove_hook(registry.module, HOOK_NAME)
            count += 1
    return count


def _hooks(model: nn.Module) -> dict[str, AttentionHook]:
    return hooks_named(model, HOOK_NAME, AttentionHook)


def apply_attention(model: nn.Module, config: Attention | None = None, **kwargs: Any) -> dict[str, Any]:
    """Route attention to backends (`hookwise.apply(model, Attention(...))`); returns the summary."""
    apply_techniques(model, [config or Attention(**kwargs)])
    return attention_summary(model)


def remove_attention(model: nn.Module) -> list[str]:
    """Remove the attention backends (the same as `hookwise.remove(model, "attention")`)."""
    return remove_techniques(model, [NAME])


def attention_summary(model: nn.Module) -> dict[str, Any]:
    """What the attention technique does on `model`.

    - `modules`: {path: {"backends": its chain, "calls": forwards, "routed": attention calls routed,
      "chosen": {shape: backend}}}; a module with calls and nothing routed computes attention some
      other way (diffusers' own non-native backend, a kernel called directly).
    - `decisions`: one entry per call shape and chain: the backend chosen, the reason for each one
      passed over, the relative errors against the math reference and the slice they were measured
      on, and for "auto" the best time of each backend.
    - `disabled`: {backend: why} for backends the numerics check disabled.
    """
    hooks = _hooks(model)
    records: list[AttentionRecord] = []
    modules: dict[str, Any] = {}
    for path, hook in hooks.items():
        if hook.record not in records:
            records.append(hook.record)
        modules[path] = {"backends": list(hook.chain), "calls": hook.calls, "routed": hook.routed, "chosen": {}}
    decisions = [d for r in records for d in r.decisions.values()]
    for decision in decisions:
        for path in decision.modules:
            if path in modules:
                modules[path]["chosen"][decision.shape] = decision.chosen
    disabled = {name: why for r in records for name, why in r.disabled.items()}
    return {"modules": modules, "decisions": [d.to_dict() for d in decisions], "disabled": disabled}


# ---- cost declaration (for the planner) -------------------------------------------------------------
# Step time under Attention("auto") relative to without, keyed by the device kind it was measured on
# (`core.cost.device_kind`: "<device>:<name>" as the planner's Hardware reports it, e.g. "cpu:amd epyc (2 cores)",
# "cuda:nvidia h100 80gb hbm3"), each with its source, e.g.
#   "cpu:amd epyc (2 cores)": SpeedFigure(forward=0.8, backward=0.9, source="benchmarks/kernels.py full width, BENCHMARKS.md 2026-12-01, load 1.2")
# The planner offers Attention("auto") only on that device kind, where the figure for the job's mode is below 1 (or
# where the user states one: measurements={"speed": {"attention": ...}}). Empty: nothing measured yet.
MEASURED_SPEED: dict[str, SpeedFigure] = {}


register_technique(
    NAME,
    Attention,
    apply=_apply_attention,
    remove=_remove_attention,
    layer=Layer.KERNEL,
    description="attention backends per attention module (SDPA kernels, FlexAttention, flash-attn, Sage, xFormers)",
    cost=speed_cost(NAME, lambda: Attention(), MEASURED_SPEED),
)
