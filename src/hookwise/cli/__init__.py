"""The `hookwise` command line: `hookwise inspect MODEL [--json]`, `hookwise plan MODEL [--vram ...]`,
`hookwise bench cache [--model NAME]`, `hookwise cache info|clean`, `hookwise train-lora [MODEL]`,
`hookwise demo [--fast]`.

The training commands (`train-lora`, `demo`) live in `_train.py`; shared helpers in `_common.py`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..bench import DIFFUSERS_METHODS, HOOKWISE_METHODS, run_cache_bench, save_plot, to_markdown
from ..errors import ConfigError, HookwiseError
from ..introspect import describe, load_model, spec_names
from ..memory import clean_offload_cache, default_offload_dir, offload_cache_files
from ..plan.job import DEFAULT_STEPS
from ..zoo import load_reference, reference_names
from ..zoo.reference import get_reference_spec
from ._common import _mib, _positive_int
from ._train import _add_demo, _add_train_lora, cmd_demo

__all__ = ["build_parser", "cmd_demo", "main"]


def _pattern(path: str) -> str:
    """A path with block indices folded: transformer_blocks.3.norm1 -> transformer_blocks.*.norm1."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path)


def _inspect_tables(model_map, source: str):
    m = model_map
    yield Text.assemble((f"{m.model_cls}", "bold"), f"  from {source}")
    yield Text.assemble(
        "architecture: ",
        (m.architecture or "unknown (mapped structurally)", "cyan"),
        f"   parameters: {m.param_count:,} ({_mib(m.param_bytes)} MiB)   buffers: {_mib(m.buffer_bytes)} MiB",
    )
    dtypes = ", ".join(f"{k} {_mib(v)} MiB" for k, v in m.dtype_bytes.items()) or "-"
    yield Text(f"dtypes: {dtypes}   device: {m.device}   timestep argument: {m.timestep_arg or '-'}\n")

    towers = Table(title="Towers (repeated blocks)", title_justify="left")
    for col in ("tower", "main", "block class", "blocks", "MiB / block", "leaves / block", "total MiB"):
        left = col in ("tower", "block class", "main")
        towers.add_column(col, justify="left" if left else "right", overflow="fold")
    for t in m.towers:
        sizes = [b.param_bytes + b.buffer_bytes for b in t.blocks]
        lo, hi = min(sizes), max(sizes)
        per = _mib(lo) if lo == hi else f"{_mib(lo)}-{_mib(hi)}"
        towers.add_row(
            t.name or "(model)",
            "yes" if t.main else "",
            t.block_cls,
            str(t.num_blocks),
            per,
            str(t.blocks[0].leaves),
            _mib(t.param_bytes + t.buffer_bytes),
        )
    towers.add_row("outside towers", "", "", "", "", "", _mib(m.outside_tower_bytes), style="dim")
    yield towers if m.towers else Text("No towers: " + "; ".join(m.notes), style="yellow")

    leaves = Table(title="Leaves", title_justify="left")
    for col in ("kind", "count", "MiB", "kept high precision", "castable MiB"):
        leaves.add_column(col, justify="left" if col == "kind" else "right")
    for kind in ("linear", "conv", "embedding"):
        group = [leaf for leaf in m.leaves if leaf.kind == kind]
        if not group:
            continue
        kept = [leaf for leaf in group if leaf.keep]
        leaves.add_row(
            kind,
            str(len(group)),
            _mib(sum(leaf.param_bytes for leaf in group)),
            str(len(kept)),
            _mib(sum(leaf.param_bytes for leaf in group if not leaf.keep and kind != "embedding")),
        )
    yield leaves

    high = Table(title="Kept in high precision", title_justify="left")
    for col in ("modules", "reason", "count", "MiB"):
        high.add_column(col, justify="right" if col in ("count", "MiB") else "left", overflow="fold")
    groups: dict[tuple[str, str], list[str]] = {}
    for path, reason in m.high_precision.items():
        groups.setdefault((_pattern(path), reason), []).append(path)
    for (pattern, reason), paths in groups.items():
        size = sum(m.high_precision_bytes.get(p, 0) for p in paths)
        high.add_row(pattern, reason, str(len(paths)), _mib(size))
    yield high

    caps = Table(title="Capabilities", title_justify="left")
    for col in ("capability", "available", "detail"):
        caps.add_column(col, overflow="fold")
    for cap in m.capabilities():
        caps.add_row(cap["name"], "[green]yes[/]" if cap["available"] else "[red]no[/]", cap["detail"])
    yield caps

    roles = Text(
        f"attention modules: {len(m.attention)}   feed-forward modules: {len(m.ffn)}   "
        f"block classes: {', '.join(m.block_classes) or '-'}"
    )
    yield roles
    for note in m.notes:
        yield Text(f"note: {note}", style="yellow")


