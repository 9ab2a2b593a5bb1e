"""Offloading: weights live on the host (or on disk) and stream to the device as the model needs them.

    hookwise.apply(transformer, Offload(onload_device="cuda", vram_budget="50%"))

Groups come from the model map (`_groups.py`): tower blocks at block granularity, Linear / Conv /
Embedding leaves at leaf granularity, and everything outside them in groups of its own. With a
VRAM budget as many groups as fit stay resident for good and the rest stream, spread evenly
(`_budget.py`). Streamed groups move through a few device slots, prefetched along the execution
order recorded by the first forward, forward and backward (`_schedule.py`), by an engine that
uses a copy stream, flat pinned buffers and events on CUDA and synchronous copies elsewhere
(`_transfer.py`). With `offload_device="disk"` each group is one safetensors file named by its
content (`_disk.py`); when the CPU computes, its parameters are views of the mapped files, read
ahead by the OS when prefetched and released after use (no slots, no copies).

A larger budget can be taken in place (`switch_residency`, for validation during training): the
streamed groups it has room for are held resident, bound to device copies of the host copies,
pinned buffers or mapped files already there, until the applied config is switched back; nothing is
written, hashed or pinned again.

Trainable parameters (LoRA adapters, or everything in a full fine-tune) stay resident unless
`offload_trainable=True`. Tensors held directly by modules that contain other groups (e.g. a
`scale_shift_table` on the root) stay resident too: they are read during the whole forward. Both
count against the budget. `model.to(...)` on an offloaded model warns and changes nothing;
`remove_offload` puts every weight back on one device with its current values.

Saving and copying: `state_dict()` gives each streamed tensor as a plain copy of its current
values in a storage of its own, on the host (not a view into a group buffer, a slot or a mapped
file), so it saves its own bytes and loads into the plain model. `torch.save(model)`, pickling and
`copy.deepcopy` of an offloaded model raise `CompatibilityError` (its weights live in shared
buffers, slots and mapped files): save the state dict, or remove offloading first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import HookRegistry, Layer, ModelHook, TechniqueConfig, add_hook, current_transaction, register_technique
from ..core import apply_techniques, ledger_of, remove_hooks, remove_techniques, transaction, unwrap
from ..core.overrides import override_method, restore_method
from ..errors import CompatibilityError, ConfigError
from ..introspect import ModelMap, describe
from ._placement import COMPONENT_HOOK, OFFLOAD_ROOT_HOOK, home_device, parse_device, pin_allowance, to_device
from ._budget import BudgetError, Residency, check_budget_value, choose_residency, fmt_bytes, minimum_bytes, parse_budget
from ._budget import widen_residency
from ._disk import DiskFile, check_writable, default_dir, store
from ._groups import Group, Partition, TensorRef, partition
from ._schedule import GroupState, Scheduler
from ._transfer import HostSource, TransferEngine, make_engine

logger = logging.getLogger("hookwise.memory.offload")

GROUP_HOOK = "hookwise.offload"
OWNER = "hookwise.offload"


@dataclasses.dataclass(frozen=True)
class Offload(TechniqueConfig):
    """Stream weights from host memory or disk to the device, under an optional VRAM budget.

    - `onload_device`: where the model computes ("cuda", "cuda:1", "cpu").
    - `offload_device`: where streamed weights live: "cpu" (RAM) or "disk" (safetensors files).
    - `vram_budget`: None (stream every group), bytes, a share of the device ("80%") or a size
      ("12GiB"). Counts resident groups, tensors that must stay resident and the prefetch slots.
    - `granularity`: "block" (tower blocks), "leaf" (Linear / Conv / Embedding) or "auto"
      (blocks when they fit the budget, else leaves).
    - `prefetch`: True (one group ahead), False (load on demand), or how many groups ahead.
    - `pin`: "auto" (pin what fits under a share of RAM, stage the rest), "all", "none". CUDA only.
    - `disk_path`: folder for `offload_device="disk"` (default: ~/.cache/hookwise/offload).
    - `blocks_per_group`: consecutive tower blocks moved together at block granularity.
    - `offload_trainable`: stream trainable parameters too; their gradients move to the host with
      them. False keeps them resident (LoRA adapters). None (default): resident when the user
      froze some parameters (LoRA training), streamed when the user froze none (inference models
      as loaded, full fine-tune). Weights casting stored in fp8 were frozen by casting, not by
      the user, and count with the flag they had.
    - `use_streams`: None (streams on CUDA), True (require them), False (synchronous copies).
    """

    onload_device: str = "cuda"
    offload_device: str = "cpu"
    vram_budget: int | str | None = None
    granularity: str = "auto"
    prefetch: bool | int = True
    pin: str = "auto"
    disk_path: str | None = None
    blocks_per_group: int = 1
    offload_trainable: bool | None = None
    use_streams: bool | None = None

    def validate(self) -> None:
        onload = parse_device(self.onload_device, "onload_device")
        if self.offload_device not in ("cpu", "disk"):
            raise ConfigError(f"offload_device={self.offload_device!r}: use 'cpu' (host RAM) or 'disk'")
        check_budget_value(self.vram_budget)
        if self.granularity not in ("block", "leaf", "auto"):
            raise ConfigError(f"granularity={self.granularity!r}: use 'block', 'leaf' or 'auto'")
        if not isinstance(self.prefetch, (bool, int)) or (not isinstance(self.prefetch, bool) and self.prefetch < 0):
            raise ConfigError(f"prefetch={self.prefetch!r}: use True, False, or how many groups to fetch ahead (>= 0)")
        if self.pin not in ("auto", "all", "none"):
            raise ConfigError(f"pin={self.pin!r}: use 'auto', 'all' or 'none'")
        if self.pin == "all" and onload.type != "cuda":
            raise ConfigError(f"pin='all' needs a CUDA onload device (got {self.onload_device!r}); use pin='auto' or 'none'")
        if self.disk_path is not None and self.offload_device != "disk":
            raise ConfigError("disk_path is only used with offload_device='disk'; drop it or set offload_device='disk'")
        if not isinstance(self.blocks_per_group, int) or isinstance(self.blocks_per_group, bool) or self.blocks_per_group < 1:
            raise ConfigError(f"blocks_per_group={self.blocks_per_group!r} must be an integer >= 1")
        if self.use_streams and onload.type != "cuda":
            raise ConfigError(
                f"use_streams=True but onload_device={self.onload_device!r} has no streams; use a CUDA device or "
                f"use_streams=None (synchronous copies with the same schedule)"
            )

    @property
    def depth(self) -> int:
        """How many groups are fetched ahead."""
        if isinstance(self.prefetch, bool):
            return 1 if self.prefetch else 0
        return int(self.prefetch)


def _resolve_onload(config: Offload) -> torch.device:
    device = parse_device(config.onload_device, "onload_device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"onload_device={config.onload_device!r} but CUDA is not available in this process; run where a "
                f"GPU is visible, or pass onload_device='cpu' to run the same schedule on the CPU"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


# ---- reports ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupReport:
    name: str
    kind: str  # "block" | "leaf" | "rest"
    modules: tuple[str, ...]
    nbytes: int
    resident: bool
    storage: str  # "device" (resident), "pinned", "pageable", "disk"
    file: str | None = None
    file_reused: bool | None = None  # the file already held these bytes (None: no file)


@dataclasses.dataclass(frozen=True)
class OffloadReport:
    """What offloading did to a model: groups, where they live, bytes per place, counters."""

    granularity: str
    onload_device: str
    offload_device: str
    budget: int | None
    groups: tuple[GroupReport, ...]
    always_resident: dict[str, str]  # tensor path -> why it stays on the device
    slots: int
    slot_bytes: int
    device_bytes: int  # weight bytes on the onload device: resident tensors + slots (measured)
    planned_device_bytes: int  # the same as the budget planned it (groups padded to their layout)
    host_bytes: int  # streamed masters in RAM (disk: 0)
    pinned_host_bytes: int
    disk_bytes: int
    order: tuple[str, ...]  # recorded forward order of streamed groups
    backward_order: tuple[str, ...]
    bound: tuple[str, ...]  # streamed groups whose tensors are their device copies now
    stats: dict[str, int]

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if g.resident)

    @property
    def streamed(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if not g.resident)

    def summary(self) -> str:
        return (
            f"offload ({self.granularity}, {self.onload_device} <- {self.offload_device}): "
            f"{len(self.resident)} resident / {len(self.streamed)} streamed groups, "
            f"device {fmt_bytes(self.device_bytes)}"
            + (f" of budget {fmt_bytes(self.budget)}" if self.budget else "")
            + f", {self.slots} slot(s) of {fmt_bytes(self.slot_bytes)}, host {fmt_bytes(self.host_bytes)}"
            f" ({fmt_bytes(self.pinned_host_bytes)} pinned), disk {fmt_bytes(self.disk_bytes)}"
        )


@dataclasses.dataclass(frozen=True)
class ResidencySwitch:
    """What one change of residency in place did (`switch_residency`)."""

    held: tuple[str, ...]  # streamed groups that became resident
    released: tuple[str, ...]  # held groups that stream again
    bytes_copied: int  # into device copies of held groups (0 where the host copy is on the device)
    writebacks: int  # tensors a held group changed, copied into their host masters on release


# ---- the controller -------------------------------------------------------------------------------
class _Offloader:
    """Everything one application of `Offload` created; the hooks point at it."""

    def __init__(self, model: nn.Module, config: Offload) -> None:
        self.model = model
        self.config = config
        self.built_config = config  # `config` changes with the residency (`switch`); this one never
        self.onload = _resolve_onload(config)
        self.streams = config.use_streams if config.use_streams is not None else self.onload.type == "cuda"
        self.home = home_device(model)
        self.model_map: ModelMap = describe(model)
        self.budget = parse_budget(config.vram_budget, self.onload)
        # On the CPU, disk-backed groups are computed on in place (mapped files): no slots needed.
        self.direct = config.offload_device == "disk" and self.onload.type == "cpu" and not self.streams
        self.slots = 0 if self.direct else config.depth + 1
        self.part, self.residency = _choose(model, self.model_map, config, self.budget, self.slots)
        self.disk_dir: Path | None = None
        if config.offload_device == "disk":
            self.disk_dir = check_writable(Path(config.disk_path) if config.disk_path else default_dir())
        self.engine: TransferEngine = make_engine(self.onload, streams=self.streams)
        self.resident: list[TensorRef] = []
        self.states: list[GroupState] = []
        self.files: dict[int, DiskFile] = {}
        self.scheduler: Scheduler | None = None
        self.state_dict_hooks: list[Any] = []

    def __deepcopy__(self, memo: dict) -> Any:
        raise _not_copyable()

    # ---- building -----------------------------------------------------------------------------------
    def build(self) -> None:
        txn = current_transaction()
        txn.on_rollback(self.engine.close, "offload engine")
        groups = self.part.groups
        resident_groups = [g for g in groups if g.index in self.residency.resident]
        for ref in self.part.pinned + [ref for g in resident_groups for ref in g.tensors]:
            self._make_resident(ref)
        streamed = [g for g in groups if g.index not in self.residency.resident]
        pin_left = self._pin_allowance(streamed)
        for group in streamed:
            if self.disk_dir is not None:
                source = self._to_disk(group)
            else:
                pin = pin_left >= group.nbytes
                flat, pinned = self.engine.alloc_host(group.nbytes, pin)
                if pinned:
                    pin_left -= group.nbytes
                _fill(flat, group)
                source = HostSource(flat, "pinned" if pinned else "pageable")
            state = GroupState(group, source)
            for ref, master in zip(group.tensors, state.masters):
                _point(ref, master, txn)
            self.states.append(state)
        self.scheduler = Scheduler(
            self.states, self.engine, slots=self.slots, slot_bytes=self.residency.slot_bytes, depth=self.config.depth
        )
        add_hook(self.model, _RootHook(self), OFFLOAD_ROOT_HOOK)
        for state in self.states:
            for _, module in state.group.modules:
                add_hook(module, _GroupHook(self.scheduler, state, module), GROUP_HOOK)
        override_method(self.model, "_apply", _ignore_apply, owner=OWNER)
        # Found by attribute lookup (pickle and deepcopy both ask the instance): refuse before writing.
        override_method(self.model, "__getstate__", _refuse_pickle, owner=OWNER)
        self._hook_state_dict(txn)
        logger.info("hookwise %s", self.report().summary())

    def _make_resident(self, ref: TensorRef) -> None:
        t = ref.tensor
        old_device = t.device
        if old_device != self.onload:
            t.data = t.data.to(self.onload)
            if t.grad is not None:
                t.grad = t.grad.to(self.onload)

            def undo(t=t, device=old_device) -> None:
                t.data = t.data.to(device)
                if t.grad is not None:
                    t.grad = t.grad.to(device)

            current_transaction().on_rollback(undo, f"move {ref.path}")
        self.resident.append(ref)

    def _hook_state_dict(self, txn: Any) -> None:
        """Make `state_dict()` copy streamed tensors out of their group buffers (see `_StateDictCopies`)."""
        owners: dict[int, tuple[nn.Module, dict[str, tuple[GroupState, int]]]] = {}
        for state in self.states:
            for i, ref in enumerate(state.group.tensors):
                owners.setdefault(id(ref.module), (ref.module, {}))[1][ref.name] = (state, i)
        for module, names in owners.values():
            handle = module.register_state_dict_post_hook(_StateDictCopies(self, names))
            self.state_dict_hooks.append(handle)
            txn.on_rollback(handle.remove, "state_dict hook")

    def plain_copy(self, state: GroupState, i: int, value: torch.Tensor) -> torch.Tensor:
        """The current values of tensor `i` of `state` (read as `value`) in a host tensor of its own."""
        master = state.masters[i]
        file = state.source.disk
        if file is not None and not state.bound:
            file.check()  # before reading the mapping: a truncated file would kill the process
        sched = self.scheduler
        if sched is not None and sched.strict and not state.bound and not state.direct:
            value = master  # strict mode's placeholder holds no values
        out = torch.empty(value.shape, dtype=value.dtype, device=master.device)
        with torch.no_grad():
            out.copy_(value)
        return out

    def _pin_allowance(self, streamed: list[Group]) -> float:
        if self.disk_dir is not None or not self.engine.streams:
            return 0
        host = sum(ref.nbytes for g in streamed for ref in g.tensors if ref.tensor.device.type == "cpu")
        return pin_allowance(self.config.pin, host)

    def _to_disk(self, group: Group) -> HostSource:
        flat = torch.zeros(group.nbytes, dtype=torch.uint8)
        _fill(flat, group)
        file = store(self.disk_dir, group, flat)
        del flat
        current_transaction().on_rollback(file.close, f"close {file.path.name}")
        self.files[group.index] = file
        logger.debug("hookwise offload: group %s %s %s", group.name, "reuses" if file.reused else "wrote", file.path)
        return HostSource(file.data, "disk", disk=file)

    # ---- running ----------------------------------------------------------------------------------
    def inputs_to_device(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return to_device(args, self.onload), to_device(kwargs, self.onload)

    # ---- removing ----------------------------------------------------------------------------------
    def close(self, device: torch.device) -> None:
        """Put every weight (and gradient) back on `device`, each in storage of its own.

        Every offload file is checked first (its content hashed): a changed file raises
        `OffloadFileError` and leaves the model as it was, so corrupt values never become its weights.
        """
        for file in self.files.values():
            file.verify()
        if any(state.held for state in self.states):
            self.switch(self.built_config)  # held groups write their changes back to their masters
        for handle in self.state_dict_hooks:
            handle.remove()
        self.state_dict_hooks.clear()
        if self.scheduler is not None:
            self.scheduler.flush()
        for state in self.states:
            for ref, master in zip(state.group.tensors, state.masters):
                t = ref.tensor
                if ref.current() is not t:
                    continue
                t.data = master.to(device, copy=True)
                if t.grad is not None and t.grad.device != device:
                    t.grad = t.grad.to(device)
        for ref in self.resident:
            t = ref.tensor
            if t.device != device:
                t.data = t.data.to(device)
                if t.grad is not None:
                    t.grad = t.grad.to(device)
        self.engine.close()
        for file in self.files.values():
            file.close()
        self.states.clear()
        self.files.clear()
        self.scheduler = None

    # ---- residency in place -------------------------------------------------------------------------
    def why_not_in_place(self, config: Offload) -> str | None:
        """Why the residency cannot change to `config`'s in place (None: it can)."""
        if dataclasses.replace(config, vram_budget=self.built_config.vram_budget) != self.built_config:
            return "the two Offload configs differ in more than vram_budget"
        if self._held_for(config) is None:
            return (
                f"vram_budget={config.vram_budget!r} cannot hold what is resident under "
                f"vram_budget={self.built_config.vram_budget!r} (groups would have to leave the device)"
            )
        return None

    def _held_for(self, config: Offload) -> frozenset[int] | None:
        """The streamed groups (indices) that `config`'s budget keeps resident too; None: not in place."""
        if config == self.built_config:
            return frozenset()
        budget = parse_budget(config.vram_budget, self.onload)
        if budget is None:  # stream everything: only when nothing but the always-resident tensors is resident
            return frozenset() if not self.residency.resident else None
        sched = self.scheduler
        slots = sum(s.flat.numel() for s in sched.slots) if sched else 0
        device = self.residency.pinned_bytes + self.residency.resident_bytes + slots
        return widen_residency(self.part.groups, [st.group.index for st in self.states], device_bytes=device, budget=budget)

    def switch(self, config: Offload) -> ResidencySwitch:
        """Hold resident the streamed groups that `config`'s budget has room for, release the others.

        Uses what the build made: a held group's tensors become device copies of its host masters
        (on the CPU with host copies in RAM, the masters themselves), and released, they point at
        their masters again, changed values written back first. No file is written or hashed, no
        host memory allocated or pinned, the slots stay. Raises `CompatibilityError` when `config`
        differs from the applied one in more than `vram_budget`, or its budget is smaller than
        what stays resident.
        """
        reason = self.why_not_in_place(config)
        if reason is not None:
            raise CompatibilityError(
                f"offloading cannot switch to {config!r} in place: {reason}; remove it and apply the new config instead"
            )
        target = self._held_for(config)
        sched = self.scheduler
        if sched is None:
            raise ConfigError("this offloading was removed; apply Offload(...) again")
        sched.flush()
        copied = written = 0
        held: list[str] = []
        released: list[str] = []
        for st in self.states:
            want = st.group.index in target
            if want and not st.held:
                copied += self._hold(st)
                held.append(st.name)
            elif st.held and not want:
                written += st.unbind(self.engine, settle_grads=True)
                st.views = []  # the device copies go with the last reference
                released.append(st.name)
        sched.hold([st for st in self.states if st.group.index in target])
        self.config = config
        self.budget = parse_budget(config.vram_budget, self.onload)
        return ResidencySwitch(tuple(held), tuple(released), copied, written)

    def _hold(self, st: GroupState) -> int:
        """Bind `st` to device copies of its masters (a master on the device already: itself); bytes copied."""
        copies: list[torch.Tensor] = []
        copied = 0
        if st.source.disk is not None:
            st.source.disk.check()  # before its pages are read (a truncated file: SIGBUS)
        with torch.inference_mode(False), torch.no_grad():
            for ref, master in zip(st.group.tensors, st.masters):
                if master.device == self.onload and st.source.kind != "disk":
                    copies.append(master)
                else:
                    copies.append(master.to(self.onload, copy=True))
                    copied += ref.nbytes
        st.bind(copies)
        if st.source.disk is not None and not st.source.disk.dirty:
            st.source.after_read()  # the copies are made: the mapped pages can go
        return copied

    def report(self) -> OffloadReport:
        groups = []
        files = self.files
        states = {s.group.index: s for s in self.states}
        for g in self.part.groups:
            st = states.get(g.index)
            resident = st is None or st.held
            storage = "device" if resident else st.source.kind
            file = files.get(g.index)
            groups.append(
                GroupReport(g.name, g.kind, tuple(p for p, _ in g.modules), g.nbytes, resident, storage,
                            str(file.path) if file else None, file.reused if file else None)
            )
        sched = self.scheduler
        slot_bytes = sum(s.flat.numel() for s in sched.slots) if sched else 0
        resident_bytes = sum(ref.nbytes for ref in self.resident if ref.tensor.device == self.onload)
        resident_bytes += sum(st.group.nbytes for st in self.states if st.held)
        host = [s for s in self.states if s.source.kind != "disk"]
        return OffloadReport(
            granularity=self.part.granularity,
            onload_device=str(self.onload),
            offload_device=self.config.offload_device,
            budget=self.budget,
            groups=tuple(groups),
            always_resident=dict(self.part.reasons),
            slots=len(sched.slots) if sched else 0,
            slot_bytes=self.residency.slot_bytes,
            device_bytes=resident_bytes + slot_bytes,
            planned_device_bytes=self.residency.device_bytes,
            host_bytes=sum(s.source.nbytes for s in host),
            pinned_host_bytes=sum(s.source.nbytes for s in host if s.source.kind == "pinned"),
            disk_bytes=sum(f.path.stat().st_size for f in files.values()),
            order=tuple(s.name for s in sched.forward_order) if sched else (),
            backward_order=tuple(s.name for s in sched.backward_order) if sched else (),
            bound=tuple(s.name for s in self.states if s.bound and not s.held),
            stats=sched.stats.as_dict() if sched else {},
        )


