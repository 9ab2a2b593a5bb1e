"""Attention backends on the CPU: the attention op alone, and a full-width FLUX block stack's forward and
LoRA step, per backend, against plain eager and diffusers' own backend switch, in one process and run.

- Op alone: one `scaled_dot_product_attention` at FLUX's head layout (24 heads x 128) and `--op-tokens`
  tokens, no grad: each hookwise backend's call, and diffusers' `dispatch_attention_fn` under each of
  its backends that runs here; ratios against `F.scaled_dot_product_attention` as is.
- Model: a FLUX transformer at full width (3072 wide, 24 heads x 128) with `--double` double and
  `--single` single blocks, random weights, `--tokens` image + `--text` text tokens, in `--dtype`:
  the forward (no grad) and a LoRA step (forward + backward + AdamW, rank-16 peft adapters on the
  attention projections, the base frozen) under `hookwise.Attention(backend=...)` and under
  diffusers' `attention_backend(...)` context; ratios against plain eager. Backends without a
  backward on the CPU (FlexAttention) are not in the LoRA rows: in training hookwise never chooses
  them (its row shows the fallback), and diffusers' would fail.

Every variant gets a warm-up call ("auto" measures there, the numerics check runs there), then the
median of `--repeats` timed calls. The load average is printed with each row.

    python benchmarks/attention.py [--tokens 64] [--text 16] [--op-tokens 1024 4096] [--repeats 3]
                                   [--threads 1] [--only op|model] [--json out.json]
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
import torch.nn.functional as F

import hookwise
from hookwise.core.outputs import sample_of
from hookwise.kernels import _attn_backends as ab

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import add_lora, full_width_model  # noqa: E402  (one full-width builder for the benchmarks)

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
DIFFUSERS_BACKENDS = ("native", "_native_math", "_native_flash", "flex")
HOOKWISE_BACKENDS = ("sdpa", "sdpa-math", "sdpa-flash", "flex", "auto")


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def row(kind: str, variant: str, seconds: float, times: list[float], **extra) -> dict:
    load = os.getloadavg()[0]
    print(f"  {kind:<8} {variant:<34} {seconds * 1e3:10.2f} ms  (load {load:.1f})", flush=True)
    return dict(kind=kind, variant=variant, seconds=seconds, times=times, load=load, **extra)


# ---- the op alone ---------------------------------------------------------------------------------------
def op_rows(tokens: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 24, tokens, 128, generator=g).to(dtype) for _ in range(3))
    call = ab.AttnCall(q, k, v)
    rows = [row("op", "F.sdpa (eager)", *timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats))]
    for name in ab.backend_names():
        backend = ab.backend_named(name)
        if backend.refuse(call) is None:
            rows.append(row("op", f"hookwise {name}", *timed(lambda b=backend: b.call(call), repeats)))
    qb, kb, vb = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # diffusers' (batch, seq, heads, dim)
    for name in DIFFUSERS_BACKENDS:
        def run(name=name):
            with attention_backend(name):
                return dispatch_attention_fn(qb, kb, vb)
        try:
            rows.append(row("op", f"diffusers {name}", *timed(run, repeats)))
        except Exception as exc:  # noqa: BLE001 - a backend that does not run here is reported, not fatal
            print(f"  op       diffusers {name}: does not run here ({type(exc).__name__}: {str(exc)[:80]})")
    return rows


# ---- the model ----------------------------------------------------------------------------------------------
def forward(model, inputs):
    with torch.no_grad():
        return sample_of(model(**inputs), "bench")


class LoraStep:
    def __init__(self, model, inputs) -> None:
        self.model, self.inputs = model, inputs
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out = sample_of(self.model(**self.inputs), "bench").float()
        out.pow(2).mean().backward()
        self.optimizer.step()


def model_rows(base, inputs, repeats: int) -> list[dict]:
    from diffusers.models.attention_dispatch import attention_backend

    rows = []
    for mode in ("forward", "lora"):
        model = copy.deepcopy(base)
        if mode == "lora":
            add_lora(model)
        step = LoraStep(model, inputs) if mode == "lora" else (lambda m=model: forward(m, inputs))
        rows.append(row(mode, "plain eager", *timed(step, repeats)))
        for name in HOOKWISE_BACKENDS:
            if mode == "lora" and name == "flex":
                continue
            hookwise.apply(model, hookwise.Attention(backend=name))
            seconds, times = timed(step, repeats)
            chosen = sorted({d["chosen"] for d in hookwise.attention_summary(model)["decisions"]})
            rows.append(row(mode, f"hookwise {name} -> {'/'.join(chosen)}", seconds, times, chosen=chosen))
            hookwise.remove(model)
        for name in DIFFUSERS_BACKENDS:
            if mode == "lora" and name == "flex":
                continue

            def under(name=name):
                with attention_backend(name):
                    return step()

            try:
                rows.append(row(mode, f"diffusers {name}", *timed(under, repeats)))
            except Exception as exc:  # noqa: BLE001
                print(f"  {mode:<8} diffusers {name}: does not run here ({type(exc).__name__}: {str(exc)[:80]})")
        del model, step
    return rows


def table(rows: list[dict], kind: str, base: str) -> str:
    ref = next(r for r in rows if r["kind"] == kind and r["variant"] == base)
    lines = ["| variant | ms | vs " + base + " | load |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["kind"] == kind:
            lines.append(f"| {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / ref['seconds']:.2f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="image tokens of the model")
    parser.add_argument("--text", type=int, default=16, help="text tokens of the model")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--op-tokens", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["op", "model"], default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                commit=commit, threads=args.threads, args=vars(args))  # fmt: skip
    print(json.dumps(meta), flush=True)
    out: dict = dict(meta=meta, rows=[])
    if args.only in (None, "op"):
        for tokens in args.op_tokens:
            print(f"op alone: 24 heads x 128, {tokens} tokens, {args.dtype}", flush=True)
            rows = op_rows(tokens, dtype, args.repeats)
            for r in rows:
                r["tokens"] = tokens
            out["rows"] += rows
            print(table(rows, "op", "F.sdpa (eager)"))
    if args.only in (None, "model"):
        base, inputs = full_width_model(args.tokens, args.text, args.double, args.single, dtype)
        print(f"full-width FLUX, {args.double} double + {args.single} single blocks, {args.tokens} + {args.text} "
              f"tokens, {args.dtype}", flush=True)  # fmt: skip
        rows = model_rows(base, inputs, args.repeats)
        out["rows"] += rows
        print(table(rows, "forward", "plain eager"))
        print(table(rows, "lora", "plain eager"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
