"""The hook engine: `ModelHook`, the per-module `HookRegistry`, and helpers over a whole model.

A registry replaces a module's `forward` with one function bound to the registry. The chain of hooks
behind it is rebuilt as plain closures whenever a hook is added or removed, ordered by each hook's `layer`
(inner to outer) and, within a layer, by the order of addition (later is outer). Removing the last
hook puts back exactly what the module had before: the instance attribute `forward` if there was
one, otherwise nothing, so the class method shows through again.
"""

from __future__ import annotations

import copy
import functools
import inspect
import types
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterator, TypeVar

from torch import nn

from ..errors import ConfigError, HookError
from .transaction import current_transaction

H = TypeVar("H", bound="ModelHook")

REGISTRY_ATTR = "_hookwise_registry"


class Layer(IntEnum):
    """Where a hook sits in its module's chain; lower values run closer to the module's own forward.

    This is the one ordering concept of hookwise. A hook declares its place with its `layer`
    attribute, and a technique registers its layer, which also orders the techniques applied in one
    `hookwise.apply` call (lowest first). So the order never depends on the order a user applied
    them in: casting is innermost, offloading wraps casting, caches wrap everything, and the
    run-state hook of the root model is outermost. A place between two layers gets a named member
    here, with the reason it sits there; never arithmetic on a member at a call site.
    """

    # A module's own forward replaced by an equivalent one (Kernels' fused block forwards): innermost,
    # so every other hook, probes included, wraps the replacement as it wrapped the module's forward.
    REPLACE = 40
    # Observers that count the calls which really reach a module (tests, benchmarks): inside every
    # technique, so a call a cache skips or offloading reroutes is never counted.
    PROBE = 50
    CAST = 100
    QUANT = 200
    OFFLOAD = 300
    # The offloader's hook on the root model: outside the group hooks (a block that is also the root
    # is entered through it), so inputs reach the device and a pass begins before any group loads.
    OFFLOAD_ROOT = 350
    # Component offloading on each component and its direct children: outside every offloading hook
    # of the same module, so the component is on the device before anything inside it runs.
    COMPONENT = 360
    # Activation checkpointing on blocks: outside every offloading hook of the block, so the
    # recompute in backward enters the group hook again and loads the group's weights.
    CHECKPOINT = 370
    # Context parallelism's hook on each attention module: inside the attention backends' hook, so its
    # mode is entered last and meets `scaled_dot_product_attention` first; the local attention it
    # computes after the exchange then reaches the chosen backend.
    PARALLEL_ATTENTION = 390
    KERNEL = 400
    DEFAULT = 500
    PARALLEL = 600
    # CFG parallelism on the root model: outside the other parallel hooks, so a batched-CFG call is cut into
    # its two halves first and context parallelism then splits each half's sequence over its own group.
    CFG_PARALLEL = 610
    # Layer skipping: inside the step caches, so a skipped block looks computed to them.
    CACHE_SKIP = 690
    CACHE = 700
    # A technique that attaches to a step cache (TaylorSeer predicting a block cache's skipped
    # residuals): applied after the block caches, so it finds one applied in the same call.
    CACHE_PREDICTOR = 710
    # Context parallelism's split and gather at each tower's ends: outside the step caches, so a cache
    # sees one rank's tokens (its decision statistic is reduced across ranks through the run state).
    PARALLEL_SPLIT = 800
    STATE = 1000


class ModelHook:
    """Base class of hooks. Override what you need; the defaults are identities and cost nothing.

    - `pre_forward(module, args, kwargs) -> (args, kwargs)` runs before the inner chain.
    - `new_forward(module, next_fn, *args, **kwargs) -> output` replaces the call to the inner chain;
      call `next_fn(*args, **kwargs)` to run it (or don't, to skip it).
    - `post_forward(module, output) -> output` runs after.
    - `on_attach(module)` / `on_detach(module)` run when the hook is added to / removed from a module.
    - `reset()` clears per-run state of a `stateful` hook.
    """

    layer: int = Layer.DEFAULT
    stateful: bool = False

    def on_attach(self, module: nn.Module) -> None:
        """Called once when the hook is added to `module`, before it joins the chain."""

    def on_detach(self, module: nn.Module) -> None:
        """Called once after the hook has left the chain of `module`."""

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return next_fn(*args, **kwargs)

    def reset(self) -> None:
        """Forget per-run state. Only called on hooks with `stateful = True`."""


def _overrides(hook: ModelHook, name: str) -> bool:
    if name in vars(hook):
        return True
    return getattr(type(hook), name) is not getattr(ModelHook, name)


