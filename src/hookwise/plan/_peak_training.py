"""What a LoRA training step adds to a model for the length of one run, and takes away after.

LoRA follows peft's layout: on each target Linear, `lora_B(lora_A(x))` scaled and added to the base
output, the input cast to the adapters' dtype (float32 for fp16 / bf16 models, peft's default
`autocast_adapter_dtype`), the sum cast back. It is attached as removable forward hooks, and
`attached` removes them however the run ends. Gradient checkpointing is the project's own
`Checkpointing` technique, applied with the rest of the stack (`_peak_stack`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..introspect import describe

_HALF = (torch.float16, torch.bfloat16)
ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq, float32, per trainable parameter


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


@contextlib.contextmanager
def attached(
    model: nn.Module,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float = 1.0,
) -> Iterator[None]:
    """LoRA adapters on the named Linears, for the block's length."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for path, (a, b) in adapters.items():
            handles.append(modules[path].register_forward_hook(_lora_hook(a, b, scaling)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def adam_state_bytes(model: nn.Module, rank: int) -> int:
    """Bytes of AdamW's state for rank-`rank` LoRA adapters on `model`'s attention Linears."""
    modules = dict(model.named_modules())
    params = sum(rank * (modules[p].in_features + modules[p].out_features) for p in lora_targets(model))
    return ADAM_MOMENTS * 4 * params
