"""The process group a parallel technique runs on, checked once at apply.

Every technique in `parallel/` takes its group from `group_of(config_group, technique)`, so the checks
and their messages are the same everywhere: torch.distributed available and initialised, a backend
that can run the collectives, and the world the technique asked for.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

from ..errors import HookwiseError

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective of this folder waits for the other ranks before every rank fails with an error
(override with HOOKWISE_DIST_TIMEOUT, in seconds, or the technique's own `timeout_s`)."""


@dataclass(frozen=True)
class GroupInfo:
    group: object  # a torch.distributed ProcessGroup (None: the default group)
    rank: int
    size: int
    backend: str


def default_timeout() -> datetime.timedelta:
    raw = os.environ.get("HOOKWISE_DIST_TIMEOUT")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise HookwiseError(f"HOOKWISE_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


def group_of(group: object, technique: str) -> GroupInfo:
    """The checked group for `technique` (None: the default world group)."""
    if not dist.is_available():
        raise HookwiseError(f"{technique} needs torch.distributed, which this PyTorch build does not have")
    if not dist.is_initialized():
        raise HookwiseError(
            f"{technique} needs torch.distributed initialised on every rank before it is applied: launch with "
            "`torchrun --nproc-per-node N script.py` and call torch.distributed.init_process_group() first"
        )
    return GroupInfo(
        group=group,
        rank=dist.get_rank(group),
        size=dist.get_world_size(group),
        backend=str(dist.get_backend(group)),
    )
