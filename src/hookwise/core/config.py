"""Technique configs are data: frozen dataclasses, validated on creation, to and from plain dicts.

A config subclass is a `@dataclass(frozen=True)` that overrides `validate()` to raise `ConfigError`
with a message naming the field, the bad value and what would work. `to_dict()` gives JSON-safe
values (dtypes as names, tuples as lists) tagged with the technique name; `from_dict()` reverses it
using the field annotations. The `check_*` validators give every config the same wording for the
common field kinds (counts, non-negative numbers, timestep windows).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from .hooks import Layer


@dataclasses.dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique config."""

    technique: ClassVar[str] = ""  # set by register_technique
    layer: ClassVar[int] = Layer.DEFAULT  # set by register_technique; orders the techniques of one apply

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` if a field has a value that cannot work."""

    # ---- order-aware conflicts, per config (the technique table's `conflicts` are per technique and
    # symmetric). `hookwise.apply` asks both sides of every pair of the stack, in the order the configs
    # are applied (what the model has first, then the new ones in canonical order), before anything
    # changes; the reason returned is the error's message.
    def refuses_to_follow(self, earlier: TechniqueConfig) -> str | None:
        """Why this config cannot be applied to a model that `earlier` is on already (None: it can)."""
        return None

    def refuses_to_precede(self, later: TechniqueConfig) -> str | None:
        """Why `later` cannot be applied to a model this config is on already (None: it can)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"technique": self.technique or type(self).__name__}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TechniqueConfig:
        data = dict(data)
        tag = data.pop("technique", None)
        if tag is not None and cls.technique and tag != cls.technique:
            raise ConfigError(f"this dict describes technique {tag!r}, not {cls.technique!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _decode(v, hints.get(k, Any), k) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> TechniqueConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(_encode(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"cannot serialize a {type(value).__name__} ({value!r}) in a technique config")


def _hint_args(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def parse_dtype(value: Any, field: str = "dtype") -> torch.dtype:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.float8_e4m3fn", "bf16", "fp8")."""
    if isinstance(value, torch.dtype):
        return value
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp8": "float8_e4m3fn",
        "fp8_e4m3": "float8_e4m3fn",
        "fp8_e5m2": "float8_e5m2",
    }
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = aliases.get(name, name)
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ConfigError(f"{field}={value!r} is not a torch dtype; use e.g. torch.bfloat16 or 'float8_e4m3fn'")


def _decode(value: Any, hint: Any, field: str) -> Any:
    options = _hint_args(hint)
    if value is None:
        return None
    if isinstance(value, str) and any(o is torch.dtype for o in options):
        return parse_dtype(value, field)
    if isinstance(value, list):
        if any(typing.get_origin(o) is tuple or o is tuple for o in options):
            return tuple(value)
        if any(typing.get_origin(o) is frozenset or o is frozenset for o in options):
            return frozenset(value)
    for option in options:
        if isinstance(option, type) and issubclass(option, enum.Enum) and not isinstance(value, option):
            try:
                return option(value)
            except ValueError:
                pass
    return value


# ---- validators for `validate()`: each raises `ConfigError` naming the field, the value and what works ----
def check_fraction(name: str, value: float, *, allow_zero: bool = True) -> None:
    """A finite number >= 0 (> 0 with `allow_zero=False`); despite the name, not bounded above."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """An integer (not a bool) >= `minimum`; None too with `optional=True`."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = " or None" if optional else ""
        raise ConfigError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


def check_range(name: str, value: Any) -> None:
    """None, or a (low, high) pair of numbers (not NaN; infinite ends are open) with low <= high (a timestep window)."""
    if value is None:
        return
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in value)
        or value[0] > value[1]
    ):
        raise ConfigError(f"{name} must be a (low, high) pair of timesteps with low <= high, or None; got {value!r}")

