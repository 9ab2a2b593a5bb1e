"""The call structure of one forward: which modules ran, in what order, inside which, and where attention ran.

Static rules (names, classes, shapes) guess what a block or an attention module is; a trace says what
the model really does. `trace_calls(model, example_inputs)` runs one forward under `no_grad` with a
forward pre-hook and an always-called forward hook on every module (each handle removed in a
`finally`), so each module call is recorded with the call it is nested in. A `TorchFunctionMode`
watches the functional calls made meanwhile and attributes each attention computation to the
innermost module call open at that moment. Attention is recognised as:

- `torch.nn.functional.scaled_dot_product_attention` (and any torch op named for attention);
- a call made from diffusers' `dispatch_attention_fn`, when diffusers is loaded (its non-native
  backends call kernels that are not torch functions);
- a `softmax` of a matmul of two activations (q @ k^T), through elementwise steps such as scaling and
  masking in between.

`CallRecorder` is the recorder itself, a context manager around any call: `trace_calls` opens it
around a forward of its own, and the first-call check of a hooked model around the model's first
real call (with the attention watch off: that check asks only which modules ran, and in what order).

On the `meta` device nothing is computed, so a full-size model is traced in moments; the example
inputs must then be on `meta` too (the model is never moved).
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.hooks import unwrap
from ..errors import ConfigError

if TYPE_CHECKING:
    from .model_map import ModelMap

class MapMismatchError(ConfigError):
    """The model map disagrees with what the model ran: a hooked block or attention module never ran,
    or a tower's blocks ran out of order."""


_SDPA = {F.scaled_dot_product_attention}
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.einsum}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}


@dataclass(frozen=True)
class ModuleCall:
    """One call of one module during the traced forward."""

    index: int  # position in call order (pre-hook order)
    path: str  # `named_modules` path ("" = the model)
    parent: int | None  # index of the call it is nested in (None for the outermost)


@dataclass(frozen=True)
class CallTrace:
    """What one forward of a model did: its module calls, in order, and where attention was computed."""

    model_cls: str
    calls: tuple[ModuleCall, ...]
    attention: dict[str, int] = field(default_factory=dict)  # path -> calls of it in which attention ran (innermost)
    watched_attention: bool = True  # False: only module calls were recorded, `attention` is empty

    def count(self, path: str) -> int:
        """How many times the module at `path` was called."""
        return sum(1 for c in self.calls if c.path == path)

    def ran(self, path: str) -> bool:
        """Whether the module at `path` was called at least once."""
        return path in self.first_calls

    @property
    def first_calls(self) -> dict[str, int]:
        """{path: index of its first call}, in call order."""
        first: dict[str, int] = {}
        for c in self.calls:
            first.setdefault(c.path, c.index)
        return first

    @property
    def order(self) -> tuple[str, ...]:
        """Paths of the called modules, in order of their first call."""
        return tuple(self.first_calls)

    def parent_of(self, path: str) -> str | None:
        """The path of the module whose call held the first call of `path` (None for the outermost call)."""
        for c in self.calls:
            if c.path == path:
                return None if c.parent is None else self.calls[c.parent].path
        raise ConfigError(f"the module {path!r} was not called in the traced forward; called: {list(self.order)[:20]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_cls": self.model_cls,
            "calls": [[c.path, c.parent] for c in self.calls],
            "attention": dict(self.attention),
            "watched_attention": self.watched_attention,
        }


