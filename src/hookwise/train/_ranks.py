"""The reference trainer on several processes (machinery of `trainer.py`; private).

Under `torchrun` (WORLD_SIZE > 1 in the environment) or with torch.distributed already initialised,
`train_lora` trains data-parallel: every rank draws the same global batch from the same generator and
trains on its slice of it, `DataParallel` averages the LoRA's gradients and `average_gradients` the
task's own trainable tensors, so the run is the single-process run on the whole batch. Every rank
takes rank 0's stack (the planner could choose differently per rank), every rank samples the
validations (a stack switch applies techniques on every rank alike), and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..parallel import DataParallel, average_gradients, default_timeout, mean_over_ranks, no_sync


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    created: bool = False  # this run initialised torch.distributed (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch: int, accumulate: int = 1) -> None:
        parts = self.world * accumulate
        if batch % parts:
            split = f"{self.world} ranks" + (f" x {accumulate} micro-batches" if accumulate > 1 else "")
            raise ConfigError(f"train_lora(batch={batch}) on {split}: the batch must split evenly over them; "
                              f"use a multiple of {parts}")  # fmt: skip

    def same_stack(self, configs: list[Any], explanation: str | None) -> tuple[list[Any], str | None]:
        """Rank 0's stack on every rank, with DataParallel added when there are several ranks."""
        if self.world == 1:
            return configs, explanation
        from ..stack import Stack

        box = [Stack(*configs).to_json(indent=None) if self.main else None, explanation]
        dist.broadcast_object_list(box, src=0)
        configs = list(Stack.from_json(box[0]).configs)
        if not any(isinstance(c, DataParallel) for c in configs):
            configs.append(DataParallel(mode="ddp"))
        return configs, box[1]

    def shard(self, task: Any, batch: int, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              cond: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
        """This rank's slice of a global batch."""
        return self.part(task, batch, self.world, self.rank, x0, noise, t, cond)

    @staticmethod
    def part(task: Any, batch: int, parts: int, i: int, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             cond: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:  # fmt: skip
        """The i-th of `parts` equal slices of a batch (a rank's share, or a micro-batch)."""
        if parts == 1:
            return x0, noise, t, cond
        n = batch // parts
        lo, hi = i * n, (i + 1) * n
        shared = task.shared_keys()
        cond = {k: v if k in shared or not isinstance(v, torch.Tensor) else v[lo:hi] for k, v in cond.items()}
        return x0[lo:hi], noise[lo:hi], t[lo:hi], cond

    def no_sync(self, model: Any) -> Any:
        """The micro-steps of gradient accumulation: DataParallel keeps their gradients local (one rank: nothing)."""
        return no_sync(model) if self.world > 1 else contextlib.nullcontext()

    def loss(self, loss: torch.Tensor) -> float:
        """The whole batch's loss: the mean of the ranks' (equal-sized) slices' losses."""
        return mean_over_ranks(loss) if self.world > 1 else float(loss.detach())

    def sync_extra(self, params: list[torch.Tensor]) -> None:
        if self.world > 1:
            average_gradients(params)

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def join_ranks(device: torch.device | None) -> tuple[Ranks, torch.device | None]:
    """The ranks of this run (initialising torch.distributed under torchrun) and its device."""
    if dist.is_available() and dist.is_initialized():
        ranks = Ranks(dist.get_rank(), dist.get_world_size())
    elif dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=default_timeout())
        ranks = Ranks(dist.get_rank(), dist.get_world_size(), created=True)
    else:
        return Ranks(), device
    if device is None and torch.cuda.is_available() and ranks.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank % torch.cuda.device_count())))
    return ranks, device
