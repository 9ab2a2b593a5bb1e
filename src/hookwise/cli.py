"""The `hookwise` command line: `hookwise inspect MODEL [--json]`, `hookwise plan MODEL [--vram ...]`,
`hookwise bench cache [--model NAME]`, `hookwise cache info|clean`, `hookwise train-lora [MODEL]`,
`hookwise demo [--fast]`."""

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

from . import __version__
from .bench import DIFFUSERS_METHODS, HOOKWISE_METHODS, run_cache_bench, save_plot, to_markdown
from .errors import ConfigError, HookwiseError
from .introspect import describe, load_model, spec_names
from .memory import clean_offload_cache, default_offload_dir, offload_cache_files
from .zoo import load_reference, reference_names
from .zoo.reference import get_reference_spec

_MIB = 1 / 2**20


def _mib(n: int) -> str:
    return f"{n * _MIB:,.1f}"


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    from .plan.choose import fmt, unfit

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
    from .plan import Hardware, Job, make_plan
    from .plan.job import parse_resolution

    model, source = load_model(args.model, dtype=args.dtype)
    height, width = parse_resolution(args.resolution)
    job = Job(height=height, width=width, frames=args.frames, batch=args.batch, text_len=args.text_len,
              cfg=args.cfg, training=args.training, lora_rank=args.lora_rank)  # fmt: skip
    hardware = Hardware.detect(gpu=args.gpu, vram=args.vram, ram=args.ram, h2d=args.h2d, disk_read=args.disk_read,
                               tflops=args.tflops, device=args.device)  # fmt: skip
    plan = make_plan(model, job, hardware, args.goal, attention_backend=args.attention)
    if args.json:
        print(plan.to_json())
        return 0 if plan.chosen else 1
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(Text.assemble((plan.model_cls, "bold"), f"  from {source}"))
    console.print(Text(f"machine: {hardware.describe()}"))
    console.print(Text(f"activations: {plan.activation.activation_bytes / 2**30:.2f} GiB ({plan.activation.method})\n"))
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
    plan.add_argument("--goal", choices=("balanced", "quality", "speed", "memory"), default="balanced")
    plan.add_argument("--resolution", default="1024", help="HEIGHTxWIDTH or one number (default 1024)")
    plan.add_argument("--frames", type=_positive_int, default=1, help="video frames (default 1: an image)")
    plan.add_argument("--batch", type=_positive_int, default=1)
    plan.add_argument("--text-len", type=_positive_int, default=512, help="text tokens (default 512)")
    plan.add_argument("--cfg", choices=("batched", "separate"), default=None, help="classifier-free guidance calls")
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
    labels = None
    if args.prompts:
        names = list(reference.spec.classes)
        labels = []
        for item in args.prompts.split(","):
            item = item.strip()
            if item.isdigit():
                labels.append(int(item))
            elif item in names:
                labels.append(names.index(item))
            else:
                raise ConfigError(f"unknown prompt {item!r} for {args.model}; use class ids or names: {names}")
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
             "  diffusers runs its own implementation of: " + ", ".join(DIFFUSERS_METHODS), "",
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
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the model's, 28)")
    cache.add_argument("--repeats", type=_positive_int, default=2, help="timed runs per setting; the fastest counts")
    cache.add_argument("--methods", default=None, help="comma-separated methods to run (listed below; default: all)")
    cache.add_argument("--no-diffusers", action="store_true", help="skip diffusers' implementations")
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