def _choose(model: nn.Module, model_map: ModelMap, config: Offload, budget: int | None, slots: int) -> tuple[Partition, Residency]:
    """The partition and the residency: the granularity asked for, or for "auto" the first that fits."""
    if config.granularity == "auto":
        options = ["block", "leaf"] if model_map.towers else ["leaf"]
    else:
        options = [config.granularity]
    failures: list[tuple[str, BudgetError]] = []
    for granularity in options:
        part = partition(
            model, model_map, granularity, blocks_per_group=config.blocks_per_group,
            offload_trainable=config.offload_trainable,
        )
        try:
            return part, choose_residency(part.groups, pinned_bytes=part.pinned_bytes, slots=slots, budget=budget)
        except BudgetError as exc:
            failures.append((granularity, exc))
    granularity, first = failures[0]
    hints = []
    if granularity == "block" and len(failures) == 1 and model_map.leaves:
        leaf = partition(model, model_map, "leaf", offload_trainable=config.offload_trainable)
        hints.append(f"granularity='leaf' needs {fmt_bytes(minimum_bytes(leaf.groups, leaf.pinned_bytes, slots))}")
    for other, exc in failures[1:]:
        hints.append(f"granularity={other!r} needs {fmt_bytes(exc.need)}")
    if slots > 1:
        hints.append(f"prefetch=False needs {fmt_bytes(minimum_bytes(part.groups, part.pinned_bytes, 1))} at "
                     f"granularity={failures[-1][0]!r} (no transfer hidden)")
    message = f"{first} (granularity={granularity!r})"
    if hints:
        message += "; alternatives: " + "; ".join(hints)
    raise BudgetError(message, need=first.need)


