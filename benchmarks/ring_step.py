"""One ring step's local attention, three ways, in one process (no ranks): what routing the step through
the attention backend costs.

A ring step attends this rank's queries to one K/V block and needs the log-sum-exp of the scores:

- `fused`: PyTorch's CPU flash kernel called directly (`aten._scaled_dot_product_flash_attention_for_cpu`),
  output and log-sum-exp in one call: the ring's local attention before it went through the backend;
- `routed`: `F.scaled_dot_product_attention` (what an applied `Attention` backend intercepts), the
  log-sum-exp taken from the kernel that ran (hookwise's ring since this change);
- `routed-math`: the same under `sdpa_kernel(MATH)`, a kernel without a log-sum-exp, which the ring then
  computes in float32 (the fallback that warns once).

The three are interleaved in every repeat; reported: medians, ratios to `fused`, and the largest
difference of output and log-sum-exp from `fused`.

    python benchmarks/ring_step.py --heads 8 --tokens 2048 --head-dim 128 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hookwise.parallel._ring import attend_lse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048, help="query rows and keys of the block")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.head_dim, generator=g) for _ in range(3))
    scale = args.head_dim**-0.5

    def fused():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)

    def routed():
        return attend_lse(q, k, v, scale)

    def routed_math():
        with sdpa_kernel(SDPBackend.MATH):
            return attend_lse(q, k, v, scale, on_computed=lambda kernels: None)

    variants = {"fused": fused, "routed": routed, "routed-math": routed_math}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            outs[name] = fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"q = k = v: [1, {args.heads}, {args.tokens}, {args.head_dim}] float32, {args.threads} thread(s), "
          f"{args.repeats} repeats, load average {' '.join(load)}")
    base = statistics.median(times["fused"])
    ref_out, ref_lse = outs["fused"][0], outs["fused"][1].float()
    print("| variant | median ms | vs fused | max abs diff out | max abs diff lse |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        med = statistics.median(times[name])
        out, lse = outs[name][0], outs[name][1]
        print(f"| {name} | {med * 1e3:.1f} | {med / base:.2f}x | {float((out - ref_out).abs().max()):.1e} | "
              f"{float((lse - ref_lse).abs().max()):.1e} |")
    print("per repeat (ms): " + "; ".join(f"{n} " + " / ".join(f"{t * 1e3:.0f}" for t in ts) for n, ts in times.items()))


if __name__ == "__main__":
    main()
