"""Peak memory of a job's step: the fake-tensor estimate against peaks measured on real CPU runs,
plain and under each stack, and the estimate for full-size FLUX.1-dev and Wan2.1-14B with the time
it takes.

Per strategy (`--stacks`): the estimate with the stack's hooks on a fake copy (offloading's own
partition and hooks included), the peak composed from the declarations alone (the planner's default:
declared resident weights and slots plus the plain run's activations), and the real run with the
stack applied on the CPU (the offload's host masters counted apart).

Measured peaks come from the same storage tracker on a real run (LoRA from peft, checkpointing from
diffusers), with attention on the CPU's math or flash kernel and the estimate asked for the same
backend, weights counted, storages unrounded (compute_device="cpu"). The full-size estimates are
for a CUDA device (512 B rounding, flash attention on bf16) and need no weights.

    python benchmarks/plan_peak.py [--skip-full] [--skip-small] [--stacks] [--calibrate] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from hookwise.errors import HookwiseError  # noqa: E402
from hookwise.introspect.specs import build_spec  # noqa: E402
from hookwise.plan._peak_formula import fit_factors, formula_activation, step_shape  # noqa: E402
from hookwise.plan._peak_inputs import build_inputs, known_target  # noqa: E402
from hookwise.plan._peak_measure import measure_peak  # noqa: E402
from hookwise.plan.job import Job  # noqa: E402
from hookwise.plan.peak import estimate_peak  # noqa: E402

MODES = {"sample": dict(), "train ckpt": dict(training=True), "train": dict(training=True, checkpointing=False)}


def small_models() -> list[tuple[str, torch.nn.Module, Job]]:
    from model_helpers import tiny_flux, tiny_wan

    from hookwise.zoo import load_reference

    return [
        ("tiny flux", tiny_flux()[0], Job(height=256, width=256, text_len=24)),
        ("tiny wan", tiny_wan()[0], Job(height=128, width=128, frames=9, text_len=12)),
        ("zoo flux-shapes", load_reference("flux-shapes"), Job(height=64, width=64, text_len=4)),
        ("zoo wan-moving", load_reference("wan-moving"), Job(height=48, width=48, frames=8, text_len=4)),
    ]


def mib(n: int) -> str:
    return f"{n / 2**20:9.3f}"


def gib(n: int) -> str:
    return f"{n / 2**30:7.2f}"


def compare_small() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, samples = [], []
    print("\nPredicted (fake tensors) vs measured (real CPU run) peak, MiB; weights included")
    print(f"{'model':16s} {'step':10s} {'attn':5s} {'measured':>9s} {'fake':>9s} {'ratio':>6s} "
          f"{'act meas':>9s} {'act fake':>9s} {'formula':>9s}")
    for name, model, base in small_models():
        target, _ = known_target(model)
        sample: dict[str, Any] = {"shape": step_shape(model, base)}
        for mode, extra in MODES.items():
            if modes and mode not in modes:
                continue
            job = Job(**{**base.__dict__, **extra})
            inputs = build_inputs(model, job, torch.float32)
            for backend in ("math", "flash"):
                measured = measure_peak(target, inputs, job, attention_backend=backend)
                fake = estimate_peak(model, job, attention_backend=backend, compute_device="cpu")
                formula = formula_activation(sample["shape"], job, backend, "cpu")
                ratio = fake.peak_bytes / measured["peak_bytes"]
                print(f"{name:16s} {mode:10s} {backend:5s} {mib(measured['peak_bytes'])} {mib(fake.peak_bytes)} "
                      f"{ratio:6.3f} {mib(measured['activation_bytes'])} {mib(fake.activation_bytes)} {mib(formula)}")
                rows.append(dict(model=name, step=mode, attention=backend, measured=measured["peak_bytes"],
                                 fake=fake.peak_bytes, measured_activation=measured["activation_bytes"],
                                 fake_activation=fake.activation_bytes, formula_activation=formula))
                if backend == "flash":
                    key = {"sample": "sampling", "train ckpt": "checkpointed", "train": "saved"}[mode]
                    sample[key] = measured["activation_bytes"]
        samples.append(sample)
    return rows, samples


def stacks(weight_bytes: int) -> dict[str, tuple]:
    from hookwise.memory import LayerwiseCasting, Offload
    from hookwise.quant import Quantize

    return {
        "plain": (),
        "fp8": (LayerwiseCasting(),),
        "block offload": (Offload(onload_device="cpu", granularity="block"),),
        "budget offload": (Offload(onload_device="cpu", granularity="block", vram_budget=weight_bytes * 6 // 10),),
        "leaf offload": (Offload(onload_device="cpu", granularity="leaf"),),
        "fp8 + offload": (LayerwiseCasting(), Offload(onload_device="cpu", granularity="block")),
        "int8": (Quantize("int8-weight"),),
        "nf4": (Quantize("nf4"),),
        "int8 + offload": (Quantize("int8-weight"), Offload(onload_device="cpu", granularity="block")),
    }


def declared_peak(model: torch.nn.Module, job: Job, stack: tuple, plain: Any) -> int:
    """The peak composed from the cost declarations: each technique's effect on the footprint,
    plus the plain fake run's activations and optimizer state (what the planner adds up)."""
    from types import SimpleNamespace

    from hookwise.core.cost import CostContext, Placement
    from hookwise.core.techniques import technique_of
    from hookwise.introspect import describe
    from hookwise.plan.footprint import footprint_from_map

    target, _ = known_target(model)
    placement = Placement.resident(footprint_from_map(describe(target)))
    hw = SimpleNamespace(vram=0, pinned_limit=0, device="cpu")
    ctx = CostContext(hardware=hw, job=job, device_room=0, ram_room=0, passes=2 if job.training else 1,
                      training=job.training)
    for config in stack:
        placement = technique_of(config).cost.effect(placement, config, ctx)
    return placement.device_bytes + placement.transient_bytes + plain.activation_bytes + plain.optimizer_bytes


