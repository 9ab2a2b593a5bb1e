"""The parallel techniques' cost declarations, for the planner (`hookwise plan --gpus N`).

Each rank of N runs the same stack on its share of the work, so a declaration states one rank's
bytes and the bytes it sends to the others per step:

- `ContextParallel` (sampling): the tokens split over the ranks: activations and compute 1/N, weights
  replicated. Ulysses sends 4 all-to-alls per attention layer (q, k, v in, the output back), each
  (N-1)/N of the rank's tokens x width; ring passes its K and V on N-1 times per attention layer.
  Both gather the output at the end.
- `CFGParallel` (sampling, batched CFG, 2 ranks): each rank computes one half of the batch; the halves
  of the output are gathered. On 2N GPUs it is the CFG dimension of a 2 x N mesh
  (`CFGParallel(context=N)`), and context parallelism's options then take the N GPUs left
  (`ContextParallel(..., cfg=2)`): the combined stack comes from the two declarations composing (each
  records its degree in the placement's `mesh`), and a stack whose split leaves GPUs idle (CFG alone on
  4 GPUs) is not kept.
- `DataParallel` (LoRA training): each rank trains on batch / N. "ddp" replicates the base and
  all-reduces the LoRA's gradients (2 (N-1)/N of their bytes, ring all-reduce); "fsdp" shards the
  base (1/N resident; a gathered block and the next one's prefetch, plus the root's parameters
  outside the blocks, while they compute) and all-gathers it in forward and again in backward; the
  LoRA's parameters, gradients and optimizer state are sharded with it (`lora_share` 1/N per rank).

Time: compute scales by 1/N and the communicated bytes cost bytes / `hardware.link`, added to the
step without overlap. This is a declared model, not a measurement: the plan's notes say so, and a
measured step-time ratio (`measurements["speed"][technique][device][mode]`, as for the speed
techniques) replaces it. Offered only when `hardware.gpus` > 1; data parallelism serves training and
the other two sampling, so they never meet; the fake run cannot make several processes, so a stack
with one keeps its declared peak (`fake_run=False`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..core.cost import CostContext, Placement, TechniqueCost, speed_factor
from ..core.techniques import declare_cost
from .cfg import CFGParallel
from .context import ContextParallel
from .data import DataParallel

EXCLUSIVE = "several-gpus"
GB = 1e9
_DIM = {"context_parallel": "context", "cfg_parallel": "cfg", "data_parallel": "data"}


def _gpus(ctx: CostContext) -> int:
    return max(int(getattr(ctx.hardware, "gpus", 1) or 1), 1)


def _split(placement: Placement, ctx: CostContext, technique: str, n: int, comm: float, what: str) -> Placement:
    """One rank's placement: activations and compute 1/n, `comm` bytes sent per step (declared), or the
    measured step-time ratio where one exists; the split recorded in the placement's mesh."""
    measured = speed_factor(ctx, technique)
    link = float(getattr(ctx.hardware, "link", 0.0) or 0.0)
    placement = replace(placement, mesh=(*placement.mesh, (_DIM[technique], n)))
    if measured is not None:
        return replace(
            placement, activation_share=placement.activation_share / n,
            compute_factor=placement.compute_factor * measured,
        ).note(f"{technique} over {n} GPUs: measured x{measured:.2f} step time (communication included); {what}")  # fmt: skip
    return replace(
        placement, activation_share=placement.activation_share / n, compute_factor=placement.compute_factor / n,
        comm_bytes=placement.comm_bytes + int(comm),
    ).note(
        f"{technique} over {n} GPUs: compute and activations 1/{n} per rank, {comm / GB:.2f} GB sent per rank per step"
        + (f" at {link / GB:.0f} GB/s" if link else "") + f" ({what}); a declared estimate, not measured. "
        f"Launch with torchrun --nproc-per-node {n}"
    )  # fmt: skip


# ---- context parallelism ------------------------------------------------------------------------
def _cp_degree(config: ContextParallel, ctx: CostContext) -> int:
    if config.ulysses and config.ring:
        return config.ulysses * config.ring
    return _gpus(ctx) // config.cfg  # a CFG half's GPUs