def cmd_inspect(args: argparse.Namespace) -> int:
    model, source = load_model(args.model, dtype=args.dtype)
    model_map = describe(model)
    if args.json:
        data = {"model": args.model, "source": source, **model_map.to_dict()}
        print(json.dumps(data, indent=2))
        return 0
    console = Console()
    if not console.is_terminal:  # piped: wide enough that module paths are never cut
        console = Console(width=160)
    for renderable in _inspect_tables(model_map, source):
        console.print(renderable)
    return 0


def _plan_tables(plan, limit: int | None):
    from ..plan.choose import fmt, unfit

    fits = Table(title=f"Stacks that fit ({len(plan.ranked)}, best first for goal '{plan.goal}')", title_justify="left")
    for col in ("#", "stack", "device peak", "RAM", "disk", "time / step", "bound", "quality"):
        fits.add_column(col, justify="left" if col in ("stack", "bound", "quality") else "right", overflow="fold")
    shown = plan.ranked if limit is None else plan.ranked[:limit]
    for i, o in enumerate(shown, 1):
        fits.add_row(str(i), o.label, fmt(o.device_peak), fmt(o.ram_peak), fmt(o.disk_bytes) if o.disk_bytes else "-",
                     f"{o.time_rel:.2f}x", o.bound, o.quality_class, style="bold green" if o is plan.chosen else None)  # fmt: skip
    yield fits
    if limit is not None and len(plan.ranked) > limit:
        yield Text(f"... {len(plan.ranked) - limit} more that fit (--all shows every one)", style="dim")
    failing = unfit(plan.options)
    if failing:
        bad = Table(title=f"Stacks that do not fit ({len(failing)}): the first resource that fails", title_justify="left")
        bad.add_column("stack", overflow="fold")
        bad.add_column("fails on", overflow="fold")
        for o in failing if limit is None else failing[:limit]:
            bad.add_row(o.label, o.failure)
        yield bad
        if limit is not None and len(failing) > limit:
            yield Text(f"... {len(failing) - limit} more that do not fit", style="dim")


def cmd_plan(args: argparse.Namespace) -> int:
    from ..plan import Hardware, Job, make_plan
    from ..plan.job import parse_resolution

    model, source = load_model(args.model, dtype=args.dtype)
    height, width = parse_resolution(args.resolution)
    job = Job(height=height, width=width, frames=args.frames, batch=args.batch, text_len=args.text_len,
              cfg=args.cfg, training=args.training, lora_rank=args.lora_rank, num_steps=args.steps)  # fmt: skip
    hardware = Hardware.detect(gpu=args.gpu, vram=args.vram, ram=args.ram, h2d=args.h2d, disk_read=args.disk_read,
                               tflops=args.tflops, device=args.device, fp8=args.fp8, gpus=args.gpus,
                               link=args.link)  # fmt: skip
    plan = make_plan(model, job, hardware, args.goal, attention_backend=args.attention, stack_check=args.stack_check)
    if args.json:
        print(plan.to_json())
        return 0 if plan.chosen else 1
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(Text.assemble((plan.model_cls, "bold"), f"  from {source}"))
    console.print(Text(f"machine: {hardware.describe()}"))
    console.print(Text(f"activations: {plan.activation.activation_bytes / 2**30:.2f} GiB ({plan.activation.method}); "
                       f"the chosen stack's device peak from: {plan.peak_source}\n"))
    for renderable in _plan_tables(plan, None if args.all else 12):
        console.print(renderable)
    console.print(Text("\nChoice: ", style="bold"), Text(plan.explain()))
    if plan.chosen is not None:
        console.print(Text("\nApply it with:", style="bold"))
        print(f"import hookwise\n{plan.python_line('transformer')}")
        console.print(Text("or let hookwise plan on the machine that runs it, and check the first step:", style="dim"))
        print(f"plan = hookwise.optimize(transformer, hookwise.{job!r}, goal={args.goal!r})")
    return 0 if plan.chosen else 1


