"""The VRAM budget: how many bytes the onload device may hold, and which groups stay resident.

With a budget, groups outside the towers (embedders, output layers: little compute to hide a
transfer behind) become resident first, smallest first; then as many tower groups as fit, chosen
so the streamed ones are spread evenly between resident ones and every transfer has compute to
hide behind. The budget counts the prefetch slots: `slots` buffers as large as the largest
streamed group. Without a budget every group streams (diffusers' behaviour). `choose_layout` forms
the partition at the granularity asked for (for "auto", the first that fits) and chooses its residency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from ..core.cost import parse_size
from ..errors import ConfigError
from ..introspect import ModelMap
from ._groups import Group, Partition, partition


def fmt_bytes(n: int | float) -> str:
    """Bytes for people: binary units, three significant figures."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def check_budget_value(value: object) -> None:
    """Raise `ConfigError` unless `value` is None, a positive byte count, "NN%" or "12GiB"."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(
            f"vram_budget={value!r} must be None (stream everything), a number of bytes, a share such as "
            f"'80%', or a size such as '12GiB'"
        )
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"vram_budget={value} bytes must be positive")
        return
    text = value.strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise ConfigError(f"vram_budget={value!r}: a share must lie in (0%, 100%], e.g. '80%'")
        return
    try:
        parse_size(text, "vram_budget")
    except ConfigError:
        raise ConfigError(f"vram_budget={value!r} is not a size; use bytes (an int), '80%', '12GiB' or '500MB'") from None


def device_total_bytes(device: torch.device) -> int:
    """Total memory of the onload device (host RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)


def parse_budget(value: int | str | None, device: torch.device) -> int | None:
    """The budget in bytes (None: no budget). Shares are of the onload device's total memory."""
    check_budget_value(value)
    if value is None or isinstance(value, int):
        return value
    text = value.strip()
    if text.endswith("%"):
        return int(device_total_bytes(device) * float(text[:-1]) / 100)
    return parse_size(text, "vram_budget")


@dataclass(frozen=True)
class Residency:
    """Which groups stay resident, and what the onload device holds for weights."""

    resident: frozenset[int]  # group indices
    streamed: tuple[int, ...]  # group indices, in group order
    slots: int
    slot_bytes: int  # size of one slot (the largest streamed group)
    pinned_bytes: int  # tensors resident whatever the budget
    resident_bytes: int  # resident groups
    budget: int | None

    @property
    def device_bytes(self) -> int:
        """Weight bytes on the onload device: pinned + resident groups + slots."""
        return self.pinned_bytes + self.resident_bytes + self.slots * self.slot_bytes


def spread(n: int, streamed: int) -> list[int]:
    """Indices of `streamed` of `n` items spaced evenly (the rest stay resident between them)."""
    if streamed <= 0:
        return []
    if streamed >= n:
        return list(range(n))
    return [int((i + 0.5) * n / streamed) for i in range(streamed)]


def minimum_bytes(groups: list[Group], pinned_bytes: int, slots: int) -> int:
    """The least a budget can be: pinned tensors plus `slots` buffers of the largest group."""
    return pinned_bytes + slots * max((g.nbytes for g in groups), default=0)


