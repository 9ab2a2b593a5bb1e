"""Step caches on the reference models: hookwise and diffusers at equal settings, in one process.

    PYTHONPATH=src python benchmarks/cache_quality.py [--threads 1] [--repeats 3] [--out docs] [--device cpu]
    PYTHONPATH=src python benchmarks/cache_quality.py --tables-from docs   # tables of the saved runs

For each reference model (flux-shapes, wan-moving) this runs `hookwise bench cache`'s harness over
every class, then writes `<out>/cache-<model>.png` (PSNR vs speed-up and vs evaluations saved),
`<out>/cache-<model>.json` and prints the Markdown tables used in BENCHMARKS.md: every run, and
hookwise's PSNR against diffusers' at equal work.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from hookwise.bench import RunResult, compare_at_equal_work, comparison_markdown, run_cache_bench, save_plot, to_markdown
from hookwise.zoo import load_reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="flux-shapes,wan-moving")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--device", default="cpu", help="where to sample (cpu, cuda, cuda:1)")
    parser.add_argument("--tables-from", default=None, metavar="DIR",
                        help="run nothing: print the tables of the runs saved in DIR/cache-<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.tables_from:
        for name in args.models.split(","):
            rows = json.loads((Path(args.tables_from) / f"cache-{name}.json").read_text())
            results = [
                RunResult(**{k: (math.inf if v == "inf" else math.nan if v is None and k != "note" else v) for k, v in r.items()})
                for r in rows
            ]
            print(f"## {name} (saved run)\n")
            print(to_markdown(results) + "\n")
            print(comparison_markdown(compare_at_equal_work(results)) + "\n")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} thread(s), device {args.device}\n")
    for name in args.models.split(","):
        reference = load_reference(name)
        start = time.perf_counter()

        def progress(done: int, total: int, what: str) -> None:
            print(f"  [{done}/{total}] {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

        results = run_cache_bench(reference, repeats=args.repeats, steps=args.steps, progress=progress, device=args.device)
        spec = reference.spec
        title = (
            f"{name} ({spec.kind}, {len(spec.classes)} classes, {args.steps or spec.steps} steps, CFG {spec.guidance_scale}): "
            f"PSNR against the uncached samples"
        )
        save_plot(results, str(out / f"cache-{name}.png"), title=title)
        (out / f"cache-{name}.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        print(f"## {name} ({time.perf_counter() - start:.0f} s)\n")
        print(to_markdown(results) + "\n")
        print(comparison_markdown(compare_at_equal_work(results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
