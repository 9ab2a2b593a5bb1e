"""The structural route: the gated residual and rotary embedding of any block, found in its own code path.

Blocks of classes no per-architecture entry of `_inline.py` knows (a custom DiT, a new diffusers
variant) still write `x + gate * y` and the rotary embedding inline. This route reads them from the
block's forward itself:

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
   gated residual per range, and `add(mul(x, cos), mul(rot(x), sin))` the fused rotary embedding, where
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
import operator
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from ..core.hooks import Layer, ModelHook

KIND = "structural"
# What the rewritten sites call, by op (the names in `_patterns.EXPRESSIONS`).
ROPE_FUNCTIONS = {"interleaved": "rope_interleaved", "half": "rope_half"}
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _known_ropes() -> tuple[Callable[..., Any], ...]:
    """Rotary functions of libraries a block may call, kept as one call each and rewritten whole
    (diffusers' `apply_rotary_emb` unpacks `*x.shape`, which fx cannot trace); only those already imported."""
    embeddings = sys.modules.get("diffusers.models.embeddings")
    fn = getattr(embeddings, "apply_rotary_emb", None)
    return (fn,) if callable(fn) else ()


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


# ---- patterns -----------------------------------------------------------------------------------------
_ADD = {operator.add, torch.add, torch.Tensor.add}
_MUL = {operator.mul, torch.mul, torch.Tensor.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_CASTS = {"float", "half", "bfloat16", "double", "to", "type_as", "type"}


def _binary(node: fx.Node, functions: set, method: str) -> tuple[fx.Node, fx.Node] | None:
    """The two Node operands of `node` if it is the binary op (function or method) without extras."""
    if node.kwargs or len(node.args) != 2:
        return None
    if (node.op == "call_function" and node.target in functions) or (node.op == "call_method" and node.target == method):
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return a, b
    return None


def _cat(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    if node.op != "call_function" or node.target not in _CAT or not node.args:
        return None
    pieces = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not isinstance(dim, int) or set(node.kwargs) - {"dim"}:
        return None
    return list(pieces), dim


def _strip_casts(node: fx.Node) -> fx.Node:
    while node.op == "call_method" and node.target in _CASTS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _ancestry(node: fx.Node, source: fx.Node) -> list[fx.Node] | None:
    """The nodes computing `node` from `source` alone (constants aside), in graph order; None if
    any other value (a parameter, another input, a module call) enters."""
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n is source or n in seen:
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        seen[n] = None
        stack.extend(a for a in n.all_input_nodes)
    if source not in {a for n in seen for a in n.all_input_nodes}:
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


@dataclass(frozen=True)
class _Slot:
    """A value of a recorded chain: -1 the source, else the result of step `index`."""

    index: int


def _record(nodes: list[fx.Node], source: fx.Node) -> list[tuple[str, Any, tuple, dict]]:
    """The chain as plain steps (erasing a node clears its arguments, so the graph's nodes are not kept)."""
    slots = {source: _Slot(-1), **{n: _Slot(i) for i, n in enumerate(nodes)}}
    return [(n.op, n.target, fx.node.map_arg(n.args, slots.__getitem__), fx.node.map_arg(n.kwargs, slots.__getitem__)) for n in nodes]


def _fill(value: Any, env: list[Any], source: Any) -> Any:
    if isinstance(value, _Slot):
        return source if value.index < 0 else env[value.index]
    if isinstance(value, (tuple, list)):
        return type(value)(_fill(v, env, source) for v in value)
    if isinstance(value, dict):
        return {k: _fill(v, env, source) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_fill(value.start, env, source), _fill(value.stop, env, source), _fill(value.step, env, source))
    return value


def _evaluate(steps: list[tuple[str, Any, tuple, dict]], value: torch.Tensor) -> Any:
    env: list[Any] = []
    for op, target, args, kwargs in steps:
        args, kwargs = _fill(args, env, value), _fill(kwargs, env, value)
        env.append(target(*args, **kwargs) if op == "call_function" else getattr(args[0], target)(*args[1:], **kwargs))
    return env[-1]


def rotate(layout: str, x: torch.Tensor) -> torch.Tensor:
    """The rotation a rotary embedding multiplies by sin: interleaved pairs or rotate-half."""
    if layout == "interleaved":
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-x1, x0], dim=-1).flatten(-2)
    x0, x1 = x.chunk(2, dim=-1)
    return torch.cat([-x1, x0], dim=-1)


@dataclass
class RopeSite:
    """One `x * cos + rot(x) * sin` of the graph: how to compute `rot` eagerly, and its layout per shape."""

    steps: list[tuple[str, Any, tuple, dict]]
    layouts: dict[tuple, str | None] = field(default_factory=dict)

    def layout(self, x: torch.Tensor) -> str | None:
        key = tuple(x.shape)
        if key not in self.layouts:
            self.layouts[key] = None
            if x.dim() >= 1 and x.shape[-1] % 2 == 0 and x.numel() < 2**24:
                probe = torch.arange(x.numel(), dtype=torch.float32).view(x.shape)
                with torch.no_grad():
                    try:
                        got = _evaluate(self.steps, probe)
                    except Exception:  # noqa: BLE001 - not a rotation of this shape
                        got = None
                if isinstance(got, torch.Tensor) and got.shape == x.shape:
                    for layout in ("interleaved", "half"):
                        if torch.equal(got.float(), rotate(layout, probe)):
                            self.layouts[key] = layout
        return self.layouts[key]

    def rotated(self, x: torch.Tensor) -> torch.Tensor:
        return _evaluate(self.steps, x)


# ---- what the rewritten graph calls ---------------------------------------------------------------------
def _ops(hook: Any) -> dict[str, Callable[..., torch.Tensor]]:
    return hook.expressions if torch.compiler.is_compiling() else hook.ops


def _gate_fits(x: Any, gate: Any, y: Any) -> bool:
    if not all(isinstance(t, torch.Tensor) for t in (x, gate, y)) or x.dim() < 2:
        return False
    if y.shape != x.shape or gate.dim() > x.dim() or gate.shape[-1] != x.shape[-1]:
        return False
    padded = (1,) * (x.dim() - gate.dim()) + tuple(gate.shape)
    return padded[-2] in (1, x.shape[-2]) and all(g in (1, s) for g, s in zip(padded, x.shape))


def _gate(hook: Any, x: Any, a: Any, b: Any) -> Any:
    fused = _ops(hook).get("gated_residual")
    gate, y = (a, b) if isinstance(b, torch.Tensor) and isinstance(x, torch.Tensor) and b.shape == x.shape else (b, a)
    if fused is None or not _gate_fits(x, gate, y):
        return x + a * b
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    out = fused(x, gate, y)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def gate_site(hook: Any, x: Any, a: Any, b: Any) -> Any:
    """`x + a * b` (the graph's own order of operands), fused where the shapes allow."""
    return _gate(hook, x, a, b)


def gate_cat_site(hook: Any, x: Any, dim: int, pairs: list) -> Any:
    """`x + cat([a0 * b0, a1 * b1, ...], dim)`: one gated residual per range of `x` along `dim`."""
    if not isinstance(x, torch.Tensor) or not all(isinstance(t, torch.Tensor) for p in pairs for t in p):
        return x + torch.cat([a * b for a, b in pairs], dim)
    sizes = [torch.broadcast_shapes(a.shape, b.shape)[dim] for a, b in pairs]
    if sum(sizes) != x.shape[dim]:
        return x + torch.cat([a * b for a, b in pairs], dim)
    parts = x.split(sizes, dim)
    return torch.cat([_gate(hook, part, a, b) for part, (a, b) in zip(parts, pairs)], dim)


def _tables(x: torch.Tensor, cos: Any, sin: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(cos, sin) as (seq, head_dim) tables and x's seq dim, where they broadcast over x that way."""
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)) or cos.shape != sin.shape:
        return None
    if cos.requires_grad or sin.requires_grad or cos.dim() > x.dim() or x.dim() < 2 or cos.shape[-1] != x.shape[-1]:
        return None
    padded = (1,) * (x.dim() - cos.dim()) + tuple(cos.shape)
    varying = [i for i, n in enumerate(padded[:-1]) if n != 1]
    if len(varying) > 1 or any(padded[i] != x.shape[i] for i in varying):
        return None
    seq_dim = varying[0] if varying else x.dim() - 2
    rows = x.shape[seq_dim]
    d = x.shape[-1]
    return cos.reshape(-1, d).expand(rows, d), sin.reshape(-1, d).expand(rows, d), seq_dim


