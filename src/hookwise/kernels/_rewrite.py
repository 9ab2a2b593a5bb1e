"""The structural route's patterns (`_structural.py` traces and runs): where they are in a block's fx graph,
and the site functions the rewritten graph calls in their place.

- gate: `x + gate * y`, and `x + cat([g0 * y0, g1 * y1, ...])` (a gate per token range);
- modulate: `norm(x) * (1 + scale) + shift` in any operand order (`1 + scale` or `scale + 1`), the norm
  a call of a LayerNorm / RMSNorm submodule without parameters (`_patterns.structural_kind`) or of
  `F.layer_norm` / `F.rms_norm`. A modulation-shaped add is never counted as a gate, nor a rotary
  embedding as one, whichever ops are asked for: the count at apply says what the block holds;
- rope: `x * cos + rot(x) * sin` (interleaved pairs or rotate-half, found on a probe tensor), and calls
  of diffusers' `apply_rotary_emb`.

Each site function decides per call, on the real tensors, whether the fused op applies (a modulation
or gate that broadcasts over tokens as (..., 1 or tokens, width), the norm over the last dimension,
floating dtypes, rotary tables without gradient); otherwise it computes the very expression the graph
had (the norm submodule called as itself). Inside a graph being compiled they trace the eager
expressions of `_patterns.py`, so the surrounding compile fuses them.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._patterns import structural_kind

# What the rewritten sites call, by op (the names in `_patterns.EXPRESSIONS`).
ROPE_FUNCTIONS = {"interleaved": "rope_interleaved", "half": "rope_half"}


def known_ropes() -> tuple[Callable[..., Any], ...]:
    """Rotary functions of libraries a block may call, kept as one call each and rewritten whole
    (diffusers' `apply_rotary_emb` unpacks `*x.shape`, which fx cannot trace); only those already imported."""
    embeddings = sys.modules.get("diffusers.models.embeddings")
    fn = getattr(embeddings, "apply_rotary_emb", None)
    return (fn,) if callable(fn) else ()



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


# ---- AdaLN modulation: norm(x) * (1 + scale) + shift -----------------------------------------------------
def _broadcasts_per_token(x: torch.Tensor, t: Any) -> bool:
    """`t` broadcasts over x as the fused ops take a modulation: (..., 1 or tokens, x's width)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() > x.dim() or t.dim() < 1 or t.shape[-1] != x.shape[-1]:
        return False
    padded = (1,) * (x.dim() - t.dim()) + tuple(t.shape)
    return all(p in (1, s) for p, s in zip(padded, x.shape))


def _module_width(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
    return int(shape[0]) if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1 else None


def _norm_operands(norm: Any, how: str, x: torch.Tensor, shape: Any, weight: Any, bias: Any, eps: Any) -> tuple | None:
    """(weight, bias, eps) for the fused op, or None where it does not compute this norm."""
    width = x.shape[-1]
    if norm is not None:  # a norm module without parameters (checked when the graph was rewritten)
        if _module_width(norm) != width or getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None:
            return None
        weight, bias, eps = None, None, getattr(norm, "eps", None)
    elif not isinstance(shape, (tuple, list, torch.Size)) or tuple(shape) != (width,):
        return None
    for t in (weight, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (width,) or t.dtype != x.dtype):
            return None
    if eps is None and how == "rms_norm":
        eps = torch.finfo(x.dtype).eps  # as torch's rms_norm
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    return weight, bias, float(eps)


def modulate_site(hook: Any, norm: Any, how: str, x: Any, scale: Any, shift: Any, shape: Any = None, weight: Any = None,
                  bias: Any = None, eps: Any = None) -> Any:  # fmt: skip
    """`norm(x) * (1 + scale) + shift` (norm: a module without parameters, or F.layer_norm / F.rms_norm
    with `shape, weight, bias, eps`), by the fused norm + modulation where the shapes and dtypes allow."""
    fused = _ops(hook).get("norm_modulate")
    operands = None
    if fused is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
        if _broadcasts_per_token(x, scale) and _broadcasts_per_token(x, shift):
            operands = _norm_operands(norm, how, x, shape, weight, bias, eps)
    if operands is None:
        if norm is not None:
            normed = norm(x)
        elif how == "layer_norm":
            normed = F.layer_norm(x, shape, weight, bias, eps)
        else:
            normed = F.rms_norm(x, shape, weight, eps)
        return normed * (1 + scale) + shift
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(scale.dtype, shift.dtype))
    out = fused(x, *operands[:2], scale, shift, operands[2], how == "rms_norm")
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ---- the rewrite ------------------------------------------------------------------------------------------
@dataclass
class Found:
    """The patterns found in one graph: how many of each op."""

    gate: int = 0
    rope: int = 0
    modulate: int = 0

    def ops(self) -> tuple[str, ...]:
        return tuple(op for op, n in (("gate", self.gate), ("modulate", self.modulate), ("rope", self.rope)) if n)


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


def _one_plus(node: fx.Node) -> fx.Node | None:
    """`scale` if node is `1 + scale` or `scale + 1` (a function or method add, the 1 a constant), else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _ADD) or (node.op == "call_method" and node.target == "add")):
        return None
    for scale, one in (node.args, node.args[::-1]):
        if isinstance(scale, fx.Node) and isinstance(one, (int, float)) and not isinstance(one, bool) and one == 1:
            return scale
    return None


