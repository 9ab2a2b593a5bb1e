"""A stack of techniques on a fake copy of a model, for one fake-tensor run of a job's step.

The copy shares no tensor with the model: every parameter and buffer is a fake tensor of the same
shape, dtype and strides (`copy.deepcopy` with those fakes in its memo, so only module objects are
copied and nothing is allocated). The stack is applied to the copy with `hookwise.apply`, inside the
fake mode, so every hook is in place as it would be on the device: casting stores its weights (and
scales) in their storage dtype and dequantizes per layer in the run, checkpointing (the project's own
technique, from the technique table) drops and recomputes each block's activations, and offloading
partitions the copy, keeps its resident groups and prefetch slots and streams the rest through the
slots as the run needs them (`apply_offload_fake`).

The fake CPU tensors stand for the compute device, so an offload runs there with the same partition,
budget and schedule: onload on the CPU, host copies in (fake) RAM instead of pinned memory or disk
(what the device holds is the same), synchronous copies. Its slots count as device bytes and its
host copies apart. A budget given as a share of the device is taken of `hardware.vram`, and the LoRA
adapters of a training job (attached to the copy after the stack, resident on a real run) come out
of it, as they do on a real run where the offload sees them.

Where the offload cannot be applied to the copy (a budget too small for its partition), its device
bytes come from its cost declaration on the copy's footprint after the techniques that ran
(`modelled_weights`): resident groups plus the prefetch slots, and the report says why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..core.cost import CostContext, Placement, parse_size
from ..core.techniques import technique_named, technique_of
from ..errors import ConfigError
from ..introspect import describe
from ..memory.offload import offload_buffers, offload_report
from ..stack import Stack
from ..stack import apply as apply_stack
from .footprint import footprint_from_map
from .job import Job

# Techniques applied to the copy after the LoRA adapters exist (their budget leaves the adapters room);
# composed from their cost declaration when they cannot be applied to it.
OFFLOAD = "offload"
MODELLED = (OFFLOAD,)
CHECKPOINTING = "checkpointing"


def configs_of(stack: Any) -> tuple[Any, ...]:
    """The technique configs of `stack` (a `Stack`, one config, or a sequence of them), in layer order."""
    if stack is None:
        return ()
    if isinstance(stack, Stack):
        return stack.configs
    items = list(stack) if isinstance(stack, (list, tuple)) else [stack]
    for item in items:
        technique_of(item)  # raises ConfigError naming the registered configs
    return tuple(sorted(items, key=lambda c: technique_of(c).layer))


def split(configs: Iterable[Any], job: Job) -> tuple[list[Any], list[Any]]:
    """(configs applied to the fake copy first, offload configs applied after the adapters exist); a
    training job with checkpointing on gets the project's `Checkpointing` when the stack has none."""
    run, modelled = [], []
    for config in configs:
        (modelled if technique_of(config).name in MODELLED else run).append(config)
    names = {technique_of(c).name for c in run}
    if job.training and job.uses_checkpointing and CHECKPOINTING not in names:
        run.append(technique_named(CHECKPOINTING).config_cls())
    if not job.training:
        run = [c for c in run if technique_of(c).name != CHECKPOINTING]  # it passes inference through
    return run, modelled


def fake_copy(model: nn.Module, mode: Any, *, frozen: bool) -> nn.Module:
    """A copy of `model` whose parameters and buffers are fake tensors made in `mode`.

    Tied tensors stay tied (one fake per tensor object). `frozen` turns gradients off for every
    parameter (a LoRA job trains only its adapters)."""
    memo: dict[int, Any] = {}
    with mode:
        for _, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in memo:
                fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                memo[id(p)] = nn.Parameter(fake, requires_grad=p.requires_grad and not frozen)
        for _, b in model.named_buffers(remove_duplicate=False):
            if id(b) not in memo:
                memo[id(b)] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")
    registry = model.__dict__.get("_hookwise_registry")
    if registry is not None or any("_hookwise_registry" in m.__dict__ for m in model.modules()):
        raise ConfigError(
            "estimate_peak(stack=...) needs the plain model: this one has hookwise hooks applied; pass the model "
            "before hookwise.apply (or hookwise.remove(model) first) and give the stack to estimate"
        )
    return copy.deepcopy(model, memo)


def budget_bytes(config: Any, hardware: Any) -> int | None:
    """`config.vram_budget` in bytes (None: no budget); a share of the device is taken of `hardware.vram`."""
    budget = getattr(config, "vram_budget", None)
    if isinstance(budget, str) and budget.strip().endswith("%"):
        vram = getattr(hardware, "vram", None)
        if not vram:
            raise ConfigError(
                f"{type(config).__name__}(vram_budget={budget!r}) is a share of the device: pass hardware= (a "
                f"hookwise.plan.Hardware, or anything with .vram) to estimate_peak, or give the budget in bytes"
            )
        return int(vram * float(budget.strip()[:-1]) / 100)
    return None if budget is None else parse_size(budget, "vram_budget")


def fake_run_config(config: Any, hardware: Any = None, trainable_bytes: int = 0) -> Any:
    """`config` (an `Offload`) as it runs on the fake CPU copy standing for the compute device: onload
    on the CPU, host copies in RAM, synchronous copies, the budget in bytes less the adapters'."""
    size = budget_bytes(config, hardware)
    return dataclasses.replace(
        config, onload_device="cpu", offload_device="cpu", disk_path=None, pin="none", use_streams=False,
        vram_budget=None if size is None else max(size - trainable_bytes, 1),
    )  # fmt: skip


