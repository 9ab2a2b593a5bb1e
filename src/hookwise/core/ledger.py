"""The ledger of a model: the technique configs hookwise has applied to it, in the order applied.

It is a small object kept on the root model, apart from the run-state hook: the run state says what
the model is doing now, the ledger what was done to it. `hookwise.apply` writes it, `hookwise.applied`
reads it, `hookwise.remove` undoes what it lists. Every public `apply_<name>` goes through
`hookwise.apply`, so the ledger lists every technique on the model.

It also keeps the model map the user stated (`hookwise.apply(model, ..., towers=[...],
attention=[...])`): `describe(model)` reads it, so every technique targets the stated map, and a
saved stack carries it. Layers above `core` may ask to hear of each recorded config
(`watch_ledgers`): the first-call check of the model map is installed that way, since `core`
imports nothing of `introspect`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch import nn

from ..errors import ConfigError
from .transaction import current_transaction

LEDGER_ATTR = "_hookwise_ledger"
MAP_KEYS = ("towers", "attention")

# fn(model, config) after each config is recorded (inside the applying transaction), and fn(model)
# before the ledger is taken off a model (nothing hookwise applied is left on it).
_AFTER_RECORD: list[Callable[[nn.Module, Any], None]] = []
_BEFORE_CLOSE: list[Callable[[nn.Module], None]] = []


def watch_ledgers(
    after_record: Callable[[nn.Module, Any], None], before_close: Callable[[nn.Module], None]
) -> None:
    """Have `after_record(model, config)` called after each config is recorded on a model's ledger, and
    `before_close(model)` before a ledger is taken off its model. Registering the same pair again does nothing.
    """
    if after_record not in _AFTER_RECORD:
        _AFTER_RECORD.append(after_record)
    if before_close not in _BEFORE_CLOSE:
        _BEFORE_CLOSE.append(before_close)


class Ledger:
    """The configs applied to one model, oldest first, and the model map stated for it."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self._configs: list[Any] = []
        self._map: dict[str, tuple[str, ...]] = {}
        # A plain reference: a deep copy of the model copies its ledger with it, pointing at the copy.
        self.model = model

    def record(self, config: Any) -> None:
        """Note `config` as applied; forgotten again if the open transaction rolls back."""
        self._configs.append(config)
        txn = current_transaction()
        if txn is not None:
            txn.on_rollback(lambda: self.forget(config), f"record of {type(config).__name__}")
        if self.model is not None:
            for fn in list(_AFTER_RECORD):
                fn(self.model, config)

    @property
    def stated_map(self) -> dict[str, tuple[str, ...]]:
        """The map the user stated: {"towers": container paths, "attention": module paths}, keys as given."""
        return dict(self._map)

    def state_map(self, stated: dict[str, Any]) -> None:
        """Keep `stated` ({"towers": [...], "attention": [...]}, paths already checked) as the model's map.

        Undone if the open transaction rolls back.
        """
        unknown = set(stated) - set(MAP_KEYS)
        if unknown:
            raise ConfigError(f"a stated model map has only the keys {MAP_KEYS}, got {sorted(unknown)}")
        previous = self._map
        self._map = {key: tuple(stated[key]) for key in MAP_KEYS if stated.get(key) is not None}
        txn = current_transaction()
        if txn is not None:
            txn.on_rollback(lambda: setattr(self, "_map", previous), "stated model map")

    def forget(self, config: Any) -> None:
        """Drop `config` (by identity: two equal configs are two entries)."""
        for i, c in enumerate(self._configs):
            if c is config:
                del self._configs[i]
                return

    def replace(self, old: Any, new: Any) -> None:
        """Put `new` where `old` (by identity) stands: the same technique changed in place, so the order
        (removal runs newest first) stays and nothing recorded after `old` is re-run."""
        for i, c in enumerate(self._configs):
            if c is old:
                self._configs[i] = new
                return
        raise ConfigError(f"{type(old).__name__} is not in this model's ledger; nothing was replaced")

    @property
    def configs(self) -> list[Any]:
        return list(self._configs)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._configs))

    def __len__(self) -> int:
        return len(self._configs)

    def __repr__(self) -> str:
        stated = f", map={self._map}" if self._map else ""
        return f"Ledger({[type(c).__name__ for c in self._configs]}{stated})"


def ledger_of(model: nn.Module) -> Ledger | None:
    """The ledger of `model` (already unwrapped), or None when hookwise has applied nothing to it."""
    ledger = model.__dict__.get(LEDGER_ATTR)
    return ledger if isinstance(ledger, Ledger) else None


def open_ledger(model: nn.Module) -> Ledger:
    """The ledger of `model`, created if missing (and dropped again if the open transaction rolls back)."""
    ledger = ledger_of(model)
    if ledger is not None:
        return ledger
    ledger = Ledger(model)
    model.__dict__[LEDGER_ATTR] = ledger
    txn = current_transaction()
    if txn is not None:
        txn.on_rollback(lambda: close_ledger(model), "ledger")
    return ledger


def stated_map(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The model map stated for `model` (already unwrapped) when its techniques were applied; {} if none."""
    ledger = ledger_of(model)
    return ledger.stated_map if ledger is not None else {}


def close_ledger(model: nn.Module) -> None:
    """Take the ledger off `model` (when nothing it lists is left)."""
    if ledger_of(model) is not None:
        for fn in list(_BEFORE_CLOSE):
            fn(model)
    model.__dict__.pop(LEDGER_ATTR, None)
