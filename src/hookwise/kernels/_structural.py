"""The structural route: the gated residual, AdaLN modulation and rotary embedding of any block, found in
its own code path.

Blocks of classes no per-architecture entry of `_inline.py` knows (a custom DiT, a new diffusers
variant) still write `x + gate * y`, `norm(x) * (1 + scale) + shift` and the rotary embedding inline.
This route reads them from the block's forward itself (this file: tracing, call signatures, the hook;
`_rewrite.py`: the patterns and the functions the rewritten graph calls):

1. `torch.fx` traces the block's forward symbolically, every submodule a leaf: each submodule stays one
   call of that very module, so the hooks it carries (casting, offloading, LoRA, attention backends,
   other Kernels sites) run as before. At apply, one trace says whether the forward can be traced at all
   and whether it holds a pattern; a block whose trace fails (data-dependent control flow, an argument
   fx cannot follow) or that holds none is listed in `kernels_summary()["not_reached"]` with the reason.
2. At a block's first call with a new call signature (which arguments are tensors, tuples of tensors,
   and the values of the others: None, flags, ints), the forward is traced again with those values
   fixed, so a branch on `rope is None` or on a flag is the branch this call takes. The graph is
   rewritten: `add(x, mul(gate, y))` (either order) becomes the fused gated residual,
   `add(x, cat([mul, mul, ...]))` (a gate per token range, HunyuanVideo's token replace) one fused
   gated residual per range, `add(mul(norm(x), add(1, scale)), shift)` (any operand order; the norm a
   LayerNorm / RMSNorm submodule without parameters, or F.layer_norm / F.rms_norm) the fused norm +
   modulation, and `add(mul(x, cos), mul(rot(x), sin))` the fused rotary embedding, where
   `rot` is a chain of ops on x alone that the first call finds, on a probe tensor of x's shape, to be
   the interleaved-pairs (FLUX / Wan) or the rotate-half (Llama / Liger) rotation; a call of diffusers'
   `apply_rotary_emb` (kept as one call in the trace) becomes the fused op of its layout.
3. The rewritten forward is checked against the block's own forward on a slice of that call's real
   inputs (the first sample; all of them where a slice does not run): outputs and the gradients of
   the inputs and trainable parameters within `fused.TOLERANCE`. A signature that fails runs the
   block's own forward, and the summary's `rejected` says why.

Each fused site decides per call, on the real tensors, whether the fused op applies (shapes that
broadcast the way the kernels take them, dtypes, tables without gradient); otherwise it computes the
very expression the graph had. The hook sits at `Layer.REPLACE` like the per-architecture block hooks,
and `hookwise.remove` takes it off (nothing is left on the block).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ..core.hooks import Layer, ModelHook
from ._rewrite import Found, gate_cat_site, gate_site, known_rope_site, modulate_site, rewrite, rope_site
from ._rewrite import known_ropes as _known_ropes

KIND = "structural"
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _LeafTracer(fx.Tracer):
    """Every submodule is called as itself: only the block's own code is traced."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_known_ropes())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class UntraceableError(Exception):
    """The block's forward (or one call of it) cannot be traced; the message says why."""


# ---- call signatures ---------------------------------------------------------------------------------
def _bind(block: nn.Module, args: tuple, kwargs: dict, signature: inspect.Signature | None = None) -> dict[str, Any]:
    signature = signature or inspect.signature(type(block).forward)
    kinds = {p.kind for p in signature.parameters.values()}
    if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        raise UntraceableError("its forward takes *args / **kwargs, which fx cannot trace per argument")
    bound = signature.bind(block, *args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    values.pop(next(iter(signature.parameters)))  # self
    return values


def _is_tensor_tree(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value))


def _concrete(name: str, value: Any) -> Any:
    """What fx traces `value` as: a placeholder (tensors, tuples of tensors), or the value itself."""
    if isinstance(value, torch.Tensor):
        return fx.PH
    if _is_tensor_tree(value):
        return pytree.tree_map(lambda _: fx.PH, value)
    if isinstance(value, _CONSTANTS):
        return value
    raise UntraceableError(f"its argument {name!r} is a {type(value).__name__}, which the trace would bake in")


def _key(values: dict[str, Any]) -> tuple:
    """The call signature: the structure of the tensor arguments and the value of every other one."""
    out = []
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            out.append((name, "T"))
        elif _is_tensor_tree(value):
            out.append((name, str(pytree.tree_structure(value))))
        else:
            out.append((name, type(value).__name__, value if isinstance(value, _CONSTANTS) else id(value)))
    return tuple(out)


def _leaves(values: dict[str, Any]) -> list[Any]:
    """The generated forward's arguments: every placeholder, in the order fx made them."""
    out: list[Any] = []
    for value in values.values():
        out.extend(pytree.tree_leaves(value) if _is_tensor_tree(value) else [value])
    return out


def static_concrete(block: nn.Module) -> dict[str, Any]:
    """The trace at apply: arguments without a default, or defaulting to None, as placeholders; the
    others (flags, sizes) at their defaults."""
    concrete: dict[str, Any] = {}
    params = list(inspect.signature(type(block).forward).parameters.values())[1:]
    for p in params:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise UntraceableError("its forward takes *args / **kwargs, which fx cannot trace per argument")
        if p.default is not inspect.Parameter.empty and p.default is not None:
            concrete[p.name] = p.default
    return concrete


