"""Step caches on the reference models: hookwise and diffusers at equal settings, in one process.

    PYTHONPATH=src python benchmarks/cache_quality.py [--threads 1] [--repeats 3] [--out docs] [--device cpu]
    PYTHONPATH=src python benchmarks/cache_quality.py --tables-from docs   # tables of the saved runs
    PYTHONPATH=src python benchmarks/cache_quality.py --steps 50 --methods forecast,taylorseer,...   # cache-<model>-50.*
    PYTHONPATH=src python benchmarks/cache_quality.py --cache-dit --methods dbcache,... --merge-into docs/frontier

For each reference model (flux-shapes, wan-moving) this runs `hookwise bench cache`'s harness over
every class, then writes `<out>/cache-<model>.png` (PSNR vs speed-up and vs evaluations saved),
`<out>/cache-<model>.json` and prints the Markdown tables used in BENCHMARKS.md: every run, and
hookwise's PSNR against diffusers' at equal work. The calibrated caches (MagCache, TeaCache, the
forecast's fit and schedule search) are calibrated on classes that are not evaluated (`--calibration`,
by default a diagonal of the class grid: flux-shapes 0, 4, 8; wan-moving 0, 4) with the next seed;
the forecast configs the search found are written to `<out>/forecast-<model>-<steps>.json`.
`--cache-dit` adds cache-dit's DBCache, TaylorSeer and DBCache + TaylorSeer (on a copy of the model);
`--merge-into DIR` adds a partial run's rows to the saved run in DIR and redraws its plot from all of them
(with `--tables-from SRC [--methods ...]`, the rows of the saved run in SRC, noted "from SRC").
`--ship` also writes the forecast configs the search found into `hookwise/zoo/weights/<model>/forecast.json`
(the shipped schedules, `hookwise.zoo.shipped_forecast`): a budget found again replaces the shipped one, the
other shipped budgets stay.
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
from hookwise.zoo import get_reference_spec, load_reference


DIAGONAL = {"flux-shapes": [0, 4, 8], "wan-moving": [0, 4]}  # calibration classes: every shape / axis and colour once


def _stem(name: str, steps: int | None) -> str:
    """`<model>` at the model's own step count (28), `<model>-<steps>` otherwise."""
    return name if steps in (None, 28) else f"{name}-{steps}"


def _load(path: Path) -> list[RunResult]:
    rows = json.loads(path.read_text())
    return [
        RunResult(**{k: (math.inf if v == "inf" else math.nan if v is None and k != "note" and k != "config" else v) for k, v in r.items()})
        for r in rows
    ]


def _calibration(args: argparse.Namespace, name: str) -> list[int] | None:
    if args.calibration == "none":
        return None
    if args.calibration == "diagonal":
        return DIAGONAL[name]
    return [int(c) for c in args.calibration.split(",")]


def _title(name: str, steps: int | None, cal: list[int] | None) -> str:
    spec = get_reference_spec(name)
    return (
        f"{name} ({spec.kind}, classes {'all' if cal is None else 'not ' + str(cal)}, {steps or spec.steps} steps, "
        f"CFG {spec.guidance_scale}): PSNR against the uncached samples"
    )


def _save_merged(dest: Path, name: str, steps: int | None, new: list[RunResult], cal: list[int] | None) -> list[RunResult]:
    """Add `new`'s rows to `dest/cache-<stem>.json` (a row of the same method, impl and setting is replaced; the
    saved reference rows stay: every run samples the same uncached reference, same model, classes and seed),
    redraw `dest/cache-<stem>.png` from all of them; returns the merged rows."""
    path = dest / f"cache-{_stem(name, steps)}.json"
    old = _load(path) if path.exists() else []
    key = lambda r: (r.method, r.impl, r.setting)  # noqa: E731
    fresh = {key(r) for r in new if r.impl != "reference"}
    merged = [r for r in old if key(r) not in fresh] + [r for r in new if r.impl != "reference" or not old]
    if not merged:
        raise SystemExit(f"nothing to merge into {path}")
    dest.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_dict() for r in merged], indent=1) + "\n")
    save_plot(merged, str(dest / f"cache-{_stem(name, steps)}.png"), title=_title(name, steps, cal))
    return merged


