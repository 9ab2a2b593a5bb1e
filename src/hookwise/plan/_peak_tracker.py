"""Live bytes per device over a computation, from the storages its operations create.

A dispatch mode sees every operation's outputs (forward, backward and recomputation alike, real or
fake tensors). Each storage not seen before adds its bytes to its device's live total, and a weak
reference on the storage takes them off when the storage dies; a view shares its base's storage, so
it adds nothing. Storages that existed before (weights, inputs) are registered up front, counted or
not. The peak is the largest live total seen after any operation; bytes an operation allocates and
frees inside its own kernel (workspaces) are not visible at this level.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CUDA_BLOCK = 512  # the CUDA caching allocator's smallest block and rounding unit, in bytes


def rounded(nbytes: int, block: int) -> int:
    """`nbytes` rounded up to a whole number of allocator blocks (`block` <= 1: exact)."""
    if block <= 1 or nbytes == 0:
        return nbytes
    return -(-nbytes // block) * block


class StorageTracker(TorchDispatchMode):
    """Tracks the live bytes of every storage created while it is active; see the module docstring."""

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        # id(storage) -> (weak reference, device, bytes counted); the id is only trusted while the
        # weak reference still points at the same storage object.
        self._known: dict[int, tuple[weakref.ref, str, int]] = {}

    # ---- what existed before -------------------------------------------------------------------
    def register(self, tensor: torch.Tensor, count: bool = True) -> int:
        """Know `tensor`'s storage from now on; `count` adds its bytes to the live total. Returns them."""
        return self._see(tensor, count)

    def reserve(self, device: str, nbytes: int) -> None:
        """Add `nbytes` held on `device` for the whole run by something not run (a modelled buffer)."""
        self._add(device, nbytes)

    def move(self, tensor: torch.Tensor, device: str) -> int:
        """Count `tensor`'s (known) storage on `device` from now on (a host copy on a shared memory);
        returns the bytes moved, 0 if it was there already or is not known."""
        storage = tensor.untyped_storage()
        entry = self._known.get(id(storage))
        if entry is None or entry[0]() is not storage or entry[1] == device:
            return 0
        ref, old, size = entry
        self.live[old] -= size
        self._known[id(storage)] = (ref, device, size)
        self._add(device, size)
        return size

    # ---- reading -------------------------------------------------------------------------------
    def live_bytes(self, device: str) -> int:
        return self.live.get(device, 0)

    def peak_bytes(self, device: str) -> int:
        return self.peak.get(device, 0)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        for device in list(self.peak):
            self.peak[device] = self.live.get(device, 0)

    # ---- tracking ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, True)
        return out

    def _see(self, tensor: torch.Tensor, count: bool) -> int:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return 0  # a tensor without a storage (sparse, nested, a subclass's wrapper)
        key = id(storage)
        entry = self._known.get(key)
        if entry is not None and entry[0]() is storage:
            ref, device, counted = entry
            size = rounded(storage.nbytes(), self.block) if counted else 0
            if size != counted:  # resized in place (an `out=` operation)
                self._add(device, size - counted)
                self._known[key] = (ref, device, size)
            return size
        device = _device_name(tensor.device)
        size = rounded(storage.nbytes(), self.block) if count else 0
        ref = weakref.ref(storage, self._forget(key))
        self._known[key] = (ref, device, size)
        self._add(device, size)
        return size

    def _forget(self, key: int):
        def callback(ref: weakref.ref) -> None:
            entry = self._known.get(key)
            if entry is not None and entry[0] is ref:
                del self._known[key]
                self.live[entry[1]] -= entry[2]

        return callback

    def _add(self, device: str, nbytes: int) -> None:
        live = self.live[device] + nbytes
        self.live[device] = live
        if live > self.peak[device]:
            self.peak[device] = live


def _device_name(device: torch.device) -> str:
    return device.type if device.index is None else f"{device.type}:{device.index}"


def storage_bytes(tensors: Any, block: int = 1) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once), rounded."""
    seen: dict[int, Any] = {}  # holding the storages keeps their ids unique while counting
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen[id(storage)] = storage
            total += rounded(storage.nbytes(), block)
    return total
