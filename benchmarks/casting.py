"""Layerwise casting: hookwise's scaling modes vs diffusers' enable_layerwise_casting vs bf16, one run.

On a FLUX-architecture transformer (diffusers FluxTransformer2DModel, random weights) at a size that
fits the machine: weight bytes, bytes autograd saves for backward in one LoRA training step, forward
time, and output error against the bf16 model, with ratios to the bf16 baseline. Also the exact
weight bytes of the full-size FLUX.1-dev transformer (built on the meta device) for each setting.

    python benchmarks/casting.py [--heads 8] [--double 2] [--single 4] [--tokens 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
import warnings

import torch

import hookwise
from hookwise.introspect import build_spec
from hookwise.memory import LayerwiseCasting, saved_for_backward

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def flux_kwargs(args) -> dict:
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=args.double,
        num_single_layers=args.single,
        attention_head_dim=128,
        num_attention_heads=args.heads,
        joint_attention_dim=1024,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def init_like_trained(model: torch.nn.Module) -> None:
    """Trained-like weight magnitudes: N(0, 1/fan_in) for every Linear (in place, on the model's device)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.02)


_WEIGHTS: dict = {}


def weights(args) -> dict[str, torch.Tensor]:
    """The bf16 weights every variant starts from, made once per run.

    On the CPU as before (the default init, then `init_like_trained`). On CUDA the model is built on
    `meta` and filled on the device: the default init of a full-width model on the CPU in fp32 takes
    minutes. Every tensor a Linear does not own gets its default-init value (norm scales 1, else 0).
    """
    from diffusers import FluxTransformer2DModel

    key = (args.device, args.heads, args.double, args.single)
    if key not in _WEIGHTS:
        torch.manual_seed(0)
        if args.device == "cpu":
            model = FluxTransformer2DModel(**flux_kwargs(args))
        else:
            with torch.device("meta"):
                model = FluxTransformer2DModel(**flux_kwargs(args))
            model = model.to_empty(device=args.device)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.fill_(1.0 if name.endswith("weight") and p.dim() == 1 else 0.0)
        init_like_trained(model)
        model = model.to(args.device, torch.bfloat16)
        if any(True for _ in model.buffers()):  # none in FluxTransformer2DModel; to_empty would leave them garbage
            raise RuntimeError("casting.py: the model has buffers, which the meta build does not initialize")
        _WEIGHTS[key] = model.state_dict()
    return _WEIGHTS[key]


def build(args) -> tuple[torch.nn.Module, dict]:
    """A fresh FLUX-architecture model holding its own copy of `weights(args)`, and its inputs."""
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    state = weights(args)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_kwargs(args))
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    model = model.to(args.device, torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    side = int(args.tokens**0.5)
    txt = 64
    axes = (torch.zeros(1), torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32))
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g),
        encoder_hidden_states=torch.randn(1, txt, 1024, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=ids.reshape(-1, 3).float(),
        txt_ids=torch.zeros(txt, 3),
    )
    inputs = {
        k: v.to(args.device, torch.bfloat16) if k not in ("img_ids", "txt_ids") else v.to(args.device)
        for k, v in inputs.items()
    }
    return model, inputs


def timed_forward(model, inputs, device: str) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        out = model(**inputs).sample
        sync()
    return time.perf_counter() - start, out


def add_lora(model: torch.nn.Module) -> torch.nn.Module:
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    return peft.inject_adapter_in_model(config, model)