def apply_offload_fake(
    fake: nn.Module, configs: list[Any], hardware: Any = None, trainable_bytes: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """Apply the offload `configs` to the fake copy (inside its fake mode); returns (device buffers:
    the prefetch slots, host buffers: the streamed groups' host copies, notes). Raises what applying
    raises (nothing stays attached then)."""
    apply_stack(fake, *[fake_run_config(c, hardware, trainable_bytes) for c in configs])
    slots, host = offload_buffers(fake)
    report = offload_report(fake)
    notes = [
        f"offload: its hooks ran on the fake copy ({report.granularity} granularity, {len(report.resident)} resident "
        f"/ {len(report.streamed)} streamed groups, {report.slots} slot(s)); the fake CPU stands for the device, "
        f"streamed weights are counted on the host (RAM or disk alike), not the device"
    ]
    return slots, host, notes


def modelled_weights(
    model: nn.Module, configs: list[Any], job: Job, hardware: Any = None, trainable_bytes: int = 0,
    checkpointed: list[str] = (),
) -> tuple[int, int, int, list[str]]:
    """(device weight bytes, prefetch slot bytes, host bytes, notes) of `model` as it is now (with the
    run techniques applied) under the modelled configs, from their cost declarations.

    `trainable_bytes` (LoRA adapters, kept resident by offloading) come out of an offload's budget.
    `checkpointed` blocks recompute in backward with all their groups loaded at once: at leaf
    granularity the offload then adds slots until each of them has one (it warns when it does)."""
    model_map = describe(model)
    placement = Placement.resident(footprint_from_map(model_map))
    vram = getattr(hardware, "vram", None)
    hw = SimpleNamespace(vram=vram or 0, pinned_limit=getattr(hardware, "pinned_limit", 0), device="cuda")
    ctx = CostContext(hardware=hw, job=job, device_room=0, ram_room=0,
                      passes=job.calls_per_step * (2 if job.training else 1), training=job.training,
                      video=job.frames > 1, cfg=job.cfg)  # fmt: skip
    notes = []
    for config in configs:
        size = budget_bytes(config, hardware)
        if size is not None:
            config = dataclasses.replace(config, vram_budget=max(size - trainable_bytes, 1))
        effect = technique_of(config).cost.effect
        placed = effect(placement, config, ctx)
        granularity = getattr(config, "granularity", None)
        if granularity == "auto":
            granularity = "block" if model_map.towers else "leaf"
            # As the technique does: blocks when they fit the budget, else leaves.
            if size is not None and placed.device_bytes + placed.transient_bytes > config.vram_budget:
                granularity = "leaf"
                placed = effect(placement, dataclasses.replace(config, granularity="leaf"), ctx)
        slots = config.depth + 1 if hasattr(config, "depth") else 1
        if job.training and checkpointed and granularity == "leaf" and size is None and placed.transient_bytes:
            need = max(_groups_in(model, model_map, path) for path in checkpointed)
            if need > slots:
                placed = dataclasses.replace(placed, transient_bytes=placed.transient_bytes * need // slots)
                notes.append(f"{technique_of(config).name}: {need} slots, one per leaf group of the largest "
                             f"checkpointed block (its recomputation holds them all), not {slots}")
        placement = placed
        notes.append(
            f"{technique_of(config).name}: resident weights and prefetch slots from its cost declaration; streamed "
            f"weights counted on the host, not the device"
        )
    return placement.device_bytes, placement.transient_bytes, placement.host_bytes, notes


def _groups_in(model: nn.Module, model_map: Any, block: str) -> int:
    """Leaf-granularity offload groups inside `block`: its leaves and its childless modules with tensors."""
    leaves = [leaf.path for leaf in model_map.leaves if leaf.path == block or leaf.path.startswith(block + ".")]
    rest = 0
    for path, module in model.get_submodule(block).named_modules(prefix=block):
        if any(path == p or path.startswith(p + ".") for p in leaves) or next(module.children(), None) is not None:
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            rest += 1
    return len(leaves) + rest


def checkpointed_blocks(model: nn.Module, configs: list[Any]) -> list[str]:
    """The blocks a `Checkpointing` among `configs` checkpoints on `model` (as it chooses them)."""
    for config in configs:
        if technique_of(config).name != CHECKPOINTING:
            continue
        model_map = describe(model)
        blocks = [b.path for t in model_map.main_towers for b in t.blocks] or [b.path for b in model_map.blocks]
        if isinstance(config.blocks, (list, tuple)):
            return list(config.blocks)
        return blocks if config.blocks == "auto" else blocks[: config.blocks]
    return []


# The offload's scheduler warns when a recomputation makes it add a slot beyond its plan. On the fake
# copy that is a finding of the plan (counted in the report's notes), not a fault of the user's run.
SCHEDULE_LOGGER = "hookwise.memory.schedule"


class _ThisThread(logging.Filter):
    """Drops the warnings this thread logs; other threads' records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and record.levelno == logging.WARNING:
            self.dropped += 1
            return False
        return True


@contextlib.contextmanager
def quiet_schedule() -> Iterator[_ThisThread]:
    """While a fake run steps: the offload scheduler's warnings from this thread are dropped (and
    counted); the logger, its level and every other thread's records are left as they are."""
    quiet = _ThisThread()
    logger = logging.getLogger(SCHEDULE_LOGGER)
    logger.addFilter(quiet)
    try:
        yield quiet
    finally:
        logger.removeFilter(quiet)


def overflow_note(fake: nn.Module) -> str | None:
    """A note for the slots the offload on `fake` added beyond its plan during the run, or None."""
    try:
        added = offload_report(fake).stats.get("overflow_slots", 0)
    except ConfigError:  # no offload on the copy
        return None
    if not added:
        return None
    return (f"offload: the run needed {added} prefetch slot(s) beyond the budget's plan (a checkpointed block's "
            f"recomputation holds all its groups at once); counted in the peak")
