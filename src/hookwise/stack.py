"""Stack: an ordered, validated, serializable list of technique configs; `apply()` and `remove()`.

`hookwise.apply(model, *configs)` checks the whole stack (what is already on the model plus what is
asked) against the technique table before touching anything, then applies the new techniques in
canonical order (lowest layer first) inside a transaction: if any step raises, every hook it
attached and every change it recorded is undone, and the model computes exactly as before. The
machinery lives in `core.techniques`; it is the one entry path, which each technique's own
`apply_<name>` calls too, so `applied` and `remove` see every technique however it was applied.

The model map the techniques take their targets from can be stated (`towers=`, `attention=`): it is
kept on the model's ledger, where `describe(model)` finds it, and in the stack, so a saved stack
re-applies with the same map.

The first real call after techniques are applied is checked against the map: the blocks and
attention modules they hooked must all run, and the blocks a step cache or layer skip hooked in
their tower's order. The check records
that one call (`introspect.trace.CallRecorder`, module calls only) and compares before the call
returns, so a wrong map (a container taken for a block, a block the model never calls) raises
`MapMismatchError` instead of returning a result computed without the techniques' hooks, such as
offloaded weights that were never loaded. It then removes itself: later calls cost nothing extra.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .core.config import TechniqueConfig
from .core.hooks import HookRegistry, Layer, ModelHook, add_hook, get_hook, iter_registries, remove_hook, unwrap
from .core.ledger import MAP_KEYS, ledger_of, open_ledger, stated_map, watch_ledgers
from .core.techniques import (
    apply_techniques,
    applied_configs,
    check_compatible,
    remove_techniques,
    technique_named,
    technique_of,
    techniques,
)
from .core.transaction import transaction
from .errors import ConfigError
from .introspect.model_map import ModelMap, describe
from .introspect.trace import CallRecorder, MapMismatchError, check_against_trace

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


def _stated(towers: Any, attention: Any) -> dict[str, tuple[str, ...]]:
    """{"towers": ..., "attention": ...} of the keys given, as tuples of module paths."""
    stated: dict[str, tuple[str, ...]] = {}
    for key, value in (("towers", towers), ("attention", attention)):
        if value is None:
            continue
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
            raise ConfigError(
                f"{key}= takes a list of module paths as in model.named_modules() (e.g. ['blocks']), got {value!r}"
            )
        stated[key] = tuple(value)
    return stated


def _merge_maps(maps: Iterable[dict[str, tuple[str, ...]]]) -> dict[str, tuple[str, ...]]:
    merged: dict[str, tuple[str, ...]] = {}
    for stated in maps:
        for key, paths in stated.items():
            if key in merged and merged[key] != paths:
                raise ConfigError(
                    f"two different {key}= maps were given ({list(merged[key])} and {list(paths)}); "
                    f"a model has one map: state it once"
                )
            merged[key] = paths
    return merged


class Stack:
    """An ordered, validated list of technique configs, in canonical order, with the model map it was
    stated for (`towers=` container paths, `attention=` module paths; None: the map `describe` finds)."""

    def __init__(
        self,
        *configs: TechniqueConfig | Stack,
        towers: list[str] | tuple[str, ...] | None = None,
        attention: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        flat = _flatten(configs)
        check_compatible(flat)
        self._configs: tuple[TechniqueConfig, ...] = tuple(sorted(flat, key=lambda c: technique_of(c).layer))
        inner = [item.map for item in _stacks(configs)]
        self._map = _merge_maps([*inner, _stated(towers, attention)])

    @property
    def configs(self) -> tuple[TechniqueConfig, ...]:
        return self._configs

    @property
    def map(self) -> dict[str, tuple[str, ...]]:
        """The stated model map: {"towers": ..., "attention": ...}, only the keys stated."""
        return dict(self._map)

    def names(self) -> list[str]:
        return [technique_of(c).name for c in self._configs]

    def __iter__(self) -> Iterator[TechniqueConfig]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        parts = [repr(c) for c in self._configs] + [f"{k}={list(v)!r}" for k, v in self._map.items()]
        return f"Stack({', '.join(parts)})"

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; the stated map, if any, under "map"."""
        out: dict[str, Any] = {
            "format": STACK_FORMAT,
            "version": STACK_VERSION,
            "techniques": [c.to_dict() for c in self._configs],
        }
        if self._map:
            out["map"] = {key: list(paths) for key, paths in self._map.items()}
        return out

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
        stated = data.get("map", {})
        if not isinstance(stated, dict) or set(stated) - set(MAP_KEYS):
            raise ConfigError(f"stack 'map' must be a dict with the keys {list(MAP_KEYS)}, got {stated!r}")
        return cls(*configs, towers=stated.get("towers"), attention=stated.get("attention"))

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


