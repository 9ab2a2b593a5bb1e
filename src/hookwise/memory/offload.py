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

import dataclasses
import gc
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import HookRegistry, Layer, TechniqueConfig, add_hook, current_transaction, register_technique
from ..core import apply_techniques, ledger_of, remove_hooks, remove_techniques, transaction, unwrap
from ..core.overrides import override_method, restore_method
from ..errors import CompatibilityError, ConfigError
from ..introspect import ModelMap, describe
from ._placement import OFFLOAD_ROOT_HOOK, home_device, parse_device, pin_allowance, to_device
from ._budget import check_budget_value, choose_layout, parse_budget, widen_residency
from ._binding import GroupState
from ._disk import DiskFile, check_writable, default_dir, store
from ._groups import Group, TensorRef
from ._groups import declared_groups as _declared_groups  # noqa: F401 - re-exported: tests import it from here
from ._guards import StateDictCopies, check_other_offloading, ignore_apply, not_copyable, refuse_pickle
from ._offload_hooks import GroupHook, RootHook
from ._report import GroupReport, OffloadReport, ResidencySwitch
from ._schedule import Scheduler
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
        self.part, self.residency = choose_layout(model, self.model_map, config, self.budget, self.slots)
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
        raise not_copyable()

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
        add_hook(self.model, RootHook(self), OFFLOAD_ROOT_HOOK)
        for state in self.states:
            for _, module in state.group.modules:
                add_hook(module, GroupHook(self.scheduler, state, module), GROUP_HOOK)
        override_method(self.model, "_apply", ignore_apply, owner=OWNER)
        # Found by attribute lookup (pickle and deepcopy both ask the instance): refuse before writing.
        override_method(self.model, "__getstate__", refuse_pickle, owner=OWNER)
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
        """Make `state_dict()` copy streamed tensors out of their group buffers (see `StateDictCopies`)."""
        owners: dict[int, tuple[nn.Module, dict[str, tuple[GroupState, int]]]] = {}
        for state in self.states:
            for i, ref in enumerate(state.group.tensors):
                owners.setdefault(id(ref.module), (ref.module, {}))[1][ref.name] = (state, i)
        for module, names in owners.values():
            handle = module.register_state_dict_post_hook(StateDictCopies(self, names))
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


# ---- public functions --------------------------------------------------------------------------------
def _offloader(model: nn.Module) -> _Offloader | None:
    registry = HookRegistry.of(model)
    hook = registry.get(OFFLOAD_ROOT_HOOK) if registry else None
    return hook.offloader if isinstance(hook, RootHook) else None


def _check_foreign(model: nn.Module) -> None:
    """Raise `CompatibilityError` if another offloading system already manages `model`."""
    if _offloader(model) is not None:
        raise CompatibilityError(
            "hookwise offloading is already applied to this model; remove_offload(model) (or hookwise.remove) "
            "first to change its settings"
        )
    check_other_offloading(model)


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
        lambda name, hook: name in (GROUP_HOOK, OFFLOAD_ROOT_HOOK) and isinstance(hook, (GroupHook, RootHook)),
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


register_technique(
    "offload",
    Offload,
    apply=_apply_offload,
    remove=_remove_offload,
    layer=Layer.OFFLOAD,
    conflicts=("component_offload",),  # its cost is declared in _cost.py
)