def trace(block: nn.Module, concrete: dict[str, Any]) -> fx.Graph:
    try:
        return _LeafTracer().trace(block, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any failure of the trace is the reason the block is not reached
        text = str(exc).strip().splitlines()
        raise UntraceableError(f"its forward could not be traced by torch.fx ({type(exc).__name__}: {text[0] if text else ''})") from exc



def find_structural(block: nn.Module, wanted: tuple[str, ...]) -> Found:
    """The patterns of `wanted` ops the block's forward holds (the trace at apply); raises UntraceableError."""
    graph = trace(block, static_concrete(block))
    return rewrite(graph, wanted, block)[0]


# ---- one rewritten forward per call signature --------------------------------------------------------------
@dataclass
class Rewritten:
    forward: Callable[..., Any]
    placeholders: int
    out_spec: Any
    found: Found

    def __call__(self, block: nn.Module, values: dict[str, Any]) -> Any:
        leaves = _leaves(values)
        out = self.forward(block, *leaves)
        return out if self.out_spec is None else pytree.tree_unflatten(out, self.out_spec)


def build(block: nn.Module, values: dict[str, Any], wanted: tuple[str, ...], hook: Any) -> Rewritten:
    """The block's forward for calls like `values`, traced, rewritten and made a function; raises
    UntraceableError."""
    concrete = {name: _concrete(name, value) for name, value in values.items()}
    graph = trace(block, concrete)
    found, sites = rewrite(graph, wanted, block)
    out_spec = None
    codegen = graph._codegen
    if hasattr(codegen, "pytree_info"):  # placeholders per tuple element: the forward takes the leaves
        out_spec = codegen.pytree_info.out_spec
        graph._codegen = fx.graph.CodeGen()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    for name, value in list(namespace.items()):
        if value is gate_site or value is gate_cat_site or value is modulate_site:
            namespace[name] = partial(value, hook)
        elif value is known_rope_site:
            namespace[name] = partial(value, hook, _known_ropes()[0])
        elif value is rope_site:
            namespace[name] = partial(value, hook, sites)
    exec(compile(code.src, f"<hookwise kernels: {type(block).__name__} rewritten>", "exec"), namespace)  # noqa: S102
    placeholders = sum(1 for n in graph.nodes if n.op == "placeholder")
    if placeholders != len(_leaves(values)):
        raise UntraceableError(f"its traced forward takes {placeholders} inputs where the call has {len(_leaves(values))}")
    return Rewritten(namespace["forward"], placeholders, out_spec, found)


class StructuralHook(ModelHook):
    """Computes a block's forward through its traced, rewritten graph (one per call signature), checked
    against the block's own forward at the signature's first call. Innermost on the block."""

    layer = Layer.REPLACE

    def __init__(self, backend: str, ops: dict[str, Callable[..., torch.Tensor]], expressions: dict[str, Callable[..., torch.Tensor]],
                 wanted: tuple[str, ...], check: Callable[..., str | None]) -> None:  # fmt: skip
        self.kind = KIND
        self.backend = backend
        self.ops = ops
        self.expressions = expressions
        self.wanted = wanted
        self.check = check  # (block, eager, fused, args, kwargs) -> None or why not
        self.rewritten: dict[tuple, Rewritten | None] = {}
        self.why: dict[tuple, str] = {}  # signature -> why it runs the block's own forward
        self._class_forward: Any = None
        self._signature: inspect.Signature | None = None

    def on_attach(self, module: nn.Module) -> None:
        self._class_forward = type(module).forward
        self._signature = inspect.signature(self._class_forward)

    def _prepare(self, module: nn.Module, key: tuple, values: dict[str, Any], args: tuple, kwargs: dict) -> Rewritten | None:
        try:
            rewritten = build(module, values, self.wanted, self)
        except UntraceableError as exc:
            self.why[key] = str(exc)
            return None
        if not rewritten.found.ops():
            self.why[key] = "no gate / modulate / rope pattern in the forward traced for this call"
            return None
        fused = lambda *a, **k: rewritten(module, _bind(module, a, k, self._signature))  # noqa: E731
        why = self.check(module, fused, args, kwargs)
        if why is not None:
            self.why[key] = why
            return None
        return rewritten

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(next_fn, "__func__", None) is not self._class_forward or getattr(next_fn, "__self__", None) is not module:
            return next_fn(*args, **kwargs)
        try:
            values = _bind(module, args, kwargs, self._signature)
            key = _key(values)
        except (UntraceableError, TypeError):
            return next_fn(*args, **kwargs)
        if key not in self.rewritten:
            if torch.compiler.is_compiling():  # traced and checked at an eager call only
                return next_fn(*args, **kwargs)
            self.rewritten[key] = self._prepare(module, key, values, args, kwargs)
        rewritten = self.rewritten[key]
        return next_fn(*args, **kwargs) if rewritten is None else rewritten(module, values)
