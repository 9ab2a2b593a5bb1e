"""Memory meters: bytes held by a model per device and dtype, and bytes autograd saves for backward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class SavedForBackward:
    """What autograd kept for backward during one call.

    `new_bytes` counts tensors that are not parameters or buffers of the model (activations, and any
    weight copies made in forward); `resident_bytes` counts saved tensors that are the model's own
    parameters or buffers, which exist anyway. Storages are counted once.
    """

    new_bytes: int = 0
    resident_bytes: int = 0
    tensors: int = 0
    new_by_dtype: dict[str, int] = field(default_factory=dict)
    new_shapes: list[tuple[tuple[int, ...], str]] = field(default_factory=list)

    def has_new_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether a new (non-parameter) tensor of this shape and dtype was saved."""
        name = str(dtype).removeprefix("torch.")
        return any(s == tuple(shape) and d == name for s, d in self.new_shapes)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


def saved_for_backward(model: nn.Module, step: Callable[[], Any]) -> SavedForBackward:
    """Run `step()` (a forward returning a loss, or a forward and backward) and meter what autograd saves."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"]
    resident = {_storage_key(t) for t in tensors}
    # Hold the starting storages for the whole measurement: a technique that swaps parameter data
    # during forward (diffusers' casting) would otherwise free them, and a saved activation could
    # land at a recorded address and be miscounted as resident.
    held = [t.untyped_storage() for t in tensors]
    seen: set[tuple[str, int]] = set()
    result = SavedForBackward()

    def pack(t: torch.Tensor) -> torch.Tensor:
        result.tensors += 1
        key = _storage_key(t)
        if key in seen:
            return t
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        if key in resident:
            result.resident_bytes += nbytes
        else:
            result.new_bytes += nbytes
            name = str(t.dtype).removeprefix("torch.")
            result.new_by_dtype[name] = result.new_by_dtype.get(name, 0) + nbytes
            result.new_shapes.append((tuple(t.shape), name))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward()
    del held
    return result


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers by "device/dtype", shared tensors counted once."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = f"{t.device.type}/{str(t.dtype).removeprefix('torch.')}"
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out
