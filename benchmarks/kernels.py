"""Fused kernels and regional compile on the CPU: forward and LoRA-step time of a full-width FLUX block stack.

Variants, each on a fresh copy of the same bf16 weights, in one process, one run:

- eager: the plain model;
- kernels: `Kernels(backend="compile")` (norms, AdaLN modulation and GELU as generated C++ kernels);
- compile: `Compile()` (each block compiled by inductor, one compile per block class);
- kernels + compile: both (inside a compiled block the kernel hooks trace their eager expressions);
- whole-model compile: `torch.compile(model)`, the usual alternative.

Time: median of the timed calls after a warm-up call (which compiles; its time is reported apart).
A LoRA step is forward + backward + AdamW of a rank-16 LoRA (peft) on the attention projections,
the base frozen in bf16. The Triton kernels run on the CPU only in Triton's interpreter, which says
nothing of their speed: their figures are GPU figures (`--device cuda` on a GPU machine).

    python benchmarks/kernels.py [--double 1] [--single 1] [--tokens 64] [--text 16] [--steps 3] [--no-step]
                                 [--only kernels compile ...] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

import hookwise
from hookwise import Compile, Kernels
from hookwise.core.outputs import sample_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import add_lora, full_width_model  # noqa: E402  (one full-width builder for the benchmarks)

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device: str) -> tuple[float, float]:
    """(warm-up seconds, median seconds of `steps` calls)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return warm, statistics.median(times)


def make_variant(name: str, base: torch.nn.Module):
    model = copy.deepcopy(base)
    if name == "kernels":
        hookwise.apply(model, Kernels(backend="compile"))
    elif name == "compile":
        hookwise.apply(model, Compile())
    elif name == "kernels + compile":
        hookwise.apply(model, Kernels(backend="compile"), Compile())
    elif name == "whole-model compile":
        model = torch.compile(model)
    return model


def run(name: str, base: torch.nn.Module, lora_base: torch.nn.Module | None, inputs: dict, steps: int, device: str) -> dict:
    torch._dynamo.reset()
    row: dict = dict(variant=name)
    model = make_variant(name, base)

    def forward():
        with torch.no_grad():
            sample_of(model(**inputs), "bench")

    row["forward_warm_s"], row["forward_s"] = timed(forward, steps, device)
    if name in ("kernels", "kernels + compile"):
        row["kernel_sites"] = len(hookwise.kernels_summary(model)["used"])
        row["rejected"] = hookwise.kernels_summary(model)["rejected"]
    del model
    if lora_base is None:
        print(json.dumps(row), flush=True)
        return row
    torch._dynamo.reset()
    model = make_variant(name, lora_base)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = sample_of(model(**inputs), "bench").float()
        loss = out.pow(2).mean()
        del out
        loss.backward()
        optimizer.step()

    row["step_warm_s"], row["step_s"] = timed(step, steps, device)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    plain = rows[0]
    lines = ["| variant | forward s | vs eager | LoRA step s | vs eager | first forward / step s (compiles) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        step = r.get("step_s")
        lines.append(
            f"| {r['variant']} | {r['forward_s']:.3f} | {r['forward_s'] / plain['forward_s']:.2f} | "
            + (f"{step:.3f} | {step / plain['step_s']:.2f} | " if step is not None else "- | - | ")
            + f"{r['forward_warm_s']:.1f} / " + (f"{r['step_warm_s']:.1f} |" if step is not None else "- |")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--text", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (eager always runs)")
    parser.add_argument("--heads", type=int, default=24, help="heads of 128 (24: full width; fewer for a smoke run)")
    parser.add_argument("--no-step", action="store_true", help="forward only (no LoRA step)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, commit=commit,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        threads=torch.get_num_threads(), load_before=os.getloadavg(), args=vars(args),
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    base, inputs = full_width_model(args.tokens, args.text, args.double, args.single, device=args.device, heads=args.heads)
    lora_base = None
    if not args.no_step:
        lora_base = copy.deepcopy(base)
        add_lora(lora_base)
    names = ["eager", "kernels", "compile", "kernels + compile", "whole-model compile"]
    if args.only:
        names = ["eager", *[n for n in names[1:] if n in args.only]]
    rows: list[dict] = []
    for name in names:
        rows.append(run(name, base, lora_base, inputs, args.steps, args.device))
        meta["load_after"] = os.getloadavg()
        if args.json:  # after every variant, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print(table(rows))


if __name__ == "__main__":
    main()
