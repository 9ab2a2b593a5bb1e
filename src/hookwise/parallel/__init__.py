"""Several processes on `torch.distributed`: each one a technique config for `hookwise.apply`.

Techniques, one file each (a config, its validation, its registration): context parallelism
(Ulysses / ring) for sampling, CFG parallelism, and data-parallel LoRA training (DDP / FSDP2).

Machinery, private to this folder:

- `_seq.py`: where context parallelism splits and gathers the token streams (per-architecture plans).
- `_ulysses.py`: the all-to-all between head and sequence splits; `_ring.py`: ring attention with
  log-sum-exp merging of the partial results.
- `_dist.py`: the process group a technique runs on, checked once at apply (initialised, backend,
  world size), and the timeout every collective of this folder waits at most, so a dead rank ends
  the others with a clear error instead of a hang.

hookwise starts no processes: launch with `torchrun` (or any launcher that initialises
`torch.distributed`), then apply the technique on every rank with the same config.
"""

from .context import ContextParallel, apply_context_parallel, context_parallel_stats, remove_context_parallel

__all__: list[str] = [
    "ContextParallel",
    "apply_context_parallel",
    "context_parallel_stats",
    "remove_context_parallel",
]