def _fused_rope(hook: Any, layout: str | None, source: torch.Tensor, cos: Any, sin: Any) -> torch.Tensor | None:
    """`source * cos + rot(source) * sin` by the fused op of `layout`, in source's dtype; None where it
    does not apply (no op asked for, tables that do not broadcast as (seq, head_dim), tables with grad)."""
    fused = _ops(hook).get(ROPE_FUNCTIONS.get(layout or "", ""))
    tables = _tables(source, cos, sin) if fused is not None else None
    if tables is None:
        return None
    c, s, seq_dim = tables
    if layout == "interleaved":
        four = (c[:, 0::2], s[:, 0::2], c[:, 1::2], s[:, 1::2])
    else:
        h = c.shape[-1] // 2
        four = (c[:, :h], s[:, :h], c[:, h:], s[:, h:])
    return fused(source, *(t.contiguous() for t in four), seq_dim)


def rope_site(hook: Any, sites: list[RopeSite], index: int, source: Any, a: Any, cos: Any, sin: Any) -> Any:
    """`a * cos + rot(source) * sin` (a: source, perhaps cast), fused where the tables allow."""
    site = sites[index]
    layout = site.layout(source) if isinstance(source, torch.Tensor) and not torch.compiler.is_compiling() else site.layouts.get(
        tuple(source.shape) if isinstance(source, torch.Tensor) else None
    )
    out = _fused_rope(hook, layout, source, cos, sin) if isinstance(a, torch.Tensor) and a.shape == source.shape else None
    if out is None:
        return a * cos + site.rotated(source) * sin
    out_dtype = torch.promote_types(torch.promote_types(a.dtype, cos.dtype), sin.dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def known_rope_site(hook: Any, function: Callable[..., Any], x: Any, freqs_cis: Any, use_real: bool = True,
                    use_real_unbind_dim: int = -1, sequence_dim: int = 2) -> Any:  # fmt: skip
    """diffusers' `apply_rotary_emb(x, (cos, sin), ...)` by the fused op, else the function itself."""
    layout = {-1: "interleaved", -2: "half"}.get(use_real_unbind_dim)
    usable = use_real and layout and sequence_dim in (1, 2) and isinstance(x, torch.Tensor) and x.dim() == 4
    if usable and isinstance(freqs_cis, (tuple, list)) and len(freqs_cis) == 2:
        cos, sin = freqs_cis
        if isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and cos.dim() == 2 and cos.device == x.device:
            at = (None, None) if sequence_dim == 2 else (None, slice(None), None)
            out = _fused_rope(hook, layout, x, cos[at], sin[at])
            if out is not None:
                return out
    return function(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)


# ---- the rewrite ------------------------------------------------------------------------------------------
@dataclass
class Found:
    """The patterns found in one graph: how many of each op."""

    gate: int = 0
    rope: int = 0

    def ops(self) -> tuple[str, ...]:
        return tuple(op for op, n in (("gate", self.gate), ("rope", self.rope)) if n)


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for n in reversed(nodes):
        if n.graph is graph and not n.users and n.op in ("call_function", "call_method"):
            graph.erase_node(n)


def _rope_match(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, list[fx.Node]] | None:
    """(source, a, cos, sin, rotation nodes) if node is `a * cos + rot(source) * sin` in any operand order."""
    pair = _binary(node, _ADD, "add")
    if pair is None:
        return None
    products = [_binary(p, _MUL, "mul") for p in pair]
    if None in products or any(len(p.users) != 1 for p in pair):
        return None
    for first, second in ((0, 1), (1, 0)):
        for a, cos in (products[first], products[first][::-1]):
            source = _strip_casts(a)
            for b, sin in (products[second], products[second][::-1]):
                if b is source or b is a:
                    continue
                chain = _ancestry(b, source)
                if chain and cos not in chain and sin not in chain:
                    return source, a, cos, sin, chain
    return None


def rewrite(graph: fx.Graph, wanted: tuple[str, ...]) -> tuple[Found, list[RopeSite]]:
    """Replace the gate and rope patterns of `graph` (of the `wanted` ops) by calls of the site functions."""
    found = Found()
    sites: list[RopeSite] = []
    for node in list(graph.nodes):
        if node.graph is not graph or node.op not in ("call_function", "call_method"):
            continue
        if "rope" in wanted and node.op == "call_function" and node.target in _known_ropes():
            with graph.inserting_before(node):
                new = graph.call_function(known_rope_site, tuple(node.args), dict(node.kwargs))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            found.rope += 1
            continue
        match = _rope_match(node) if "rope" in wanted else None
        if match is not None:
            source, a, cos, sin, chain = match
            sites.append(RopeSite(_record(chain, source)))
            with graph.inserting_before(node):
                new = graph.call_function(rope_site, (len(sites) - 1, source, a, cos, sin))
            dead = [m for m in node.all_input_nodes]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            _erase_unused(graph, chain + dead)
            found.rope += 1
            continue
        pair = _binary(node, _ADD, "add") if "gate" in wanted else None
        if pair is None:
            continue
        for x, other in (pair, pair[::-1]):
            product = _binary(other, _MUL, "mul")
            if product is not None and len(other.users) == 1 and x is not other:
                with graph.inserting_before(node):
                    new = graph.call_function(gate_site, (x, *product))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                _erase_unused(graph, [other])
                found.gate += 1
                break
            cat = _cat(other)
            pieces = [_binary(p, _MUL, "mul") if isinstance(p, fx.Node) else None for p in cat[0]] if cat else None
            if cat and len(other.users) == 1 and pieces and None not in pieces and all(len(p.users) == 1 for p in cat[0]):
                with graph.inserting_before(node):
                    new = graph.call_function(gate_cat_site, (x, cat[1], [tuple(p) for p in pieces]))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                _erase_unused(graph, [*cat[0], other])
                found.gate += len(pieces)
                break
    graph.lint()
    return found, sites


def find_structural(block: nn.Module, wanted: tuple[str, ...]) -> Found:
    """The patterns of `wanted` ops the block's forward holds (the trace at apply); raises UntraceableError."""
    graph = trace(block, static_concrete(block))
    return rewrite(graph, wanted)[0]


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
    found, sites = rewrite(graph, wanted)
    out_spec = None
    codegen = graph._codegen
    if hasattr(codegen, "pytree_info"):  # placeholders per tuple element: the forward takes the leaves
        out_spec = codegen.pytree_info.out_spec
        graph._codegen = fx.graph.CodeGen()
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    for name, value in list(namespace.items()):
        if value is gate_site or value is gate_cat_site:
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
            self.why[key] = "no gate / rope pattern in the forward traced for this call"
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
