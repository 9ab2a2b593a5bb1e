"""A streamed group's runtime state, and the device slots its tensors are bound into.

Binding points each of a group's parameters and buffers (`tensor.data`) at a view into device
memory holding the group's values (a slot, or device copies held resident); unbinding points them
back at their host masters, writing back first any value changed while bound (its version counter
moved, or its `.data` was replaced), and moves a trainable tensor's gradient to its master's
device. These are the group's own, not the scheduler's (`_schedule.py`, which decides which group
sits in which slot and when), so component offloading binds whole models the same way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import HookError
from ._groups import Group, TensorRef
from ._transfer import HostSource, TransferEngine


def address(t: torch.Tensor) -> Any:
    """What identifies the memory `t` starts at: its data pointer. A fake tensor (the planner's fake
    run) has no memory and every one's pointer starts at 0: its storage's identity and offset then."""
    if isinstance(t, FakeTensor):
        return (t.untyped_storage()._cdata, t.storage_offset() * t.element_size())
    return t.data_ptr()


def storage_key(t: torch.Tensor) -> Any:
    """What identifies `t`'s storage: its data pointer, or for a fake tensor the storage's identity."""
    if isinstance(t, FakeTensor):
        return t.untyped_storage()._cdata
    return t.untyped_storage().data_ptr()


class Slot:
    __slots__ = ("index", "flat", "group", "marker", "ptr", "_typed")

    def __init__(self, index: int, flat: torch.Tensor) -> None:
        self.index = index
        self.flat = flat
        self.group: GroupState | None = None
        self.marker: Any = None  # passes when compute that read the previous group has finished
        self.ptr = storage_key(flat)
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def typed(self, dtype: torch.dtype) -> torch.Tensor:
        view = self._typed.get(dtype)
        if view is None:
            with torch.inference_mode(False):
                view = self._typed[dtype] = self.flat.view(dtype)
        return view


class GroupState:
    """Runtime state of one streamed group."""

    def __init__(self, group: Group, source: HostSource) -> None:
        self.group = group
        self.source = source
        self.masters = [ref.view_in(source.flat) for ref in group.tensors]
        self.slot: Slot | None = None
        self.ticket: Any = None
        self.bound = False
        self.views: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.versions: list[int] = []  # at bind: a change while bound is written back at unbind
        self.loaded_versions: list[int] = []  # of the values now in the slot: a change while unbound reloads
        self.homes: list[torch.Tensor] = list(self.masters)  # what each tensor holds while unbound
        self.in_use = 0
        self.last_use = 0
        self.prefetched = False
        self.direct = False  # computed on in place (a mapped file on the CPU): no slot, no copy
        self.held = False  # resident for a while (`Scheduler.hold`): bound to device copies, never streamed
        self.hot = False  # a direct group whose pages were read since they were last released
        self.trainable = any(ref.kind == "param" and ref.tensor.requires_grad for ref in group.tensors)
        self.grad_stash: dict[int, torch.Tensor] = {}
        self._views_by_slot: dict[int, list[torch.Tensor]] = {}

    @property
    def name(self) -> str:
        return self.group.name

    def views_in(self, slot: Slot) -> list[torch.Tensor]:
        views = self._views_by_slot.get(slot.index)
        if views is None:
            # Views made under inference_mode would be inference tensors, unusable for training later.
            with torch.inference_mode(False):
                views = [ref.view_in(slot.flat) for ref in self.group.tensors]
            self._views_by_slot[slot.index] = views
        return views

    def current_versions(self) -> list[int]:
        """The version counter of each of the group's tensors now."""
        return [ref.tensor._version for ref in self.group.tensors]

    def bind(
        self, views: list[torch.Tensor], on_replaced: Callable[[TensorRef], None] | None = None, *, grads: bool = True
    ) -> None:
        """Point each tensor at its view in `views` (device memory holding the group's values).

        A tensor the model replaced since the group was built is left alone and passed to
        `on_replaced`. With `grads`, a trainable tensor's gradient on another device is set aside
        (gradients accumulate on the device while bound) and added back by `settle_grad`.
        """
        for i, (ref, view) in enumerate(zip(self.group.tensors, views)):
            t = ref.tensor
            if ref.current() is not t:
                if on_replaced is not None:
                    on_replaced(ref)
                continue
            if grads and self.trainable and t.grad is not None and t.grad.device != view.device:
                self.grad_stash[i] = t.grad
                t.grad = None
            t.data = view
        self.views = views
        self.ptrs = [address(v) for v in views]
        self.versions = self.current_versions()
        self.bound = True

    def unbind(self, engine: TransferEngine, *, settle_grads: bool) -> int:
        """Point each tensor back at its home, writing changed values to the host master first.

        With `settle_grads`, a trainable tensor's gradient moves to its master's device. Returns how
        many tensors were written back.
        """
        writes = 0
        for i, (ref, master) in enumerate(zip(self.group.tensors, self.masters)):
            t = ref.tensor
            if ref.current() is not t:
                continue
            data = t.data
            if t._version != self.versions[i] or address(data) != self.ptrs[i]:
                self.write_back(engine, ref, data, master)
                writes += 1
            t.data = self.homes[i]
            if settle_grads and self.trainable:
                self.settle_grad(i)
        self.loaded_versions = self.current_versions()
        self.bound = False
        return writes

    def write_back(self, engine: TransferEngine, ref: TensorRef, data: torch.Tensor, master: torch.Tensor) -> None:
        """Copy `data`, the current values of `ref`, into its host `master`."""
        if data.shape != master.shape or data.dtype != master.dtype:
            raise HookError(
                f"{ref.path} was given data of shape {tuple(data.shape)} / {data.dtype} while offloaded "
                f"(it was {tuple(master.shape)} / {master.dtype}); remove offloading before changing shapes or dtypes"
            )
        engine.copy_back(data, master)
        self.source.mark_written()

    def settle_grad(self, i: int) -> None:
        """Give tensor `i` one gradient on its master's device: its own plus any set aside at bind."""
        t = self.group.tensors[i].tensor
        master = self.masters[i]
        grad = t.grad
        stash = self.grad_stash.pop(i, None)
        if grad is not None and grad.device != master.device:
            t.grad = None
            grad = grad.to(master.device)
        if stash is not None:
            grad = stash if grad is None else stash.add_(grad)
        if grad is not None and t.grad is not grad:
            t.grad = grad

    def __repr__(self) -> str:
        where = f"slot {self.slot.index}" if self.slot else "host"
        return f"<{self.name}: {where}{', bound' if self.bound else ''}>"