STACK_JOBS = {
    "tiny flux": Job(height=64, width=64, text_len=24),
    "tiny wan": Job(height=32, width=32, frames=5, text_len=12),
    "zoo flux-shapes": Job(height=16, width=16, text_len=4),
    "zoo wan-moving": Job(height=12, width=12, frames=8, text_len=4),
}


def compare_stacks(models: list[str] | None = None, labels: list[str] | None = None,
                   modes: list[str] | None = None) -> list[dict[str, Any]]:
    import warnings

    rows = []
    print("\nPer strategy: fake run with the stack vs declarations vs real CPU run with the stack, device peak in "
          "MiB (math attention; training: LoRA r16 + AdamW state; ckpt = hookwise Checkpointing)")
    print(f"{'model':16s} {'step':10s} {'stack':15s} {'measured':>9s} {'fake':>9s} {'ratio':>6s} {'declared':>9s} "
          f"{'ratio':>6s} {'host':>7s}")
    chosen = {name: (model, job) for name, model, job in small_models()}
    for name in models or list(chosen):
        model = chosen[name][0]
        print(f"# {name}: load {open('/proc/loadavg').read().strip()}", flush=True)
        target, _ = known_target(model)
        weights = sum(t.numel() * t.element_size() for t in [*target.parameters(), *target.buffers()])
        for mode, extra in MODES.items():
            if modes and mode not in modes:
                continue
            job = Job(**{**STACK_JOBS[name].__dict__, **extra})
            inputs = build_inputs(model, job, torch.float32)
            plain = estimate_peak(model, job, attention_backend="math", compute_device="cpu")
            for label, stack in stacks(weights).items():
                if labels and label not in labels:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the offload's extra-slot warnings: the table shows them
                    try:
                        measured = measure_peak(target, inputs, job, attention_backend="math", stack=stack)
                    except HookwiseError as exc:  # a budget below two slots of the largest block
                        print(f"{name:16s} {mode:10s} {label:15s} does not apply: {str(exc)[:80]}")
                        continue
                    except RuntimeError as exc:  # the real run fails: the table says so
                        print(f"{name:16s} {mode:10s} {label:15s} real run fails: {type(exc).__name__}: "
                              f"{str(exc)[:90]}", flush=True)
                        rows.append(dict(model=name, step=mode, stack=label, error=f"{type(exc).__name__}: {exc}"))
                        continue
                    fake = estimate_peak(model, job, attention_backend="math", compute_device="cpu", stack=stack)
                declared = declared_peak(model, job, stack, plain)
                m = measured["peak_bytes"]
                print(f"{name:16s} {mode:10s} {label:15s} {mib(m)} {mib(fake.peak_bytes)} {fake.peak_bytes / m:6.3f} "
                      f"{mib(declared)} {declared / m:6.3f} {measured['host_bytes'] / 2**20:7.3f}", flush=True)
                rows.append(dict(model=name, step=mode, stack=label, measured=m, fake=fake.peak_bytes,
                                 declared=declared, host=measured["host_bytes"], fake_host=fake.host_bytes,
                                 optimizer=measured["optimizer_bytes"], fake_optimizer=fake.optimizer_bytes))
    ran = [r for r in rows if "error" not in r]
    within = sum(abs(r["fake"] / r["measured"] - 1) <= 0.05 for r in ran)
    declared_within = sum(abs(r["declared"] / r["measured"] - 1) <= 0.05 for r in ran)
    print(f"within 5%: fake run with the stack {within}/{len(ran)}, declarations {declared_within}/{len(ran)}; "
          f"{len(rows) - len(ran)} real runs failed")
    return rows


