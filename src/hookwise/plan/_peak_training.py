"""What a LoRA training step adds to a model for the length of one run, and takes away after.

LoRA follows peft's layout: on each target Linear, `lora_B(lora_A(x))` scaled and added to the base
output, the input cast to the adapters' dtype (float32 for fp16 / bf16 models, peft's default
`autocast_adapter_dtype`), the sum cast back. Gradient checkpointing wraps each tower block in
non-reentrant `torch.utils.checkpoint`, as diffusers' `enable_gradient_checkpointing` does. Both are
attached as removable hooks, and `attached` removes them however the run ends.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.hooks import ModelHook, add_hook, remove_hook
from ..introspect import describe

CHECKPOINT_HOOK = "plan_peak_checkpoint"
_HALF = (torch.float16, torch.bfloat16)


def lora_targets(model: nn.Module) -> list[str]:
    """Paths of the Linears inside the model's attention modules (what peft targets for a DiT LoRA)."""
    model_map = describe(model)
    paths: list[str] = []
    modules = dict(model.named_modules())
    for role in model_map.attention:
        for name, module in modules[role.path].named_modules():
            if isinstance(module, nn.Linear):
                paths.append(f"{role.path}.{name}" if name else role.path)
    return sorted(set(paths), key=paths.index)


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Paths of the main towers' blocks, each one checkpointed as a unit."""
    return [b.path for t in describe(model).main_towers for b in t.blocks]


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if weight_dtype in _HALF else weight_dtype


def make_lora(linear: nn.Linear, rank: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trainable (A, B) of a rank-`rank` adapter for `linear` (created under the active tensor mode)."""
    dtype = adapter_dtype(weight.dtype)
    a = torch.zeros(rank, linear.in_features, dtype=dtype, device=weight.device, requires_grad=True)
    b = torch.zeros(linear.out_features, rank, dtype=dtype, device=weight.device, requires_grad=True)
    return a, b


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a.dtype)
        result = output + F.linear(F.linear(x, a), b) * scaling
        return result.to(output.dtype)

    return hook


class _Checkpointed(ModelHook):
    """Runs the module's forward under non-reentrant activation checkpointing."""

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return next_fn(*args, **kwargs)
        return checkpoint(next_fn, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def attached(
    model: nn.Module,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    checkpointed: list[str],
    scaling: float = 1.0,
) -> Iterator[None]:
    """LoRA adapters on the named Linears and checkpointing on the named blocks, for the block's length."""
    modules = dict(model.named_modules())
    handles = []
    hooked: list[nn.Module] = []
    try:
        for path, (a, b) in adapters.items():
            handles.append(modules[path].register_forward_hook(_lora_hook(a, b, scaling)))
        for path in checkpointed:
            add_hook(modules[path], _Checkpointed(), CHECKPOINT_HOOK)
            hooked.append(modules[path])
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in hooked:
            remove_hook(module, CHECKPOINT_HOOK)