def _train_progress(console: Console, steps: int, what: str):
    """A rich progress bar with loss, step time and peak memory, and the callback that drives it."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[step_time]}/step  peak {task.fields[peak]}"),
        console=console,
    )  # fmt: skip
    task = bar.add_task(what, total=steps, loss="-", step_time="-", peak="-")

    def update(info) -> None:
        bar.update(task, completed=info.step, loss=f"{info.loss:.4f}", step_time=f"{info.step_seconds * 1000:.0f} ms",
                   peak=f"{_mib(info.peak_bytes)} MiB")  # fmt: skip

    return bar, update


def _train_summary(console: Console, result) -> None:
    console.print(f"optimizer: {result.optimizer}   stack: {', '.join(result.stack) or 'none (all resident)'}   "
                  f"{result.step_seconds * 1000:.0f} ms/step   {result.peak_what}: {_mib(result.peak_bytes)} MiB")  # fmt: skip
    for fmt, path in result.files.items():
        console.print(f"LoRA ({fmt}): {path}")
    for fmt, why in result.skipped_formats.items():
        console.print(f"not saved as {fmt}: {why}", style="yellow")
    if result.embedding is not None:
        console.print(f"new class embedding: {result.embedding}")
    if result.distances:
        (bn, bo), (an, ao) = result.distances["before"], result.distances["after"]
        console.print(f"samples of the new class, distance to its data / to the old classes' data (RMS, nearest): "
                      f"before {bn:.3f} / {bo:.3f}, after {an:.3f} / {ao:.3f} "
                      f"({'learned' if result.learned() else 'not learned yet: train longer'})")  # fmt: skip
    if result.grid is not None:
        console.print(f"before / after grid: {result.grid}")


def cmd_train_lora(args: argparse.Namespace) -> int:
    import torch

    from .train import train_lora

    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(stderr=True)
    stack = None if args.stack == "none" else "plan"
    if args.stack not in ("plan", "none"):
        from .stack import Stack

        stack = Stack.from_json(Path(args.stack).read_text())
    bar, update = _train_progress(console, args.steps, f"LoRA on {args.model}")
    with bar:
        result = train_lora(
            args.model, args.out, data=args.data, steps=args.steps, batch=args.batch, rank=args.rank, alpha=args.alpha,
            lr=args.lr, targets=args.targets.split(",") if args.targets else None, base=args.base, stack=stack,
            optimizer=args.optimizer, validate_every=args.validate_every, resume=args.resume,
            formats=tuple(args.formats.split(",")), seed=args.seed, device=args.device, sample_steps=args.sample_steps,
            progress=update,
        )  # fmt: skip
    if result.plan:
        console.print(f"plan: {result.plan}", style="dim")
    _train_summary(console, result)
    return 0


def _add_train_lora(sub) -> None:
    from .train import FORMATS
    from .train.trainer import BASES, OPTIMIZERS

    train = sub.add_parser(
        "train-lora",
        help="train a LoRA: a zoo model learns a new class, or any diffusers transformer from cached latents",
        description="Train a LoRA (peft) on the attention projections with rectified flow. On a zoo reference model "
        "it teaches a class the model never saw (a yellow cross) with a new class-embedding row, and writes a before "
        "/ after grid. The LoRA is saved in every format (diffusers, peft, kohya, bfl); --resume continues a run.",
    )
    train.add_argument("model", nargs="?", default="flux-shapes",
                       help="a zoo reference model (default flux-shapes) or a diffusers transformer folder (with --data)")  # fmt: skip
    train.add_argument("--data", default=None, help="folder of cached latents (hookwise.train.save_latents files)")
    train.add_argument("--out", default="lora-run", help="output folder (default lora-run)")
    train.add_argument("--steps", type=_positive_int, default=300)
    train.add_argument("--batch", type=_positive_int, default=16)
    train.add_argument("--rank", type=_positive_int, default=8)
    train.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--targets", default=None, help="comma-separated module paths (default: the attention projections)")
    train.add_argument("--base", choices=BASES, default="float32", help="base weights: float32, bf16, or fp8 storage")
    train.add_argument("--stack", default="plan", help="'plan' (the planner's choice for this machine), 'none', or a stack JSON file")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="auto",
                       help="auto: bitsandbytes 8-bit AdamW on CUDA when installed, else torch AdamW")  # fmt: skip
    train.add_argument("--validate-every", type=int, default=0, help="validation samples every N steps (0: at the end only)")
    train.add_argument("--sample-steps", type=_positive_int, default=20, help="sampling steps of validation samples")
    train.add_argument("--resume", default=None, help="an output folder of an earlier run to continue")
    train.add_argument("--formats", default=",".join(FORMATS), help=f"LoRA file formats (default: {','.join(FORMATS)})")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    train.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    train.set_defaults(func=cmd_train_lora)


def _sampled(task, model, labels, seed: int, device: str):
    """(pixels, seconds, peak bytes) of a sampling run.

    The time is of the run as it is; the peak is measured on a run of one step (a run's peak is
    one step's: each step replaces the last), because metering live storages on the CPU slows every op.
    """
    import time

    import torch

    from .plan._measure import measure_call

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = task.sample(model, labels, seed=seed)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, peak, _ = measure_call(lambda: task.sample(model, labels, seed=seed, steps=1), device)
    return out, seconds, peak


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    import math
    import tempfile
    import time

    import torch

    from . import apply as apply_stack
    from . import remove as remove_stack
    from .cache import TaylorSeer
    from .core.hooks import Layer
    from .core.techniques import technique_of
    from .memory.meters import parameter_bytes
    from .plan import Job, make_plan
    from .sampling import psnr
    from .train import train_lora
    from .train._lora_tasks import ZooTask
    from .zoo.grid import save_rows_png

    began = time.perf_counter()
    console = Console(stderr=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # The model is tiny: an op's work is less than waking another thread, and on a busy machine
        # threads that wait for each other made the demo 25x slower (measured, 2 cores shared).
        torch.set_num_threads(args.threads)
    steps, sample_steps = (8, 6) if args.fast else (150, 20)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hookwise-demo-"))
    reference = load_reference("flux-shapes").to(device)
    model_map = describe(reference.transformer)
    console.print(f"[bold]flux-shapes[/] ({model_map.model_cls}, {model_map.param_count:,} parameters): "
                  f"{', '.join(f'{t.name} x{t.num_blocks}' for t in model_map.towers)}, "
                  f"{len(model_map.attention)} attention modules; computing on {device}")  # fmt: skip
    task = ZooTask(reference, sample_steps=sample_steps)
    labels = [task.new_label] * 4 + [0, 4, 8, 2]
    before = task.sample(reference.transformer, labels, seed=args.seed)

    bar, update = _train_progress(console, steps, f"LoRA: {task.class_name!r}")
    with bar:
        result = train_lora(reference, out, steps=steps, batch=16, sample_steps=sample_steps, seed=args.seed,
                            device=device, progress=update)  # fmt: skip
    task.load(out)  # the trained embedding row; the LoRA stays in the transformer
    transformer = reference.transformer
    resident = sum(parameter_bytes(reference).values()) + sum(p.numel() * p.element_size() for p in task.parameters())

    # The cache: the planner's for sampling on this machine, or the step cache hookwise defaults to.
    job = Job(batch=len(labels), cfg="separate")
    example = task.example_inputs(len(labels), next(transformer.parameters()).dtype)
    sampling_plan = make_plan(transformer, job, example_inputs=example)
    planned = [c for c in (sampling_plan.stack.configs if sampling_plan.chosen else ()) if technique_of(c).layer == Layer.CACHE]
    # TaylorSeer(order=2, interval=3): the best speed at >= 40 dB on flux-shapes in docs/cache-flux-shapes.json
    cache = planned[0] if planned else TaylorSeer(order=2, interval=3)
    source = "the plan's" if planned else "the plan has none, so TaylorSeer (the best >= 40 dB on flux-shapes in the shipped harness)"

    transformer.eval()
    exact, t_exact, p_exact = _sampled(task, transformer, labels, args.seed, device)
    apply_stack(transformer, cache)
    try:
        cached, t_cached, p_cached = _sampled(task, transformer, labels, args.seed, device)
    finally:
        remove_stack(transformer, technique_of(cache).name)

    table = Table(title=f"hookwise demo: flux-shapes learns {task.class_name!r} ({device})", title_justify="left")
    for col in ("run", "time (s)", "peak MiB", "resident MiB", "PSNR vs exact (dB)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    stack = ", ".join(result.stack) or "all resident"
    table.add_row(f"train LoRA, {steps} steps ({stack})", f"{result.seconds:.1f}", _mib(result.peak_bytes) + "*",
                  _mib(resident), "-")  # fmt: skip
    table.add_row(f"sample {len(labels)} x {sample_steps} steps, uncached", f"{t_exact:.2f}", _mib(p_exact), _mib(resident), "exact")
    value = psnr(cached, exact)
    table.add_row(f"sample, {_config_label(cache)}", f"{t_cached:.2f}", _mib(p_cached), _mib(resident),
                  "inf" if math.isinf(value) else f"{value:.1f}")  # fmt: skip
    print_console = Console()
    if not print_console.is_terminal:  # piped: one line per row
        print_console = Console(width=140)
    print_console.print(table)
    peak_note = "the CUDA allocator's peak" if device == "cuda" else "the storages one sampling step allocates"
    console.print(f"* training peak: {result.peak_what}; sampling peaks: {peak_note}. Cache: {source}.", style="dim")
    (bn, bo), (an, ao) = result.distances["before"], result.distances["after"]
    console.print(f"new class samples, distance to its data / the old classes' (RMS): before {bn:.3f} / {bo:.3f}, "
                  f"after {an:.3f} / {ao:.3f}")  # fmt: skip
    png = save_rows_png(
        [("before LoRA", before), ("after, uncached", exact), (f"after, {type(cache).__name__}", cached)],
        Path(args.png) if args.png else out / "demo.png",
        title=f"flux-shapes: 4 x {task.class_name!r}, then 4 old classes",
    )  # fmt: skip
    print(f"samples side by side: {png}")
    print(f"LoRA files in {out}; demo took {time.perf_counter() - began:.0f} s")
    return 0


def _config_label(config) -> str:
    """`TaylorSeer(order=2, interval=3)`: the config with the fields that differ from the defaults."""
    from dataclasses import fields

    try:
        default = type(config)()
    except Exception:  # a config with required fields: show it whole
        return repr(config)
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in fields(config) if getattr(config, f.name) != getattr(default, f.name)]
    return f"{type(config).__name__}({', '.join(changed)})"


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the shipped flux-shapes model learns a new class; samples uncached and cached, one table and a PNG",
        description="Map the shipped flux-shapes reference model, plan for this machine, train a LoRA on a class it "
        "never saw (a yellow cross) with the training stack, then sample uncached and under a step cache (the plan's, "
        "or TaylorSeer when the plan has none) and print time, peak memory, resident bytes and PSNR vs exact.",
    )
    demo.add_argument("--fast", action="store_true", help="a few steps only (a smoke test)")
    demo.add_argument("--out", default=None, help="folder for the LoRA files (default: a new temporary folder)")
    demo.add_argument("--png", default=None, help="where to write the samples PNG (default: OUT/demo.png)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default 1: the model is tiny)")
    demo.set_defaults(func=cmd_demo)


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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