def _fill(flat: torch.Tensor, group: Group) -> None:
    """Copy every tensor of `group` into `flat` at its offset."""
    for ref in group.tensors:
        ref.view_in(flat).copy_(ref.tensor.data)


def _point(ref: TensorRef, master: torch.Tensor, txn: Any) -> None:
    """Make `ref` hold its host master; on rollback it gets its values back on its old device."""
    t = ref.tensor
    device = t.device
    t.data = master

    def undo(t=t, device=device, master=master) -> None:
        t.data = master.to(device, copy=True)

    txn.on_rollback(undo, f"restore {ref.path}")


def _not_copyable() -> CompatibilityError:
    return CompatibilityError(
        "a model with hookwise offloading cannot be pickled, saved whole (torch.save(model)) or deep-copied: its "
        "weights live in shared host buffers, device slots or mapped files. Save model.state_dict() instead "
        "(plain tensors that load into the plain model), or remove offloading first (hookwise.remove(model)), "
        "copy or save, then apply it again"
    )


def _refuse_pickle(module: nn.Module) -> Any:
    _drop_file_being_saved()
    raise _not_copyable()


def _drop_file_being_saved() -> None:
    """Inside `torch.save(model, path)`: delete the file it opened, so the refusal leaves no unreadable file.

    torch.save creates the file before it pickles anything, and on the way out of the error it still
    writes the archive's end: without this a ~600-byte file that `torch.load` cannot read would stay
    (and an older file of that name is gone already: torch truncated it). Unlinking an open file is
    safe on POSIX (the writer finishes on the orphaned inode); on Windows the file stays.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "save" and code.co_filename == torch.serialization.__file__:
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                with contextlib.suppress(OSError):
                    os.unlink(target)
            return
        frame = frame.f_back


class _StateDictCopies:
    """A state_dict post-hook on a module that owns streamed tensors: their entries become plain copies.

    Without it an entry is a view into the group's flat buffer (saving it writes the whole buffer;
    views of one buffer in several dtypes cannot be saved at all), a device slot, or a mapped file.
    Entries asked for with `keep_vars=True` are the tensors themselves and stay so.
    """

    def __init__(self, offloader: _Offloader, names: dict[str, tuple[GroupState, int]]) -> None:
        self.offloader = offloader
        self.names = names

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name, (state, i) in self.names.items():
            key = prefix + name
            value = state_dict.get(key)
            if value is None or value is state.group.tensors[i].tensor:
                continue
            state_dict[key] = self.offloader.plain_copy(state, i, value)


def _ignore_apply(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    warnings.warn(
        "hookwise: this model has offloading applied, so .to() / .cuda() / .cpu() / .half() and other "
        "whole-model moves or casts are ignored (offloading decides where each weight lives). To move or "
        "cast it, remove offloading first (hookwise.remove(model) or remove_offload(model)), then apply it again",
        stacklevel=3,
    )
    return module


# ---- hooks ------------------------------------------------------------------------------------------
class _GroupHook(ModelHook):
    """On each module of a streamed group: the group is on the device while the module runs."""

    layer = Layer.OFFLOAD

    def __init__(self, scheduler: Scheduler, state: GroupState, module: nn.Module | None = None) -> None:
        self.scheduler = scheduler
        self.state = state
        # A module with submodules may checkpoint its own body, recomputed in backward outside this
        # hook: its outputs' autograd nodes load the group first (`Scheduler.guard_recompute`).
        self.guards_recompute = module is not None and next(module.children(), None) is not None
        self.detached = False

    def __deepcopy__(self, memo: dict) -> Any:
        raise _not_copyable()

    def on_detach(self, module: nn.Module) -> None:
        # An adapter that replaced the module's forward after offloading (kohya's LoRA) still calls
        # the chain this hook was in as its original: from now on it passes through.
        self.detached = True

    def new_forward(self, module: nn.Module, next_fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.detached or self.state.held:  # held resident by `switch`: its tensors are device copies
            return next_fn(*args, **kwargs)
        sched = self.scheduler
        saving = sched.acquire(self.state)  # checks a group file before its pages are read
        try:
            if saving is None:
                output = next_fn(*args, **kwargs)
            else:
                with saving:
                    output = next_fn(*args, **kwargs)
        finally:
            sched.release(self.state)
        if self.guards_recompute and torch.is_grad_enabled():
            sched.guard_recompute(self.state, output)
        return output


class _RootHook(ModelHook):
    """On the model: inputs to the device, pass boundaries, and saved-tensor packing with gradients."""

    layer = Layer.OFFLOAD_ROOT

    def __init__(self, offloader: _Offloader) -> None:
        self.offloader = offloader
        self.detached = False

    def on_detach(self, module: nn.Module) -> None:
        self.detached = True  # as _GroupHook's

    def new_forward(self, module: nn.Module, next_fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.detached:
            return next_fn(*args, **kwargs)
        ctl = self.offloader
        sched = ctl.scheduler
        args, kwargs = ctl.inputs_to_device(args, kwargs)
        grad = torch.is_grad_enabled()
        sched.begin_pass()
        try:
            saving = sched.saving()
            if saving is None:
                output = next_fn(*args, **kwargs)
            else:
                with saving:
                    output = next_fn(*args, **kwargs)
        finally:
            sched.end_pass(grad)
        sched.guard_files(output)
        return output


# ---- public functions --------------------------------------------------------------------------------
def _offloader(model: nn.Module) -> _Offloader | None:
    registry = HookRegistry.of(model)
    hook = registry.get(OFFLOAD_ROOT_HOOK) if registry else None
    return hook.offloader if isinstance(hook, _RootHook) else None


def _check_foreign(model: nn.Module) -> None:
    """Raise `CompatibilityError` if another offloading system already manages `model`."""
    if _offloader(model) is not None:
        raise CompatibilityError(
            "hookwise offloading is already applied to this model; remove_offload(model) (or hookwise.remove) "
            "first to change its settings"
        )
    for path, module in model.named_modules():
        where = path or "the model"
        hf = module.__dict__.get("_hf_hook")
        if hf is not None:
            inner = getattr(hf, "hooks", [hf])
            names = [type(h).__name__ for h in inner]
            if any(n in ("AlignDevicesHook", "CpuOffload", "UserCpuOffloadHook") for n in names):
                raise CompatibilityError(
                    f"{where} already has accelerate offloading hooks ({', '.join(names)}), from device_map, "
                    f"enable_model_cpu_offload or enable_sequential_cpu_offload; remove them first "
                    f"(accelerate.hooks.remove_hook_from_module(model, recurse=True)) or load the model without them"
                )
        registry = module.__dict__.get("_diffusers_hook")
        hooks = getattr(registry, "hooks", {}) if registry is not None else {}
        found = [n for n in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker") if n in hooks]
        if found:
            raise CompatibilityError(
                f"{where} already has diffusers group offloading ({', '.join(found)}); use one offloading system: "
                f"load the model again without enable_group_offloading / apply_group_offloading"
            )
        registry = HookRegistry.of(module)
        if registry is not None and COMPONENT_HOOK in registry:
            raise CompatibilityError(
                f"{where} is a component managed by ComponentOffload; remove_component_offload first, or leave "
                f"this component out of it"
            )


def apply_offload(model: nn.Module, config: Offload | None = None, **kwargs: Any) -> OffloadReport:
    """Apply offloading to `model` (all-or-nothing); returns the report. kwargs build an `Offload`.

    The same as `hookwise.apply(model, config)` followed by `offload_report(model)`.
    """
    if config is None:
        config = Offload(**kwargs)
    elif kwargs:
        raise ConfigError("pass either an Offload config or keyword arguments, not both")
    if not isinstance(config, Offload):
        raise ConfigError(f"apply_offload needs an Offload config, got {type(config).__name__}")
    if not isinstance(unwrap(model), nn.Module):
        raise ConfigError(f"apply_offload needs a torch.nn.Module, got {type(model).__name__}")
    apply_techniques(model, [config])
    return offload_report(model)


def remove_offload(model: nn.Module, device: str | torch.device | None = None) -> None:
    """Undo offloading: every weight back on one device (default: where the model was) with its values.

    The same as `hookwise.remove(model, "offload")`, with the device to gather the weights on.
    """
    remove_techniques(model, ["offload"], device=device)


def _apply_offload(model: nn.Module, config: Offload) -> None:
    model = unwrap(model)
    with transaction(), torch.inference_mode(False):
        _check_foreign(model)
        offloader = _Offloader(model, config)
        offloader.build()


def _remove_offload(model: nn.Module, config: Offload | None = None, device: str | torch.device | None = None) -> None:
    model = unwrap(model)
    offloader = _offloader(model)
    if offloader is None:
        raise ConfigError("this model has no hookwise offloading to remove")
    target = offloader.home if device is None else parse_device(device, "device")
    offloader.close(target)
    remove_hooks(
        model,
        lambda name, hook: name in (GROUP_HOOK, OFFLOAD_ROOT_HOOK) and isinstance(hook, (_GroupHook, _RootHook)),
        keep_wrapper=True,
    )
    restore_method(model, "_apply", owner=OWNER)
    restore_method(model, "__getstate__", owner=OWNER, missing_ok=True)
    # The engine's objects refer to each other (scheduler, group states, slots, sources), so its host
    # buffers and slots are freed by the cycle collector, not when the last hook goes. Python starts
    # that collector by counts of objects, not bytes: applying and removing offloading of a 2 GB model
    # a few times ran out of memory before it did. Collect now, while the whole model's worth is free.
    del offloader
    gc.collect()


def switch_residency(model: nn.Module, config: Offload) -> ResidencySwitch:
    """Change the residency of `model`'s offloading to `config`'s in place, and record `config`.

    `config` must differ from the applied `Offload` only in `vram_budget`, with room for what is
    resident now: the streamed groups it has room for are held resident (device copies made from
    the existing host copies, pinned buffers or mapped files) and the rest stream as before; passing
    the applied config back releases them. Nothing is written to disk, hashed, allocated on the host
    or pinned. Raises `CompatibilityError` when it cannot be done in place (nothing changed then).
    """
    root = unwrap(model)
    offloader = _offloader(root)
    if offloader is None:
        raise ConfigError("this model has no hookwise offloading; apply Offload(...) first")
    old = offloader.config
    result = offloader.switch(config)
    ledger = ledger_of(root)
    if ledger is not None and old is not config:
        # Replaced where it stands: the same technique on the same targets, so neither the ledger's order
        # (removal runs newest first) nor the first-call check of the map (which `record` would install
        # again, describing the model) has cause to change.
        ledger.replace(old, config)
    return result


def in_place_reason(model: nn.Module, config: Offload) -> str | None:
    """Why `switch_residency(model, config)` cannot be done (None: it can)."""
    offloader = _offloader(unwrap(model))
    if offloader is None:
        return "the model has no hookwise offloading"
    return offloader.why_not_in_place(config)


def offload_report(model: nn.Module) -> OffloadReport:
    """The report of the offloading applied to `model` (groups, bytes per place, counters)."""
    offloader = _offloader(unwrap(model))
    if offloader is None:
        raise ConfigError("this model has no hookwise offloading; apply Offload(...) first")
    return offloader.report()


def offload_buffers(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(device buffers, host buffers) that offloading allocated for `model`: its prefetch slots, and
    the flat host copies (or mapped files) of its streamed groups. For memory accounting: the
    planner's fake run counts the slots on the device and the host copies apart."""
    offloader = _offloader(unwrap(model))
    if offloader is None:
        raise ConfigError("this model has no hookwise offloading; apply Offload(...) first")
    sched = offloader.scheduler
    return [s.flat for s in sched.slots] if sched else [], [st.source.flat for st in offloader.states]


