"""Step caches on the reference models: hookwise and diffusers at equal settings, in one process.

    PYTHONPATH=src python benchmarks/cache_quality.py [--threads 1] [--repeats 3] [--out docs] [--device cpu]
    PYTHONPATH=src python benchmarks/cache_quality.py --tables-from docs   # tables of the saved runs
    PYTHONPATH=src python benchmarks/cache_quality.py --steps 50 --methods forecast,taylorseer,...   # cache-<model>-50.*

For each reference model (flux-shapes, wan-moving) this runs `hookwise bench cache`'s harness over
every class, then writes `<out>/cache-<model>.png` (PSNR vs speed-up and vs evaluations saved),
`<out>/cache-<model>.json` and prints the Markdown tables used in BENCHMARKS.md: every run, and
hookwise's PSNR against diffusers' at equal work. The calibrated caches (MagCache, TeaCache, the
forecast's fit and schedule search) are calibrated on classes that are not evaluated (`--calibration`,
by default a diagonal of the class grid: flux-shapes 0, 4, 8; wan-moving 0, 4) with the next seed;
the forecast configs the search found are written to `<out>/forecast-<model>-<steps>.json`.
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

from hookwise.bench import RunResult, best_at_work, best_at_work_markdown, compare_at_equal_work, comparison_markdown, run_cache_bench, save_plot, to_markdown
from hookwise.zoo import load_reference


DIAGONAL = {"flux-shapes": [0, 4, 8], "wan-moving": [0, 4]}  # calibration classes: every shape / axis and colour once


def _stem(name: str, steps: int | None) -> str:
    """`<model>` at the model's own step count (28), `<model>-<steps>` otherwise."""
    return name if steps in (None, 28) else f"{name}-{steps}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="flux-shapes,wan-moving")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--device", default="cpu", help="where to sample (cpu, cuda, cuda:1)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--calibration", default="diagonal",
                        help="'diagonal' (the default classes above), 'none' (calibrate on the evaluated classes) or ids")
    parser.add_argument("--tables-from", default=None, metavar="DIR",
                        help="run nothing: print the tables of the runs saved in DIR/cache-<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.tables_from:
        for name in args.models.split(","):
            rows = json.loads((Path(args.tables_from) / f"cache-{_stem(name, args.steps)}.json").read_text())
            results = [
                RunResult(**{k: (math.inf if v == "inf" else math.nan if v is None and k != "note" else v) for k, v in r.items()})
                for r in rows
            ]
            print(f"## {name} (saved run)\n")
            print(to_markdown(results) + "\n")
            print(comparison_markdown(compare_at_equal_work(results)) + "\n")
            print(best_at_work_markdown(best_at_work(results)) + "\n")
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

        if args.calibration == "none":
            cal = None
        elif args.calibration == "diagonal":
            cal = DIAGONAL[name]
        else:
            cal = [int(c) for c in args.calibration.split(",")]
        results = run_cache_bench(
            reference, repeats=args.repeats, steps=args.steps, progress=progress, device=args.device,
            methods=args.methods.split(",") if args.methods else None, compare_diffusers=not args.no_diffusers,
            calibration_labels=cal,
        )
        spec = reference.spec
        stem = _stem(name, args.steps)
        found = {r.setting: r.config for r in results if r.method == "forecast-calibrated" and r.config}
        if found:
            (out / f"forecast-{name}-{args.steps or spec.steps}.json").write_text(json.dumps(found, indent=1) + "\n")
        title = (
            f"{name} ({spec.kind}, classes {'all' if cal is None else 'not ' + str(cal)}, {args.steps or spec.steps} steps, CFG {spec.guidance_scale}): "
            f"PSNR against the uncached samples"
        )
        save_plot(results, str(out / f"cache-{stem}.png"), title=title)
        (out / f"cache-{stem}.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        print(f"## {name} ({time.perf_counter() - start:.0f} s)\n")
        print(to_markdown(results) + "\n")
        print(comparison_markdown(compare_at_equal_work(results)) + "\n")
        print(best_at_work_markdown(best_at_work(results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
