"""Measured peaks of one real call: CUDA allocator statistics, or live storages on the CPU.

On the CPU there are no allocator statistics, so a dispatch mode counts the bytes of every storage
an operation creates while it stays alive (each storage once, however many views share it), and
keeps the peak. It sees what the call allocates, not the weights that were there before it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorages(TorchDispatchMode):
    """Bytes of the storages created inside the mode and still referenced, and their peak."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, list[int]] = {}  # data pointer -> [bytes, live tensors]
        self.now = 0
        self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.now -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self.live.get(ptr)
            if entry is None:
                entry = self.live[ptr] = [storage.nbytes(), 0]
                self.now += entry[0]
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


def measure_call(fn: Callable[[], Any], device: str) -> tuple[Any, int, str]:
    """(result, peak bytes, how): on CUDA the allocator's peak over the call (everything resident
    included); elsewhere the peak of what the call itself allocated."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, int(torch.cuda.max_memory_allocated()), "cuda allocator"
    tracker = _LiveStorages(device)
    with tracker:
        out = fn()
    return out, tracker.peak, "live storages"