def _cp_effect(placement: Placement, config: ContextParallel, ctx: CostContext) -> Placement:
    n = _cp_degree(config, ctx)
    if n < 2:
        return placement
    item = placement.footprint.compute_itemsize
    batch = getattr(ctx.job, "effective_batch", 1) / config.cfg  # a CFG half's batch beside CFGParallel
    calls = getattr(ctx.job, "calls_per_step", 1)
    shard = ctx.tokens / n * ctx.hidden * item * batch  # one rank's tokens x width, one tensor
    ring = config.ring or (1 if config.ulysses else 0)
    ulysses = config.ulysses or (1 if ring else n)
    per_layer = 0.0
    if ulysses > 1:
        per_layer += 4 * shard * (ulysses - 1) / ulysses  # q, k, v in, the output back
    if ring > 1:
        per_layer += 2 * shard * (ring - 1)  # K and V passed on, ring - 1 times
    comm = (per_layer * ctx.attention_layers + ctx.output_bytes / config.cfg * (n - 1) / n) * calls
    kind = "Ulysses" if ring <= 1 else ("ring" if ulysses <= 1 else f"Ulysses {ulysses} x ring {ring}")
    return _split(placement, ctx, "context_parallel", n, comm, f"{kind} exchanges per attention layer, output gathered")


def _cp_options(placement: Placement, ctx: CostContext) -> list[Any]:
    n = _gpus(ctx) // placement.ranks  # the GPUs an outer split (CFG parallelism) left to each of its groups
    if n < 2 or ctx.training:
        return []
    cfg = dict(placement.mesh).get("cfg", 1)
    return [ContextParallel(ulysses=n, cfg=cfg), ContextParallel(ring=n, cfg=cfg)]


# ---- CFG parallelism ----------------------------------------------------------------------------
def _cfg_effect(placement: Placement, config: CFGParallel, ctx: CostContext) -> Placement:
    comm = ctx.output_bytes / 2  # each rank sends its half of the output
    return _split(placement, ctx, "cfg_parallel", 2, comm, "one half of the batched-CFG call each, output gathered")


def _cfg_options(placement: Placement, ctx: CostContext) -> list[Any]:
    n = _gpus(ctx)
    if n < 2 or n % 2 or ctx.cfg != "batched" or ctx.training:
        return []
    return [CFGParallel() if n == 2 else CFGParallel(context=n // 2)]  # on 2N GPUs: the CFG dim of a 2 x N mesh


# ---- data parallelism ---------------------------------------------------------------------------
def _dp_effect(placement: Placement, config: DataParallel, ctx: CostContext) -> Placement:
    n = _gpus(ctx)
    if n < 2:
        return placement
    grads = ctx.trainable_bytes
    if config.mode == "ddp":
        comm = 2 * grads * (n - 1) / n
        return _split(placement, ctx, "data_parallel", n, comm, "batch / N per rank, the LoRA's gradients all-reduced")
    fp = placement.footprint
    sharded = replace(
        placement,
        device_bytes=placement.device_bytes // n,
        transient_bytes=placement.transient_bytes + fp.outside_bytes + 2 * fp.largest_block,
        lora_share=placement.lora_share / n,  # the LoRA and its gradients and optimizer state: sharded too
    )
    comm = 2 * placement.device_bytes * (n - 1) / n + grads * (n - 1) / n  # base gathered in forward and backward
    return _split(sharded, ctx, "data_parallel", n, comm,
                  "batch / N per rank, the base sharded 1/N and gathered per block in forward and backward")  # fmt: skip


def _dp_options(placement: Placement, ctx: CostContext) -> list[Any]:
    n = _gpus(ctx)
    if n < 2 or not ctx.training or getattr(ctx.job, "batch", 1) % n:
        return []
    return [DataParallel(mode="ddp"), DataParallel(mode="fsdp")]


def _several(ctx: CostContext) -> bool:
    return _gpus(ctx) > 1


def declare_parallel_costs() -> None:
    """Give the three parallel techniques their cost declarations (once, when `parallel` is imported)."""
    common = dict(fake_run=False, offered=_several)
    # CFG and context parallelism compose (the CFG dim of a 2 x N mesh, then the sequence over each half's N)
    declare_cost("context_parallel", TechniqueCost(_cp_effect, _cp_options, training=False, **common))
    declare_cost("cfg_parallel", TechniqueCost(_cfg_effect, _cfg_options, training=False, **common))
    declare_cost("data_parallel", TechniqueCost(_dp_effect, _dp_options, sampling=False, exclusive=EXCLUSIVE, **common))
