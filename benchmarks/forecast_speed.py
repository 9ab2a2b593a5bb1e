"""CPU wall clock of Forecast against TaylorSeer and the uncached model, interleaved in one process.

    PYTHONPATH=src python benchmarks/forecast_speed.py [--repeats 5] [--steps 28,50] [--threads 1]

For each reference model and step count: rounds of (uncached, TaylorSeer order 1 interval 3 warmup 3,
Forecast at `steps // 4` computed steps by the even rule, the same with predictor="foca", Forecast at
`steps // 2` by the even rule, the shipped calibrated Forecast at `steps // 4`), each sampling the evaluated classes once (CFG as two calls); the median seconds of each
variant over the rounds, its speed-up against the uncached median, and its PSNR against the uncached
samples. The order of the variants rotates from round to round, so a slow moment of the shared CPU
is spread over all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hookwise
from hookwise.cache.forecast import FOCA_GAIN
from hookwise.errors import ConfigError
from hookwise.sampling import psnr, sample
from hookwise.zoo import load_reference, shipped_forecast

EVALUATED = {"flux-shapes": [1, 2, 3, 5, 6, 7], "wan-moving": [1, 2, 3, 5]}  # not the calibration classes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="flux-shapes,wan-moving")
    parser.add_argument("--steps", default="28,50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | steps | variant | block evals | median s | speed-up | PSNR dB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        ref = load_reference(name)
        spec, model = ref.spec, ref.transformer
        labels = torch.tensor(EVALUATED[name])
        noise = ref.noise(len(labels), torch.Generator().manual_seed(0))
        cond, uncond = ref.conditioning(labels), ref.conditioning(torch.full_like(labels, -1))
        for steps in (int(s) for s in args.steps.split(",")):
            budget = steps // 4
            variants = {
                "uncached": [],
                "taylorseer order=1 interval=3": [hookwise.TaylorSeer(order=1, interval=3, warmup=3)],
                f"forecast budget={budget} (even rule)": [hookwise.Forecast(num_steps=steps, budget=budget)],
                f"forecast budget={budget} foca (gain {FOCA_GAIN})": [hookwise.Forecast(num_steps=steps, budget=budget, predictor="foca")],
                f"forecast budget={steps // 2} (even rule)": [hookwise.Forecast(num_steps=steps, budget=steps // 2)],
            }
            try:
                variants[f"forecast budget={budget} (shipped, calibrated)"] = [shipped_forecast(name, steps, budget)]
            except ConfigError as exc:
                print(f"<!-- {name} {steps}: {exc} -->")
            times: dict[str, list[float]] = {v: [] for v in variants}
            images: dict[str, torch.Tensor] = {}
            keys = list(variants)
            for r in range(args.repeats):
                for v in keys[r % len(keys):] + keys[: r % len(keys)]:
                    if variants[v]:
                        hookwise.apply(model, *variants[v])
                    start = time.perf_counter()
                    with torch.no_grad():
                        latents = sample(model, noise, cond, uncond, steps=steps, guidance_scale=spec.guidance_scale,
                                         timestep_scale=spec.timestep_scale)
                    times[v].append(time.perf_counter() - start)
                    images[v] = ref.decode(latents)
                    if variants[v]:
                        hookwise.remove(model)
            base = statistics.median(times["uncached"])
            for v in keys:
                med = statistics.median(times[v])
                evals = 1.0 if not variants[v] else _evals(variants[v][0], steps)
                quality = psnr(images[v], images["uncached"])
                print(f"| {name} | {steps} | {v} | {evals:.3f} | {med:.2f} | {base / med:.2f}x | {quality:.2f} |", flush=True)
    return 0


def _evals(config, steps: int) -> float:
    if isinstance(config, hookwise.Forecast):
        return len(config.computed_steps()) / steps
    return sum(1 for s in range(steps) if s < 3 or (s - 4) % 3 == 0) / steps  # TaylorSeer's schedule, warmup 3


if __name__ == "__main__":
    raise SystemExit(main())
