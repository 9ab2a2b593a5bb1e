"""Regional compile: each block of the model's main towers compiled on its own, one compile per block class.

`Compile(mode=..., dynamic=..., fullgraph=...)` gives every main-tower block (from the model map) the
compiled call that `nn.Module.compile` would give it (the instance's `_compiled_call_impl`, which
`nn.Module.__call__` runs instead of `_call_impl`), but through one `torch.compile`d function per block
class: blocks of a class share its graphs, and each class has a dynamo cache of its own, so a model
with several block classes never runs out of dynamo's per-code-object variants. Nothing is patched on
a class; removal puts back the call each block had (none), so the blocks run eagerly again.

Everything else hookwise attaches composes with it as already built: offloading, casting, step caches
and the run-state keep their bookkeeping in `torch.compiler.disable`d functions that run between the
compiled graphs, and the Kernels hooks trace their eager expressions inside a compiled block (the
block's compile fuses them). So a sampling run or a training loop compiles each block class once per
grad mode, then never again from step to step (tested with dynamo's `error_on_recompile`).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.cost import SpeedFigure, speed_cost
from ..core.hooks import Layer, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import current_transaction
from ..errors import ConfigError, NoTargetError
from ..introspect.model_map import describe

NAME = "compile"
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_STATE_ATTR = "_hookwise_compile"


@dataclass(frozen=True)
class Compile(TechniqueConfig):
    """Compile each main-tower block with `torch.compile` (regional compile), one compile per block class.

    - `mode`, `dynamic`, `fullgraph`: as `torch.compile`'s (`dynamic=False`: static shapes, a new
      graph per input shape; None: dynamo decides, marking shapes dynamic after a change).
    - `backend`: `torch.compile`'s backend name ("inductor"; "aot_eager" traces without generating code).
    """

    mode: str | None = None
    dynamic: bool | None = False
    fullgraph: bool = False
    backend: str = "inductor"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"Compile(mode={self.mode!r}) is not a torch.compile mode; use one of {list(MODES)}")
        if self.dynamic not in (None, True, False):
            raise ConfigError(f"Compile(dynamic={self.dynamic!r}) must be True, False or None")
        if not isinstance(self.fullgraph, bool):
            raise ConfigError(f"Compile(fullgraph={self.fullgraph!r}) must be True or False")
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"Compile(backend={self.backend!r}) must be a torch.compile backend name such as 'inductor'")


def _call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module._call_impl(*args, **kwargs)


def _compiled_for_class(cls: type, config: Compile) -> Callable[..., Any]:
    # A code object of its own per block class: dynamo keys its cache on code objects (shared by
    # every module's `_call_impl`), and keeps a bounded number of variants per code object.
    code = _call.__code__.replace(co_name=f"compiled_{cls.__name__}")
    fn = types.FunctionType(code, _call.__globals__, code.co_name)
    options: dict[str, Any] = dict(dynamic=config.dynamic, fullgraph=config.fullgraph, backend=config.backend)
    if config.mode is not None:
        options["mode"] = config.mode
    return torch.compile(fn, **options)


def compiled_blocks(model: nn.Module) -> list[str]:
    """The paths of the blocks Compile compiled on `model` (empty when it is not applied)."""
    return list(unwrap(model).__dict__.get(_STATE_ATTR, {}))


def _apply_compile(model: nn.Module, config: Compile) -> None:
    model = unwrap(model)
    blocks: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for tower in describe(model).main_towers:
        for block in tower.blocks:
            module = model.get_submodule(block.path)
            if id(module) not in seen:  # a block reused at two places is compiled once
                seen.add(id(module))
                blocks[block.path] = module
    if not blocks:
        raise NoTargetError(
            f"Compile found no tower blocks in {type(model).__name__}; state them with hookwise.describe(model, "
            f"towers=...) or compile the model with torch.compile instead"
        )
    already = [p for p, m in blocks.items() if getattr(m, "_compiled_call_impl", None) is not None]
    if already:
        raise ConfigError(
            f"blocks {already[:3]} are compiled already (module.compile()); leave Compile out, or build the model "
            f"again without compiling them"
        )
    per_class: dict[type, Callable[..., Any]] = {}
    state: dict[str, tuple[nn.Module, bool]] = {}
    for path, module in blocks.items():
        fn = per_class.get(type(module))
        if fn is None:
            fn = per_class[type(module)] = _compiled_for_class(type(module), config)
        # Whether the instance had the attribute (else the class default shows): removal restores that.
        state[path] = (module, "_compiled_call_impl" in module.__dict__)
        module._compiled_call_impl = functools.partial(fn, module)
    model.__dict__[_STATE_ATTR] = state
    txn = current_transaction()
    if txn is not None:
        txn.on_rollback(lambda: _remove_compile(model), "compiled blocks")


def _remove_compile(model: nn.Module, config: Compile | None = None) -> int:
    blocks = unwrap(model).__dict__.pop(_STATE_ATTR, {})
    for module, had in blocks.values():
        if had:
            module._compiled_call_impl = None
        else:
            module.__dict__.pop("_compiled_call_impl", None)
    return len(blocks)


def apply_compile(model: nn.Module, config: Compile | None = None, **kwargs: Any) -> list[str]:
    """Compile the main-tower blocks (as `hookwise.apply(model, Compile(...))`); returns their paths."""
    apply_techniques(model, [config or Compile(**kwargs)])
    return compiled_blocks(model)


def remove_compile(model: nn.Module) -> list[str]:
    """Remove Compile (the same as `hookwise.remove(model, "compile")`): the blocks run eagerly again."""
    return remove_techniques(model, [NAME])


# Step time under Compile relative to without, keyed by the device kind it was measured on
# (`core.cost.device_kind`: "<device>:<name>" as the planner's Hardware reports it, e.g. "cpu:amd epyc (2 cores)",
# "cuda:nvidia h100 80gb hbm3"), each with its source, e.g.
#   "cpu:amd epyc (2 cores)": SpeedFigure(forward=0.8, backward=0.9, source="benchmarks/kernels.py full width, BENCHMARKS.md 2026-12-01, load 1.2")
# The planner offers Compile only on that device kind, where the figure for the job's mode is below 1 (or
# where the user states one: measurements={"speed": {"compile": ...}}). Empty: nothing measured yet.
MEASURED_SPEED: dict[str, SpeedFigure] = {}


register_technique(
    NAME,
    Compile,
    apply=_apply_compile,
    remove=_remove_compile,
    layer=Layer.KERNEL,
    description="regional torch.compile of each tower block, one compile per block class",
    cost=speed_cost(NAME, lambda: Compile(), MEASURED_SPEED),
)
