"""Data-parallel training: every rank trains on its share of the batch, the trained parameters stay equal.

Two modes, for LoRA (or any partly frozen) training launched with `torchrun`:

- `"ddp"` (replicated base): at apply the trainable parameters are broadcast from rank 0, so every
  rank starts equal; after each backward of a forward made with gradients on, the trainable gradients
  are averaged over the group in one flat all-reduce per dtype (queued at the end of backward, as
  torch's DDP does it, so nothing waits inside backward). Reversible: the hooks come off exactly. No
  wrapper module: the model stays the model, with every other hookwise technique on it (casting,
  offload, checkpointing, quantization).
- `"fsdp"` (sharded base, FSDP2): torch's `fully_shard` on each tower block and on the root, so the
  frozen base and the LoRA parameters are sharded over the group (parameters become DTensors) and
  gathered per block for compute (rank 0's trainable values are broadcast first). Irreversible (it changes the modules in place: reload to undo), and
  refused with techniques that move or rewrite weights themselves (offloading, quantization, GGUF,
  fp8 casting), applied before or after it: FSDP2 owns the parameters' storage.

Gradient accumulation: the micro-steps that do not step the optimizer run inside `no_sync(model)`
(DDP: no average; FSDP2: `set_requires_gradient_sync(False)`), so a step of k micro-batches
synchronises once. Applying is all-or-nothing: a `fully_shard` that fails part-way (or a technique
applied after it in the same call) puts every module back as it was (class, parameters, hooks), and
what FSDP2 cannot stand is refused in either order (`refuses_to_follow` / `refuses_to_precede`).

Collectives wait at most the folder's timeout (`timeout_s`); a rank that died ends the others with a
`CollectiveError`. On a group of one rank both modes are the identity (nothing to synchronise).
`average_gradients(params)` averages the gradients of parameters that live outside the model (a
trainer's extra embeddings) the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..core.config import TechniqueConfig, check_fraction
from ..core.hooks import HookRegistry, Layer, ModelHook, hook_on, unwrap
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import current_transaction
from ..errors import CompatibilityError, ConfigError, NoTargetError
from ..introspect import describe
from ._dist import group_of, resolve_group, timeout_of, wait

NAME = "data_parallel"
HOOK = "hookwise.data_parallel"
MODES = ("ddp", "fsdp")
# What FSDP2 cannot stand under: techniques that move, re-store or rewrite the weights it shards.
_NOT_UNDER_FSDP = {
    "offload": "offloading moves the weights between devices, and FSDP2 owns their storage (shards them instead)",
    "component_offload": "component offloading moves whole components, and FSDP2 owns the weights' storage",
    "quantization": "quantized weights are tensor subclasses FSDP2 cannot shard here",
    "gguf": "GGUF weights are packed blocks FSDP2 cannot shard",
    "casting": "fp8 casting re-stores each weight in place, and FSDP2's all-gather needs the sharded parameters "
    "untouched (cast with DataParallel(mode='ddp'), or shard a bf16 base)",
}


@dataclass(frozen=True)
class DataParallel(TechniqueConfig):
    """Data-parallel training over a process group: `mode="ddp"` (replicated) or `"fsdp"` (FSDP2 sharded).

    - `group`: the process group (None: the default world group; or a 1-D `DeviceMesh`). Not saved
      by `to_dict`.
    - `timeout_s`: how long a collective waits for the other ranks (None: HOOKWISE_DIST_TIMEOUT, else 600 s).
    """

    mode: str = "ddp"
    group: Any = dataclasses.field(default=None, compare=False)
    timeout_s: float | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"DataParallel.mode={self.mode!r}: use 'ddp' (replicated) or 'fsdp' (FSDP2, sharded)")
        if self.timeout_s is not None:
            check_fraction("DataParallel.timeout_s", self.timeout_s, allow_zero=False)

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() if self.group is None else dataclasses.replace(self, group=None).to_dict()

    def refuses_to_follow(self, earlier: TechniqueConfig) -> str | None:
        why = _NOT_UNDER_FSDP.get(earlier.technique) if self.mode == "fsdp" else None
        return f"DataParallel(mode='fsdp') cannot shard a model with {earlier.technique!r} on it: {why}" if why else None

    def refuses_to_precede(self, later: TechniqueConfig) -> str | None:
        why = _NOT_UNDER_FSDP.get(later.technique) if self.mode == "fsdp" else None
        return f"{later.technique!r} cannot run on a model DataParallel(mode='fsdp') sharded: {why}" if why else None


def average_gradients(params: Iterable[torch.Tensor], group: object = None, *, timeout_s: float | None = None) -> None:
    """Average the gradients of `params` over `group` (missing gradients count as zeros and become them)."""
    params = list(params)
    if not params or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    timeout = timeout_of(timeout_s)
    size = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, same in by_dtype.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        work = dist.all_reduce(flat, group=group, async_op=True)
        wait(work, f"averaging the gradients ({flat.numel()} {str(dtype).removeprefix('torch.')} values)",
             "DataParallel", timeout)  # fmt: skip
        flat.div_(size)
        offset = 0
        for p in same:
            n = p.numel()
            chunk = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)
            offset += n


def mean_over_ranks(value: torch.Tensor | float, group: object = None, *, timeout_s: float | None = None) -> float:
    """The mean of a scalar over the ranks of `group` (the value itself outside torch.distributed)."""
    t = value.detach().reshape(1).double() if torch.is_tensor(value) else torch.tensor([float(value)], dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return float(t)
    work = dist.all_reduce(t, group=group, async_op=True)
    wait(work, "averaging a scalar (the loss) over the ranks", "DataParallel", timeout_of(timeout_s))
    return float(t) / dist.get_world_size(group)


class DataParallelHook(ModelHook):
    """On the root model: arms the gradient average for the backward of a forward made with gradients on."""

    layer = Layer.PARALLEL

    def __init__(self, config: DataParallel, group: object, size: int, params: list[nn.Parameter]) -> None:
        self.config = config
        self.group = group
        self.size = size
        self.params = params
        self.armed = False
        self.queued = False
        self.sync = True  # False inside no_sync(model)
        self.syncs = 0
        self.handles: list[Any] = []

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if torch.is_grad_enabled():  # decided at forward, as torch's DDP does: a forward inside no_sync keeps
            self.armed = self.sync  # its backward's gradients local
        return args, kwargs

    def on_grad(self, param: torch.Tensor) -> None:
        # Called for each trainable parameter as its gradient is accumulated; the first one of a backward
        # queues the average at the end of that backward, when every gradient is there.
        if self.armed and not self.queued and self.size > 1:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    def _sync(self) -> None:
        self.queued = False
        self.armed = False
        average_gradients(self.params, self.group, timeout_s=self.config.timeout_s)
        self.syncs += 1


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradient accumulation's micro-steps: backward passes of forwards made inside keep their gradients on
    each rank (no collective); the first backward of a forward made outside synchronises what accumulated.

        for i, micro in enumerate(micro_batches):
            with no_sync(model) if i < len(micro_batches) - 1 else contextlib.nullcontext():
                (loss_of(model, micro) / len(micro_batches)).backward()
        optimizer.step()

    So an optimizer step of k micro-batches costs one gradient average (mode "ddp": one all-reduce per
    dtype) instead of k. Mode "fsdp" uses FSDP2's `set_requires_gradient_sync(False)` (its gradients
    stay unsharded, and are reduce-scattered by the last backward): run the backward inside too.
    """
    hook = hook_on(model, HOOK, DataParallelHook, technique="DataParallel", caller="no_sync")
    if hook.config.mode == "fsdp":
        root = unwrap(model)
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)
        return
    before = hook.sync
    hook.sync = False
    try:
        yield
    finally:
        hook.sync = before


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NoTargetError(
            "DataParallel: no parameter of the model requires grad, so there is nothing to train and synchronise; "
            "add the LoRA (peft) or unfreeze what you train before applying it"
        )
    return params