# ---- cost declaration (for the planner) -------------------------------------------------------------
from ..core.cost import CostContext, Placement, TechniqueCost, parse_size  # noqa: E402
from ._groups import align, block_ancestors, rest_group_of  # noqa: E402


# The planner asks for the groups of equal footprints many times (every option built on one, block and
# leaf, with and without a budget, and the same footprint reached by several orders of a stack): they
# are formed once per (footprint, granularity, blocks per group). A footprint is a frozen dataclass,
# hashed and compared by value. The groups returned are shared: callers read them (choose_residency
# does), never change them.
_GROUPS_CACHE: dict[tuple[Any, str, int], tuple[list[Group], int]] = {}
_GROUPS_CACHE_SIZE = 256


def _declared_groups(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[Group], int]:
    """`_form_declared_groups`, formed once per footprint (see _GROUPS_CACHE)."""
    key = (fp, granularity, blocks_per_group)
    hit = _GROUPS_CACHE.get(key)
    if hit is not None:
        return hit
    found = _form_declared_groups(fp, granularity, blocks_per_group)
    if len(_GROUPS_CACHE) >= _GROUPS_CACHE_SIZE:
        del _GROUPS_CACHE[next(iter(_GROUPS_CACHE))]  # the oldest entry
    _GROUPS_CACHE[key] = found
    return found