def lora_step_saved_bytes(model, inputs) -> int:
    target = torch.zeros_like(inputs["hidden_states"])

    def step():
        return (model(**inputs).sample.float() - target.float()).pow(2).mean()

    return saved_for_backward(model, step).new_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 128 (width = 128 x heads)")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square number)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each variant once per round)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    # `fused` set explicitly so each row means the same on every device: eager ops (two kernels and a
    # compute-dtype temporary per weight) or one generated dequantize kernel per weight.
    configs = {
        f"hookwise scaling={s}": LayerwiseCasting(scaling=s, fused=False) for s in ("none", "tensor", "channel", "block")
    }
    configs["hookwise block + cast_modulation"] = LayerwiseCasting(scaling="block", cast_modulation=True, fused=False)
    configs["hookwise block, fused"] = LayerwiseCasting(scaling="block", fused=True)
    configs["hookwise block + cast_modulation, fused"] = LayerwiseCasting(scaling="block", cast_modulation=True, fused=True)

    def make(name: str, lora: bool = False) -> torch.nn.Module:
        # A fresh model per variant (same seed, same weights): diffusers' hooked models cannot be
        # deep-copied (the copy would still call the original's hook chain). LoRA goes in first and
        # diffusers is told to skip it (otherwise it casts the adapters to fp8 too).
        model, _ = build(args)
        if lora:
            model = add_lora(model)
        if name == "diffusers layerwise casting":
            skip = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "lora")
            model.enable_layerwise_casting(
                storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16, skip_modules_pattern=skip
            )
        elif name in configs:
            hookwise.apply(model, configs[name])
        return model

    _, inputs = build(args)
    names = ["bf16 baseline", "diffusers layerwise casting", *configs]
    models = {name: make(name) for name in names}
    outputs, times = {}, {name: [] for name in names}
    for name, model in models.items():  # warm-up, and the outputs for the error column
        _, outputs[name] = timed_forward(model, inputs, args.device)
    # Interleaved rounds in a shuffled order: on a shared machine, load changes hit every variant alike.
    rng = random.Random(0)
    loads = []
    for _ in range(args.repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(timed_forward(models[name], inputs, args.device)[0])
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    reference = outputs["bf16 baseline"].float()
    rows = []
    for name in names:
        error = ((outputs[name].float() - reference).norm() / reference.norm()).item()
        weight_bytes = model_bytes(models[name])
        rows.append(dict(variant=name, weight_bytes=weight_bytes, forward_s=statistics.median(times[name]), error=error))
    del models, outputs

    def dump(**more) -> None:
        # Written as soon as each part is measured: a run stopped later keeps what it measured.
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "loads": loads, "rows": rows, **more}, f, indent=2)

    dump()
    for row in rows:
        print(f"  {row['variant']:40s} forward {row['forward_s'] * 1e3:8.2f} ms, x{row['forward_s'] / rows[0]['forward_s']:.3f} of bf16", flush=True)
    for row in rows:
        row["saved_bytes"] = lora_step_saved_bytes(make(row["variant"], lora=True), inputs)
        if args.device != "cpu":
            torch.cuda.empty_cache()
    dump()

    base_row = rows[0]
    width = args.heads * 128
    print(
        f"FLUX-architecture transformer, width {width}, {args.double} double + {args.single} single blocks, "
        f"{args.tokens} image + 64 text tokens, bf16, device {args.device}; torch {torch.__version__}; "
        f"forward: median of {args.repeats} shuffled rounds (1-min load average per round: "
        f"{', '.join(f'{x:.1f}' for x in loads)})"
    )
    header = f"{'variant':40s} {'weights MiB':>11s} {'x bf16':>7s} {'saved MiB':>10s} {'x bf16':>7s} {'fwd ms':>8s} {'x bf16':>7s} {'out rel err':>11s}"
    print(header)
    for r in rows:
        print(
            f"{r['variant']:40s} {r['weight_bytes'] / 2**20:11.1f} {r['weight_bytes'] / base_row['weight_bytes']:7.3f} "
            f"{r['saved_bytes'] / 2**20:10.1f} {r['saved_bytes'] / base_row['saved_bytes']:7.3f} "
            f"{r['forward_s'] * 1e3:8.1f} {r['forward_s'] / base_row['forward_s']:7.3f} {r['error']:11.5f}"
        )
    diffusers_saved = rows[1]["saved_bytes"]
    for r in rows[2:]:
        print(f"  {r['variant']}: saved-for-backward below diffusers by {(diffusers_saved - r['saved_bytes']) / 2**20:.1f} MiB")

    # Exact bytes of the full-size FLUX.1-dev transformer for each setting (meta device: nothing allocated).
    full = build_spec("flux.1-dev")
    full_bytes = model_bytes(full)
    print(f"\nFLUX.1-dev full size: bf16 {full_bytes / 2**30:.2f} GiB")
    full_rows = {}
    for name, config in configs.items():
        model = build_spec("flux.1-dev")
        hookwise.apply(model, config)
        full_rows[name] = model_bytes(model)
        summary = hookwise.casting_summary(model)
        print(
            f"  {name:40s} {full_rows[name] / 2**30:6.2f} GiB  x{full_rows[name] / full_bytes:.3f}  "
            f"({len(summary['cast'])} leaves cast, {len(summary['kept'])} kept)"
        )
    dump(flux_full_bytes={"bf16": full_bytes, **full_rows})


if __name__ == "__main__":
    main()
