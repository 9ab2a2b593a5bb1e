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

`budget` (with "auto" or a list: the candidates) checkpoints only as many candidates as needed to
keep the bytes they hold for backward within it. The first grad-enabled call of the model
checkpoints every candidate (never more memory than full checkpointing) and measures, in each
block's checkpointed forward, what autograd asks to save: every tensor passes the checkpoint's pack
hook there (which drops it), so chaining a counter in front of that hook sees the block's
saved-for-backward storages without keeping them (parameters excluded, each storage counted once),
and a `FlopCounterMode` counts the matmul FLOPs a recompute of the block costs. At the end of that
call the blocks are chosen: every candidate keeps its inputs (the checkpoint saves them; on the
host with `offload_activations`); the budget left pays for the activations of blocks that are not
checkpointed, taken greedily by recompute FLOPs saved per byte kept (blocks of one kind: the
smallest first, so the fewest are checkpointed). A budget below the inputs alone is stated (a
warning and the report) and every candidate stays checkpointed.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ..core import Layer, ModelHook, TechniqueConfig, add_hook, apply_techniques, register_technique
from ..core import remove_hooks, remove_techniques, unwrap
from ..core.cost import ActivationTerm, CostContext, Placement, TechniqueCost, parse_size
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
    - `budget`: bytes ("2GB" = 2e9, "2GiB" = 2 * 2**30, or a number) the candidate blocks ("auto" or
      the listed ones) may keep for backward on the compute device, their inputs included: only as
      many are checkpointed as needed to stay within it, chosen from bytes measured on the first
      grad-enabled call (which checkpoints them all). Not with `blocks=N` (a count and a budget
      would both choose the blocks).
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
            if isinstance(self.blocks, int):
                raise ConfigError(
                    f"Checkpointing(blocks={self.blocks}, budget={self.budget!r}): a count and a budget would both choose "
                    f"the blocks; use blocks='auto' (or a list of candidates) with the budget, or drop the budget"
                )
            parse_size(self.budget, "Checkpointing.budget")


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


def _top_hooks() -> tuple[Callable, Callable] | None:
    """The innermost saved-tensor hooks now active (the checkpoint's, inside its forward)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


@dataclass
class BlockMeasure:
    """What one block's calls of the measured step saved for backward and cost to recompute."""

    saved_bytes: int = 0  # storages autograd saved inside the block (parameters and inputs excluded)
    input_bytes: int = 0  # its tensor inputs, which the checkpoint keeps (shared ones counted at first use)
    flops: int = 0  # FLOPs of its forward, what a recompute costs
    calls: int = 0