def _broadcast(params: list[nn.Parameter], group: object, config: DataParallel) -> None:
    """Rank 0's values of `params` on every rank (one flat broadcast per dtype); this rank's own values
    come back if the apply fails later."""
    txn = current_transaction()
    if txn is not None:
        before = [(p, p.detach().clone()) for p in params]

        def restore() -> None:
            with torch.no_grad():
                for p, value in before:
                    p.copy_(value)

        txn.on_rollback(restore, "DataParallel's broadcast of rank 0's trainable values")
    timeout = timeout_of(config.timeout_s)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    with torch.no_grad():
        for same in by_dtype.values():
            flat = torch.cat([p.detach().reshape(-1) for p in same])
            work = dist.broadcast(flat, src, group=group, async_op=True)
            wait(work, "broadcasting rank 0's trainable parameters", "DataParallel", timeout)
            offset = 0
            for p in same:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def _apply_ddp(model: nn.Module, config: DataParallel, group: object, size: int) -> None:
    params = _trainable(model)
    hook = DataParallelHook(config, group, size, params)
    if size > 1:
        _broadcast(params, group, config)
    HookRegistry.get_or_create(model).add(HOOK, hook)
    for p in params:
        hook.handles.append(p.register_post_accumulate_grad_hook(hook.on_grad))