def _is_activation(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 3


def _dispatch_code() -> Any:
    """The code object of diffusers' `dispatch_attention_fn`, if diffusers' attention dispatch is loaded."""
    module = sys.modules.get("diffusers.models.attention_dispatch")
    fn = getattr(module, "dispatch_attention_fn", None) if module is not None else None
    return inspect.unwrap(fn).__code__ if callable(fn) else None


class _AttentionWatch(TorchFunctionMode):
    """Reports each attention computation to `on_attention`; see the module docstring for what counts."""

    _FRAMES = 24  # how far up the Python stack a call from diffusers' dispatch is looked for

    def __init__(self, on_attention: Callable[[], None], marked: Callable[[], bool]) -> None:
        super().__init__()
        self._on_attention = on_attention
        self._marked = marked  # whether the innermost open call already counts as computing attention
        # id -> weak reference: tensors compare elementwise, so no set of tensors can hold them
        self._logits: dict[int, weakref.ref] = {}
        self._dispatch = _dispatch_code()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "") or ""
        if func in _SDPA or "attention" in name or "attn" in name:
            self._on_attention()
        elif func in _SOFTMAX:
            if args and self._is_logits(args[0]):
                self._on_attention()
        elif func in _MATMULS or func in _BADDBMM:
            operands = [a for a in (args[1:] if func is torch.einsum else args) if isinstance(a, torch.Tensor)]
            if func in _BADDBMM:
                operands = operands[1:3]
            if len(operands) >= 2 and all(_is_activation(a) for a in operands[:2]) and isinstance(out, torch.Tensor):
                self._logits[id(out)] = weakref.ref(out)
        elif isinstance(out, torch.Tensor) and args:
            # Scaling, masking and casting between q @ k^T and the softmax keep the logits' shape.
            if self._is_logits(args[0]) and out.shape == args[0].shape:
                self._logits[id(out)] = weakref.ref(out)
        if self._dispatch is not None and not self._marked():
            frame = sys._getframe(1)
            for _ in range(self._FRAMES):
                if frame is None:
                    break
                if frame.f_code is self._dispatch:
                    self._on_attention()
                    break
                frame = frame.f_back
        return out

    def _is_logits(self, value: Any) -> bool:
        ref = self._logits.get(id(value))
        return ref is not None and ref() is value


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _check_devices(model: nn.Module, args: tuple, kwargs: dict) -> None:
    on_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    inputs = _tensors(args) + _tensors(kwargs)
    if on_meta and any(not t.is_meta for t in inputs):
        raise ConfigError(
            "the model is on the meta device but some example inputs are not: build the example inputs "
            "on meta too (`with torch.device('meta'): ...`); the model is never moved for a trace"
        )


class CallRecorder:
    """Records the module calls made while it is open, and (with `attention=True`) where attention ran.

        with CallRecorder(model) as recorder:
            model(x)                # a real call: gradients, devices and hooks as the caller has them
        recorder.trace              # the CallTrace of what ran inside the `with`

    Opening adds a forward pre-hook and an always-called forward hook to every module of `model` (and
    the attention watch); closing removes them all, even when the call inside raised, so a closed
    recorder costs nothing. One recorder records one `with` block at a time.
    """

    def __init__(self, model: nn.Module, *, attention: bool = True) -> None:
        model = unwrap(model)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"CallRecorder needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.watches_attention = attention
        self._handles: list[Any] = []
        self._watch: _AttentionWatch | None = None
        self._calls: list[ModuleCall] = []
        self._stack: list[int] = []
        self._attention_calls: set[int] = set()
        self._trace: CallTrace | None = None

    @property
    def recording(self) -> bool:
        return bool(self._handles)

    @property
    def trace(self) -> CallTrace:
        """What ran while the recorder was open (available once it is closed)."""
        if self._trace is None:
            state = "still open" if self.recording else "never opened"
            raise ConfigError(f"the call recorder is {state}: read `trace` after its `with` block has closed")
        return self._trace

    def _on_attention(self) -> None:
        if self._stack:
            self._attention_calls.add(self._stack[-1])

    def _pre(self, path: str) -> Callable:
        calls, stack = self._calls, self._stack

        def hook(module: nn.Module, inputs: Any) -> None:
            calls.append(ModuleCall(len(calls), path, stack[-1] if stack else None))
            stack.append(len(calls) - 1)

        return hook

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> CallRecorder:
        if self.recording:
            raise ConfigError("this call recorder is already open; use one recorder per `with` block")
        self._calls, self._stack, self._attention_calls, self._trace = [], [], set(), None
        try:
            for path, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._pre(path)))
                self._handles.append(module.register_forward_hook(self._post, always_call=True))
            if self.watches_attention:
                stack, marked = self._stack, self._attention_calls
                self._watch = _AttentionWatch(self._on_attention, lambda: bool(stack) and stack[-1] in marked)
                self._watch.__enter__()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close(exc_type, exc, tb)
        attention: dict[str, int] = {}
        for index in sorted(self._attention_calls):
            path = self._calls[index].path
            attention[path] = attention.get(path, 0) + 1
        self._trace = CallTrace(type(self.model).__name__, tuple(self._calls), attention, self.watches_attention)

    def _close(self, *exc_info: Any) -> None:
        watch, self._watch = self._watch, None
        try:
            if watch is not None:
                watch.__exit__(*(exc_info or (None, None, None)))
        finally:
            handles, self._handles = self._handles, []
            for handle in handles:
                handle.remove()


