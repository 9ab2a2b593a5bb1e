"""Run a function on N spawned processes joined by a gloo process group, for the parallel tests.

`run_ranks(fn, n, *args)` starts n processes (spawn), initialises gloo in each (one CPU thread each),
calls `fn(rank, n, *args)` and returns every rank's return value in rank order. A rank that raises
makes the call raise with that rank's traceback; a run past `timeout` kills every rank and raises.
`fn` must be a module-level function of an importable module (a test file is).

Starting ranks costs 20-40 s on a loaded machine (each imports torch and diffusers), so test modules share
one spawn per world size: a module registers its scenario at import (`share_ranks(2, "cfg", fn)`, before
any test runs: pytest imports every module it collects first) and its fixture reads its part
(`shared_results(2, "cfg")`). The first reader spawns once for every scenario registered for that world;
a scenario that raises fails only the tests that read it, with its traceback.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    pass


def _child(rank: int, world: int, init_file: str, out_dir: str, fn, args, pg_timeout: float) -> None:
    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "value": value}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        os._exit(1)


def run_ranks(fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0) -> list:
    """Each rank's return value of `fn(rank, world, *args)`, in rank order."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="hookwise-dist-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_child, args=(r, world, init_file, tmp, fn, args, pg_timeout), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        errors = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                results.append(None)
                errors.append(f"rank {r}: " + ("still running at the timeout" if r in hung else "died without a result"))
                continue
            got = torch.load(path, weights_only=False)
            if got["ok"]:
                results.append(got["value"])
            else:
                results.append(None)
                errors.append(f"rank {r} raised:\n{got['error']}")
        if errors:
            raise RankFailed("\n".join(errors))
        return results


_SHARED: dict[int, dict[str, tuple]] = {}
_RESULTS: dict[int, list] = {}


def share_ranks(world: int, name: str, fn, *args) -> None:
    """Run `fn(rank, world, *args)` in this session's one spawn of `world` ranks (see the module docstring)."""
    _SHARED.setdefault(world, {})[name] = (fn, args)


def _run_shared(rank: int, world: int, items: list) -> dict:
    out = {}
    for name, fn, args in items:  # every rank in the same order: their collectives and groups match
        try:
            out[name] = (True, fn(rank, world, *args))
        except Exception:  # noqa: BLE001 - reported to the tests that read this scenario
            out[name] = (False, traceback.format_exc())
    return out


def shared_results(world: int, name: str, timeout: float = 900.0) -> list:
    """Every rank's return value of the scenario registered as `name`, spawning once per world size."""
    if world not in _RESULTS:
        items = [(n, fn, args) for n, (fn, args) in _SHARED.get(world, {}).items()]
        _RESULTS[world] = run_ranks(_run_shared, world, items, timeout=timeout)
    per_rank = [r[name] for r in _RESULTS[world]]
    errors = [f"rank {i} raised in scenario {name!r}:\n{value}" for i, (ok, value) in enumerate(per_rank) if not ok]
    if errors:
        raise RankFailed("\n".join(errors))
    return [value for _, value in per_rank]


def world_of_one() -> None:
    """Initialise torch.distributed in this process as a gloo world of one rank (once; destroyed at exit),
    for tests of a parallel technique's identity case without spawning processes."""
    if dist.is_initialized():
        return
    import atexit

    init_file = os.path.join(tempfile.mkdtemp(prefix="hookwise-dist-one-"), "init")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
