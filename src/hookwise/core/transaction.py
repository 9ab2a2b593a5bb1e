"""All-or-nothing changes to a model.

Inside `with transaction():` every hook added through a `HookRegistry` is recorded, and a technique
may record its own undo steps (`current_transaction().on_rollback(fn)`) for anything else it changes,
such as a parameter's dtype or device. If the block raises, the undo steps run newest first and the
model is back where it started; the original exception propagates.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

logger = logging.getLogger("hookwise.core.transaction")

_CURRENT: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("hookwise_transaction", default=None)


class Transaction:
    """A list of undo steps, run newest first on rollback."""

    def __init__(self) -> None:
        self._undo: list[tuple[Callable[[], object], str]] = []

    def on_rollback(self, fn: Callable[[], object], description: str = "") -> None:
        self._undo.append((fn, description))

    def __len__(self) -> int:
        return len(self._undo)

    def rollback(self) -> list[BaseException]:
        """Run every undo step, newest first; keep going past failures and return them."""
        errors: list[BaseException] = []
        while self._undo:
            fn, description = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # an undo step must not hide the error that caused the rollback
                logger.error("hookwise: undoing %s failed: %r", description or fn, exc)
                errors.append(exc)
        return errors


def current_transaction() -> Transaction | None:
    """The innermost open transaction, or None."""
    return _CURRENT.get()


@contextmanager
def transaction() -> Iterator[Transaction]:
    """Open a transaction; a nested one hands its undo steps to its parent when it succeeds."""
    parent = _CURRENT.get()
    txn = Transaction()
    token = _CURRENT.set(txn)
    try:
        yield txn
    except BaseException:
        _CURRENT.reset(token)
        token = None
        txn.rollback()
        raise
    finally:
        if token is not None:
            _CURRENT.reset(token)
    if parent is not None:
        parent._undo.extend(txn._undo)