def _add_plan(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="choose the fastest stack that fits a model and job on a machine (this one, or one you state)",
        description="Measure the model (without weights for specs), predict peak memory, RAM and step time for every "
        "stack the techniques offer, and choose by goal. Sizes: 24GB = 24e9 bytes, 24GiB = 24 x 2^30.",
    )
    plan.add_argument("model", metavar="MODEL", help=f"as for inspect: a shipped spec ({', '.join(spec_names())}), "
                      "a local diffusers model folder, or package.module:factory")  # fmt: skip
    plan.add_argument("--vram", default=None, help="device memory to plan for, e.g. 24GB (default: this GPU's free memory)")
    plan.add_argument("--ram", default=None, help="host RAM to plan for, e.g. 64GB (default: what is available here)")
    plan.add_argument("--h2d", default=None, help="host->device bandwidth, e.g. 25GB/s (default: measured, cached)")
    plan.add_argument("--disk-read", default=None, help="disk read speed for disk offload, e.g. 3GB/s")
    plan.add_argument("--gpu", default=None, help="a GPU to plan for by name (e.g. 'RTX 4090'): its memory and rate")
    plan.add_argument("--tflops", type=float, default=None, help="the device's dense bf16 rate a step reaches")
    plan.add_argument("--device", choices=("cuda", "cpu"), default=None, help="where the model computes")
    plan.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                      help="the GPU multiplies in fp8 (compute capability 8.9+), so fp8-compute options are offered "
                      "(default: from this GPU's or the named GPU's capability)")  # fmt: skip
    plan.add_argument("--gpus", type=_positive_int, default=None,
                      help="how many such GPUs the run uses (under torchrun): above 1, context / CFG / data "
                      "parallelism are offered (default: the initialised torch.distributed world, else 1)")  # fmt: skip
    plan.add_argument("--link", default=None, help="bytes per second between the GPUs, e.g. 300GB/s for NVLink "
                      "(default 25GB/s, PCIe 4.0, assumed)")  # fmt: skip
    plan.add_argument("--stack-check", action=argparse.BooleanOptionalAction, default=True,
                      help="run the best options on fake tensors with their stack in place and choose by that peak "
                      "(default; --no-stack-check trusts the cost declarations alone, faster)")  # fmt: skip
    plan.add_argument("--goal", choices=("balanced", "quality", "speed", "memory"), default="balanced")
    plan.add_argument("--resolution", default="1024", help="HEIGHTxWIDTH or one number (default 1024)")
    plan.add_argument("--frames", type=_positive_int, default=1, help="video frames (default 1: an image)")
    plan.add_argument("--batch", type=_positive_int, default=1)
    plan.add_argument("--text-len", type=_positive_int, default=512, help="text tokens (default 512)")
    plan.add_argument("--cfg", choices=("batched", "separate"), default=None, help="classifier-free guidance calls")
    plan.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                      help=f"denoising steps of one sampling run: step caches are scheduled for it (default {DEFAULT_STEPS})")
    plan.add_argument("--training", action="store_true", help="LoRA training (forward and backward) instead of sampling")
    plan.add_argument("--lora-rank", type=_positive_int, default=16)
    plan.add_argument("--attention", choices=("flash", "efficient", "math"), default="flash",
                      help="the attention kernel that will run (decides attention memory)")  # fmt: skip
    plan.add_argument("--dtype", default=None, help="parameter dtype to size the model in (default: bf16 for specs)")
    plan.add_argument("--all", action="store_true", help="list every option, not the first 12")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)


