"""The memory techniques' cost declarations, for the planner: what each does to a step's bytes per
device, bytes moved and time (`core/cost.py`), declared on the techniques when this folder is imported.

- `LayerwiseCasting`: cast leaves shrink by the storage rule (`_stored_leaf`, the layout `quantize`
  makes); one dequantized weight at a time is transient.
- `Offload`: the groups `partition` would form from the footprint (`_groups.declared_groups`), placed
  by `choose_residency` (the offload's own code) under the budget.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import replace
from typing import Any

from ..core.cost import CostContext, LeafBytes, Placement, TechniqueCost, parse_size
from ..core.techniques import declare_cost
from ._budget import BudgetError, choose_residency
from ._cast_targets import MODULATION
from ._dequant import Layout
from ._groups import declared_groups
from .casting import LayerwiseCasting
from .offload import Offload


# ---- LayerwiseCasting ----------------------------------------------------------------------------------
_DEQUANT_FACTOR = 1.05  # assumed: one dequantize kernel per weight use, next to a compute-bound matmul
# compute="fp8": forward time relative to the plain model. CPU: the fp8 path against the upcast path on
# a full-width FLUX block, measured (BENCHMARKS.md, "fp8 compute"), times the upcast path's factor.
# CUDA: assumed, not measured here (no GPU was lent): fp8 tensor cores run twice the bf16 rate, less the
# activation quantization; issue 14's target for fp8 matmul on H100 / H200 is 0.75x of bf16.
_FP8_FACTOR = {"cpu": 0.61 * _DEQUANT_FACTOR, "cuda": 0.75}


@functools.lru_cache(maxsize=1 << 16)  # the planner asks for the same leaves under the same config many times
def _stored_leaf(leaf: LeafBytes, config: LayerwiseCasting, compute_itemsize: int) -> LeafBytes:
    """`leaf` as casting stores it: the weight in the storage dtype, its scales in the compute dtype."""
    numel = 1
    for n in leaf.shape:
        numel *= n
    scaling = config.scaling
    if scaling == "block" and (len(leaf.shape) != 2 or leaf.shape[1] % config.block_size != 0):
        scaling = "channel"  # as quantize() falls back
    layout = Layout(scaling, leaf.shape, config.block_size if scaling == "block" else 0)
    scales = 0
    if scaling != "none":
        scales = 1
        for n in layout.scale_shape():
            scales *= n
    stored = numel * config.storage_dtype.itemsize + scales * compute_itemsize
    return replace(leaf, nbytes=leaf.nbytes - numel * leaf.itemsize + stored, itemsize=config.storage_dtype.itemsize,
                   keep="cast")  # fmt: skip


def _casting_effect(placement: Placement, config: LayerwiseCasting, ctx: CostContext) -> Placement:
    """Cast leaves shrink by the storage rule; one dequantized weight at a time is transient."""
    fp = placement.footprint
    compute = config.compute_dtype.itemsize if config.compute_dtype is not None else fp.compute_itemsize
    cast = []
    for leaf in fp.leaves:
        if leaf.kind not in ("linear", "conv") or leaf.itemsize <= config.storage_dtype.itemsize:
            continue
        modulation = leaf.keep in MODULATION and leaf.block is not None and config.cast_modulation
        if leaf.keep is None or modulation or (config.skip == "none" and leaf.keep not in ("adapter", "cast")):
            cast.append(_stored_leaf(leaf, config, compute))
    new = fp.with_leaves(cast)
    largest = max((leaf.nbytes // max(leaf.itemsize, 1) * compute for leaf in cast), default=0)
    name = str(config.storage_dtype).removeprefix("torch.")
    quality = f"{'fp8' if config.storage_dtype.itemsize == 1 else name} ({config.scaling} scaling)"
    factor = _DEQUANT_FACTOR
    if config.compute == "fp8":
        device = "cuda" if str(getattr(ctx.hardware, "device", "cuda")).startswith("cuda") else "cpu"
        factor = _FP8_FACTOR[device]
        quality = f"{quality[:-1]}, fp8 compute with {config.activation_scale} activation scales)"
        # Convolutions dequantize; a Linear's transient is its quantized activation, not a weight.
        largest = max((leaf.nbytes // max(leaf.itemsize, 1) * compute for leaf in cast if leaf.kind == "conv"),
                      default=0)  # fmt: skip
    return placement.stored_as(new, transient=largest, factor=factor, quality=quality)


def _casting_options(placement: Placement, ctx: CostContext) -> list[LayerwiseCasting]:
    """fp8 storage at each scaling (block scaling first: the most accurate); for sampling on a device
    whose hardware profile says it multiplies in fp8 (`hardware.fp8`), also fp8 compute at each
    scaling it takes. Training keeps the upcast path: its gradients were measured only there."""
    if not any(leaf.keep is None and leaf.kind in ("linear", "conv") for leaf in placement.footprint.leaves):
        return []
    options = [LayerwiseCasting(scaling=s) for s in ("block", "channel", "tensor", "none")]
    if getattr(ctx.hardware, "fp8", False) is True and not ctx.training:
        options += [LayerwiseCasting(scaling=s, compute="fp8") for s in ("channel", "tensor")]
    return options


# ---- Offload ---------------------------------------------------------------------------------------------
def _offload_units(fp: Any, granularity: str, blocks_per_group: int) -> tuple[list[int], int]:
    """(bytes of each tower group, bytes outside them: the other groups and what stays resident)."""
    groups, pinned = declared_groups(fp, granularity, blocks_per_group)
    return [g.nbytes for g in groups if g.in_tower], pinned + sum(g.nbytes for g in groups if not g.in_tower)


def _offload_effect(placement: Placement, config: Offload, ctx: CostContext) -> Placement:
    """The groups `partition` forms, placed by `choose_residency` (the offload's own code) under the
    budget: resident groups and the prefetch slots on the device, the rest in RAM or on disk and
    moved on every pass through the weights."""
    fp = placement.footprint
    granularity = config.granularity if config.granularity != "auto" else ("block" if fp.blocks else "leaf")
    groups, pinned = declared_groups(fp, granularity, config.blocks_per_group)
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


def declare_memory_costs() -> None:
    """Give the memory techniques their cost declarations (once, when `memory` is imported)."""
    declare_cost("casting", TechniqueCost(_casting_effect, _casting_options, exact_undo=False))
    declare_cost("offload", TechniqueCost(_offload_effect, _offload_options))
