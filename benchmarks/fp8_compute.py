"""Layerwise casting's two compute paths on one full-width FLUX block: upcast vs fp8 matmul, one run.

A diffusers `FluxTransformerBlock` at FLUX.1's width (3072, 24 heads of 128), random weights in
bf16, cast to fp8 (e4m3fn) with per-channel scales, run forward with `compute="upcast"` (dequantize
each weight to bf16, bf16 matmul) and `compute="fp8"` (activations quantized per row, fp8 matmul
with `torch._scaled_mm`) on the same stored weights. Reports the median forward time of each and
their ratio, and the output difference between the paths (relative L2, and against the bf16 block).

    python benchmarks/fp8_compute.py [--img 256] [--txt 64] [--repeats 5] [--threads 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings

import torch

import hookwise
from hookwise.memory import LayerwiseCasting

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)


def block_and_inputs(img: int, txt: int, device: str = "cpu"):
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128)
    block = block.to(device=device, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, img, 3072, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 3072, generator=g),
        temb=torch.randn(1, 3072, generator=g),
    )
    inputs = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in inputs.items()}
    return block, inputs


def timed(block, inputs, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = block(**inputs)[1]  # warm-up (and the output: the image stream)
        times = []
        for _ in range(repeats):
            _sync(out)
            start = time.perf_counter()
            last = block(**inputs)[1]
            _sync(last)
            times.append(time.perf_counter() - start)
    return (statistics.median(times) if times else 0.0), out.float()


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img", type=int, default=256, help="image tokens")
    parser.add_argument("--txt", type=int, default=64, help="text tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (fp8 matmul needs SM 8.9+)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    block, inputs = block_and_inputs(args.img, args.txt, args.device)
    _, reference = timed(block, inputs, 0)  # the bf16 block's output
    results = {}
    for compute in ("upcast", "fp8"):
        cast, _ = block_and_inputs(args.img, args.txt, args.device)
        hookwise.apply(cast, LayerwiseCasting(scaling="channel", compute=compute, fused=False))
        seconds, out = timed(cast, inputs, args.repeats)
        results[compute] = dict(seconds=seconds, error_vs_bf16=rel(out, reference), out=out)
        del cast
    ratio = results["fp8"]["seconds"] / results["upcast"]["seconds"]
    between = rel(results["fp8"]["out"], results["upcast"]["out"])
    print(f"FLUX double block, 3072 wide, {args.img} image + {args.txt} text tokens, bf16 compute, {args.device}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'path':8s} {'forward s':>10s} {'rel. L2 vs bf16':>16s}")
    for compute, r in results.items():
        print(f"{compute:8s} {r['seconds']:10.3f} {r['error_vs_bf16']:16.4f}")
    print(f"fp8 / upcast forward time: {ratio:.3f}; fp8 vs upcast output: rel. L2 {between:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), ratio=ratio, between=between,
                           paths={k: {n: v for n, v in r.items() if n != "out"} for k, r in results.items()}), f,
                      indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
