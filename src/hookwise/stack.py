"""Stack: an ordered, validated, serializable list of technique configs; `apply()` and `remove()`.

`hookwise.apply(model, *configs)` checks the whole stack (what is already on the model plus what is
asked) against the technique table before touching anything, then applies the new techniques in
canonical order (lowest layer first) inside a transaction: if any step raises, every hook it
attached and every change it recorded is undone, and the model computes exactly as before. The
machinery lives in `core.techniques`; it is the one entry path, which each technique's own
`apply_<name>` calls too, so `applied` and `remove` see every technique however it was applied.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from torch import nn

from .core.config import TechniqueConfig
from .core.techniques import (
    apply_techniques,
    applied_configs,
    check_compatible,
    remove_techniques,
    technique_named,
    technique_of,
    techniques,
)
from .errors import ConfigError

STACK_FORMAT = "hookwise.stack"
STACK_VERSION = 1


def _flatten(items: Iterable[Any]) -> list[TechniqueConfig]:
    out: list[TechniqueConfig] = []
    for item in items:
        if isinstance(item, Stack):
            out.extend(item.configs)
        elif isinstance(item, (list, tuple)):
            out.extend(_flatten(item))
        elif isinstance(item, TechniqueConfig):
            out.append(item)
        else:
            known = ", ".join(t.config_cls.__name__ for t in techniques()) or "none registered"
            raise ConfigError(
                f"{type(item).__name__} is not a technique config; pass configs such as {known}"
            )
    return out


class Stack:
    """An ordered, validated list of technique configs, in canonical order."""

    def __init__(self, *configs: TechniqueConfig | Stack) -> None:
        flat = _flatten(configs)
        check_compatible(flat)
        self._configs: tuple[TechniqueConfig, ...] = tuple(sorted(flat, key=lambda c: technique_of(c).layer))

    @property
    def configs(self) -> tuple[TechniqueConfig, ...]:
        return self._configs

    def names(self) -> list[str]:
        return [technique_of(c).name for c in self._configs]

    def __iter__(self) -> Iterator[TechniqueConfig]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Stack({', '.join(repr(c) for c in self._configs)})"

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": STACK_FORMAT, "version": STACK_VERSION, "techniques": [c.to_dict() for c in self._configs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stack:
        if not isinstance(data, dict) or data.get("format") != STACK_FORMAT:
            raise ConfigError(f"not a hookwise stack: expected a dict with format={STACK_FORMAT!r}")
        if data.get("version") != STACK_VERSION:
            raise ConfigError(f"stack version {data.get('version')!r} is not supported (this hookwise reads {STACK_VERSION})")
        configs = []
        for entry in data.get("techniques", []):
            if not isinstance(entry, dict) or "technique" not in entry:
                raise ConfigError(f"stack entry {entry!r} has no 'technique' name")
            configs.append(technique_named(entry["technique"]).config_cls.from_dict(entry))
        return cls(*configs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Stack:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"stack JSON does not parse: {exc}") from exc
        return cls.from_dict(data)

    def apply(self, model: nn.Module, *, timestep_arg: str | None = None) -> Stack:
        return apply(model, self, timestep_arg=timestep_arg)


def applied(model: nn.Module) -> Stack:
    """The stack of techniques hookwise has applied to `model` (empty if none)."""
    return Stack(*applied_configs(model))


def apply(model: nn.Module, *configs: TechniqueConfig | Stack, timestep_arg: str | None = None) -> Stack:
    """Apply technique configs to `model`, validated as one stack and all-or-nothing.

    Techniques already on the model stay; the new ones must be compatible with them. Returns the
    whole stack now on the model. `timestep_arg` names the forward argument holding the timestep
    when it is not one of the usual names.
    """
    return Stack(*apply_techniques(model, _flatten(configs), timestep_arg=timestep_arg))


def remove(model: nn.Module, *names: str) -> list[str]:
    """Undo techniques on `model` (all of them, or those named), newest first; returns the names undone.

    An irreversible technique stays, with a warning. When nothing hookwise applied is left, the
    run-state hook goes too and the model is as it was.
    """
    return remove_techniques(model, names)


__all__ = ["Stack", "applied", "apply", "remove"]
