"""LoRA module names: how an architecture's original (reference-code) module names map to the model's own.

Each known architecture may carry a table of `LoraNameRule`s next to its entry in `architectures.py`.
A rule names one original module (with `{n}` standing for a block index) and the model modules it
corresponds to, concatenated along the output features in that order: FLUX's BFL `img_attn.qkv` is
diffusers' `to_q`, `to_k`, `to_v`. This module only answers name questions; `hookwise.train.lora_io`
does the tensor work (splitting and concatenating LoRA weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class LoraNameRule:
    """One original module and the model modules it is made of (concatenated along output features)."""

    original: str  # e.g. "double_blocks.{n}.img_attn.qkv"
    modules: tuple[str, ...]  # e.g. ("transformer_blocks.{n}.attn.to_q", ...)
    # Relative output sizes of the parts, used when no model is at hand to read them from; equal if empty.
    weights: tuple[int, ...] = ()
    # The original module puts the two output halves the other way round (BFL's final shift/scale).
    swap_halves: bool = False

    @cached_property
    def _original_re(self) -> re.Pattern:
        return _pattern(self.original)

    @cached_property
    def _original_underscored_re(self) -> re.Pattern:
        return _pattern(self.original.replace(".", "_"))

    @cached_property
    def _module_res(self) -> tuple[re.Pattern, ...]:
        return tuple(_pattern(m) for m in self.modules)


def rule(original: str, *modules: str, weights: tuple[int, ...] = (), swap_halves: bool = False) -> LoraNameRule:
    """A table row: `original` is made of `modules`, in order (shorthand for the tables)."""
    return LoraNameRule(original, tuple(modules), weights, swap_halves)


def _pattern(template: str) -> re.Pattern:
    parts = template.split("{n}")
    return re.compile("^" + r"(?P<n>\d+)".join(re.escape(p) for p in parts) + "$")


@dataclass(frozen=True)
class OriginalGroup:
    """A resolved rule: one original name and the model module names it stands for."""

    original: str
    modules: tuple[str, ...]
    weights: tuple[int, ...]
    swap_halves: bool


def _resolve(r: LoraNameRule, n: str | None) -> OriginalGroup:
    fill = (lambda s: s.replace("{n}", n)) if n is not None else (lambda s: s)
    weights = r.weights or (1,) * len(r.modules)
    return OriginalGroup(fill(r.original), tuple(fill(m) for m in r.modules), weights, r.swap_halves)


def group_of_original(table: tuple[LoraNameRule, ...], name: str, underscored: bool = False) -> OriginalGroup | None:
    """The group an original module name (dotted, or with `_` for `.` as kohya writes it) stands for."""
    for r in table:
        m = (r._original_underscored_re if underscored else r._original_re).match(name)
        if m:
            return _resolve(r, m.groupdict().get("n"))
    return None


def group_of_module(table: tuple[LoraNameRule, ...], module: str) -> OriginalGroup | None:
    """The group that a model module name belongs to, or None if the table has no original name for it."""
    for r in table:
        for pattern in r._module_res:
            m = pattern.match(module)
            if m:
                return _resolve(r, m.groupdict().get("n"))
    return None