FULL = [
    ("flux.1-dev", "1024x1024", Job(height=1024, width=1024, text_len=512)),
    ("flux.1-dev", "1024x1024 cfg", Job(height=1024, width=1024, text_len=512, cfg="batched")),
    ("flux.1-dev", "1024x1024 train", Job(height=1024, width=1024, text_len=512, training=True)),
    ("flux.1-dev", "1024x1024 train -ckpt", Job(height=1024, width=1024, text_len=512, training=True,
                                                 checkpointing=False)),
    ("wan2.1-t2v-14b", "832x480x81", Job(height=480, width=832, frames=81, text_len=512)),
    ("wan2.1-t2v-14b", "1280x720x81", Job(height=720, width=1280, frames=81, text_len=512)),
    ("wan2.1-t2v-14b", "832x480x81 train", Job(height=480, width=832, frames=81, text_len=512, training=True)),
]


def full_size() -> list[dict[str, Any]]:
    rows = []
    print("\nFull-size estimates (bf16, for CUDA, flash attention), GiB; time of the estimate")
    print(f"{'model':16s} {'job':22s} {'peak':>7s} {'weights':>7s} {'act':>7s} {'saved':>7s} {'math act':>8s} "
          f"{'formula':>7s} {'time s':>6s}")
    models: dict[str, torch.nn.Module] = {}
    for spec, label, job in FULL:
        model = models.setdefault(spec, build_spec(spec))
        start = time.perf_counter()
        report = estimate_peak(model, job)
        seconds = time.perf_counter() - start
        # Math attention without checkpointing keeps every block's scores: skipped, it is hopeless anyway.
        hopeless = job.training and job.checkpointing is False
        math = None if hopeless else estimate_peak(model, job, attention_backend="math")
        formula = formula_activation(step_shape(model, job), job, "flash", "cuda")
        print(f"{spec:16s} {label:22s} {gib(report.peak_bytes)} {gib(report.weight_bytes)} "
              f"{gib(report.activation_bytes)} {gib(report.saved_for_backward_bytes)} "
              f"{gib(math.activation_bytes) if math else '      -':>8s} {gib(formula)} {seconds:6.1f}")
        rows.append(dict(model=spec, job=label, seconds=seconds, **report.to_dict(),
                         math_activation=math.activation_bytes if math else None, formula_activation=formula))
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return rows


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-full", action="store_true", help="skip the full-size FLUX / Wan estimates")
    parser.add_argument("--skip-small", action="store_true", help="skip the plain small-model comparison")
    parser.add_argument("--stacks", action="store_true", help="compare every strategy on the small models")
    parser.add_argument("--models", nargs="+", choices=list(STACK_JOBS), help="only these models in --stacks")
    parser.add_argument("--only", nargs="+", metavar="STACK", help="only these stacks in --stacks (labels as printed)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="only these steps in --stacks")
    parser.add_argument("--calibrate", action="store_true", help="print the formula factors fitted on the small models")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {open('/proc/loadavg').read().strip()}, commit {_commit()}")
    out: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    if not args.skip_small:
        out["small"], samples = compare_small()
    if args.stacks:
        out["stacks"] = compare_stacks(args.models, args.only, args.modes)
    if args.calibrate and samples:
        factors = fit_factors(samples)
        print("\nformula factors fitted on the measured peaks (flash):",
              ", ".join(f"{k}={v:.2f}" for k, v in factors.items()))
        out["factors"] = factors
    if not args.skip_full:
        out["full"] = full_size()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
