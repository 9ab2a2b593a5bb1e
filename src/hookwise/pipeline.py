"""Swapping, adding and removing a pipeline's components while hookwise stacks are applied.

    old = hookwise.set_component(pipe, "transformer", other_checkpoint)   # swap: `old` comes back plain
    hookwise.set_component(pipe, "vae", vae)                               # add, e.g. for validation only
    text_encoder = hookwise.pop_component(pipe, "text_encoder")           # remove: back plain

A pipeline is a diffusers pipeline (its `components`, changed through `register_modules`, so its
config stays in step) or a dict of named modules. Each call is one change, all-or-nothing:

- The module coming in gets the stack its role calls for: the stack the component it replaces had
  (`hookwise.applied(old)`, with its stated map), or, for a name with no component now, the stack
  the pipeline's other components of that kind carry (the kind is the name without a trailing
  `_<n>`: `text_encoder_2` is a `text_encoder`, `transformer_2` a `transformer`); a kind no
  component has gets no stack. `stack=` says otherwise.
- The pipeline's component offloading, if any, re-plans: the new module is managed in its place in
  the pipeline's order, the one that left is not, and a config that named it stops naming it.
- The module going out has its component offloading and its stack removed, newest first, as
  `hookwise.remove` removes them: its original `forward`, its parameters on the devices they were
  on. Casting's storage rounding stays in its weights (`hookwise.remove` warns), as everywhere.

The new module's stack and the re-plan are applied inside one transaction with the change of the
pipeline itself, so an error leaves the pipeline, the new module and the old one as they were. The
old module is released only after that commits; what could stop its release (a technique that
cannot be undone) is checked before anything changes.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping

from torch import nn

from .core.hooks import iter_registries, unwrap
from .core.ledger import ledger_of
from .core.techniques import applied_configs, technique_of
from .core.transaction import current_transaction, transaction
from .errors import CompatibilityError, ConfigError
from .memory.components import replan_components
from .stack import Stack, applied, apply, remove

__all__ = ["pop_component", "set_component"]


def set_component(
    pipe: Any, name: str, module: nn.Module, *, stack: Stack | None = None
) -> nn.Module | None:
    """Put `module` in `pipe` as component `name`, under the stack its role calls for; returns the
    module it replaces with that module's stack removed (None when there was none).

    `stack` (a `Stack`, possibly empty) overrides the stack of the role. Component offloading on
    `pipe` re-plans to manage `module` in place of the old one.
    """
    slots = _slots(pipe)
    _check_name(pipe, name, slots, adding=True)
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"set_component puts a torch.nn.Module in the pipeline, got {type(module).__name__} for {name!r}; "
            f"to take a component out use pop_component(pipe, {name!r})"
        )
    old = slots.get(name)
    if old is not None and not isinstance(old, nn.Module):
        raise ConfigError(
            f"{name!r} holds a {type(old).__name__}, not a model; set_component swaps the pipeline's nn.Module "
            f"components ({_module_names(slots)})"
        )
    if old is module:
        raise ConfigError(f"this module is already the pipeline's {name!r}; pass another module to swap it")
    _check_free(module, name, {n: m for n, m in slots.items() if n != name and isinstance(m, nn.Module)})
    if stack is None:
        stack = _role_stack(slots, name)
    elif not isinstance(stack, Stack):
        raise ConfigError(
            f"stack= takes a hookwise.Stack (Stack(*configs), or Stack() for none), got {type(stack).__name__}"
        )
    if old is not None:
        _check_removable(old, name)
    after = dict(slots)
    after[name] = module
    with transaction():
        if len(stack):
            apply(module, stack)
        finish = replan_components(pipe, name, module, _modules(after))
        _put(pipe, name, module)
    if finish is not None:
        finish()
    if old is not None:
        _strip(old)
    return old


def pop_component(pipe: Any, name: str) -> nn.Module:
    """Take component `name` out of `pipe` and return it with its stack removed.

    Component offloading on `pipe` re-plans without it. A diffusers pipeline keeps the slot, empty
    (None), as its `register_modules` does; a dict loses the key.
    """
    slots = _slots(pipe)
    _check_name(pipe, name, slots, adding=False)
    old = slots[name]
    if not isinstance(old, nn.Module):
        held = "nothing" if old is None else f"a {type(old).__name__}, not a model"
        raise ConfigError(
            f"{name!r} holds {held}; pop_component takes out the pipeline's nn.Module components "
            f"({_module_names(slots)})"
        )
    _check_removable(old, name)
    after = {n: m for n, m in slots.items() if n != name}
    with transaction():
        finish = replan_components(pipe, name, None, _modules(after))
        _put(pipe, name, None)
    if finish is not None:
        finish()
    _strip(old)
    return old


# ---- the pipeline's slots ------------------------------------------------------------------------------
def _slots(pipe: Any) -> dict[str, Any]:
    """name -> what the pipeline holds there (a module, None, a tokenizer, a scheduler ...)."""
    if isinstance(pipe, Mapping):
        return dict(pipe)
    components = getattr(pipe, "components", None)
    if isinstance(components, Mapping) and callable(getattr(pipe, "register_modules", None)):
        return dict(components)
    raise ConfigError(
        f"set_component / pop_component work on a diffusers pipeline or a dict of modules, got "
        f"{type(pipe).__name__}; for a single model, remove its stack (hookwise.remove), change it, and apply again"
    )


def _check_name(pipe: Any, name: str, slots: dict[str, Any], *, adding: bool) -> None:
    """`name` must be a slot of `pipe`; a dict takes new names when `adding`."""
    if not isinstance(name, str):
        raise ConfigError(f"a component name is a string, got {type(name).__name__}")
    if name in slots or (adding and isinstance(pipe, Mapping)):
        return
    where = "" if isinstance(pipe, Mapping) else " (a diffusers pipeline takes the components its __init__ names)"
    raise ConfigError(f"{type(pipe).__name__} has no component {name!r}; its components are {sorted(slots)}{where}")


def _module_names(slots: Mapping[str, Any]) -> list[str]:
    return sorted(n for n, m in slots.items() if isinstance(m, nn.Module))


def _modules(slots: Mapping[str, Any]) -> dict[str, nn.Module]:
    return {n: m for n, m in slots.items() if isinstance(m, nn.Module)}


def _put(pipe: Any, name: str, module: nn.Module | None) -> None:
    """Set (None: clear) slot `name` of `pipe`, undone with the open transaction."""
    txn = current_transaction()
    if isinstance(pipe, Mapping):
        had, before = name in pipe, pipe.get(name)
        if module is None:
            del pipe[name]
        else:
            pipe[name] = module
        txn.on_rollback(lambda: pipe.__setitem__(name, before) if had else pipe.pop(name, None), f"pipeline[{name!r}]")
        return
    before = getattr(pipe, name, None)
    txn.on_rollback(lambda: pipe.register_modules(**{name: before}), f"pipeline.{name}")
    pipe.register_modules(**{name: module})


# ---- the modules coming in and going out ---------------------------------------------------------------
def _kind(name: str) -> str:
    """The kind of component a name is for: the name without a trailing `_<n>`."""
    return re.sub(r"_\d+$", "", name)


def _role_stack(slots: Mapping[str, Any], name: str) -> Stack:
    """The stack component `name` calls for: its current module's, else that of its kind's components."""
    current = slots.get(name)
    if isinstance(current, nn.Module):
        return applied(unwrap(current))
    found: dict[str, Stack] = {}
    for other, module in slots.items():
        if isinstance(module, nn.Module) and other != name and _kind(other) == _kind(name):
            found[other] = applied(unwrap(module))
    distinct = {s.to_json(indent=None): s for s in found.values()}
    if len(distinct) > 1:
        listed = "; ".join(f"{n}: {s.names() or 'none'}" for n, s in found.items())
        raise ConfigError(
            f"the pipeline's {_kind(name)} components carry different stacks ({listed}), so the stack of a new "
            f"{name!r} is not clear; pass stack= (a hookwise.Stack, Stack() for none)"
        )
    return next(iter(distinct.values()), Stack())


def _hookwise_hooks(module: nn.Module) -> list[str]:
    return [
        f"{path or '<root>'}: {n}" for path, registry in iter_registries(module) for n in registry.names()
        if n.startswith("hookwise.")
    ]  # fmt: skip


def _check_free(module: nn.Module, name: str, others: Mapping[str, nn.Module]) -> None:
    """`module` must be no other component (nor inside one, nor holding one) and carry no hookwise hooks."""
    root = unwrap(module)
    for other, held in others.items():
        held = unwrap(held)
        if any(m is root for m in held.modules()) or any(m is held for m in root.modules()):
            raise ConfigError(
                f"the module given for {name!r} is (or shares modules with) the pipeline's {other!r}; a component "
                f"is one module in one place: pass a separate module (a copy)"
            )
    hooks = _hookwise_hooks(root)
    if ledger_of(root) is not None or hooks:
        on = [technique_of(c).name for c in applied_configs(root)]
        what = f"the stack {on}" if on else f"hookwise hooks ({', '.join(hooks[:3])})"
        raise CompatibilityError(
            f"the module given for {name!r} is in use under {what} (applied to it, or to a pipeline or model it "
            f"belongs to); the pipeline applies the stack of the role itself: remove those first (hookwise.remove, "
            f"remove_component_offload, pop_component) or pass a module that has none"
        )


def _check_removable(module: nn.Module, name: str) -> None:
    stuck = [technique_of(c).name for c in applied_configs(unwrap(module)) if not technique_of(c).reversible]
    if stuck:
        raise CompatibilityError(
            f"the pipeline's {name!r} carries {stuck}, which cannot be undone, so it cannot come back without its "
            f"stack; keep it in the pipeline or reload it"
        )


def _strip(module: nn.Module) -> None:
    """Remove the stack of a module that left the pipeline (its component offloading is gone already)."""
    if not applied_configs(unwrap(module)):
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remove(unwrap(module))
    for warning in caught:  # said where the user called set_component / pop_component
        warnings.warn(warning.message, warning.category, stacklevel=3)
    left = _hookwise_hooks(unwrap(module))
    if left:  # hooks outside its stack (a plan's first-step check not yet run): the user should know
        warnings.warn(
            f"hookwise: the module taken out of the pipeline still has hooks that are not part of its stack "
            f"({', '.join(left[:3])}); run one step before changing components, or remove them with "
            f"hookwise.remove_hook",
            stacklevel=3,
        )
