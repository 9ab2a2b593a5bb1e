"""Reversible overrides of a method on one module instance (never on its class).

A technique that must intercept something other than `forward` (offloading makes `model.to()` a
warning instead of a full copy) installs a bound method in the instance's `__dict__`. The previous
instance attribute, if any, is remembered and put back exactly on `restore_method`; inside a
transaction the override is undone on rollback.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

from torch import nn

from ..errors import HookError
from .transaction import current_transaction

OVERRIDES_ATTR = "_hookwise_overrides"


class _Missing:
    """Marks "the instance had no such attribute". One object, also after a deep copy or pickling of
    a model (a plain `object()` would be copied, and restoring an override on the copy would then
    put the copied marker back as the attribute)."""

    _instance: "_Missing | None" = None

    def __new__(cls) -> "_Missing":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __deepcopy__(self, memo: dict) -> "_Missing":
        return self

    def __copy__(self) -> "_Missing":
        return self

    def __reduce__(self) -> tuple:
        return (_Missing, ())

    def __repr__(self) -> str:
        return "<no instance attribute>"


_MISSING = _Missing()


def override_method(module: nn.Module, name: str, fn: Callable[..., Any], *, owner: str) -> None:
    """Make `module.<name>` call `fn(module, *args, **kwargs)`; `owner` names who did it."""
    d = module.__dict__
    table: dict[str, tuple[str, Any]] = d.setdefault(OVERRIDES_ATTR, {})
    if name in table:
        raise HookError(
            f"{type(module).__name__}.{name} is already overridden by {table[name][0]!r}; remove that first"
        )
    table[name] = (owner, d.get(name, _MISSING))
    d[name] = types.MethodType(fn, module)
    txn = current_transaction()
    if txn is not None:
        txn.on_rollback(functools.partial(restore_method, module, name, owner=owner, missing_ok=True), f"override {name}")


def restore_method(module: nn.Module, name: str, *, owner: str, missing_ok: bool = False) -> None:
    """Undo `override_method(module, name, ..., owner=owner)`."""
    d = module.__dict__
    table = d.get(OVERRIDES_ATTR, {})
    entry = table.get(name)
    if entry is None or entry[0] != owner:
        if missing_ok:
            return
        raise HookError(f"{type(module).__name__}.{name} has no override by {owner!r}")
    del table[name]
    previous = entry[1]
    if previous is _MISSING:
        d.pop(name, None)
    else:
        d[name] = previous
    if not table:
        d.pop(OVERRIDES_ATTR, None)


def overridden(module: nn.Module) -> dict[str, str]:
    """{method name: owner} of the overrides on `module`."""
    return {name: entry[0] for name, entry in module.__dict__.get(OVERRIDES_ATTR, {}).items()}