def choose_residency(groups: list[Group], *, pinned_bytes: int, slots: int, budget: int | None) -> Residency:
    """Choose the resident groups under `budget` (see the module docstring)."""
    sizes = np.array([g.nbytes for g in groups], dtype=np.int64)
    if budget is None:
        streamed = tuple(g.index for g in groups)
        return Residency(frozenset(), streamed, slots, int(sizes.max(initial=0)), pinned_bytes, 0, None)

    rest = sorted((g for g in groups if not g.in_tower), key=lambda g: (g.nbytes, g.index))
    tower = [g for g in groups if g.in_tower]
    tower_sizes = np.array([g.nbytes for g in tower], dtype=np.int64)
    n = len(tower)

    rest_sizes = [g.nbytes for g in rest]
    rest_prefix = np.concatenate([[0], np.cumsum(rest_sizes, dtype=np.int64)]).tolist()  # bytes of the first k
    rest_suffix_max = [0] * (len(rest) + 1)  # [k]: the largest of rest[k:], those streamed
    for k in range(len(rest) - 1, -1, -1):
        rest_suffix_max[k] = max(rest_sizes[k], rest_suffix_max[k + 1])

    def attempt(rest_resident: int, tower_streamed: int) -> Residency | None:
        streamed_mask = np.zeros(n, dtype=bool)
        if tower_streamed >= n:
            streamed_mask[:] = True
        elif tower_streamed > 0:  # `spread`'s indices, the same float arithmetic vectorised
            streamed_mask[((np.arange(tower_streamed) + 0.5) * n / tower_streamed).astype(np.int64)] = True
        slot = max(rest_suffix_max[rest_resident], int(tower_sizes[streamed_mask].max(initial=0)))
        res_bytes = int(rest_prefix[rest_resident] + tower_sizes[~streamed_mask].sum())
        if pinned_bytes + res_bytes + slots * slot > budget:  # Residency.device_bytes, before building one
            return None
        resident = {g.index for g in rest[:rest_resident]}
        resident.update(g.index for g, s in zip(tower, streamed_mask) if not s)
        return Residency(
            frozenset(resident),
            tuple(g.index for g in groups if g.index not in resident),
            slots,
            slot,
            pinned_bytes,
            res_bytes,
            budget,
        )

    # Everything outside the towers resident, then as many tower groups as fit.
    for tower_streamed in range(0, n + 1):
        found = attempt(len(rest), tower_streamed)
        if found is not None:
            return found
    # Not even that: stream every tower group and as few of the others as needed.
    for rest_resident in range(len(rest) - 1, -1, -1):
        found = attempt(rest_resident, n)
        if found is not None:
            return found
    raise _too_small(groups, pinned_bytes, slots, budget)


def widen_residency(groups: list[Group], streamed: list[int], *, device_bytes: int, budget: int) -> frozenset[int] | None:
    """Which of the `streamed` groups (indices) may become resident too under a larger `budget`.

    For a change in place: what is resident now stays, the slots stay as they are (`device_bytes`
    is what the device holds now: resident tensors, resident groups and slots), and the groups
    that join are chosen as `choose_residency` chooses: those outside the towers first, smallest
    first, then tower groups, so the ones still streamed are spread evenly. None when `budget`
    is below `device_bytes` (groups would have to leave the device: no change in place does that).
    """
    if device_bytes > budget:
        return None
    by_index = {g.index: g for g in groups}
    candidates = [by_index[i] for i in streamed]
    rest = sorted((g for g in candidates if not g.in_tower), key=lambda g: (g.nbytes, g.index))
    tower = [g for g in candidates if g.in_tower]
    room = budget - device_bytes

    def attempt(rest_joined: int, tower_streamed: int) -> frozenset[int] | None:
        still = set(spread(len(tower), tower_streamed))
        joined = rest[:rest_joined] + [g for i, g in enumerate(tower) if i not in still]
        return frozenset(g.index for g in joined) if sum(g.nbytes for g in joined) <= room else None

    for tower_streamed in range(0, len(tower) + 1):
        found = attempt(len(rest), tower_streamed)
        if found is not None:
            return found
    for rest_joined in range(len(rest) - 1, -1, -1):
        found = attempt(rest_joined, len(tower))
        if found is not None:
            return found
    return frozenset()  # pragma: no cover - attempt(0, len(tower)) joins nothing and always fits


def _too_small(groups: list[Group], pinned_bytes: int, slots: int, budget: int) -> ConfigError:
    largest = max(groups, key=lambda g: g.nbytes)
    need = minimum_bytes(groups, pinned_bytes, slots)
    return BudgetError(
        f"vram_budget={fmt_bytes(budget)} is too small: offloading needs at least {fmt_bytes(need)} on the "
        f"device ({fmt_bytes(pinned_bytes)} of tensors that stay resident + {slots} slot(s) of the largest "
        f"group {largest.name!r}, {fmt_bytes(largest.nbytes)} each). Raise vram_budget to at least "
        f"{need} bytes",
        need=need,
    )


class BudgetError(ConfigError):
    """The budget cannot hold the resident tensors plus the prefetch slots; `need` says how much would."""

    def __init__(self, message: str, *, need: int) -> None:
        super().__init__(message)
        self.need = need


def choose_layout(
    model: nn.Module, model_map: ModelMap, config: Any, budget: int | None, slots: int
) -> tuple[Partition, Residency]:
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
