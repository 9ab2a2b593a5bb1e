"""Several processes on `torch.distributed`: each one a technique config for `hookwise.apply`.

Techniques, one file each (a config, its validation, its registration): context parallelism
(`context.py`, `ContextParallel`: Ulysses / ring) for sampling, CFG parallelism (`cfg.py`,
`CFGParallel`), and data-parallel LoRA training (`data.py`, `DataParallel(mode="ddp" | "fsdp")`).

Machinery, private to this folder:

- `_seq.py`: where context parallelism splits and gathers the token streams (per-architecture plans).
- `_ulysses.py`: the all-to-all between head and sequence splits; `_ring.py`: ring attention with
  log-sum-exp merging of the partial results.
- `_cost.py`: the three techniques' cost declarations for the planner (one rank's bytes, the bytes it
  sends per step, a declared time model), declared on the techniques when this folder is imported.
- `_dist.py`: the process group a technique runs on, checked once at apply (initialised, backend,
  world size), the groups of the world's 2 x N split when CFG and context parallelism stand side by
  side (`CFGParallel(context=N)`, `ContextParallel(cfg=2)`), and the timeout every collective of this
  folder waits at most, so a dead rank ends the others with a clear error instead of a hang.

hookwise starts no processes: launch with `torchrun` (or any launcher that initialises
`torch.distributed`), then apply the technique on every rank with the same config.
"""

from .cfg import CFGParallel, apply_cfg_parallel, cfg_parallel_report, remove_cfg_parallel
from ._dist import CollectiveError, default_timeout
from .data import (
    DataParallel,
    apply_data_parallel,
    average_gradients,
    data_parallel_report,
    mean_over_ranks,
    no_sync,
    remove_data_parallel,
)
from .context import ContextParallel, apply_context_parallel, context_parallel_stats, remove_context_parallel
from ._cost import declare_parallel_costs

declare_parallel_costs()

__all__: list[str] = [
    "CFGParallel",
    "apply_cfg_parallel",
    "cfg_parallel_report",
    "remove_cfg_parallel",
    "DataParallel",
    "apply_data_parallel",
    "average_gradients",
    "CollectiveError",
    "mean_over_ranks",
    "no_sync",
    "default_timeout",
    "data_parallel_report",
    "remove_data_parallel",
    "ContextParallel",
    "apply_context_parallel",
    "context_parallel_stats",
    "remove_context_parallel",
]
