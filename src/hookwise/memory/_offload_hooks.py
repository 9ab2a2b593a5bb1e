"""Offloading's hooks: on each module of a streamed group (the group is on the device while the
module runs) and on the model (inputs to the device, pass boundaries, saved-tensor packing)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ..core import Layer, ModelHook
from ._binding import GroupState
from ._guards import not_copyable
from ._schedule import Scheduler


class GroupHook(ModelHook):
    """On each module of a streamed group: the group is on the device while the module runs."""

    layer = Layer.OFFLOAD

    def __init__(self, scheduler: Scheduler, state: GroupState, module: nn.Module | None = None) -> None:
        self.scheduler = scheduler
        self.state = state
        # A module with submodules may checkpoint its own body, recomputed in backward outside this
        # hook: its outputs' autograd nodes load the group first (`Scheduler.guard_recompute`).
        self.guards_recompute = module is not None and next(module.children(), None) is not None
        self.detached = False

    def __deepcopy__(self, memo: dict) -> Any:
        raise not_copyable()

    def on_detach(self, module: nn.Module) -> None:
        # An adapter that replaced the module's forward after offloading (kohya's LoRA) still calls
        # the chain this hook was in as its original: from now on it passes through.
        self.detached = True

    def new_forward(self, module: nn.Module, next_fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.detached or self.state.held:  # held resident by `switch`: its tensors are device copies
            return next_fn(*args, **kwargs)
        sched = self.scheduler
        saving = sched.acquire(self.state)  # checks a group file before its pages are read
        try:
            with nullcontext() if saving is None else saving:
                output = next_fn(*args, **kwargs)
        finally:
            sched.release(self.state)
        if self.guards_recompute and torch.is_grad_enabled():
            sched.guard_recompute(self.state, output)
        return output


class RootHook(ModelHook):
    """On the model: inputs to the device, pass boundaries, and saved-tensor packing with gradients."""

    layer = Layer.OFFLOAD_ROOT

    def __init__(self, offloader: Any) -> None:  # offload._Offloader
        self.offloader = offloader
        self.detached = False

    def on_detach(self, module: nn.Module) -> None:
        self.detached = True  # as GroupHook's

    def new_forward(self, module: nn.Module, next_fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.detached:
            return next_fn(*args, **kwargs)
        ctl = self.offloader
        sched = ctl.scheduler
        args, kwargs = ctl.inputs_to_device(args, kwargs)
        grad = torch.is_grad_enabled()
        sched.begin_pass()
        try:
            saving = sched.saving()
            with nullcontext() if saving is None else saving:
                output = next_fn(*args, **kwargs)
        finally:
            sched.end_pass(grad)
        sched.guard_files(output)
        return output