def _link(module: nn.Module, hook: ModelHook, inner: Callable[..., Any]) -> Callable[..., Any]:
    """One inner link of the chain: `hook` around `inner`. Only overridden methods are called."""
    inner = _with_new_forward(module, hook, inner)
    has_pre, has_post = _overrides(hook, "pre_forward"), _overrides(hook, "post_forward")
    pre, post, body = hook.pre_forward, hook.post_forward, inner
    if has_pre and has_post:

        def call(*args, **kwargs):
            args, kwargs = pre(module, args, kwargs)
            return post(module, body(*args, **kwargs))

    elif has_pre:

        def call(*args, **kwargs):
            args, kwargs = pre(module, args, kwargs)
            return body(*args, **kwargs)

    elif has_post:

        def call(*args, **kwargs):
            return post(module, body(*args, **kwargs))

    else:
        call = body
    return call


def _entry_point(owner: HookRegistry, hook: ModelHook, inner: Callable[..., Any]) -> Callable[..., Any]:
    """The outermost link, installed (bound to its registry) as `module.forward`.

    A bound method rather than a callable object or a closure around the chain: it is called from C
    and adds no frame of its own, which halves the per-call cost of a hook. `copy.deepcopy` copies a
    bound method by deep-copying its `__self__`, so a copied model calls this function with the
    copy's registry; the identity check sends such a call to the copy's own chain (EMA copies of a
    hooked model keep working).
    """
    module = owner.module
    inner = _with_new_forward(module, hook, inner)
    has_pre, has_post = _overrides(hook, "pre_forward"), _overrides(hook, "post_forward")
    pre, post, body = hook.pre_forward, hook.post_forward, inner
    if has_pre and has_post:

        def forward(registry, *args, **kwargs):
            if registry is not owner:
                return registry._forward_from_copy(*args, **kwargs)
            args, kwargs = pre(module, args, kwargs)
            return post(module, body(*args, **kwargs))

    elif has_pre:

        def forward(registry, *args, **kwargs):
            if registry is not owner:
                return registry._forward_from_copy(*args, **kwargs)
            args, kwargs = pre(module, args, kwargs)
            return body(*args, **kwargs)

    elif has_post:

        def forward(registry, *args, **kwargs):
            if registry is not owner:
                return registry._forward_from_copy(*args, **kwargs)
            return post(module, body(*args, **kwargs))

    else:

        def forward(registry, *args, **kwargs):
            if registry is not owner:
                return registry._forward_from_copy(*args, **kwargs)
            return body(*args, **kwargs)

    return forward


def _with_new_forward(module: nn.Module, hook: ModelHook, inner: Callable[..., Any]) -> Callable[..., Any]:
    if not _overrides(hook, "new_forward"):
        return inner
    new_forward = hook.new_forward

    def replaced(*args, **kwargs):
        return new_forward(module, inner, *args, **kwargs)

    return replaced


@dataclass
class _Entry:
    name: str
    hook: ModelHook
    layer: int
    seq: int