def _stacks(items: Iterable[Any]) -> list[Stack]:
    out: list[Stack] = []
    for item in items:
        if isinstance(item, Stack):
            out.append(item)
        elif isinstance(item, (list, tuple)):
            out.extend(_stacks(item))
    return out


def applied(model: nn.Module) -> Stack:
    """The stack of techniques hookwise has applied to `model` (empty if none), with its stated map."""
    stated = stated_map(unwrap(model))
    return Stack(*applied_configs(model), towers=stated.get("towers"), attention=stated.get("attention"))


def apply(
    model: nn.Module,
    *configs: TechniqueConfig | Stack,
    timestep_arg: str | None = None,
    towers: list[str] | tuple[str, ...] | None = None,
    attention: list[str] | tuple[str, ...] | None = None,
) -> Stack:
    """Apply technique configs to `model`, validated as one stack and all-or-nothing.

    Techniques already on the model stay; the new ones must be compatible with them. Returns the
    whole stack now on the model. `timestep_arg` names the forward argument holding the timestep
    when it is not one of the usual names. `towers=` (container paths) and `attention=` (module
    paths) state the model map every technique takes its targets from, as in `describe(model,
    towers=..., attention=...)`; a stack passed in brings the map it was saved with. The map is kept
    on the model (`describe(model)` then returns it) until every technique is removed.
    """
    flat = _flatten(configs)
    stated = _merge_maps([*(s.map for s in _stacks(configs)), _stated(towers, attention)])
    root = unwrap(model)
    if not stated:
        apply_techniques(root, flat, timestep_arg=timestep_arg)
        return applied(root)
    if not isinstance(root, nn.Module):
        raise ConfigError(f"hookwise.apply needs a torch.nn.Module, got {type(root).__name__}")
    ledger = ledger_of(root)
    if ledger is not None and len(ledger) and ledger.stated_map != stated:
        was = ledger.stated_map or "that describe() finds"
        raise ConfigError(
            f"the techniques already on this model were applied with the map {was}; a model has one map: "
            f"remove them (hookwise.remove(model)) and apply everything with the new one"
        )
    describe(root, towers=stated.get("towers"), attention=stated.get("attention"))  # checks the paths
    with transaction():
        open_ledger(root).state_map(stated)
        apply_techniques(root, flat, timestep_arg=timestep_arg)
    return applied(root)


def remove(model: nn.Module, *names: str) -> list[str]:
    """Undo techniques on `model` (all of them, or those named), newest first; returns the names undone.

    An irreversible technique stays, with a warning. When nothing hookwise applied is left, the
    run-state hook goes too and the model is as it was.
    """
    return remove_techniques(model, names)


# ---- the first-call check of the model map ---------------------------------------------------------
FIRST_CALL_CHECK = "hookwise.first_call_check"


def _technique_hooks(registry: HookRegistry) -> list[ModelHook]:
    return [registry.get(n) for n in registry.names() if n.startswith("hookwise.") and n != FIRST_CALL_CHECK]


