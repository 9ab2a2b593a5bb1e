"""Fused DiT kernels: norms, AdaLN modulation, gated residuals, rotary embedding and GELU / GEGLU / SwiGLU
computed by fused ops through hooks.

`Kernels(ops=..., backend=...)` finds the sites of each op (`_patterns.py`: per-architecture tables for
FLUX and Wan, structural matching for the rest; `_inline.py`: the FLUX / Wan / HunyuanVideo / LTX-Video
blocks and attention processors that hold the gate, rope and part of the modulation inline;
`_structural.py`: the gate, modulation and rope of any other tower block, found in a torch.fx trace of its forward,
where the per-architecture entries do not reach it) and attaches a hook to each site
module that computes its forward with the backend's fused functions instead of the module's chain of
eager ops (for an attention processor: a processor object of its own on the instance). The
module's own submodules still run (an adaptive norm's `linear`, a GELU's `proj`), so casting,
offloading and LoRA on them are untouched. No class is patched; `hookwise.remove` takes the hooks off
and the modules' forwards are their own again.

Backends:
- `"triton"`: the Triton kernels of `_triton_dit.py` (forward and backward; Liger-Kernel's for the plain
  norm cases on CUDA when installed). Runs on CUDA, and on the CPU under Triton's interpreter only.
- `"compile"`: the eager expressions of `_patterns.py` compiled by `torch.compile` (inductor: Triton on
  CUDA, C++ on the CPU), one compile per op, dtype, device (and shape on the CPU).
- `"eager"`: the eager expressions themselves (the reference; for tests and as a baseline).
- `"auto"`: "triton" on CUDA where Triton is installed, "compile" elsewhere.

Inside a graph that is being compiled (regional `Compile`, a compiled model), every backend traces the
eager expression instead: the surrounding compile fuses it, and no kernel call breaks the graph.

Numerics are checked at apply, once per distinct site shape: the replacement and the module's own
forward run on inputs of the module's real widths, dtype and device (2 x 8 tokens), and the outputs and
the gradients (inputs and trainable parameters) must agree within `TOLERANCE` (the largest absolute
difference at most `rtol` times the largest absolute eager value, per dtype). A site that fails, or
whose backend cannot run there, keeps its own forward and `kernels_summary(model)["rejected"]` says
why. A stack whose ops match no site at all raises `NoTargetError`.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.cost import SpeedFigure, speed_cost
from ..core.hooks import Layer, ModelHook, add_hook, iter_registries, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import current_transaction
from ..errors import ConfigError, NoTargetError, require
from ..introspect.architectures import detect_architecture
from ..introspect.model_map import describe
from ._inline import INLINE_KINDS, KIND_OPS, PROCESSOR_KINDS, ROUTED, FusedProcessor, fused_processor, inline_sites, ops_for
from ._check import ALL_KINDS, TOLERANCE, check_call, check_site, module_dtype_device  # noqa: F401 - TOLERANCE: public bound
from ._patterns import EXPRESSIONS, OPS, arch_sites, find_sites
from ._structural import KIND as STRUCTURAL
from ._structural import StructuralHook, UntraceableError, find_structural

logger = logging.getLogger("hookwise.kernels")

NAME = "kernels"
HOOK_NAME = "hookwise.kernels"
BACKENDS = ("auto", "triton", "compile", "eager")
_STATE_ATTR = "_hookwise_kernels"


@dataclass(frozen=True)
class Kernels(TechniqueConfig):
    """Fused kernels for the DiT patterns, injected by hooks and checked against eager at apply.

    - `ops`: any of "norm" (LayerNorm / RMSNorm), "modulate" (AdaLN: the norm fused with
      `* (1 + scale) + shift`), "gate" (`x + gate * y`), "rope" (interleaved rotary embedding),
      "geglu" (GELU-tanh / GEGLU activations), "swiglu" (SwiGLU activations). "gate", "rope" and
      part of "modulate" are written inline in DiT blocks and attention processors: in FLUX, Wan,
      HunyuanVideo and LTX-Video blocks they are reached through a block-forward replacement and an
      instance-level processor (`_inline.py`); in the tower blocks of other classes (a custom DiT) the
      gate, the modulation (`norm(x) * (1 + scale) + shift`, the norm without parameters) and the rope
      are found by tracing the block's forward with torch.fx and rewritten (`_structural.py`; checked at
      the block's first call of each call signature); the tower blocks no route reaches (a forward fx
      cannot trace, a modulation after a norm with parameters) are listed in
      `kernels_summary(model)["not_reached"]` with the reason.
    - `backend`: "auto" (Triton kernels on CUDA, a `torch.compile`-generated function elsewhere),
      "triton", "compile" or "eager".
    """

    ops: tuple[str, ...] = OPS
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.ops, str):
            raise ConfigError(f"Kernels(ops={self.ops!r}) must be a list or tuple of op names, e.g. ops=({self.ops!r},)")
        object.__setattr__(self, "ops", tuple(self.ops))
        super().__post_init__()

    def validate(self) -> None:
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ConfigError(f"Kernels(ops={list(self.ops)}): unknown or no ops {unknown}; choose from {list(OPS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Kernels(backend={self.backend!r}) is not a backend; use one of {list(BACKENDS)}")


# ---- backends -----------------------------------------------------------------------------------------
_GENERATED: dict[tuple, Callable[..., torch.Tensor]] = {}


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.device.type, tuple(value.shape) if value.device.type == "cpu" else value.dim())
    return value if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__


def _compiled(name: str) -> Callable[..., torch.Tensor]:
    """The eager expression `name`, compiled once per dtype, device type (and shape on the CPU)."""
    fn = EXPRESSIONS[name]

    def call(*args: Any) -> torch.Tensor:
        key = (name, *(_signature(a) for a in args))
        compiled = _GENERATED.get(key)
        if compiled is None:
            # A code object of its own per key: dynamo keeps a bounded number of variants per code
            # object and then silently runs it uncompiled (as the fused dequantize does).
            code = fn.__code__.replace(co_name=f"{fn.__name__}_{len(_GENERATED)}")
            copy = types.FunctionType(code, fn.__globals__, code.co_name)
            static = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
            compiled = _GENERATED[key] = torch.compile(copy, dynamic=False if static else None, fullgraph=True)
        return compiled(*args)

    return call


def _triton_ops(device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    require("triton", "triton", "Kernels(backend='triton')")
    # Imported here: the module imports triton, which only this backend needs.
    from ._triton_dit import gated_residual, geglu, gelu, liger_function, norm_modulate, rope_half, rope_interleaved, swiglu

    ops = {
        "norm_modulate": norm_modulate,
        "gated_residual": gated_residual,
        "rope_interleaved": rope_interleaved,
        "rope_half": rope_half,
        "gelu": gelu,
        "geglu": geglu,
        "swiglu": swiglu,
    }
    if device.type == "cuda":
        ops["norm_modulate"] = _with_liger(norm_modulate, liger_function("rms_norm"), liger_function("layer_norm"))
    return ops


def _with_liger(own: Callable[..., torch.Tensor], rms: Any, layer: Any) -> Callable[..., torch.Tensor]:
    """Liger-Kernel's RMSNorm / LayerNorm for the plain affine cases, the own kernel for the rest."""

    def norm_modulate(x, weight, bias, scale, shift, eps, is_rms):
        if scale is None and weight is not None and x.dtype == weight.dtype:
            if is_rms and rms is not None and bias is None:
                return rms.apply(x, weight, eps, 0.0, "llama", False)
            if not is_rms and layer is not None and bias is not None:
                return layer.apply(x, weight, bias, eps)
        return own(x, weight, bias, scale, shift, eps, is_rms)

    return norm_modulate


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - a torch without it
        return False
    return bool(has_triton())