def _modulation(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(normed, product, one_plus, scale, shift) if node is `normed * (1 + scale) + shift` in any operand
    order (either order of the add and of the mul; `1 + scale` or `scale + 1`)."""
    pair = _binary(node, _ADD, "add")
    if pair is None:
        return None
    for product, shift in (pair, pair[::-1]):
        factors = _binary(product, _MUL, "mul")
        for normed, one in (factors, factors[::-1]) if factors is not None else ():
            scale = _one_plus(one)
            if scale is not None:
                return normed, product, one, scale, shift
    return None


_NORM_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    F.layer_norm: ("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5}),
}
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS[F.rms_norm] = ("rms_norm", ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})


def _norm_of(node: fx.Node, block: nn.Module) -> tuple[str, str | None, tuple] | None:
    """(how, module path or None, (x, shape, weight, bias, eps)) if node normalizes x's last dimension: a
    call of a LayerNorm / RMSNorm submodule without parameters, or of F.layer_norm / F.rms_norm."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        try:
            module = block.get_submodule(node.target)
        except AttributeError:
            return None
        how = structural_kind(module)
        if how not in ("layer_norm", "rms_norm") or any(True for _ in module.parameters()) or _module_width(module) is None:
            return None
        return how, node.target, (node.args[0], None, None, None, None)
    if node.op != "call_function" or node.target not in _NORM_FUNCTIONS:
        return None
    how, names, defaults = _NORM_FUNCTIONS[node.target]
    if len(node.args) > len(names) or set(node.kwargs) - set(names[len(node.args):]):
        return None
    values = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    if not isinstance(values.get("input"), fx.Node) or "normalized_shape" not in values:
        return None
    return how, None, (values["input"], values["normalized_shape"], values["weight"], values.get("bias"), values["eps"])


def rewrite(graph: fx.Graph, wanted: tuple[str, ...], block: nn.Module) -> tuple[Found, list[RopeSite]]:
    """Replace the gate, modulation and rope patterns of `graph` (of the `wanted` ops; `block` the module
    traced) by calls of the site functions."""
    found = Found()
    sites: list[RopeSite] = []
    for node in list(graph.nodes):
        if node.graph is not graph or node.op not in ("call_function", "call_method"):
            continue
        if "rope" in wanted and node.op == "call_function" and node.target in known_ropes():
            with graph.inserting_before(node):
                new = graph.call_function(known_rope_site, tuple(node.args), dict(node.kwargs))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            found.rope += 1
            continue
        match = _rope_match(node)
        if match is not None and "rope" not in wanted:
            continue  # a rotary embedding, never a gate
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
        shaped = _modulation(node)
        if shaped is not None:  # a modulation, never a gate (whether or not its norm is one the fused op computes)
            normed, product, one, scale, shift = shaped
            norm = _norm_of(normed, block) if "modulate" in wanted and len(product.users) == len(normed.users) == 1 else None
            if norm is not None:
                how, path, (x, shape, weight, bias, eps) = norm
                with graph.inserting_before(node):
                    module = graph.get_attr(path) if path is not None else None
                    new = graph.call_function(modulate_site, (module, how, x, scale, shift, shape, weight, bias, eps))
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                _erase_unused(graph, [one, product])
                if not normed.users:  # the norm's own call (a module without parameters: nothing else to run)
                    graph.erase_node(normed)
                found.modulate += 1
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