def _form_declared_groups(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[Group], int]:
    """(groups, bytes pinned resident) of a footprint, formed as `partition` forms them.

    Block granularity: `blocks_per_group` tower blocks per group, and outside the towers one group
    per subtree that holds no block (`rest_group_of`, the partition's own rule), sized by the leaves
    in it. Leaf granularity: one group per leaf. The footprint knows only its leaves' paths, so the
    tensors outside every leaf (norms, a root's `scale_shift_table`, buffers) cannot be placed: they
    count as resident, as a container's direct tensors are (an upper bound for the device)."""
    groups: list[Group] = []

    def add(name: str, kind: str, raw: int, padded: int, in_tower: bool) -> None:
        group = Group(len(groups), name, kind, [], [], in_tower)
        group.nbytes = align(padded)
        groups.append(group)

    def padded(leaf: Any) -> int:
        # Each tensor sits at an aligned offset in its group's layout: the weight, then the rest (bias).
        weight = leaf.itemsize
        for n in leaf.shape:
            weight *= n
        weight = min(weight, leaf.nbytes)
        return align(weight) + align(leaf.nbytes - weight)

    if granularity == "block" and fp.blocks:
        blocks = list(fp.blocks)
        in_block = [0] * len(blocks)
        in_block_padded = [0] * len(blocks)
        for leaf in fp.leaves:
            if leaf.block is not None:
                in_block[leaf.block] += leaf.nbytes
                in_block_padded[leaf.block] += padded(leaf)
        for i in range(0, len(blocks), blocks_per_group):
            chunk = range(i, min(i + blocks_per_group, len(blocks)))
            raw = sum(blocks[j] for j in chunk)
            add(f"block {i}", "block", raw, sum(in_block_padded[j] + align(blocks[j] - in_block[j]) for j in chunk), True)
        ancestors = block_ancestors(leaf.path for leaf in fp.leaves if leaf.block is not None)
        rest: dict[str, list[int]] = {}
        for leaf in fp.leaves:
            if leaf.block is None:
                sizes = rest.setdefault(rest_group_of(leaf.path, ancestors), [0, 0])
                sizes[0] += leaf.nbytes
                sizes[1] += padded(leaf)
        for name, (raw, pad) in rest.items():
            add(name, "rest", raw, pad, False)
        placed = sum(fp.blocks) + sum(raw for raw, _ in rest.values())
    else:
        for leaf in fp.leaves:
            add(leaf.path, "leaf", leaf.nbytes, padded(leaf), leaf.block is not None)
        placed = sum(leaf.nbytes for leaf in fp.leaves)
    return groups, max(fp.total_bytes - placed, 0)


