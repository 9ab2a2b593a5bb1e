"""Cost of the first-call check of the model map: the first call of a hooked model with and without it.

After `hookwise.apply`, the model's first call is recorded (a forward pre-hook and an always-called
forward hook on every module, for that call only) and the hooked blocks are checked against it. This
times, on the tiny Flux of the tests and on a FLUX model at full width (3072 hidden, 24 heads; one
double-stream and one single-stream block). The tiny Flux runs under block offloading (onload on
the CPU); the full-width one under PAB (attention modules hooked), since repeated offload apply /
remove cycles on a 2 GB model grew the process by about 2 GB each here and ran out of memory:

- the first call with the check, and with the check's hook taken off before the call;
- the second call of each (the check is gone by then: the two should match);
- `hookwise.apply` with and without installing the check (it maps the model once per config).

Variants alternate within each round on fresh applies; the median over rounds is reported.

    python benchmarks/first_call.py [--rounds 7] [--full-rounds 3] [--tokens 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

import hookwise
from hookwise.core import ledger as ledger_module
from hookwise.stack import FIRST_CALL_CHECK

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def full_width_flux(tokens: int, text_tokens: int) -> tuple[torch.nn.Module, dict]:
    """FLUX.1 widths (3072 hidden, 24 heads of 128, 4096 text features), one block of each kind."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=[16, 56, 56],
    ).eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 64, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.full((1,), 0.5),
        img_ids=torch.randn(tokens, 3, generator=g),
        txt_ids=torch.randn(text_tokens, 3, generator=g),
    )
    return model, inputs


TECHNIQUES = {
    "offload": lambda: hookwise.Offload(onload_device="cpu", offload_device="cpu", granularity="block"),
    "pab": lambda: hookwise.PyramidAttentionBroadcast(spatial_range=2),
}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(model: torch.nn.Module, inputs: dict, checked: bool, technique: str) -> dict[str, float]:
    """Apply, call twice, remove; seconds of the apply and of each call."""
    watchers = list(ledger_module._AFTER_RECORD)
    if not checked:  # apply as before the check existed: nothing is installed
        ledger_module._AFTER_RECORD.clear()
    try:
        apply_s = timed(lambda: hookwise.apply(model, TECHNIQUES[technique]()))
    finally:
        ledger_module._AFTER_RECORD[:] = watchers
    assert (FIRST_CALL_CHECK in hookwise.list_hooks(model)[""]) == checked
    with torch.no_grad():
        first_s = timed(lambda: model(**inputs))
        assert FIRST_CALL_CHECK not in hookwise.list_hooks(model)[""]
        second_s = timed(lambda: model(**inputs))
    hookwise.remove(model)
    return {"apply": apply_s, "first": first_s, "second": second_s}


def measure(name: str, model: torch.nn.Module, inputs: dict, rounds: int, technique: str) -> dict[str, Any]:
    with torch.no_grad():
        model(**inputs)  # warm the allocator and kernels once, unhooked
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(rounds):
        for checked in (True, False) if r % 2 == 0 else (False, True):
            runs[checked].append(one_round(model, inputs, checked, technique))
    med = {
        checked: {k: statistics.median(run[k] for run in runs[checked]) for k in ("apply", "first", "second")}
        for checked in runs
    }
    result = {
        "model": name,
        "technique": technique,
        "params": sum(p.numel() for p in model.parameters()),
        "modules": sum(1 for _ in model.modules()),
        "rounds": rounds,
        "with_check_s": med[True],
        "without_check_s": med[False],
        "ratio": {k: med[True][k] / med[False][k] for k in ("apply", "first", "second")},
    }
    print(
        f"{name:>18} {technique:>7}  {result['params'] / 1e6:8.1f}M params {result['modules']:4d} modules | "
        f"first call {med[True]['first'] * 1e3:9.2f} ms vs {med[False]['first'] * 1e3:9.2f} ms "
        f"(x{result['ratio']['first']:.3f}) | second call x{result['ratio']['second']:.3f} | "
        f"apply {med[True]['apply'] * 1e3:8.2f} ms vs {med[False]['apply'] * 1e3:8.2f} ms "
        f"(x{result['ratio']['apply']:.2f})",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds on the tiny Flux")
    parser.add_argument("--full-rounds", type=int, default=3, help="rounds on the full-width FLUX")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of the full-width FLUX input")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true", help="the tiny Flux only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from model_helpers import tiny_flux

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    results = [measure("tiny flux", *tiny_flux(), rounds=args.rounds, technique="offload")]
    if not args.skip_full:
        model, inputs = full_width_flux(args.tokens, args.text_tokens)
        results.append(measure(
                f"flux 3072 x{args.tokens + args.text_tokens}t", model, inputs, rounds=args.full_rounds, technique="pab"
            ))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