def _apply_fsdp(model: nn.Module, config: DataParallel, group: object, size: int) -> None:
    params = _trainable(model)
    if size > 1:  # FSDP2 shards each rank's own values: start every rank from rank 0's trainable ones
        _broadcast(params, group, config)
    from torch.distributed import fsdp
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        group = dist.group.WORLD
    mesh = DeviceMesh.from_group(group, "cuda" if next(model.parameters()).is_cuda else "cpu")
    blocks = [model.get_submodule(path) for tower in describe(model).towers for path in tower.block_paths]
    # All or nothing: fully_shard changes each module in place (class, parameters, hooks), so what it
    # changed is put back if a later fully_shard, or anything after it in this apply, fails.
    restore = _unsharded_state(model)
    txn = current_transaction()
    try:
        for block in blocks:
            fsdp.fully_shard(block, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
    except BaseException:
        if txn is None:
            restore()
        raise
    finally:
        if txn is not None:
            txn.on_rollback(restore, "DataParallel(mode='fsdp')'s fully_shard")
    hook = DataParallelHook(config, group, size, [])
    HookRegistry.get_or_create(model).add(HOOK, hook)


# The per-module state fully_shard changes besides parameters: hooks it registers, by kind.
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)  # fmt: skip


def _unsharded_state(model: nn.Module) -> Any:
    """A function that puts every module of `model` back as it is now, undoing `fully_shard` on any of them:
    its class, parameters (the same objects, with their data), buffers, hooks and attributes, and
    torch's record of the module's composable state. Holds references only (no copies of the weights)."""
    saved = []
    for module in model.modules():
        params = dict(module._parameters)
        saved.append((
            module, module.__class__, set(module.__dict__), params, dict(module._buffers),
            {name: dict(getattr(module, name)) for name in _HOOK_DICTS if isinstance(getattr(module, name, None), dict)},
            {name: p.data for name, p in params.items() if p is not None},
        ))  # fmt: skip

    def restore() -> None:
        try:  # torch's map module -> FSDP state (a module in it cannot be sharded again)
            from torch.distributed._composable_state import _module_state_mapping as states
        except ImportError:  # pragma: no cover - a torch without it keeps the state on the module only
            states = {}
        for module, cls, keys, params, buffers, hooks, datas in saved:
            module.__class__ = cls
            for key in set(module.__dict__) - keys:
                del module.__dict__[key]
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            for name, entries in hooks.items():
                live = getattr(module, name)
                live.clear()
                live.update(entries)
            for name, data in datas.items():
                if params[name].data is not data:
                    params[name].data = data
            states.pop(module, None)

    return restore


def _apply_data_parallel(model: nn.Module, config: DataParallel) -> None:
    info = group_of(resolve_group(config.group, "DataParallel"), "DataParallel")
    if config.mode == "ddp":
        _apply_ddp(model, config, info.group, info.size)
    else:
        _apply_fsdp(model, config, info.group, info.size)


def _remove_data_parallel(model: nn.Module, config: DataParallel | None = None) -> None:
    registry = HookRegistry.of(model)
    hook = registry.get(HOOK) if registry is not None else None
    if config is not None and config.mode == "fsdp":
        raise CompatibilityError(
            "DataParallel(mode='fsdp') cannot be undone: FSDP2 changed the modules in place (their classes and "
            "DTensor parameters); reload the model to train or sample without it"
        )
    if isinstance(hook, DataParallelHook):
        for handle in hook.handles:
            handle.remove()
        hook.handles.clear()
    if registry is not None:
        registry.remove(HOOK, missing_ok=True)


def data_parallel_report(model: nn.Module) -> dict[str, Any]:
    """The mode, the group size and how many gradient averages DataParallel has made on this rank."""
    hook = hook_on(model, HOOK, DataParallelHook, technique="DataParallel", caller="data_parallel_report")
    return {"mode": hook.config.mode, "ranks": hook.size, "syncs": hook.syncs,
            "parameters": sum(p.numel() for p in hook.params)}  # fmt: skip


def apply_data_parallel(model: nn.Module, config: DataParallel | None = None) -> None:
    """Train `model` data-parallel over a process group (the same as `hookwise.apply(model, config)`)."""
    apply_techniques(model, [config or DataParallel()])


def remove_data_parallel(model: nn.Module) -> None:
    """Remove DataParallel (mode 'ddp') from `model` (the same as `hookwise.remove(model, "data_parallel")`)."""
    remove_techniques(model, [NAME])


register_technique(NAME, DataParallel, apply=_apply_data_parallel, remove=_remove_data_parallel, layer=Layer.PARALLEL)
