"""The table of techniques, and applying / removing them on a model.

Config class -> how to apply and remove it, its layer, its conflicts.

Each technique file registers its private handlers once at import:

    register_technique("casting", LayerwiseCasting, apply=_apply, remove=_remove,
                       layer=Layer.CAST, conflicts=("quantization",), cost=TechniqueCost(...))

`apply(model, config)` changes the model (recording undo steps in the open transaction for anything
that is not a hook); `remove(model, config)` undoes what that config applied. `cost` (optional,
`core.cost.TechniqueCost`) declares how the technique changes bytes and time, for the planner.

This is the one entry path: `hookwise.apply` reads this table to validate a stack (no duplicates
unless `multiple`, no declared conflict in either direction, and no config that refuses to follow or
precede another in the order they are applied: `TechniqueConfig.refuses_to_follow` /
`refuses_to_precede`, per config, with the reason), applies it in canonical order (lowest
layer first) and records each config in the model's ledger; every public `apply_<name>` is a call of
it, and every `remove_<name>` a call of `remove_techniques` for that one name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ..errors import CompatibilityError, ConfigError
from .config import TechniqueConfig
from .cost import TechniqueCost
from .hooks import unwrap
from .ledger import close_ledger, ledger_of, open_ledger
from .state import attach_run_state, detach_run_state
from .transaction import transaction


@dataclass(frozen=True)
class Technique:
    """One registered technique."""

    name: str
    config_cls: type[TechniqueConfig]
    apply: Callable[[nn.Module, Any], Any]
    remove: Callable[..., Any] | None
    layer: int
    conflicts: frozenset[str]
    multiple: bool
    description: str
    cost: TechniqueCost | None = None

    @property
    def reversible(self) -> bool:
        return self.remove is not None


_BY_NAME: dict[str, Technique] = {}
_BY_CONFIG: dict[type, Technique] = {}


def register_technique(
    name: str,
    config_cls: type[TechniqueConfig],
    *,
    apply: Callable[[nn.Module, Any], Any],
    remove: Callable[..., Any] | None,
    layer: int,
    conflicts: Iterable[str] = (),
    multiple: bool = False,
    description: str = "",
    cost: TechniqueCost | None = None,
) -> Technique:
    """Add a technique to the table. `remove=None` marks it irreversible.

    `layer` (a `Layer` member) orders the techniques applied in one call, lowest first; it is also
    readable as the config class's `layer`. `cost` declares what the technique does to a step's
    bytes and time; without one the planner never proposes it.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, TechniqueConfig)):
        raise ConfigError(f"technique {name!r}: its config class must subclass hookwise TechniqueConfig")
    existing = _BY_NAME.get(name)
    if existing is not None and existing.config_cls is not config_cls:
        raise ConfigError(f"a technique named {name!r} is already registered ({existing.config_cls.__name__})")
    if cost is not None and not isinstance(cost, TechniqueCost):
        raise ConfigError(f"technique {name!r}: cost= must be a hookwise.core.cost.TechniqueCost, got {type(cost).__name__}")
    technique = Technique(
        name=name,
        config_cls=config_cls,
        apply=apply,
        remove=remove,
        layer=int(layer),
        conflicts=frozenset(conflicts),
        multiple=multiple,
        description=description or (config_cls.__doc__ or "").strip().split("\n")[0],
        cost=cost,
    )
    config_cls.technique = name
    config_cls.layer = technique.layer
    _BY_NAME[name] = technique
    _BY_CONFIG[config_cls] = technique
    return technique


def declare_cost(name: str, cost: TechniqueCost) -> Technique:
    """Give the technique registered as `name` its cost declaration (for a declaration kept apart from the
    technique's registration); returns the technique as now registered."""
    technique = technique_named(name)
    if not isinstance(cost, TechniqueCost):
        raise ConfigError(f"technique {name!r}: cost= must be a hookwise.core.cost.TechniqueCost, got {type(cost).__name__}")
    declared = Technique(**{**technique.__dict__, "cost": cost})
    _BY_NAME[name] = declared
    _BY_CONFIG[technique.config_cls] = declared
    return declared


def unregister_technique(name: str) -> None:
    """Remove a technique from the table (for tests and plugins)."""
    technique = _BY_NAME.pop(name, None)
    if technique is not None:
        _BY_CONFIG.pop(technique.config_cls, None)


def technique_of(config: Any) -> Technique:
    """The technique a config object belongs to."""
    technique = _BY_CONFIG.get(type(config))
    if technique is None:
        known = ", ".join(sorted(t.config_cls.__name__ for t in _BY_NAME.values())) or "none"
        raise ConfigError(
            f"{type(config).__name__} is not a registered hookwise technique config (registered: {known})"
        )
    return technique


def technique_named(name: str) -> Technique:
    technique = _BY_NAME.get(name)
    if technique is None:
        raise ConfigError(f"no technique named {name!r}; known techniques: {sorted(_BY_NAME)}")
    return technique


def techniques() -> list[Technique]:
    """Every registered technique, in canonical order."""
    return sorted(_BY_NAME.values(), key=lambda t: (t.layer, t.name))


def _conflict(a: Technique, b: Technique) -> bool:
    return b.name in a.conflicts or a.name in b.conflicts


