"""What offloading reports: its groups and where they live, bytes per place, and its counters
(`OffloadReport`, from `offload_report(model)`), and what one change of residency in place did
(`ResidencySwitch`, from `switch_residency`)."""

from __future__ import annotations

import dataclasses

from ._budget import fmt_bytes


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