def _ship(name: str, steps: int, found: dict) -> Path:
    """Merge the forecast configs found (setting -> [config dict]) into the model's shipped `forecast.json`."""
    from hookwise.zoo.reference import WEIGHTS_DIR
    from hookwise.zoo.schedules import FILE

    path = WEIGHTS_DIR / name / FILE
    shipped = json.loads(path.read_text()) if path.is_file() else {}
    by_budget = shipped.setdefault(str(steps), {})
    for configs in found.values():
        config = configs[0]
        by_budget[str(len(config["schedule"]))] = config
    shipped[str(steps)] = {b: by_budget[b] for b in sorted(by_budget, key=int)}
    shipped = {s: shipped[s] for s in sorted(shipped, key=int)}
    path.write_text(json.dumps(shipped, indent=1) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="flux-shapes,wan-moving")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help="where this run's rows and plot go (default: docs; with --merge-into: only the merged file, "
                        "so a partial run never replaces a full one)")
    parser.add_argument("--device", default="cpu", help="where to sample (cpu, cuda, cuda:1)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--cache-dit", action="store_true", help="also run cache-dit's caches (on a copy of the model)")
    parser.add_argument("--no-bracket", action="store_true",
                        help="no uncached run around each setting: speed-ups against the session's reference runs (3x fewer runs)")
    parser.add_argument("--merge-into", default=None, metavar="DIR",
                        help="add this run's rows to DIR/cache-<model>[-<steps>].json (same method, impl and setting: "
                        "replaced) and redraw DIR's plot from all of them; the tables printed are of the merged rows")
    parser.add_argument("--calibration", default="diagonal",
                        help="'diagonal' (the default classes above), 'none' (calibrate on the evaluated classes) or ids")
    parser.add_argument("--ship", action="store_true",
                        help="write the forecast configs the search found into hookwise/zoo/weights/<model>/forecast.json")
    parser.add_argument("--tables-from", default=None, metavar="DIR",
                        help="run nothing: print the tables of the runs saved in DIR/cache-<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.tables_from:
        for name in args.models.split(","):
            results = _load(Path(args.tables_from) / f"cache-{_stem(name, args.steps)}.json")
            if args.merge_into:  # add the saved run's rows (of --methods) to another saved run's, redraw its plot
                chosen = set(args.methods.split(",")) if args.methods else None
                rows = [r for r in results if r.impl != "reference" and (chosen is None or r.method in chosen)]
                for r in rows:
                    r.note = f"{r.note}; from {args.tables_from}" if r.note else f"from {args.tables_from}"
                results = _save_merged(Path(args.merge_into), name, args.steps, rows, _calibration(args, name))
            print(f"## {name} (saved run)\n")
            print(to_markdown(results) + "\n")
            print(comparison_markdown(compare_at_equal_work(results)) + "\n")
            print(best_at_work_markdown(best_at_work(results)) + "\n")
        return 0
    out = Path(args.out or args.merge_into or "docs")
    out.mkdir(parents=True, exist_ok=True)
    write_run = args.out is not None or not args.merge_into
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
          f"{torch.get_num_threads()} thread(s), device {args.device}\n")
    for name in args.models.split(","):
        reference = load_reference(name)
        start = time.perf_counter()

        def progress(done: int, total: int, what: str) -> None:
            print(f"  [{done}/{total}] {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

        cal = _calibration(args, name)
        results = run_cache_bench(
            reference, repeats=args.repeats, steps=args.steps, progress=progress, device=args.device,
            methods=args.methods.split(",") if args.methods else None, compare_diffusers=not args.no_diffusers,
            calibration_labels=cal, compare_cache_dit=args.cache_dit, bracket=not args.no_bracket,
        )
        spec = reference.spec
        stem = _stem(name, args.steps)
        found = {r.setting: r.config for r in results if r.method == "forecast-calibrated" and r.config}
        if found:
            (out / f"forecast-{name}-{args.steps or spec.steps}.json").write_text(json.dumps(found, indent=1) + "\n")
            if args.ship:
                print(f"shipped: {_ship(name, args.steps or spec.steps, found)}", file=sys.stderr)
        if write_run:
            (out / f"cache-{stem}.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        if args.merge_into:
            results = _save_merged(Path(args.merge_into), name, args.steps, results, cal)
        else:
            save_plot(results, str(out / f"cache-{stem}.png"), title=_title(name, args.steps, cal))
        print(f"## {name} ({time.perf_counter() - start:.0f} s)\n")
        print(to_markdown(results) + "\n")
        print(comparison_markdown(compare_at_equal_work(results)) + "\n")
        print(best_at_work_markdown(best_at_work(results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
