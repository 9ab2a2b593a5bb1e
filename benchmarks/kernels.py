"""Speed techniques on the CPU: a full-width FLUX block stack's forward and forward + backward, interleaved.

Variants, each a model tree of its own that shares the same weights (bf16 on CUDA, fp32 on the CPU:
see DTYPE_NOTE) and the same rank-16 peft LoRA on the attention projections, in one process, one run:

- eager: the plain model;
- kernels: `Kernels(backend="compile")` (norms, AdaLN modulation, GELU, gated residuals, rotary
  embedding and Wan's modulation as `torch.compile`-generated kernels; the Triton kernels run on the
  CPU only in Triton's interpreter, which says nothing of their speed, so they are not timed here);
- compile: `Compile()` (each block compiled by inductor, one compile per block class);
- kernels + compile: both (inside a compiled block the kernel hooks trace their eager expressions);
- whole-model compile: `torch.compile(model)`, the usual alternative;
- attention <backend>: `Attention(backend=...)` for each SDPA backend that runs on the CPU (FlexAttention
  forward only: it has no backward on the CPU); and attention sdpa-flash + compile.

Each variant is warmed up (compiles, numerics checks, "auto" measurements: their time is reported
apart), then `--repeats` rounds run every variant once in turn (forward without grad, then forward +
backward of the LoRA), so a change of load hits every variant alike; the table gives the medians and
their ratios to eager, and the load average before and after.

    python benchmarks/kernels.py [--double 1] [--single 1] [--tokens 64] [--text 16] [--repeats 5]
                                 [--only kernels compile ...] [--device cuda] [--dtype float32|bfloat16] [--json out.json]
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
from hookwise import Attention, Compile, Kernels
from hookwise.core.outputs import sample_of

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import add_lora, full_width_model  # noqa: E402  (one full-width builder for the benchmarks)

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)

VARIANTS = (
    "eager", "kernels", "compile", "kernels + compile", "whole-model compile",
    "attention sdpa-math", "attention sdpa-flash", "attention flex", "attention sdpa-flash + compile",
)  # fmt: skip
FORWARD_ONLY = {"attention flex"}  # no backward on the CPU
# On a CPU without native bf16 (AVX2 only, as the CI machines), torch's bf16 matmul takes a slow path for
# one operand layout: measured 2026-12-01, (320 x 3072) @ (3072 x 3072) in 18.6 s against 0.49 s with the
# weight transposed and 0.08 s in fp32. A LoRA step's input gradient (grad @ W) hits it, so a bf16 backward
# on such a CPU times that path and nothing else; the CPU default is float32.
DTYPE_NOTE = "float32 on the CPU: bf16 matmul with a non-transposed weight is ~40x slower there (AVX2)"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sharing(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of `base`'s module tree holding the same parameters and buffers (hooks are per instance)."""
    memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo)


def make_variant(name: str, base: torch.nn.Module) -> torch.nn.Module:
    model = sharing(base)
    if name == "kernels":
        hookwise.apply(model, Kernels(backend="compile"))
    elif name == "compile":
        hookwise.apply(model, Compile())
    elif name == "kernels + compile":
        hookwise.apply(model, Kernels(backend="compile"), Compile())
    elif name == "whole-model compile":
        model = torch.compile(model)
    elif name.startswith("attention "):
        backend = name.split()[1]
        hookwise.apply(model, Attention(backend=backend), *([Compile()] if name.endswith("+ compile") else []))
    return model


class Variant:
    def __init__(self, name: str, base: torch.nn.Module, inputs: dict, device: str) -> None:
        self.name, self.inputs, self.device = name, inputs, device
        self.model = make_variant(name, base)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.times: dict[str, list[float]] = {"forward": [], "backward": []}
        self.warm: dict[str, float] = {}

    def forward(self) -> None:
        with torch.no_grad():
            sample_of(self.model(**self.inputs), "bench")

    def backward(self) -> None:
        for p in self.params:
            p.grad = None
        out = sample_of(self.model(**self.inputs), "bench").float()
        loss = out.pow(2).mean()
        del out
        loss.backward()

    def modes(self) -> list[str]:
        return ["forward"] if self.name in FORWARD_ONLY else ["forward", "backward"]

    def time(self, mode: str) -> float:
        sync(self.device)
        start = time.perf_counter()
        getattr(self, mode)()
        sync(self.device)
        return time.perf_counter() - start


def table(variants: list[Variant]) -> str:
    eager = variants[0]
    med = {v.name: {m: statistics.median(t) for m, t in v.times.items() if t} for v in variants}
    lines = ["| variant | forward s | vs eager | forward + backward s | vs eager | warm-up forward / fwd+bwd s |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for v in variants:
        f, b = med[v.name].get("forward"), med[v.name].get("backward")
        cells = [f"{f:.3f}", f"{f / med[eager.name]['forward']:.2f}"]
        cells += [f"{b:.3f}", f"{b / med[eager.name]['backward']:.2f}"] if b is not None else ["-", "-"]
        warm = " / ".join(f"{v.warm[m]:.1f}" if m in v.warm else "-" for m in ("forward", "backward"))
        lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {warm} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--text", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (eager always runs)")
    parser.add_argument("--heads", type=int, default=24, help="heads of 128 (24: full width; fewer for a smoke run)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None,
        help="default: bfloat16 on CUDA, float32 on the CPU (see DTYPE_NOTE)",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch._dynamo.config.cache_size_limit = 64  # several model trees share the block classes' code
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, commit=commit,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        threads=torch.get_num_threads(), load_before=open("/proc/loadavg").read().strip(), args=vars(args),
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    dtype = getattr(torch, args.dtype)
    base, inputs = full_width_model(
        args.tokens, args.text, args.double, args.single, dtype=dtype, device=args.device, heads=args.heads
    )  # fmt: skip
    add_lora(base)
    names = [n for n in VARIANTS if n == "eager" or not args.only or n in args.only]
    variants: list[Variant] = []
    for name in names:
        v = Variant(name, base, inputs, args.device)
        for mode in v.modes():
            v.warm[mode] = v.time(mode)
            v.time(mode)  # a second untimed call: the first ones after a compile are still slow
        print(json.dumps(dict(variant=name, warm=v.warm, load=open("/proc/loadavg").read().strip())), flush=True)
        variants.append(v)
    loads = []
    for r in range(args.repeats):
        for v in variants:
            for mode in v.modes():
                v.times[mode].append(v.time(mode))
        loads.append(open("/proc/loadavg").read().strip())
        print(json.dumps(dict(round=r, load=loads[-1], times={v.name: {m: t[-1] for m, t in v.times.items() if t} for v in variants})), flush=True)
        meta["load_after"] = loads
        if args.json:  # after every round, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows={v.name: dict(warm=v.warm, times=v.times) for v in variants}), f, indent=1)
    print(table(variants))
    print("load before:", meta["load_before"], "| after each round:", "; ".join(loads))


if __name__ == "__main__":
    main()