def _checked_targets(model: nn.Module, model_map: ModelMap) -> tuple[set[str], set[str]]:
    """The map's blocks and attention modules that carry a hookwise technique's hook, and of those the
    blocks whose tower order matters.

    Order matters to the techniques at the step-cache layers and above (layer skip included): they
    split a tower into head, middle and tail, or pick blocks by index. Those below (casting,
    offloading...) act on each module on its own; offloading learns the order blocks really run in.
    """
    candidates = {b.path for t in model_map.towers for b in t.blocks} | {a.path for a in model_map.attention}
    targets: set[str] = set()
    ordered: set[str] = set()
    for path, registry in iter_registries(model):
        hooks = _technique_hooks(registry) if path in candidates else []
        if hooks:
            targets.add(path)
            if any(hook.layer >= Layer.CACHE_SKIP for hook in hooks):
                ordered.add(path)
    return targets, ordered


class _FirstCallCheck(ModelHook):
    """Records the model's next call and checks that the hooked blocks and attention modules ran, in order.

    It compares which modules ran and in what order: that decides whether a technique's hooks acted.
    Where a technique hooked attention modules (an attention cache, an attention skip), it also watches
    where attention is computed, so a module that runs but computes no attention (projections only)
    or that is a whole block is caught; that watch adds work per tensor operation to this one call,
    so calls with only block or leaf targets go without it.
    """

    # The run-state hook's layer, added after it, so outermost: the recorder sees the whole call,
    # and nothing outside it can act on the call's result before the check.
    layer = Layer.STATE

    def __init__(self, model_map: ModelMap) -> None:
        self.model_map = model_map

    # Eager as a whole, compiled modules inside included (stance "force_eager"): dynamo would trace
    # the recorder's hooks into their graphs, then compile them again once the hooks are gone. So a
    # compiled model compiles from its second call, as it would run from then on.
    @torch.compiler.disable
    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        targets, ordered = _checked_targets(module, self.model_map)
        if not targets:  # the techniques that hooked blocks or attention modules were removed
            remove_hook(module, FIRST_CALL_CHECK)
            return next_fn(*args, **kwargs)
        # No cached result is served inside this call: a step cache computes every block until it
        # has stored a result, and only a call of its own stores one. A cache applied in the middle
        # of a run (its first call not a first step) starts empty all the same. A cached or skipped
        # block is still called (its hook answers for it), so the trace is complete either way.
        watch = any(a.path in targets for a in self.model_map.attention)
        recorder = CallRecorder(module, attention=watch)
        with torch.compiler.set_stance("force_eager"), recorder:
            output = next_fn(*args, **kwargs)
        problems = check_against_trace(self.model_map, recorder.trace, targets, ordered=ordered)
        if problems:
            # The check stays: every call raises until the techniques are applied with a right map.
            raise MapMismatchError(
                f"the model map of this {type(module).__name__} disagrees with its first call, so hookwise's "
                f"techniques would not act where they should (a never-run block's offloaded weights are "
                f"never loaded; a cache or skip on it does nothing): "
                + "; ".join(problems)
                + ". With techniques on the model, remove them (hookwise.remove(model)) and apply them "
                "again with the map stated: hookwise.apply(model, *configs, towers=[...], attention=[...]); "
                "the map is kept with the model and in the saved stack"
            )
        remove_hook(module, FIRST_CALL_CHECK)
        return output


def _watch_first_call(model: nn.Module, config: TechniqueConfig) -> None:
    """After a config is recorded: have the model's next call checked, if a technique hooked the map's
    blocks or attention modules (undone with the applying transaction)."""
    if get_hook(model, FIRST_CALL_CHECK) is not None:
        return
    model_map = describe(model)
    if _checked_targets(model, model_map)[0]:
        add_hook(model, _FirstCallCheck(model_map), FIRST_CALL_CHECK)


def _drop_first_call_check(model: nn.Module) -> None:
    remove_hook(model, FIRST_CALL_CHECK, missing_ok=True)


watch_ledgers(_watch_first_call, _drop_first_call_check)

__all__ = ["Stack", "applied", "apply", "remove"]
