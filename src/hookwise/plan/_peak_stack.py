"""A stack of techniques on a fake copy of a model, for one fake-tensor run of a job's step.

The copy shares no tensor with the model: every parameter and buffer is a fake tensor of the same
shape, dtype and strides (`copy.deepcopy` with those fakes in its memo, so only module objects are
copied and nothing is allocated). The stack is applied to the copy with `hookwise.apply`, inside the
fake mode, so every hook is in place as it would be on the device: casting stores its weights (and
scales) in their storage dtype and dequantizes per layer in the run, checkpointing (the project's own
technique, from the technique table) drops and recomputes each block's activations.

Offloading cannot run on fake tensors: its partition streams only plain tensors, and a fake tensor
is a tensor subclass, so it would keep every weight resident. Its device bytes come from its cost
declaration on the copy's footprint *after* the techniques that did run (cast weights are smaller):
resident groups plus the prefetch slots, a constant for the whole step, since a streamed group
only ever occupies a slot. The run then counts no weight of the copy, only what the step creates.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn

from ..core.cost import CostContext, Placement, parse_size
from ..core.techniques import technique_named, technique_of
from ..errors import ConfigError
from ..introspect import describe
from ..stack import Stack
from .footprint import footprint_from_map
from .job import Job

# Techniques whose hooks cannot run on fake tensors, and are composed from their cost declaration.
MODELLED = ("offload",)
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
    """(configs applied to the fake copy, configs modelled from their cost); a training job with
    checkpointing on gets the project's `Checkpointing` when the stack has none."""
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
        budget = getattr(config, "vram_budget", None)
        size = None
        if isinstance(budget, str) and budget.strip().endswith("%"):
            if not vram:
                raise ConfigError(
                    f"{type(config).__name__}(vram_budget={budget!r}) is a share of the device: pass hardware= (a "
                    f"hookwise.plan.Hardware, or anything with .vram) to estimate_peak, or give the budget in bytes"
                )
            size = int(vram * float(budget.strip()[:-1]) / 100)
        elif budget is not None:
            size = parse_size(budget, "vram_budget")
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
            f"{technique_of(config).name}: resident weights and prefetch slots from its cost declaration (its hooks "
            f"cannot run on fake tensors); streamed weights counted on the host, not the device"
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