class _Budget:
    """The budget's state: measuring on the first grad-enabled call, then the chosen blocks."""

    def __init__(self, budget: int, candidates: list[str], host_inputs: bool) -> None:
        self.budget = budget
        self.candidates = candidates
        self.host_inputs = host_inputs
        self.measuring = True
        self.started = False
        self.measured: dict[str, BlockMeasure] = {p: BlockMeasure() for p in candidates}
        self.seen_inputs: set[tuple[str, int]] = set()
        self.checkpointed: set[str] = set(candidates)
        self.reason = "measuring: every candidate checkpointed until the first grad-enabled call ends"
        self.unmet = False

    def wants(self, path: str) -> bool:
        return path in self.checkpointed

    def measure(self, path: str, module: nn.Module, tensors: list[torch.Tensor], run: Callable[[], Any]) -> Any:
        """Run the block's checkpointed forward, counting what it saves for backward and its FLOPs."""
        entry = self.measured[path]
        entry.calls += 1
        for t in tensors:
            key = _key(t)
            if key not in self.seen_inputs:
                self.seen_inputs.add(key)
                entry.input_bytes += t.untyped_storage().nbytes()
        # The storages that are not activations: the inputs, and the weights as bound when saved
        # (offloading binds them inside this call, after this hook).
        skip = {_key(t) for t in tensors}

        def weights() -> set[tuple[str, int]]:
            return {_key(t) for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"}

        skip |= weights()
        # The checkpoint drops what it is asked to save, so an address can be reused within the block:
        # a storage counts again only once the tensor it was first seen through is gone.
        seen: dict[tuple[str, int], weakref.ref] = {}
        outer = _top_hooks()
        if outer is None:  # not under the checkpoint's hooks: nothing to chain to
            return run()
        outer_pack, outer_unpack = outer

        def pack(t: torch.Tensor) -> Any:
            key = _key(t)
            if key not in skip and key not in seen:
                skip.update(weights())
            if key not in skip and (key not in seen or seen[key]() is None):
                seen[key] = weakref.ref(t)
                entry.saved_bytes += t.untyped_storage().nbytes()
            return outer_pack(t)

        counter = FlopCounterMode(display=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, outer_unpack), counter:
            out = run()
        entry.flops += int(counter.get_total_flops())
        return out

    def choose(self) -> None:
        """Checkpoint the fewest candidates that keep the measured bytes within the budget."""
        self.measuring = False
        called = [p for p in self.candidates if self.measured[p].calls]
        inputs = 0 if self.host_inputs else sum(self.measured[p].input_bytes for p in called)
        room = self.budget - inputs
        if room < 0:
            self.unmet = True
            self.checkpointed = set(self.candidates)
            self.reason = (
                f"budget {self.budget} B is below the {inputs} B of block inputs that checkpointing itself keeps: "
                f"every candidate stays checkpointed and the budget is not met (raise it, or keep the inputs "
                f"on the host with offload_activations=True)"
            )
            message = "Checkpointing: " + self.reason
            logger.warning(message)
            warnings.warn(message, stacklevel=2)
            return

        def worth(path: str) -> tuple[float, int]:
            m = self.measured[path]
            return (m.flops / m.saved_bytes if m.saved_bytes else float("inf"), -m.saved_bytes)

        kept: list[str] = []
        for path in sorted(called, key=worth, reverse=True):
            if self.measured[path].saved_bytes <= room:
                room -= self.measured[path].saved_bytes
                kept.append(path)
        self.checkpointed = set(self.candidates) - set(kept)
        used = self.budget - room
        self.reason = (
            f"budget {self.budget} B: {len(self.checkpointed)} of {len(self.candidates)} candidates checkpointed, "
            f"{len(kept)} keep their activations ({used} B kept for backward, block inputs "
            f"{'on the host' if self.host_inputs else f'included ({inputs} B)'}); blocks kept by recompute FLOPs "
            f"saved per byte, most first"
            + (f"; {len(self.candidates) - len(called)} never called in the measured step stay checkpointed"
               if len(called) < len(self.candidates) else "")
        )
        logger.info("Checkpointing: %s", self.reason)


class _CheckpointHook(ModelHook):
    """Runs its block under non-reentrant checkpointing when gradients are enabled."""

    layer = Layer.CHECKPOINT

    def __init__(self, saver: _HostSaver | None, path: str = "", budget: _Budget | None = None) -> None:
        self.saver = saver
        self.path = path
        self.budget = budget
        self.calls = 0

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or (self.budget is not None and not self.budget.wants(self.path)):
            return next_fn(*args, **kwargs)
        self.calls += 1
        leaves, spec = tree_flatten((args, kwargs))
        where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        tensors = [leaves[i] for i in where]
        measuring = self.budget is not None and self.budget.measuring
        in_forward = [True]  # the recompute in backward runs `run` again: measure the forward only

        def run(*tensors: torch.Tensor) -> Any:
            values = list(leaves)
            for i, t in zip(where, tensors):
                values[i] = t
            a, kw = tree_unflatten(values, spec)
            if measuring and in_forward[0]:
                return self.budget.measure(self.path, module, list(tensors), lambda: next_fn(*a, **kw))
            return next_fn(*a, **kw)

        try:
            if self.saver is None:
                return checkpoint(run, *tensors, use_reentrant=False)
            with torch.autograd.graph.saved_tensors_hooks(self.saver.pack, self.saver.unpack):
                return checkpoint(run, *tensors, use_reentrant=False)
        finally:
            in_forward[0] = False


class _BudgetRootHook(ModelHook):
    """Ends the budget's measurement when the model's first grad-enabled call returns."""

    layer = Layer.CHECKPOINT

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget

    def new_forward(self, module: nn.Module, next_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not (self.budget.measuring and torch.is_grad_enabled()) or self.budget.started:
            return next_fn(*args, **kwargs)
        self.budget.started = True
        try:
            out = next_fn(*args, **kwargs)
        except BaseException:
            self.budget.started = False  # a failed call measured nothing usable: measure the next one
            self.budget.measured = {p: BlockMeasure() for p in self.budget.candidates}
            self.budget.seen_inputs.clear()
            raise
        self.budget.choose()
        return out


@dataclass
class CheckpointingReport:
    """Which blocks are checkpointed, and why; with a budget, the measured bytes per block."""

    blocks: list[str]
    checkpointed: list[str]
    reason: str
    offload_activations: bool
    calls: dict[str, int] = field(default_factory=dict)
    # Inputs kept on the host and copied back for backward (with offload_activations), since applied.
    host_packed: int = 0
    host_unpacked: int = 0
    saver: Any = field(default=None, repr=False)
    budget: int | None = None  # bytes, parsed
    measured: dict[str, BlockMeasure] = field(default_factory=dict)  # per candidate, after the first grad call
    budget_met: bool | None = None  # None until measured
    candidates: list[str] = field(default_factory=list)
    state: Any = field(default=None, repr=False)


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
    budget = None
    if config.budget is not None:
        if not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
            raise ConfigError(
                f"Checkpointing(budget=...) measures saved tensors through a hook torch {torch.__version__} does not "
                f"have; choose the blocks with blocks=N or a list instead"
            )
        budget = _Budget(parse_size(config.budget, "Checkpointing.budget"), chosen, config.offload_activations)
        reason = budget.reason
        add_hook(model, _BudgetRootHook(budget), HOOK)
    for path in chosen:
        add_hook(model.get_submodule(path), _CheckpointHook(saver, path, budget), HOOK)
    logger.info("checkpointing %d of %d blocks (%s)", len(chosen), len(blocks), reason)
    model._hookwise_checkpointing = CheckpointingReport(
        blocks, chosen, reason, config.offload_activations, saver=saver,
        budget=budget.budget if budget else None, candidates=list(chosen), state=budget,
    )  # fmt: skip


def _remove_checkpointing(model: nn.Module, config: Checkpointing | None = None) -> None:
    model = unwrap(model)
    remove_hooks(model, lambda name, hook: name == HOOK)
    vars(model).pop("_hookwise_checkpointing", None)


def checkpointing_report(model: nn.Module) -> CheckpointingReport:
    """What Checkpointing chose on `model`: candidate blocks, checkpointed blocks, why, checkpointed calls so
    far; with a budget, the budget in bytes, each candidate's measured bytes and FLOPs, and whether it is met."""
    model = unwrap(model)
    report = vars(model).get("_hookwise_checkpointing")
    if report is None:
        raise ConfigError("checkpointing_report: Checkpointing is not applied to this model (apply it first)")
    budget = report.state
    if budget is not None:
        report.checkpointed = [p for p in report.candidates if budget.wants(p)]
        report.reason = budget.reason
        report.measured = {p: replace(m) for p, m in budget.measured.items()} if not budget.measuring else {}
        report.budget_met = None if budget.measuring else not budget.unmet
    modules = dict(model.named_modules())
    calls = {}
    for path in report.candidates if budget is not None else report.checkpointed:
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


# ---- cost declaration (for the planner) -------------------------------------------------------------
def _planned_count(config: Checkpointing, term: ActivationTerm) -> int:
    """How many of the term's blocks `config` checkpoints (a budget: the fewest that fit it)."""
    count = len(term.kept)
    if config.budget is not None:
        budget = parse_size(config.budget, "Checkpointing.budget")
        host = config.offload_activations
        for n in range(count + 1):
            kept = (0 if host else sum(term.inputs[:n])) + sum(term.kept[n:])
            if kept <= budget:
                return n
        return count
    if isinstance(config.blocks, (list, tuple)):
        return min(len(config.blocks), count)
    return count if config.blocks == "auto" else min(int(config.blocks), count)


def _checkpointing_effect(placement: Placement, config: Checkpointing, ctx: CostContext) -> Placement:
    """Checkpointed blocks keep their inputs instead of their activations (on the host with
    `offload_activations`) and run their forward again in backward: one more forward over their
    share of the tower (a training step computes about three forwards) and of the streamed weights."""
    term = ctx.activations
    if term is None or not term.kept:
        return placement
    n = _planned_count(config, term)
    share = n / len(term.kept)
    inputs = sum(term.inputs[:n])
    activations = term.total(n) - (inputs if config.offload_activations else 0)
    calls = getattr(ctx.job, "calls_per_step", 1)
    extra = share * calls / max(ctx.passes, 1)  # of what one step moves: one more pass per call
    return replace(
        placement,
        activation_bytes=activations,
        host_bytes=placement.host_bytes + (inputs if config.offload_activations else 0),
        moved_bytes=placement.moved_bytes + int(placement.moved_bytes * extra),
        transfers=placement.transfers + round(placement.transfers * extra),
        compute_factor=placement.compute_factor * (3 + share) / 3,
        notes=(*placement.notes, f"checkpointing {n} of {len(term.kept)} blocks: activations by the job's estimate "
                                 f"split per block by the formula's shares"),
    )


def _checkpointing_options(placement: Placement, ctx: CostContext) -> list[Checkpointing]:
    """For a training job that does not checkpoint by itself: half the blocks, every block, and the
    budget that fills the device room left once the weights are placed (when between the two)."""
    term = ctx.activations
    if term is None or term.checkpointed or not term.kept:
        return []
    count = len(term.kept)
    options = [Checkpointing(blocks=count // 2)] if count >= 2 else []
    options.append(Checkpointing())
    free = ctx.device_room - placement.device_bytes - placement.transient_bytes
    allowed = term.total(0) + free  # the room was left for the job's activations with none checkpointed
    budget = allowed - term.running
    if budget > 0:
        n = _planned_count(Checkpointing(budget=budget), term)
        if 0 < n < count and n != count // 2:
            options.append(Checkpointing(budget=int(budget)))
    return options


register_technique(
    NAME,
    Checkpointing,
    apply=_apply_checkpointing,
    remove=_remove_checkpointing,
    layer=Layer.CHECKPOINT,
    description="activation checkpointing per block (all, N, listed, or by a measured budget), training only",
    cost=TechniqueCost(_checkpointing_effect, _checkpointing_options, sampling=False),
)