def backend_for(backend: str, device: torch.device) -> str:
    """The backend "auto" stands for on `device`."""
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and _has_triton() else "compile"


def backend_ops(backend: str, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """The fused functions of `backend` (not "auto") for tensors on `device`."""
    if backend == "eager":
        return dict(EXPRESSIONS)
    if backend == "compile":
        return {name: _compiled(name) for name in EXPRESSIONS}
    return _triton_ops(device)


# ---- the hook -----------------------------------------------------------------------------------------
class KernelHook(ModelHook):
    """Computes one site module's forward with fused ops (the module's own forward is not called)."""

    layer = Layer.KERNEL

    def __init__(self, kind: str, backend: str, ops: dict[str, Callable[..., torch.Tensor]]) -> None:
        self.kind = kind
        self.backend = backend
        self.ops = ops
        self.expressions = {name: EXPRESSIONS[name] for name in ops}  # what a compiled graph traces instead
        self._forward = ALL_KINDS[kind].forward
        self._class_forward: Any = None

    def on_attach(self, module: nn.Module) -> None:
        self._class_forward = type(module).forward

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Only in place of the module's own class forward: a hook inside this one, or a forward set
        # on the instance (an adapter wrapping it), must run, so then the module runs as it would.
        if getattr(next_fn, "__func__", None) is not self._class_forward or getattr(next_fn, "__self__", None) is not module:
            return next_fn(*args, **kwargs)
        if torch.compiler.is_compiling():
            return self._forward(module, self.expressions, *args, **kwargs)
        return self._forward(module, self.ops, *args, **kwargs)


class BlockHook(KernelHook):
    """Computes a known block's forward with its inline gate / modulation fused (`_inline.py`).

    Innermost on the block (`Layer.REPLACE`): offloading, checkpointing and caches on the block wrap
    the replacement as they wrapped the block's own forward."""

    layer = Layer.REPLACE


class ProcessorHook(ModelHook):
    """Gives one attention module a processor that fuses its rotary embedding; puts the module's own
    processor object back on detach. The module's forward itself is not replaced."""

    layer = Layer.REPLACE

    def __init__(self, kind: str, backend: str, ops: dict[str, Callable[..., torch.Tensor]]) -> None:
        self.kind = kind
        self.backend = backend
        self.ops = ops
        self.expressions = {name: EXPRESSIONS[name] for name in ops}
        self.original: Any = None

    def on_attach(self, module: nn.Module) -> None:
        self.original = module.processor
        module.processor = fused_processor(self.original, self.kind, self)

    def on_detach(self, module: nn.Module) -> None:
        current = module.processor
        if isinstance(current, FusedProcessor) and current.owner is self:
            module.processor = self.original
        else:  # someone set another processor since: theirs stays
            logger.warning("hookwise kernels: %s's processor was replaced after Kernels; left as it is", type(module).__name__)


# ---- state, apply, remove -------------------------------------------------------------------------------
@dataclass
class _State:
    backend: str
    used: dict[str, str]  # path -> kind
    rejected: dict[str, str]  # path -> why
    inline: dict[str, str]  # op -> where the model computes it instead
    unmatched: list[str]  # ops with no site
    not_reached: dict[str, str]  # tower block path -> why its inline gate / modulate / rope stay eager
    structural: dict[str, StructuralHook]  # path -> the hook of a block reached by the structural route


def kernels_summary(model: nn.Module) -> dict[str, Any]:
    """What Kernels replaced: backend, sites used (path -> kind), rejected (path -> why), ops the model
    computes inline (op -> where), ops with no site, and the tower blocks no route reaches for the
    requested inline ops (`not_reached`: path -> why); empty when Kernels is not applied.

    A block on the structural route is traced and checked at its first call with each call signature:
    a signature that fails runs the block's own forward, and `rejected` then names the block and why."""
    state = unwrap(model).__dict__.get(_STATE_ATTR)
    if state is None:
        return {}
    rejected = dict(state.rejected)
    for path, hook in state.structural.items():
        if hook.why:
            rejected[path] = f"{hook.backend}: " + "; ".join(dict.fromkeys(hook.why.values()))
    return {
        "backend": state.backend,
        "used": dict(state.used),
        "rejected": rejected,
        "inline": dict(state.inline),
        "unmatched": list(state.unmatched),
        "not_reached": dict(state.not_reached),
    }


INLINE_OPS = ("gate", "modulate", "rope")
STRUCTURAL_OPS = ("gate", "modulate", "rope")
_PATTERNS = (
    "gate: x + gate * y; modulate: norm(x) * (1 + scale) + shift, norm a LayerNorm / RMSNorm without parameters or "
    "F.layer_norm / F.rms_norm; rope: x * cos + rot(x) * sin, interleaved pairs or rotate-half"
)


def _tower_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, module, class name) of each main-tower block, a block listed at several paths once."""
    modules = dict(model.named_modules(remove_duplicate=False))
    out: list[tuple[str, nn.Module, str]] = []
    seen: set[int] = set()
    for tower in describe(model).main_towers:
        for block in tower.blocks:
            module = modules.get(block.path)
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                out.append((block.path, module, block.cls))
    return out


def _structural_sites(model: nn.Module, sites: list[tuple[str, nn.Module, str]], ops: tuple[str, ...]
                      ) -> tuple[list[tuple[str, nn.Module, str]], dict[str, tuple[str, ...]], dict[str, str]]:  # fmt: skip
    """The tower blocks no per-architecture entry reaches whose traced forward holds a gate or rope
    pattern (path, block, "structural"), the ops found in each, and why the others are not reached."""
    wanted = tuple(op for op in STRUCTURAL_OPS if op in ops)
    if not wanted:
        return [], {}, {}
    routed = {id(m) for _, m, kind in sites if kind in INLINE_KINDS and kind not in PROCESSOR_KINDS}
    found: list[tuple[str, nn.Module, str]] = []
    found_ops: dict[str, tuple[str, ...]] = {}
    why: dict[str, str] = {}
    for path, block, _ in _tower_blocks(model):
        if id(block) in routed:
            continue
        try:
            ops_here = find_structural(block, wanted).ops()
        except UntraceableError as exc:
            why[path] = str(exc)
            continue
        if not ops_here:
            why[path] = f"its traced forward holds no pattern of {' / '.join(wanted)} ({_PATTERNS})"
            continue
        found.append((path, block, STRUCTURAL))
        found_ops[path] = ops_here
    return found, found_ops, why


def _not_reached(model: nn.Module, sites: list[tuple[str, nn.Module, str]], ops: tuple[str, ...],
                 structural: dict[str, tuple[str, ...]], untraced: dict[str, str]) -> dict[str, str]:  # fmt: skip
    """The main-tower blocks in which some requested inline op (gate, modulate, rope) has no site: the
    block itself, a module inside it (an adaptive norm), its attention processor or its traced forward
    (the structural route). Such a block computes those ops, where its code has them, eagerly."""
    wanted = [op for op in INLINE_OPS if op in ops]
    if not wanted:
        return {}
    out: dict[str, str] = {}
    for path, _, cls in _tower_blocks(model):
        inside = [kind for p, _, kind in sites if kind != STRUCTURAL and (p == path or p.startswith(path + "."))]
        covered = {op for kind in inside for op in _ops_of(kind)} | set(structural.get(path, ()))
        missing = [op for op in wanted if op not in covered]
        if not missing:
            continue
        reasons = [f"routes exist for {ROUTED}, and for adaptive-norm modules"]
        if path in untraced:
            reasons.append(f"the structural route: {untraced[path]}")
        elif path in structural:
            reasons.append(f"the structural route fuses its {' / '.join(structural[path])}; it knows {_PATTERNS}")
        out[path] = (
            f"{cls}: no route reaches its {' / '.join(missing)} ({'; '.join(reasons)}); where its forward computes "
            f"them, they run eagerly"
        )
    return out


def _apply_kernels(model: nn.Module, config: Kernels) -> None:
    model = unwrap(model)
    arch = detect_architecture(model)
    arch_name = arch.name if arch else None
    # The inline sites after the module sites: a block's check then runs its submodules as they will run.
    sites = find_sites(model, arch_name, config.ops) + inline_sites(model, arch_name, config.ops)
    structural_sites, structural_ops, untraced = _structural_sites(model, sites, config.ops)
    sites += structural_sites
    table = arch_sites(arch_name)
    inline = {op: why for op, why in (table.inline.items() if table else ()) if op in config.ops}
    if not sites:
        said = "; ".join(f"{op}: {why}" for op, why in inline.items())
        unreached = _not_reached(model, sites, config.ops, structural_ops, untraced)
        classes = sorted({why.split(":", 1)[0] for why in unreached.values()})
        if unreached:
            first = next(iter(unreached.values())).split(": ", 1)[1]
            said += ("; " if said else "") + (
                f"no route reaches the inline {'/'.join(op for op in INLINE_OPS if op in config.ops)} of its tower blocks "
                f"({', '.join(classes)}; e.g. {first})"
            )
        raise NoTargetError(
            f"Kernels(ops={list(config.ops)}) found no module to replace in {type(model).__name__}"
            + (f" ({said})" if said else "")
            + "; choose ops the model computes in modules of its own (norm, modulate, geglu), or leave Kernels out"
        )
    model_dtype, model_device = module_dtype_device(model, (torch.float32, torch.device("cpu")))
    state = _State(config.backend, {}, {}, inline, [], {}, {})
    checked: dict[tuple, str | None] = {}
    for path, module, kind in sites:
        dtype, device = module_dtype_device(module, (model_dtype, model_device))
        backend = backend_for(config.backend, device)
        ops = backend_ops(backend, device)
        if kind == STRUCTURAL:  # traced and checked per call signature, at the block's first call of it
            wanted = structural_ops[path]
            names = [n for op in wanted for n in STRUCTURAL_FUNCTIONS[op]]
            hook = StructuralHook(backend, {n: ops[n] for n in names}, {n: EXPRESSIONS[n] for n in names}, wanted, check_call)
            add_hook(module, hook, HOOK_NAME)
            state.used[path] = kind
            state.structural[path] = hook
            continue
        if kind in INLINE_KINDS:
            ops = ops_for(kind, config.ops, ops)
        shapes = tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters())
        key = (type(module), kind, backend, dtype, device, shapes, getattr(module, "eps", None), getattr(module, "approximate", None),
               tuple(ops))  # fmt: skip
        if key not in checked:
            checked[key] = check_site(module, kind, ops, dtype, device)
        why = checked[key]
        if why is not None:
            state.rejected[path or "<model>"] = f"{backend}: {why}"
            continue
        hook_class = ProcessorHook if kind in PROCESSOR_KINDS else BlockHook if kind in INLINE_KINDS else KernelHook
        add_hook(module, hook_class(kind, backend, ops), HOOK_NAME)
        state.used[path or "<model>"] = kind
    found_ops = {op for _, _, kind in sites if kind != STRUCTURAL for op in _ops_of(kind)}
    found_ops |= {op for ops_here in structural_ops.values() for op in ops_here}
    state.unmatched = [op for op in config.ops if op not in found_ops and op not in inline]
    state.not_reached = _not_reached(model, sites, config.ops, structural_ops, untraced)
    if state.not_reached:
        first = next(iter(state.not_reached.items()))
        logger.info("hookwise kernels: %d tower blocks not reached (e.g. %s: %s)", len(state.not_reached), *first)
    if state.rejected:
        first = next(iter(state.rejected.items()))
        logger.warning(
            "hookwise kernels: %d of %d sites keep their eager forward (numerics check or backend failed; "
            "e.g. %s: %s); see kernels_summary(model)", len(state.rejected), len(sites), *first,
        )
    model.__dict__[_STATE_ATTR] = state
    txn = current_transaction()
    if txn is not None:
        txn.on_rollback(lambda: model.__dict__.pop(_STATE_ATTR, None), "kernels state")


# The functions the structural route's sites call, by op.
STRUCTURAL_FUNCTIONS = {"gate": ("gated_residual",), "modulate": ("norm_modulate",), "rope": ("rope_interleaved", "rope_half")}


def _ops_of(kind: str) -> tuple[str, ...]:
    return KIND_OPS.get(kind, (ALL_KINDS[kind].op,))


def _remove_kernels(model: nn.Module, config: Kernels | None = None) -> int:
    model = unwrap(model)
    count = 0
    for _, registry in list(iter_registries(model)):
        if isinstance(registry.get(HOOK_NAME), (KernelHook, ProcessorHook, StructuralHook)):
            registry.remove(HOOK_NAME)
            count += 1
    model.__dict__.pop(_STATE_ATTR, None)
    return count


def apply_kernels(model: nn.Module, config: Kernels | None = None, **kwargs: Any) -> dict[str, Any]:
    """Apply fused kernels (as `hookwise.apply(model, Kernels(...))`); returns `kernels_summary(model)`."""
    apply_techniques(model, [config or Kernels(**kwargs)])
    return kernels_summary(model)


def remove_kernels(model: nn.Module) -> list[str]:
    """Remove Kernels (the same as `hookwise.remove(model, "kernels")`); the modules' own forwards return."""
    return remove_techniques(model, [NAME])


# ---- cost -----------------------------------------------------------------------------------------------
# Step time under Kernels relative to without, keyed by the device kind it was measured on
# (`core.cost.device_kind`: "<device>:<name>" as the planner's Hardware reports it, e.g. "cpu:amd epyc (2 cores)",
# "cuda:nvidia h100 80gb hbm3"), each with its source, e.g.
#   "cpu:amd epyc (2 cores)": SpeedFigure(forward=0.8, backward=0.9, source="benchmarks/kernels.py full width, BENCHMARKS.md 2026-12-01, load 1.2")
# The planner offers Kernels only on that device kind, where the figure for the job's mode is below 1 (or
# where the user states one: measurements={"speed": {"kernels": ...}}). Empty: nothing measured yet.
MEASURED_SPEED: dict[str, SpeedFigure] = {}

register_technique(
    NAME,
    Kernels,
    apply=_apply_kernels,
    remove=_remove_kernels,
    layer=Layer.KERNEL,
    description="fused norm / AdaLN / GELU kernels (Triton, torch.compile or eager), checked against eager",
    cost=speed_cost(NAME, lambda: Kernels(), MEASURED_SPEED),
)