def trace_calls(model: nn.Module, example_inputs: Any) -> CallTrace:
    """Run one forward of `model` on `example_inputs` (kwargs dict, args tuple, or one tensor) and record it.

    Runs under `no_grad`; every hook it adds is removed before it returns, even when the forward fails.
    """
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"trace_calls() needs a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    _check_devices(model, args, kwargs)
    recorder = CallRecorder(model)
    with torch.no_grad(), recorder:
        model(*args, **kwargs)
    return recorder.trace


def _under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")


def _called_containers(trace: CallTrace, path: str) -> list[str]:
    """The parents of the outermost modules under `path` that were called from outside it, in call order."""
    out: list[str] = []
    for c in trace.calls:
        if c.path == path or not _under(c.path, path):
            continue
        if c.parent is None or not _under(trace.calls[c.parent].path, path):
            container = c.path.rsplit(".", 1)[0]
            if container not in out:
                out.append(container)
    return out


def check_against_trace(
    model_map: ModelMap,
    trace: CallTrace,
    targets: Iterable[str] | None = None,
    *,
    ordered: Iterable[str] | None = None,
) -> list[str]:
    """Where `model_map` disagrees with what the traced forward did; an empty list when it agrees.

    Checked: every tower block ran, and its tower's blocks first ran in tower order; every attention
    module ran, attention was computed inside it, and it is not a whole block. `targets` (module paths
    that techniques hooked) limits the check to those; a target that is neither a block nor an
    attention module of the map is checked for having run. `ordered` (block paths) limits the order
    check to those blocks (None: every checked block). Pure: nothing is run or changed.
    """
    first = trace.first_calls
    blocks = {b.path: t for t in model_map.towers for b in t.blocks}
    attention = {a.path for a in model_map.attention}
    wanted = None if targets is None else set(targets)
    in_order = None if ordered is None else set(ordered)
    problems: list[str] = []

    def checked(path: str) -> bool:
        return wanted is None or path in wanted

    for tower in model_map.towers:
        last: tuple[int, str] | None = None
        for block in tower.blocks:
            if not checked(block.path):
                continue
            if block.path not in first:
                problems.append(
                    f"block {block.path!r} of tower {tower.name!r} never ran in the traced forward "
                    f"(a container, or a block the model does not call)"
                )
                continue
            if in_order is not None and block.path not in in_order:
                continue
            if last is not None and first[block.path] < last[0]:
                problems.append(
                    f"block {block.path!r} of tower {tower.name!r} ran outside its tower's order: "
                    f"it first ran before {last[1]!r}, which comes earlier in the tower"
                )
            else:
                last = (first[block.path], block.path)
    # Where attention ran is known only when the trace watched for it; a trace of module calls alone
    # (the first-call check's) checks that each attention module ran. A watched forward in which no
    # attention was seen at all computes it with a kernel the watch does not know (flash-attn's or
    # SageAttention's functions called directly): then where it ran is unknown, not wrong.
    judge_content = trace.watched_attention and bool(trace.attention) and "attention" not in model_map.overrides
    for path in sorted(attention):
        if not checked(path):
            continue
        if path not in first:
            problems.append(f"attention module {path!r} never ran in the traced forward")
        elif judge_content and not any(_under(a, path) for a in trace.attention):
            problems.append(f"attention module {path!r} ran, but no attention was computed inside it")
        elif judge_content and any(_under(b, path) for b in blocks):
            problems.append(
                f"attention module {path!r} is a whole block (it holds the block's norms, MLP and residuals); "
                f"reusing or skipping its output would drop the residual stream"
            )
    for path in sorted(wanted or ()):
        if path not in blocks and path not in attention and path not in first:
            problems.append(f"hooked module {path!r} never ran in the traced forward")
    if problems:
        whole = {p for p in trace.attention if any(_under(b, p) for b in blocks)}
        ran_attention = [p for p in trace.attention if p and p not in whole]
        ran_towers = [t.container or t.name for t in model_map.towers if any(b.path in first for b in t.blocks)]
        for tower in model_map.towers:
            for block in tower.blocks:
                if block.path not in first:  # a container: the blocks are what it holds and the model called
                    ran_towers += [c for c in _called_containers(trace, block.path) if c not in ran_towers]
        seen = f"towers={ran_towers!r}"
        if trace.watched_attention:
            seen += f", attention={ran_attention!r}"
        problems.append(
            "state the map with hookwise.describe(model, towers=[...], attention=[...]) "
            f"(from this trace: {seen}), "
            "or map it from a traced forward with describe(model, example_inputs=...)"
        )
    return problems