def _offload_units(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[int], int]:
    """(bytes of each tower group, bytes outside them: the other groups and what stays resident)."""
    groups, pinned = _declared_groups(fp, granularity, blocks_per_group)
    return [g.nbytes for g in groups if g.in_tower], pinned + sum(g.nbytes for g in groups if not g.in_tower)


def _offload_effect(placement: Placement, config: Offload, ctx: CostContext) -> Placement:
    """The groups `partition` forms, placed by `choose_residency` (the offload's own code) under the
    budget: resident groups and the prefetch slots on the device, the rest in RAM or on disk and
    moved on every pass through the weights."""
    fp = placement.footprint
    granularity = config.granularity if config.granularity != "auto" else ("block" if fp.blocks else "leaf")
    groups, pinned = _declared_groups(fp, granularity, config.blocks_per_group)
    on_cpu = str(config.onload_device).startswith("cpu")
    direct = config.offload_device == "disk" and on_cpu
    slots = 0 if direct else config.depth + 1
    budget = config.vram_budget
    if isinstance(budget, str) and budget.strip().endswith("%"):
        budget = int(ctx.hardware.vram * float(budget.strip()[:-1]) / 100)
    elif budget is not None:
        budget = parse_size(budget, "vram_budget")
    try:
        resident = choose_residency(groups, pinned_bytes=pinned, slots=slots, budget=budget).resident
    except BudgetError:
        # The offload refuses such a budget; the planner still gets a placement (every tower group
        # streamed, the rest resident), over the budget, so it does not fit.
        resident = frozenset(g.index for g in groups if not g.in_tower)
    streamed = [g.nbytes for g in groups if g.index not in resident]
    resident_bytes = sum(g.nbytes for g in groups if g.index in resident)
    moved = sum(streamed) * ctx.passes
    host = 0 if config.offload_device == "disk" else sum(streamed)
    pinned_host = 0 if on_cpu or config.pin == "none" else min(host, int(getattr(ctx.hardware, "pinned_limit", host)))
    return dataclasses.replace(
        placement,
        device_bytes=pinned + resident_bytes,
        transient_bytes=placement.transient_bytes + slots * max(streamed, default=0),
        host_bytes=placement.host_bytes + host,
        pinned_bytes=placement.pinned_bytes + pinned_host,
        disk_bytes=placement.disk_bytes + (sum(streamed) if config.offload_device == "disk" else 0),
        moved_bytes=placement.moved_bytes + (0 if direct else moved),
        transfers=placement.transfers + len(streamed) * ctx.passes,
        disk_read_bytes=placement.disk_read_bytes + (moved if config.offload_device == "disk" else 0),
    )


