"""Activation checkpointing per tower block, through hooks, on any mapped model.

A hook on each chosen block replaces its call, when gradients are enabled, by a non-reentrant
`torch.utils.checkpoint.checkpoint` of the rest of the block's chain: the block's activations are
dropped after forward and recomputed in backward. The hook sits outside every offloading hook of the
block (`Layer.CHECKPOINT`), so the recompute enters the offload group hook again and loads the
group's weights. With gradients off (inference) the hook passes the call through.

Every tensor input (positional, keyword, or inside a tuple such as rotary embeddings) is handed to
`checkpoint` positionally, so the inputs it keeps go through saved-tensor hooks: with
`offload_activations` they are kept on the host (pinned with CUDA) and copied back for backward.

`blocks`: "auto" (every block of the main towers), an int N (the first N blocks in call order: every
block's activations are alive at the end of forward, so which N does not change the peak for blocks
of one size, and the first N is predictable), or a list of module paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from ..core import Layer, ModelHook, TechniqueConfig, add_hook, apply_techniques, register_technique
from ..core import remove_hooks, remove_techniques, unwrap
from ..errors import ConfigError, NoTargetError
from ..introspect import describe

NAME = "checkpointing"
HOOK = "hookwise.checkpointing"
logger = logging.getLogger("hookwise.train.checkpointing")


@dataclass(frozen=True)
class Checkpointing(TechniqueConfig):
    """Activation checkpointing per tower block (recompute in backward instead of keeping activations).

    - `blocks`: "auto" (every main-tower block), the number of blocks to checkpoint (the first ones in
      call order), or a list of block paths.
    - `offload_activations`: keep the block inputs that checkpointing saves on the host.
    - `budget`: reserved for choosing blocks from measured activation bytes (not implemented yet: must
      be None).
    """

    blocks: Any = "auto"
    offload_activations: bool = False
    budget: int | str | None = None

    def validate(self) -> None:
        b = self.blocks
        if isinstance(b, bool) or not (
            b == "auto" or (isinstance(b, int) and b >= 0)
            or (isinstance(b, (list, tuple)) and b and all(isinstance(p, str) for p in b))
        ):
            raise ConfigError(
                f"Checkpointing.blocks must be 'auto', a number of blocks >= 0, or a non-empty list of block "
                f"paths; got {b!r}"
            )
        if not isinstance(self.offload_activations, bool):
            raise ConfigError(f"Checkpointing.offload_activations must be True or False, got {self.offload_activations!r}")
        if self.budget is not None:
            raise ConfigError(
                "Checkpointing.budget is not supported yet; leave it None and choose blocks with blocks=N or a list"
            )


class _HostSaver:
    """saved_tensors_hooks that keep saved tensors on the host and copy them back for backward."""

    def __init__(self) -> None:
        self.packed = 0
        self.unpacked = 0

    def pack(self, t: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        self.packed += 1
        if t.device.type == "cpu":
            return t.device, t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=True)
        return t.device, host

    def unpack(self, packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        self.unpacked += 1
        device, t = packed
        return t.to(device, non_blocking=True)


class _CheckpointHook(ModelHook):
    """Runs its block under non-reentrant checkpointing when gradients are enabled."""

    layer = Layer.CHECKPOINT

    def __init__(self, saver: _HostSaver | None) -> None:
        self.saver = saver
        self.calls = 0

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return next_fn(*args, **kwargs)
        self.calls += 1
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

        def run(*tensors: torch.Tensor) -> Any:
            values = list(leaves)
            for i, t in zip(where, tensors):
                values[i] = t
            a, kw = tree_unflatten(values, spec)
            return next_fn(*a, **kw)

        tensors = [leaves[i] for i in where]
        if self.saver is None:
            return checkpoint(run, *tensors, use_reentrant=False)
        with torch.autograd.graph.saved_tensors_hooks(self.saver.pack, self.saver.unpack):
            return checkpoint(run, *tensors, use_reentrant=False)


@dataclass
class CheckpointingReport:
    """Which blocks are checkpointed, and why."""

    blocks: list[str]
    checkpointed: list[str]
    reason: str
    offload_activations: bool
    calls: dict[str, int] = field(default_factory=dict)
    # Inputs kept on the host and copied back for backward (with offload_activations), since applied.
    host_packed: int = 0
    host_unpacked: int = 0
    saver: Any = field(default=None, repr=False)


def _choose(model: nn.Module, config: Checkpointing) -> tuple[list[str], list[str], str]:
    model_map = describe(model)
    blocks = [b.path for t in model_map.main_towers for b in t.blocks] or [b.path for b in model_map.blocks]
    if isinstance(config.blocks, (list, tuple)):
        modules = dict(model.named_modules())
        missing = [p for p in config.blocks if p not in modules]
        if missing:
            raise NoTargetError(f"Checkpointing: no module at {missing} in {type(model).__name__}; check the paths")
        return blocks, list(config.blocks), "listed"
    if not blocks:
        raise NoTargetError(
            f"Checkpointing: {type(model).__name__} has no tower of blocks ({'; '.join(model_map.notes) or 'nothing found'}); "
            f"name the blocks with blocks=[paths] or state towers= in hookwise.describe"
        )
    if config.blocks == "auto":
        return blocks, blocks, "every main-tower block"
    if config.blocks > len(blocks):
        raise NoTargetError(f"Checkpointing: blocks={config.blocks} but the model has {len(blocks)} blocks")
    return blocks, blocks[: config.blocks], f"the first {config.blocks} blocks in call order"


def _apply_checkpointing(model: nn.Module, config: Checkpointing) -> None:
    model = unwrap(model)
    blocks, chosen, reason = _choose(model, config)
    saver = _HostSaver() if config.offload_activations else None
    if not chosen:
        raise NoTargetError("Checkpointing: blocks=0 checkpoints nothing; leave the technique off instead")
    for path in chosen:
        add_hook(model.get_submodule(path), _CheckpointHook(saver), HOOK)
    logger.info("checkpointing %d of %d blocks (%s)", len(chosen), len(blocks), reason)
    model._hookwise_checkpointing = CheckpointingReport(
        blocks, chosen, reason, config.offload_activations, saver=saver
    )


def _remove_checkpointing(model: nn.Module, config: Checkpointing | None = None) -> None:
    model = unwrap(model)
    remove_hooks(model, lambda name, hook: name == HOOK)
    vars(model).pop("_hookwise_checkpointing", None)


def checkpointing_report(model: nn.Module) -> CheckpointingReport:
    """What Checkpointing chose on `model`: candidate blocks, checkpointed blocks, why, calls so far."""
    model = unwrap(model)
    report = vars(model).get("_hookwise_checkpointing")
    if report is None:
        raise ConfigError("checkpointing_report: Checkpointing is not applied to this model (apply it first)")
    modules = dict(model.named_modules())
    calls = {}
    for path in report.checkpointed:
        hook = getattr(modules[path], "_hookwise_registry", None)
        hook = hook.get(HOOK) if hook is not None else None
        calls[path] = hook.calls if hook is not None else 0
    report.calls = calls
    if report.saver is not None:
        report.host_packed, report.host_unpacked = report.saver.packed, report.saver.unpacked
    return report


def apply_checkpointing(model: nn.Module, config: Checkpointing | None = None) -> None:
    """Checkpoint the blocks of `model` chosen by `config` (the same as `hookwise.apply(model, config)`)."""
    apply_techniques(model, [config or Checkpointing()])


def remove_checkpointing(model: nn.Module) -> None:
    """Remove Checkpointing from `model` (the same as `hookwise.remove(model, "checkpointing")`)."""
    remove_techniques(model, [NAME])


register_technique(NAME, Checkpointing, apply=_apply_checkpointing, remove=_remove_checkpointing, layer=Layer.CHECKPOINT)
