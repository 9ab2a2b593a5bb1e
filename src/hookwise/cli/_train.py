"""`hookwise train-lora` and `hookwise demo`: LoRA training from the command line, and the README's
first command (the shipped flux-shapes model learns a new class, then samples uncached and cached)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..introspect import describe
from ..zoo import load_reference
from ._common import _mib, _positive_int


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


def _launched_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else torchrun's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def cmd_train_lora(args: argparse.Namespace) -> int:
    import torch

    from ..train import train_lora

    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(stderr=True)
    stack = None if args.stack == "none" else "plan"
    if args.stack not in ("plan", "none"):
        from ..stack import Stack

        stack = Stack.from_json(Path(args.stack).read_text())
    # Under torchrun every rank runs this command; only rank 0 shows progress and prints.
    main = _launched_rank() == 0
    bar, update = _train_progress(console, args.steps, f"LoRA on {args.model}")
    with bar if main else contextlib.nullcontext():
        result = train_lora(
            args.model, args.out, data=args.data, steps=args.steps, batch=args.batch, rank=args.rank, alpha=args.alpha,
            lr=args.lr, targets=args.targets.split(",") if args.targets else None, base=args.base, stack=stack,
            optimizer=args.optimizer, validate_every=args.validate_every, resume=args.resume,
            formats=tuple(args.formats.split(",")), seed=args.seed, device=args.device, sample_steps=args.sample_steps,
            progress=update if main else None, accumulate=args.accumulate,
        )  # fmt: skip
    if not main:
        return 0
    if result.plan:
        console.print(f"plan: {result.plan}", style="dim")
    _train_summary(console, result)
    return 0


def _add_train_lora(sub) -> None:
    from ..train import FORMATS
    from ..train.trainer import BASES, OPTIMIZERS

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
    train.add_argument("--accumulate", type=_positive_int, default=1,
                       help="compute each step's batch as this many micro-batches (gradient accumulation; default 1)")  # fmt: skip
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

    from ..plan._measure import measure_call

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

    from .. import apply as apply_stack
    from .. import remove as remove_stack
    from ..cache import TaylorSeer
    from ..core.hooks import Layer
    from ..core.techniques import technique_of
    from ..memory.meters import parameter_bytes
    from ..plan import Job, make_plan
    from ..sampling import psnr
    from ..train import train_lora
    from ..train._lora_tasks import ZooTask
    from ..zoo.grid import save_rows_png

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
