"""A quantized leaf's computation when something else sits inside its hook.

The hooks of `Quantize` and `GGUFFile` replace a leaf's own forward: its stored weight (int8 data,
4-bit codes, GGUF blocks) is not a weight `F.linear` can take. When the next link of the chain is not
the leaf's class forward (an observer hook of a lower layer, `Layer.PROBE`, or a forward set on the
instance, a kohya-style LoRA calling the original forward from inside its own), that link must still
run; the layer's own computation then happens somewhere inside it, out of the hook's reach. Only the
function call that receives the stored weight identifies it, so that call is computed by the hook
(`LeafCompute`, a `TorchFunctionMode` active while the inner link runs) and every other call runs as is.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import HookError

LAYER_FUNCS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


def is_class_forward(module: nn.Module, fn: Any) -> bool:
    """Whether `fn` is the module's class forward bound to it (no instance forward, no hook inside)."""
    return getattr(fn, "__func__", None) is type(module).forward and getattr(fn, "__self__", None) is module


class LeafCompute(TorchFunctionMode):
    """While an inner link runs: `compute(func, args, kwargs)` takes the layer's own op on its stored weight."""

    def __init__(self, module: nn.Module, compute: Callable[[Any, tuple, dict], Any]) -> None:
        super().__init__()
        self.module, self.compute, self.hits = module, compute, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LAYER_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and weight is self.module._parameters.get("weight"):
                self.hits += 1
                return self.compute(func, args, kwargs)
        return func(*args, **kwargs)


def run_inner(
    module: nn.Module, next_fn: Callable[..., Any], args: tuple, kwargs: dict,
    compute: Callable[[Any, tuple, dict], Any], what: str, where: str,
) -> Any:  # fmt: skip
    """Run the inner link `next_fn`, computing the layer's own op on its stored weight with `compute`.

    `what` names the stored weight ("int8 data", "GGUF blocks") and `where` the leaf, for the error
    raised when the inner link never computes the layer's op (its weight would never be used).
    """
    with LeafCompute(module, compute) as mode:
        out = next_fn(*args, **kwargs)
    if not mode.hits:
        raise HookError(
            f"{where} holds {what}, but the forward inside its hook ({getattr(next_fn, '__qualname__', next_fn)!r}) "
            f"never computes the layer's own operation on its weight, so the stored weight cannot be used for it; "
            f"add adapters with PEFT (they call the layer), or keep this leaf unquantized"
        )
    return out
