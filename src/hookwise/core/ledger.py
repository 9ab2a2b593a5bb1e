"""The ledger of a model: the technique configs hookwise has applied to it, in the order applied.

It is a small object kept on the root model, apart from the run-state hook: the run state says what
the model is doing now, the ledger what was done to it. `hookwise.apply` writes it, `hookwise.applied`
reads it, `hookwise.remove` undoes what it lists. Every public `apply_<name>` goes through
`hookwise.apply`, so the ledger lists every technique on the model.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from .transaction import current_transaction

LEDGER_ATTR = "_hookwise_ledger"


class Ledger:
    """The configs applied to one model, oldest first."""

    def __init__(self) -> None:
        self._configs: list[Any] = []

    def record(self, config: Any) -> None:
        """Note `config` as applied; forgotten again if the open transaction rolls back."""
        self._configs.append(config)
        txn = current_transaction()
        if txn is not None:
            txn.on_rollback(lambda: self.forget(config), f"record of {type(config).__name__}")

    def forget(self, config: Any) -> None:
        """Drop `config` (by identity: two equal configs are two entries)."""
        for i, c in enumerate(self._configs):
            if c is config:
                del self._configs[i]
                return

    @property
    def configs(self) -> list[Any]:
        return list(self._configs)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._configs))

    def __len__(self) -> int:
        return len(self._configs)

    def __repr__(self) -> str:
        return f"Ledger({[type(c).__name__ for c in self._configs]})"


def ledger_of(model: nn.Module) -> Ledger | None:
    """The ledger of `model` (already unwrapped), or None when hookwise has applied nothing to it."""
    ledger = model.__dict__.get(LEDGER_ATTR)
    return ledger if isinstance(ledger, Ledger) else None


def open_ledger(model: nn.Module) -> Ledger:
    """The ledger of `model`, created if missing (and dropped again if the open transaction rolls back)."""
    ledger = ledger_of(model)
    if ledger is not None:
        return ledger
    ledger = Ledger()
    model.__dict__[LEDGER_ATTR] = ledger
    txn = current_transaction()
    if txn is not None:
        txn.on_rollback(lambda: close_ledger(model), "ledger")
    return ledger


def close_ledger(model: nn.Module) -> None:
    """Take the ledger off `model` (when nothing it lists is left)."""
    model.__dict__.pop(LEDGER_ATTR, None)
