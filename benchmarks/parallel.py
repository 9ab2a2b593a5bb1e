"""Context parallelism on the CPU: 2 gloo processes, 1 thread each, against the single process.

A full-width FLUX block stack (24 heads x 128, `--double` + `--single` blocks, `--tokens` image +
`--text` text tokens) runs one forward per variant, interleaved in every repeat:

- `single`: the plain model on rank 0 alone (rank 1 waits), 1 thread;
- `hookwise-ulysses`, `hookwise-ring`: hookwise's ContextParallel on both ranks;
- `diffusers-ulysses`, `diffusers-ring`: diffusers' `ContextParallelConfig` (enable_parallelism) on the
  same weights, where it runs on the CPU with gloo (else the reason is printed).

Reported: the median time of a forward, its ratio to `single`, the bytes each rank sent per forward
(hookwise counts them; diffusers' are not counted), and the largest difference from the single output.
The variants share one set of weights (the models are copies that share parameters).

    python benchmarks/parallel.py --tokens 4096 --text 512 --double 1 --single 1 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from training import full_width_model  # noqa: E402  (the benchmarks' one full-width FLUX builder)


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out.sample


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _diffusers(model, kind: str, world: int):
    """The model under diffusers' context parallelism, or the reason it does not run here."""
    try:
        from diffusers import ContextParallelConfig, ParallelConfig

        cp = ContextParallelConfig(**({"ulysses_degree": world} if kind == "ulysses" else {"ring_degree": world}))
        model.enable_parallelism(config=ParallelConfig(context_parallel_config=cp))
        return model, None
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _rank(rank: int, world: int, init: str, args, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3600))  # fmt: skip
    import hookwise
    from hookwise.parallel import context_parallel_stats

    dtype = getattr(torch, args.dtype)
    base, inputs = full_width_model(args.tokens, args.text, args.double, args.single, dtype)
    base.eval()
    variants: dict = {"single": base}
    reasons: dict = {}
    for kind in ("ulysses", "ring"):
        model = _shared_copy(base)
        hookwise.apply(model, hookwise.ContextParallel(**{kind: world}))
        variants[f"hookwise-{kind}"] = model
    if not args.no_diffusers:
        for kind in ("ulysses", "ring"):
            model, why = _diffusers(_shared_copy(base), kind, world)
            if model is None:
                reasons[f"diffusers-{kind}"] = why
            else:
                variants[f"diffusers-{kind}"] = model
    times: dict = {k: [] for k in variants}
    outputs: dict = {}
    sent: dict = {}
    for name, model in variants.items():  # warm-up of the parallel variants (hookwise traces the map once)
        if name == "single":
            continue
        dist.barrier()
        try:
            outputs[name] = _out(model, inputs)
        except Exception as exc:  # noqa: BLE001
            reasons[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    for name in list(variants):
        if name in reasons:
            del variants[name], times[name]
    for name in variants:
        if name.startswith("hookwise"):
            sent[name] = dict(context_parallel_stats(variants[name])["sent_bytes"])
    for repeat in range(args.repeats):
        for name, model in variants.items():
            dist.barrier()
            if name == "single" and rank != 0:
                continue
            start = time.perf_counter()
            out = _out(model, inputs)
            times[name].append(time.perf_counter() - start)
            if name == "single" and repeat == 0:
                outputs[name] = out
            if rank == 0:
                print(f"repeat {repeat} {name}: {times[name][-1]:.2f} s (load {open('/proc/loadavg').read().split()[0]})", flush=True)
    per_forward = {}
    for name in sent:
        after = context_parallel_stats(variants[name])["sent_bytes"]
        per_forward[name] = {k: (after[k] - sent[name].get(k, 0)) // args.repeats for k in after}
    result = {
        "times": times, "sent_bytes": per_forward, "reasons": reasons,
        "outputs": {k: v.float() for k, v in outputs.items()} if rank == 0 else {},
    }  # fmt: skip
    torch.save(result, result_path)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    world = 2
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, cores=os.cpu_count(), load_before=load,
                world=world, threads_per_rank=1, args=vars(args))  # fmt: skip
    print(json.dumps(meta), flush=True)
    with tempfile.TemporaryDirectory(prefix="hookwise-bench-") as tmp:
        init = os.path.join(tmp, "init")
        paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank, args=(r, world, init, args, paths[r])) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        results = [torch.load(p, weights_only=False) for p in paths]
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    r0 = results[0]
    single = statistics.median(r0["times"]["single"])
    want = r0["outputs"]["single"]
    rows = []
    for name, ts in r0["times"].items():
        slowest = [max(r["times"][name][i] for r in results) for i in range(len(ts))] if name != "single" else ts
        median = statistics.median(slowest)
        err = float((r0["outputs"][name] - want).abs().max() / want.abs().max()) if name in r0["outputs"] else None
        sent = [sum(r["sent_bytes"].get(name, {}).values()) for r in results]
        rows.append(dict(variant=name, median_s=median, vs_single=single / median, sent_mb_per_rank=[s / 2**20 for s in sent],
                         detail=r0["sent_bytes"].get(name), rel_err=err))  # fmt: skip
    print(f"load average before {load}, after {load_after}")
    print(f"{'variant':<20} {'median s':>9} {'speed-up':>9} {'MiB sent / rank / forward':>26} {'max rel err':>12}")
    for row in rows:
        sent = "-" if not any(row["sent_mb_per_rank"]) else "/".join(f"{s:.1f}" for s in row["sent_mb_per_rank"])
        err = "-" if row["rel_err"] is None else f"{row['rel_err']:.2e}"
        print(f"{row['variant']:<20} {row['median_s']:>9.2f} {row['vs_single']:>8.2f}x {sent:>26} {err:>12}")
    for name, why in r0["reasons"].items():
        print(f"{name}: not run: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, load_after=load_after, rows=rows, reasons=r0["reasons"]), f, indent=1, default=str)


if __name__ == "__main__":
    main()