def check_compatible(configs: Sequence[Any], *, applied: Sequence[Any] = ()) -> list[Technique]:
    """Validate `configs` as one stack, on a model that has `applied` already; return their techniques.

    Raises `CompatibilityError`.
    """
    on_model = [technique_of(c) for c in applied]
    found = on_model + [technique_of(c) for c in configs]
    for i, a in enumerate(found):
        for b in found[i + 1 :]:
            if a is b and not a.multiple:
                where = "is already applied to this model" if i < len(on_model) else "is given twice"
                raise CompatibilityError(
                    f"technique {a.name!r} appears twice in the stack ({where}); it can be applied once per model "
                    f"(remove the existing one with hookwise.remove(model, {a.name!r}) first to change its settings)"
                )
            if a is not b and _conflict(a, b):
                raise CompatibilityError(
                    f"techniques {a.name!r} and {b.name!r} cannot be combined on one model; choose one"
                )
    check_order([*applied, *sorted(configs, key=lambda c: technique_of(c).layer)], applied=len(on_model))
    return found[len(on_model) :]


def refusal(earlier: Any, later: Any) -> str | None:
    """Why `later` cannot be applied to a model `earlier` is on (either config may refuse), or None."""
    return later.refuses_to_follow(earlier) or earlier.refuses_to_precede(later)


def check_order(configs: Sequence[Any], *, applied: int = 0) -> None:
    """Raise `CompatibilityError` if a config of `configs` (in the order they are applied; the first
    `applied` are on the model already) refuses to follow an earlier one or to be followed by a later one."""
    for j in range(max(applied, 1), len(configs)):  # pairs already on the model were checked when applied
        later = configs[j]
        for i, earlier in enumerate(configs[:j]):
            why = refusal(earlier, later)
            if why:
                where = "the model has it already" if i < applied else "applied first, by layer"
                raise CompatibilityError(
                    f"{type(later).__name__} cannot be applied after {type(earlier).__name__} ({where}): "
                    f"{why}. Nothing was applied"
                )


# ---- applying and removing techniques on a model ------------------------------------------------------
def applied_configs(model: nn.Module) -> list[TechniqueConfig]:
    """The configs hookwise has applied to `model`, in the order they were applied."""
    ledger = ledger_of(unwrap(model))
    return ledger.configs if ledger else []


def apply_techniques(
    model: nn.Module, configs: Sequence[TechniqueConfig], *, timestep_arg: str | None = None
) -> list[TechniqueConfig]:
    """Validate `configs` together with what is already applied, then apply them all-or-nothing.

    New configs are applied in canonical order inside a transaction and recorded in the model's
    ledger; returns every applied config.
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"hookwise.apply needs a torch.nn.Module, got {type(model).__name__}")
    if not configs:
        known = ", ".join(t.config_cls.__name__ for t in techniques()) or "none registered"
        raise ConfigError(f"hookwise.apply was given no technique config (available: {known})")
    check_compatible(configs, applied=applied_configs(model))
    ordered = sorted(configs, key=lambda c: technique_of(c).layer)
    with transaction():
        attach_run_state(model, timestep_arg)
        ledger = open_ledger(model)
        for config in ordered:
            technique_of(config).apply(model, config)
            ledger.record(config)
    return ledger.configs


def remove_techniques(model: nn.Module, names: Sequence[str] = (), **options: Any) -> list[str]:
    """Undo techniques (all, or those named), newest first; returns the names undone.

    `options` go to the remove handler of each technique undone (for a `remove_<name>` that takes
    more than the model). An irreversible technique stays, with a warning. When nothing applied is
    left, the ledger and the run-state hook go too.

    Removing some techniques leaves the model as the rest of the stack would have made it: a
    technique of a higher layer took over what those below it left (offloading holds the weights in
    the dtype casting stored them in), so every technique above the lowest one named is removed too
    and then applied again, in canonical order.
    """
    model = unwrap(model)
    ledger = ledger_of(model)
    if ledger is None:
        if names:
            raise ConfigError(
                f"cannot remove {list(names)}: hookwise has applied nothing to this model (apply it with "
                f"hookwise.apply or its apply_<name> first)"
            )
        return []
    present = [technique_of(c).name for c in ledger]
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ConfigError(f"cannot remove {unknown}: not applied to this model (applied: {present})")
    reapply: list[TechniqueConfig] = []
    if names:
        floor = min(technique_of(c).layer for c in ledger if technique_of(c).name in names)
        above = [c for c in ledger if technique_of(c).name not in names and technique_of(c).layer > floor]
        stuck = [technique_of(c).name for c in above if not technique_of(c).reversible]
        if stuck:
            raise CompatibilityError(
                f"cannot remove {list(names)} alone: {stuck} sit above it and cannot be undone to be applied "
                f"again; remove everything (hookwise.remove(model)) or reload the model"
            )
        reapply = above
    removed: list[str] = []
    for config in reversed(ledger.configs):
        technique = technique_of(config)
        named = not names or technique.name in names
        if not named and config not in reapply:
            continue
        if not technique.reversible:
            warnings.warn(
                f"hookwise: technique {technique.name!r} cannot be undone and stays on the model", stacklevel=3
            )
            continue
        technique.remove(model, config, **(options if named else {}))
        ledger.forget(config)
        if named:
            removed.append(technique.name)
    if reapply:
        try:
            apply_techniques(model, reapply)
        except Exception as error:
            raise CompatibilityError(
                f"removed {removed}; applying {[technique_of(c).name for c in reapply]} again, which sat above "
                f"them, failed ({error}); the model now has {[technique_of(c).name for c in ledger]} on it"
            ) from error
    elif not len(ledger):
        close_ledger(model)
        detach_run_state(model)
    return removed