class HookRegistry:
    """The hooks of one module, kept in chain order (inner to outer)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._entries: list[_Entry] = []
        self._seq = 0
        self._had_forward = "forward" in module.__dict__
        self._orig_forward = module.__dict__.get("forward")
        self._installed: types.MethodType | None = None

    # ---- lookup -------------------------------------------------------------------------------
    @staticmethod
    def of(module: nn.Module) -> HookRegistry | None:
        """The registry attached to `module` (unwrapping `torch.compile`), or None."""
        return unwrap(module).__dict__.get(REGISTRY_ATTR)

    @staticmethod
    def get_or_create(module: nn.Module) -> HookRegistry:
        """The registry of `module`; a new one is attached when its first hook is added."""
        module = unwrap(module)
        return module.__dict__.get(REGISTRY_ATTR) or HookRegistry(module)

    def _base_forward(self) -> Callable[..., Any]:
        if self._had_forward:
            return self._orig_forward
        return types.MethodType(type(self.module).forward, self.module)

    def _attached(self) -> bool:
        return self.module.__dict__.get(REGISTRY_ATTR) is self

    def _is_ours(self, fn: Any) -> bool:
        return isinstance(fn, types.MethodType) and fn.__self__ is self

    # ---- mutation -----------------------------------------------------------------------------
    def add(self, name: str, hook: ModelHook) -> ModelHook:
        """Add `hook` under `name`. Its place in the chain comes from `hook.layer`."""
        if not isinstance(hook, ModelHook):
            raise HookError(f"hook {name!r} is a {type(hook).__name__}, not a hookwise ModelHook subclass")
        if any(e.name == name for e in self._entries):
            raise HookError(
                f"{type(self.module).__name__} already has a hook named {name!r}; "
                f"remove it first or choose another name (hooks here: {self.names()})"
            )
        if not self._attached() and self.module.__dict__.get("forward") is not self._orig_forward:
            # The forward changed since this (detached) registry looked at the module: start afresh.
            self._had_forward = "forward" in self.module.__dict__
            self._orig_forward = self.module.__dict__.get("forward")
        hook.on_attach(self.module)
        entry = _Entry(name, hook, int(hook.layer), self._seq)
        self._seq += 1
        self._entries.append(entry)
        self._entries.sort(key=lambda e: (e.layer, e.seq))
        self._rebuild()
        if not self._attached():
            self.module.__dict__[REGISTRY_ATTR] = self
            self.module.__dict__["forward"] = self._installed
        txn = current_transaction()
        if txn is not None:
            txn.on_rollback(functools.partial(self.remove, name, missing_ok=True), f"hook {name!r}")
        return hook

    def remove(self, name: str, *, missing_ok: bool = False, keep_wrapper: bool = False) -> ModelHook | None:
        """Remove the hook called `name`; the module is restored exactly when it was the last one.

        When something else replaced the module's forward after hookwise wrapped it, removing the last
        hook raises, unless `keep_wrapper`: then that forward stays on the instance (an adapter that
        calls hookwise's forward as its original, e.g. a kohya-style LoRA, keeps working through the
        hooks' closures, which the caller must make pass-through).
        """
        index = next((i for i, e in enumerate(self._entries) if e.name == name), None)
        if index is None:
            if missing_ok:
                return None
            raise HookError(f"{type(self.module).__name__} has no hook named {name!r} (hooks here: {self.names()})")
        if len(self._entries) == 1 and not keep_wrapper:
            self._check_not_rewrapped()
        current = self.module.__dict__.get("forward")
        entry = self._entries.pop(index)
        if self._entries:
            self._rebuild()
            if keep_wrapper and not self._is_ours(current):
                self.module.__dict__["forward"] = current  # the rebuild installed ours over it
        else:
            self._detach(keep_foreign=keep_wrapper)
        entry.hook.on_detach(self.module)
        return entry.hook

    def clear(self) -> None:
        """Remove every hook, outermost first."""
        for name in self.names():
            self.remove(name)

    def _check_not_rewrapped(self) -> None:
        current = self.module.__dict__.get("forward")
        if not self._is_ours(current):
            raise HookError(
                f"the forward of {type(self.module).__name__} was replaced by something else "
                f"({current!r}) after hookwise wrapped it; remove that wrapper first, then hookwise's hooks"
            )

    def _detach(self, keep_foreign: bool = False) -> None:
        d = self.module.__dict__
        if keep_foreign and not self._is_ours(d.get("forward")):
            pass  # a forward installed over ours stays
        elif self._had_forward:
            d["forward"] = self._orig_forward
        else:
            d.pop("forward", None)
        d.pop(REGISTRY_ATTR, None)
        self._installed = None

    def _rebuild(self) -> None:
        base = self._base_forward()
        fn = base
        for entry in self._entries[:-1]:
            fn = _link(self.module, entry.hook, fn)
        forward = _entry_point(self, self._entries[-1].hook, fn)
        # Keep the original forward's name, docstring and signature for inspect and torch.export.
        functools.update_wrapper(forward, base, updated=())
        forward.__signature__ = _bound_signature(base)
        self._installed = types.MethodType(forward, self)
        if self._attached():
            self.module.__dict__["forward"] = self._installed

    def _forward_from_copy(self, *args: Any, **kwargs: Any) -> Any:
        # First call of a deep-copied model: install this registry's own entry point for next time.
        if self._attached() and self.module.__dict__.get("forward") is not self._installed:
            self.module.__dict__["forward"] = self._installed
        return self._installed(*args, **kwargs)

    # ---- queries ------------------------------------------------------------------------------
    def get(self, name: str) -> ModelHook | None:
        return next((e.hook for e in self._entries if e.name == name), None)

    def names(self, order: str = "outer") -> list[str]:
        """Hook names, outermost first (`order="outer"`, the order they run in) or innermost first."""
        names = [e.name for e in self._entries]
        return names if order == "inner" else names[::-1]

    def hooks(self) -> list[ModelHook]:
        """Hooks, outermost first."""
        return [e.hook for e in reversed(self._entries)]

    def __contains__(self, name: str) -> bool:
        return any(e.name == name for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def reset_stateful(self, recurse: bool = False) -> None:
        """Call `reset()` on every stateful hook of this module (and of its submodules with `recurse`)."""
        if recurse:
            reset_stateful_hooks(self.module)
            return
        for entry in reversed(self._entries):
            if entry.hook.stateful:
                entry.hook.reset()

    # ---- copying ------------------------------------------------------------------------------
    def __deepcopy__(self, memo: dict) -> HookRegistry:
        new = HookRegistry.__new__(HookRegistry)
        memo[id(self)] = new
        new.module = copy.deepcopy(self.module, memo)
        new._entries = [_Entry(e.name, copy.deepcopy(e.hook, memo), e.layer, e.seq) for e in self._entries]
        new._seq = self._seq
        new._had_forward = self._had_forward
        new._orig_forward = copy.deepcopy(self._orig_forward, memo)
        new._installed = None
        if new._entries:
            new._rebuild()
        return new

    # ---- pickling (torch.save(model)) -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # The installed chain is closures: it is rebuilt from the entries when loaded.
        state = dict(self.__dict__)
        state["_installed"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward as a loaded (unpickled) model first finds it: build the chain, then run it.

        A pickled bound entry point is restored as `getattr(registry, "forward")`, i.e. this method.
        """
        if self._installed is None and self._entries:
            self._rebuild()
        return self._forward_from_copy(*args, **kwargs)

    def __repr__(self) -> str:
        return f"HookRegistry({type(self.module).__name__}: {self.names()})"


def _bound_signature(base: Callable[..., Any]) -> inspect.Signature:
    """The signature of `base` with a leading registry parameter, which binding removes again."""
    first = inspect.Parameter("_hookwise_registry", inspect.Parameter.POSITIONAL_ONLY)
    try:
        signature = inspect.signature(base)
    except (TypeError, ValueError):  # builtins without a signature
        return inspect.Signature(
            [
                first,
                inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
                inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
            ]
        )
    return signature.replace(parameters=[first, *signature.parameters.values()])


# ---- helpers over a whole model ---------------------------------------------------------------
def unwrap(module: nn.Module) -> nn.Module:
    """The module under `torch.compile`'s wrapper (hooks live on the original module)."""
    while hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
        module = module._orig_mod
    return module


def add_hook(module: nn.Module, hook: ModelHook, name: str) -> ModelHook:
    """Add `hook` to `module` under `name`, at the place its `layer` gives it."""
    return HookRegistry.get_or_create(module).add(name, hook)


def get_hook(module: nn.Module, name: str) -> ModelHook | None:
    registry = HookRegistry.of(module)
    return registry.get(name) if registry else None


def remove_hook(module: nn.Module, name: str, *, missing_ok: bool = False) -> ModelHook | None:
    registry = HookRegistry.of(module)
    if registry is None:
        if missing_ok:
            return None
        raise HookError(f"{type(unwrap(module)).__name__} has no hooks, so none named {name!r}")
    return registry.remove(name, missing_ok=missing_ok)


def iter_registries(model: nn.Module) -> Iterator[tuple[str, HookRegistry]]:
    """(module path, registry) for every hooked module of `model`, in `named_modules` order."""
    for path, module in unwrap(model).named_modules(remove_duplicate=False):
        registry = module.__dict__.get(REGISTRY_ATTR)
        if registry is not None:
            yield path, registry


def hooks_named(model: nn.Module, name: str, cls: type[H]) -> dict[str, H]:
    """{module path: hook} of every hook registered as `name` that is a `cls`, in `named_modules` order."""
    found = {}
    for path, registry in iter_registries(model):
        hook = registry.get(name)
        if isinstance(hook, cls):
            found[path] = hook
    return found


def hook_on(model: nn.Module, name: str, cls: type[H], *, technique: str, caller: str) -> H:
    """The hook registered as `name` on `model` itself (a root-only hook, not a submodule's) when it is a `cls`.

    Raises `ConfigError` saying that `caller` (e.g. "cfg_parallel_report") needs `technique` (e.g.
    "CFGParallel") applied to this model.
    """
    hook = get_hook(unwrap(model), name)
    if not isinstance(hook, cls):
        raise ConfigError(
            f"{caller}: {technique} is not applied to this model; apply it with hookwise.apply first, and pass the "
            "model it was applied to (not one of its submodules)"
        )
    return hook


def list_hooks(model: nn.Module) -> dict[str, list[str]]:
    """Every hook of `model` by module path ("" is the model itself), outermost first."""
    return {path: registry.names() for path, registry in iter_registries(model)}


def reset_stateful_hooks(model: nn.Module) -> None:
    """Call `reset()` on every stateful hook anywhere in `model`."""
    for _, registry in iter_registries(model):
        registry.reset_stateful(recurse=False)


def remove_hooks(
    model: nn.Module, predicate: Callable[[str, ModelHook], bool] | None = None, *, keep_wrapper: bool = False
) -> int:
    """Remove the hooks of `model` for which `predicate(name, hook)` is true (all if None); returns a count.

    `keep_wrapper` as in `HookRegistry.remove`: a forward installed over hookwise's stays.
    """
    count = 0
    for _, registry in list(iter_registries(model)):
        for name in reversed(registry.names(order="inner")):
            hook = registry.get(name)
            if predicate is None or predicate(name, hook):
                registry.remove(name, keep_wrapper=keep_wrapper)
                count += 1
    return count
