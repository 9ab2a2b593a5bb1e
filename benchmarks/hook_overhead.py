"""Per-call cost of a hook: hookwise vs diffusers' HookRegistry vs no hook, in one process and run.

A model of N small Linear layers (default 256), each with one no-op hook. Two kinds of no-op hook:
one that defines identity `pre_forward` and `post_forward` (the same work in both libraries), and
the libraries' base hook class with nothing overridden. Variants are timed in interleaved rounds;
the median over rounds is reported, as microseconds per hooked call (a model forward divided by N)
and as the overhead above the unhooked layer.

    python benchmarks/hook_overhead.py [--layers 256] [--width 16] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import diffusers
import torch
from diffusers.hooks.hooks import HookRegistry
from diffusers.hooks.hooks import ModelHook as DiffusersHook
from torch import nn

import hookwise
from hookwise.core import ModelHook, add_hook


class HookwiseIdentity(ModelHook):
    def pre_forward(self, module, args, kwargs):
        return args, kwargs

    def post_forward(self, module, output):
        return output


def diffusers_hooks():
    class DiffusersIdentity(DiffusersHook):
        def pre_forward(self, module, *args, **kwargs):
            return args, kwargs

        def post_forward(self, module, output):
            return output

    def attach(layer, hook):
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, "noop")

    return attach, DiffusersIdentity, DiffusersHook


def make_model(layers: int, width: int, device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)


def time_forward(model: nn.Module, x: torch.Tensor, iters: int, device: str) -> float:
    """Seconds per forward of `model`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=256)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    attach_diffusers, DiffusersIdentity, DiffusersBase = diffusers_hooks()
    variants: dict[str, nn.Module] = {"no hook": make_model(args.layers, args.width, args.device)}
    for name, hook_cls in (("hookwise identity pre+post", HookwiseIdentity), ("hookwise base hook", ModelHook)):
        model = make_model(args.layers, args.width, args.device)
        for layer in model:
            add_hook(layer, hook_cls(), "noop")
        variants[name] = model
    for name, hook_cls in (("diffusers identity pre+post", DiffusersIdentity), ("diffusers base hook", DiffusersBase)):
        model = make_model(args.layers, args.width, args.device)
        for layer in model:
            attach_diffusers(layer, hook_cls())
        variants[name] = model

    x = torch.randn(1, args.width, device=args.device)
    for model in variants.values():  # warm up every variant
        time_forward(model, x, 20, args.device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, model in variants.items():
            samples[name].append(time_forward(model, x, args.iters, args.device) / args.layers * 1e6)

    per_call = {name: statistics.median(values) for name, values in samples.items()}
    base = per_call["no hook"]
    overhead = {name: value - base for name, value in per_call.items()}

    print(
        f"hook overhead: {args.layers} x Linear({args.width}, {args.width}) on {args.device}, "
        f"median of {args.rounds} rounds x {args.iters} forwards"
    )
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, hookwise {hookwise.__version__}, "
          f"python {platform.python_version()}, {platform.processor() or platform.machine()}")
    print(f"{'variant':30s} {'us / call':>10s} {'overhead us':>12s}")
    for name in variants:
        print(f"{name:30s} {per_call[name]:10.3f} {overhead[name]:12.3f}")
    ratios = {}
    for kind in ("identity pre+post", "base hook"):
        hw, df = f"hookwise {kind}", f"diffusers {kind}"
        ratios[kind] = {
            "per_call": per_call[hw] / per_call[df],
            "overhead": overhead[hw] / overhead[df] if overhead[df] > 0 else float("nan"),
        }
        print(
            f"ratio hookwise / diffusers ({kind}): per call {ratios[kind]['per_call']:.3f}, "
            f"overhead {ratios[kind]['overhead']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "per_call_us": per_call, "overhead_us": overhead, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
