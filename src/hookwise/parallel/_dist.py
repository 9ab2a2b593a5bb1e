"""The process group a parallel technique runs on, checked once at apply.

Every technique in `parallel/` takes its group from `group_of(config_group, technique)`, so the checks
and their messages are the same everywhere: torch.distributed available and initialised, a backend
that can run the collectives, and the world the technique asked for.

CFG parallelism beside context parallelism splits the world as a 2 x N mesh, CFG-major: rank
`c * N + i` holds CFG half c and context-parallel position i (the layout `init_device_mesh(device,
(2, N), mesh_dim_names=("cfg", ...))` gives). `cfg_mesh_groups` builds its groups from the configs'
own fields (`CFGParallel(context=N)`, `ContextParallel(cfg=2)`), so a saved stack carries the split.
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


def cfg_mesh_ranks(world: int, cfg: int) -> tuple[list[list[int]], list[list[int]]]:
    """The world as a cfg x (world / cfg) mesh, CFG-major: (the CFG groups, one per context position; the
    context groups, one per CFG half), each a list of global ranks."""
    n = world // cfg
    return [[c * n + i for c in range(cfg)] for i in range(n)], [list(range(c * n, (c + 1) * n)) for c in range(cfg)]


def cfg_mesh_groups(cfg: int, which: str, technique: str, field: str) -> object:
    """This rank's group of the world's cfg x N mesh (`which`: "cfg" or "context"), for a technique whose
    config field `field` states the split. Every rank creates every group, in the same order
    (torch.distributed's rule for new_group)."""
    info = group_of(None, technique)
    if info.size % cfg or info.size // cfg < 1:
        raise HookwiseError(f"{technique}({field}): a {cfg} x N mesh needs a world that {cfg} divides; this one has {info.size} ranks")
    cfg_groups, context_groups = cfg_mesh_ranks(info.size, cfg)
    mine = None
    for ranks in cfg_groups if which == "cfg" else context_groups:
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine = group
    return mine


# ---- waiting for a collective, with the folder's timeout ---------------------------------------------
class CollectiveError(HookwiseError):
    """A collective of a parallel technique did not complete: a rank died, left, or is stuck."""


def timeout_of(timeout_s: float | None) -> datetime.timedelta:
    """The collective timeout: `timeout_s` when given, else HOOKWISE_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    return default_timeout() if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))


def resolve_group(group: object, technique: str) -> object:
    """A ProcessGroup (or None, the world) from what a config holds: a group, None, or a 1-D DeviceMesh."""
    if group is None:
        return None
    get_group = getattr(group, "get_group", None)
    if callable(get_group) and hasattr(group, "mesh_dim_names"):  # a DeviceMesh
        if getattr(group, "ndim", 1) != 1:
            raise HookwiseError(
                f"{technique}(group=a {group.ndim}-D DeviceMesh): pass the one dimension it runs on, "
                "e.g. mesh['cfg'] (a 1-D mesh) or its process group"
            )
        return get_group()
    return group


def wait(work: object, what: str, technique: str, timeout: datetime.timedelta) -> None:
    """Wait for an async collective at most `timeout`; a timeout or a lost peer raises `CollectiveError`."""
    try:
        work.wait(timeout)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        seconds = timeout.total_seconds()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
            why = (f"did not complete within the timeout ({seconds:g} s): another rank is stuck, died or "
                   "never reached it")  # fmt: skip
        else:
            why = f"failed before the timeout ({seconds:g} s) because another rank died or left the group ({first})"
        raise CollectiveError(
            f"{technique}: {what} {why}. Every rank must run the same calls with the same inputs; check the "
            "other ranks' logs. The timeout is the technique's timeout_s, or HOOKWISE_DIST_TIMEOUT in seconds "
            "(the process group's own timeout, if shorter, ends it first)."
        ) from exc