def cmd_bench_cache(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    reference = load_reference(args.model)
    names = list(reference.spec.classes)

    def classes(text: str | None) -> list[int] | None:
        if not text:
            return None
        out = []
        for item in text.split(","):
            item = item.strip()
            if item.isdigit():
                out.append(int(item))
            elif item in names:
                out.append(names.index(item))
            else:
                raise ConfigError(f"unknown prompt {item!r} for {args.model}; use class ids or names: {names}")
        return out

    labels = classes(args.prompts)
    calibration = classes(args.calibration_prompts)
    methods = args.methods.split(",") if args.methods else None
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task(f"{args.model}: calibrating, reference runs", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, total=total, completed=done, description=f"{args.model}: {what}")

        results = run_cache_bench(
            reference,
            labels=labels,
            seed=args.seed,
            steps=args.steps,
            repeats=args.repeats,
            methods=methods,
            compare_diffusers=not args.no_diffusers,
            progress=progress,
            calibration_labels=calibration,
            compare_cache_dit=args.cache_dit,
        )
    table = to_markdown(results)
    print(table)
    console.print(TABLE_LEGEND, style="dim")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
    if args.plot:
        save_plot(results, args.plot, title=f"{args.model}: PSNR vs speed-up ({reference.spec.kind}, {args.steps or reference.spec.steps} steps)")
        console.print(f"plot saved to {args.plot}")
    return 0


def _bench_cache_epilog() -> str:
    lines = ["methods (--methods):", "  " + ", ".join(HOOKWISE_METHODS),
             "  diffusers runs its own implementation of: " + ", ".join(DIFFUSERS_METHODS),
             "  cache-dit (--cache-dit): dbcache, dbcache+taylorseer, taylorseer", "",
             "prompt classes (--prompts, by id or name):"]
    for name in reference_names():
        classes = get_reference_spec(name).classes
        lines.append(f"  {name}: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes)))
    lines += ["", TABLE_LEGEND]
    return "\n".join(lines)


TABLE_LEGEND = (
    "In the table, a bold setting is the method's default; 'ref' rows are the uncached reference. A peer's "
    "row noted 'failed: ...' is a run of that library's implementation that raised (its message follows; "
    "its numbers are empty): hookwise reports it and goes on."
)


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="side-by-side benchmarks", description="Benchmarks of hookwise techniques.")
    what = bench.add_subparsers(dest="bench", metavar="WHAT")
    cache = what.add_parser(
        "cache",
        help="quality vs speed of the step caches on a reference model, with diffusers' caches at equal settings",
        description="Sample a reference model uncached, then with every step cache over a sweep of settings (and "
        "diffusers' implementations of the same methods); report block evaluations, time, speed-up, PSNR and SSIM.",
        epilog=_bench_cache_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("--model", default="flux-shapes", choices=reference_names(), help="reference model (default flux-shapes)")
    cache.add_argument("--prompts", default=None, help="comma-separated class ids or names of the model's prompt classes (listed below; default: every class)")
    cache.add_argument("--calibration-prompts", default=None,
                       help="classes the calibrated caches are calibrated on (then --prompts defaults to the others; "
                       "default: calibrate on the evaluated classes)")
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's, 28)")
    cache.add_argument("--repeats", type=_positive_int, default=2, help="timed runs per setting; the fastest counts")
    cache.add_argument("--methods", default=None, help="comma-separated methods to run (listed below; default: all)")
    cache.add_argument("--no-diffusers", action="store_true", help="skip diffusers' implementations")
    cache.add_argument("--cache-dit", action="store_true",
                       help="also run cache-dit's DBCache, TaylorSeer and DBCache + TaylorSeer (pip install 'hookwise[cache-dit]')")
    cache.add_argument("--plot", default=None, metavar="PNG", help="save the quality vs speed-up plot here")
    cache.add_argument("--json", default=None, metavar="FILE", help="save the results as JSON")
    cache.add_argument("--markdown", default=None, metavar="FILE", help="save the table as Markdown")
    cache.set_defaults(func=cmd_bench_cache)
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])


def cmd_cache(args: argparse.Namespace) -> int:
    folder = Path(args.path).expanduser() if args.path else default_offload_dir()
    files = offload_cache_files(folder)
    size = sum(p.stat().st_size for p in files)
    if args.action == "info":
        print(f"{folder}: {len(files)} disk offload files, {_mib(size)} MiB")
        return 0
    count, freed = clean_offload_cache(folder, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{folder}: {verb} {count} disk offload files, {_mib(freed)} MiB")
    return 0


def _add_cache(sub) -> None:
    cache = sub.add_parser(
        "cache",
        help="show or delete the group files that disk offloading keeps",
        description="Disk offloading (Offload(offload_device='disk')) writes one file per group, named by its "
        f"content, to disk_path or, without one, to {default_offload_dir()} ($XDG_CACHE_HOME/hookwise/offload). "
        "The files are reused by later runs with the same weights and are never deleted by hookwise itself.",
    )
    cache.add_argument("action", choices=("info", "clean"), help="info: count and size; clean: delete them")
    cache.add_argument("--path", default=None, help="the disk_path folder to look in (default: the cache folder above)")
    cache.add_argument("--dry-run", action="store_true", help="with clean: say what would be deleted, delete nothing")
    cache.set_defaults(func=cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hookwise",
        description="Make diffusion transformers fit and run fast: inspect a model's structure and what applies to it.",
    )
    parser.add_argument("--version", action="version", version=f"hookwise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = sub.add_parser(
        "inspect",
        help="map a model: towers, block sizes, leaves, high-precision modules, capabilities",
        description="Map a model without loading weights (specs and folders are built on the meta device).",
    )
    inspect.add_argument(
        "model",
        metavar="MODEL",
        help=f"a shipped spec ({', '.join(spec_names())}), a local diffusers model folder, "
        "or package.module:factory",
    )
    inspect.add_argument("--json", action="store_true", help="print the map as JSON")
    inspect.add_argument("--dtype", default=None, help="parameter dtype to size the model in (default: bf16 for specs)")
    inspect.set_defaults(func=cmd_inspect)
    _add_plan(sub)
    _add_bench(sub)
    _add_cache(sub)
    _add_train_lora(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except HookwiseError as exc:
        print(f"hookwise: error: {exc}", file=sys.stderr)
        return 2