def _offload_options(placement: Placement, ctx: CostContext) -> list[Offload]:
    """Block and leaf offload with the budget solved to fill the room left for weights, and with
    every group streamed; on disk too when host RAM cannot hold what streams."""
    fp = placement.footprint
    onload = "cpu" if ctx.hardware.device == "cpu" else "cuda"
    room = int(ctx.device_room - placement.transient_bytes)
    options: list[Offload] = []
    grains = (["block"] if fp.blocks else []) + (["leaf"] if fp.leaves else [])
    for granularity in grains:
        units, rest = _offload_units(fp, granularity, 1)
        fits_already = placement.device_bytes <= room  # a budget would keep everything: no offloading
        if room > rest + 2 * max(units, default=0) and not fits_already:
            options.append(Offload(onload_device=onload, granularity=granularity, vram_budget=room))
        options.append(Offload(onload_device=onload, granularity=granularity))
    streamed_min = fp.total_bytes - max(room, 0)
    if streamed_min > ctx.ram_room:
        options += [dataclasses.replace(o, offload_device="disk") for o in options]
    return options


register_technique(
    "offload",
    Offload,
    apply=_apply_offload,
    remove=_remove_offload,
    layer=Layer.OFFLOAD,
    conflicts=("component_offload",),
    cost=TechniqueCost(_offload_effect, _offload_options),
)
