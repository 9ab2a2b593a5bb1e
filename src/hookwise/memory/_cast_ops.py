"""How a cast leaf computes: autograd functions that dequantize the stored weight on the fly (saving
only the stored weight and its scale for backward), and the torch-function mode that finds a leaf's
own F.linear / F.conv* call where an instance forward (a LoRA wrapper) makes it, out of a hook's reach."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._dequant import dequant_linear_backward

CONV_FUNCS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
CONV_INPUT_GRAD = {
    nn.Conv1d: torch.nn.grad.conv1d_input,
    nn.Conv2d: torch.nn.grad.conv2d_input,
    nn.Conv3d: torch.nn.grad.conv3d_input,
}


class CastLinearFn(torch.autograd.Function):
    """y = x @ dequant(W).T + b, saving only the stored weight and its scale for backward."""

    @staticmethod
    def forward(ctx, x, storage, scale, bias, compute_dtype, layout, dequant):
        weight = dequant(storage, scale, compute_dtype, layout)
        ctx.layout, ctx.x_dtype, ctx.dequant = layout, x.dtype, dequant
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(storage, scale)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_bias = dequant_linear_backward(ctx, grad_out)
        return grad_x, None, None, grad_bias, None, None, None


class CastConvFn(torch.autograd.Function):
    """A convolution with a stored weight, saving only the stored weight and its scale for backward."""

    @staticmethod
    def forward(ctx, x, storage, scale, bias, compute_dtype, layout, dequant, kind, stride, padding, dilation, groups):
        weight = dequant(storage, scale, compute_dtype, layout)
        ctx.layout, ctx.x_dtype, ctx.x_shape, ctx.dequant = layout, x.dtype, x.shape, dequant
        ctx.conv = (kind, stride, padding, dilation, groups)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(storage, scale)
        return CONV_FUNCS[kind](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        kind, stride, padding, dilation, groups = ctx.conv
        if ctx.needs_input_grad[0]:
            storage, scale = ctx.saved_tensors
            weight = ctx.dequant(storage, scale, grad_out.dtype, ctx.layout)
            grad_x = CONV_INPUT_GRAD[kind](ctx.x_shape, weight, grad_out, stride, padding, dilation, groups)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
        return grad_x, None, None, grad_bias, None, None, None, None, None, None, None, None


def is_class_forward(module: nn.Module, fn: Any) -> bool:
    """Whether `fn` is the module's class forward bound to it (no instance forward, no hook inside)."""
    return getattr(fn, "__func__", None) is type(module).forward and getattr(fn, "__self__", None) is module


def leaf_func(module: nn.Module) -> Any:
    """The functional op a castable leaf's own forward computes with: F.linear or F.conv1d/2d/3d."""
    if isinstance(module, nn.Linear):
        return F.linear
    return next(f for k, f in CONV_FUNCS.items() if isinstance(module, k))


class CastCompute(TorchFunctionMode):
    """While a cast leaf's instance forward runs: its own F.linear / F.conv* on its weight is cast.

    The layer's original computation happens wherever that forward calls it (a LoRA module calls
    its `org_forward`, the class forward bound to the layer), out of a hook's reach; only the
    function call that receives the stored weight identifies it.
    """

    def __init__(self, hook: Any, module: nn.Module) -> None:  # casting.CastHook
        super().__init__()
        self.hook = hook
        self.module = module
        self.func = leaf_func(module)
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.func:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and weight is self.module._parameters.get("weight"):
                self.hits += 1
                x = args[0] if args else kwargs["input"]
                padding = None
                if func is not F.linear:
                    padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
                return self.hook.compute(self.module, x, padding)
        return func(*args, **kwargs)
