"""CFG parallelism: the conditional and unconditional halves of a batched-CFG call on two ranks.

A sampler that runs classifier-free guidance as one batched call gives the model the same latents
twice (`torch.cat([x, x])`) with the two conditionings stacked behind them. The run state sees that
(`RunState.cfg_halves_equal`); this hook then gives rank i of a 2-rank group the i-th half of every
batched argument (a tensor whose first dimension is the latents' batch), runs the model on it, and
gathers the two halves of the output back into the full batch on both ranks. Each rank does half the
work; the result is the batched call's (and the two-call CFG's) within float tolerance.

Calls that are not batched CFG (two-call CFG, a batch without equal halves, training) run whole on
every rank (`unbatched="run"`, said once in the log) or raise (`unbatched="error"`). On a group of
one rank the hook is the identity. Collectives wait at most the folder's timeout (`timeout_s`).
The group may be one dimension of a 2 x N device mesh (`mesh["cfg"]`), or, saved with the config,
`context=N`: the world of 2N ranks split CFG-major (rank i and i + N are a pair; ContextParallel(cfg=2)
splits the sequence over each half's N ranks), so it can stand next to context parallelism on the other
dimension: its hook sits outside the other parallel hooks
(`Layer.CFG_PARALLEL`), so the batch is halved before the sequence is split.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.config import TechniqueConfig, check_fraction, check_int
from ..core.hooks import HookRegistry, Layer, ModelHook, hook_on
from ..core.state import get_run_state
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..errors import ConfigError, HookwiseError
from ._dist import cfg_mesh_groups, group_of, resolve_group, timeout_of, wait

logger = logging.getLogger("hookwise.parallel.cfg")

NAME = "cfg_parallel"
HOOK = "hookwise.cfg_parallel"
UNBATCHED = ("run", "error")


@dataclass(frozen=True)
class CFGParallel(TechniqueConfig):
    """CFG parallelism (degree 2): each rank computes one half of a batched-CFG call.

    - `group`: the process group of the two ranks (None: the default world group; a 1-D
      `DeviceMesh` such as `mesh["cfg"]` of a 2 x N mesh). Not saved by `to_dict`: a stack loaded
      back runs on the world group unless it is given again.
    - `unbatched`: what a call that is not batched CFG does: "run" (whole, on every rank) or "error".
    - `replicated`: argument names never split, even when their first dimension equals the batch.
    - `timeout_s`: how long a gather waits for the other rank (None: HOOKWISE_DIST_TIMEOUT, else 600 s).
    - `context`: N > 1 on a world of 2 x N ranks beside `ContextParallel(cfg=2)`: rank i and rank i + N
      compute the two halves (the CFG dimension of the CFG-major mesh). Saved with the config; 1: the
      group (or the world) is the pair.
    """

    group: Any = dataclasses.field(default=None, compare=False)
    unbatched: str = "run"
    replicated: tuple[str, ...] = ()
    timeout_s: float | None = None
    context: int = 1

    def validate(self) -> None:
        check_int("CFGParallel.context", self.context, 1)
        if self.context > 1 and self.group is not None:
            raise ConfigError("CFGParallel(context=N) builds its pairs from the world's 2 x N split; give context= or group=, not both")
        if self.unbatched not in UNBATCHED:
            raise ConfigError(f"CFGParallel.unbatched={self.unbatched!r}: use one of {UNBATCHED}")
        if not isinstance(self.replicated, tuple) or not all(isinstance(n, str) for n in self.replicated):
            raise ConfigError(f"CFGParallel.replicated must be a tuple of argument names, got {self.replicated!r}")
        if self.timeout_s is not None:
            check_fraction("CFGParallel.timeout_s", self.timeout_s, allow_zero=False)

    def to_dict(self) -> dict[str, Any]:
        # A process group is not data: a saved stack runs on the world group unless given one again.
        return super().to_dict() if self.group is None else dataclasses.replace(self, group=None).to_dict()


class CFGParallelHook(ModelHook):
    """On the root model, inside the run state: splits batched-CFG calls over the two ranks."""

    layer = Layer.CFG_PARALLEL

    def __init__(self, config: CFGParallel, group: object, rank: int, size: int) -> None:
        self.config = config
        self.group = group
        self.rank = rank
        self.size = size
        self.timeout = timeout_of(config.timeout_s)
        self.names: list[str] = []  # positional parameter names of the model's forward
        self.split_calls = 0
        self.whole_calls = 0
        self._told = False

    def on_attach(self, module: nn.Module) -> None:
        try:
            params = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):
            params = []
        self.names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def new_forward(self, module: nn.Module, next_fn, *args: Any, **kwargs: Any) -> Any:
        batch = self._cfg_batch(module)
        if batch is None:
            self.whole_calls += 1
            return next_fn(*args, **kwargs)
        half = batch // 2
        lo, hi = self.rank * half, (self.rank + 1) * half
        names = self.names + [None] * (len(args) - len(self.names))  # *args beyond the named parameters
        args = tuple(self._half(name, a, batch, lo, hi) for name, a in zip(names, args))
        kwargs = {k: self._half(k, v, batch, lo, hi) for k, v in kwargs.items()}
        self.split_calls += 1
        return self._gather(next_fn(*args, **kwargs), half)

    def _cfg_batch(self, module: nn.Module) -> int | None:
        """The batch of this call when it is batched CFG to split, else None (the call runs whole)."""
        if self.size == 1:
            return None
        state = get_run_state(module)
        if state is None or state.mode != "eval":
            return None  # training: CFG parallelism is for sampling
        equal = state.cfg_halves_equal()
        if equal is not None and bool(equal):
            return state.latents.shape[0]
        if self.config.unbatched == "error":
            raise HookwiseError(
                "CFGParallel: this call is not batched CFG (its latents are not two equal halves of the batch), so "
                "there is nothing to split over the two ranks; call the model with torch.cat([x, x]) and both "
                "conditionings, or use CFGParallel(unbatched='run') to run such calls whole on every rank"
            )
        if not self._told:
            self._told = True
            logger.warning(
                "CFGParallel: a sampling call that is not batched CFG runs whole on every rank (no speed-up); "
                "batch the two CFG branches into one call to split them"
            )
        return None

    def _half(self, name: str | None, value: Any, batch: int, lo: int, hi: int) -> Any:
        if name in self.config.replicated:
            return value
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            return value[lo:hi]
        return value

    def _gather(self, output: Any, half: int) -> Any:
        if isinstance(output, torch.Tensor):
            if output.ndim == 0 or output.shape[0] != half:
                return output
            local = output.contiguous()
            parts = [torch.empty_like(local) for _ in range(self.size)]
            work = dist.all_gather(parts, local, group=self.group, async_op=True)
            wait(work, "gathering the two CFG halves of the output", "CFGParallel", self.timeout)
            return torch.cat(parts, dim=0)
        if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
            return type(output)(*(self._gather(v, half) for v in output))
        if isinstance(output, (tuple, list)):
            return type(output)(self._gather(v, half) for v in output)
        if isinstance(output, dict):  # diffusers' BaseOutput is an ordered dict with attributes
            return type(output)(**{k: self._gather(v, half) for k, v in output.items()})
        return output


def _apply_cfg_parallel(model: nn.Module, config: CFGParallel) -> None:
    group = resolve_group(config.group, "CFGParallel")
    if config.context > 1:
        world = group_of(None, "CFGParallel").size
        if world != 2 * config.context:
            raise HookwiseError(
                f"CFGParallel(context={config.context}) runs on a 2 x {config.context} world ({2 * config.context} ranks); "
                f"this one has {world}: launch {2 * config.context} processes or state context={world // 2 or 1}"
            )
        group = cfg_mesh_groups(2, "cfg", "CFGParallel", f"context={config.context}")
    info = group_of(group, "CFGParallel")
    if info.size > 2:
        raise ConfigError(
            f"CFGParallel runs on 2 ranks (the conditional and unconditional halves); its group has {info.size}. "
            "Pass a group of two (e.g. the 'cfg' dimension of a 2 x N DeviceMesh, with context parallelism "
            "on the other dimension)"
        )
    if get_run_state(model) is None:  # hookwise.apply attaches it first
        raise HookwiseError("CFGParallel needs hookwise's run state on the model; apply it with hookwise.apply")
    HookRegistry.get_or_create(model).add(HOOK, CFGParallelHook(config, info.group, info.rank, info.size))


def _remove_cfg_parallel(model: nn.Module, config: CFGParallel | None = None) -> None:
    registry = HookRegistry.of(model)
    if registry is not None:
        registry.remove(HOOK, missing_ok=True)


def cfg_parallel_report(model: nn.Module) -> dict[str, int]:
    """How many calls CFGParallel split over the ranks and how many ran whole on this rank."""
    hook = hook_on(model, HOOK, CFGParallelHook, technique="CFGParallel", caller="cfg_parallel_report")
    return {"split": hook.split_calls, "whole": hook.whole_calls, "ranks": hook.size}


def apply_cfg_parallel(model: nn.Module, config: CFGParallel | None = None) -> None:
    """Run the halves of batched-CFG calls of `model` on two ranks (the same as `hookwise.apply(model, config)`)."""
    apply_techniques(model, [config or CFGParallel()])


def remove_cfg_parallel(model: nn.Module) -> None:
    """Remove CFGParallel from `model` (the same as `hookwise.remove(model, "cfg_parallel")`)."""
    remove_techniques(model, [NAME])


register_technique(NAME, CFGParallel, apply=_apply_cfg_parallel, remove=_remove_cfg_parallel, layer=Layer.CFG_PARALLEL)
