"""LoRA training step through hookwise's training stacks, on the CPU: peak memory and step time.

A step is forward + backward + AdamW step of a rank-16 LoRA (peft) on the attention projections,
the base frozen in bf16. Variants, each on a fresh copy of the same weights:

- plain bf16;
- fp8 casting (LayerwiseCasting, e4m3 storage, bf16 compute);
- fp8 + 50% resident: block offload with a budget of half the fp8 weights, the rest streamed from
  safetensors files on disk (on a CPU, offloading to "cpu" would leave the bytes in the same RAM);
- the same + Checkpointing at 0% (a budget that keeps every block's activations: the measuring
  first step, then no recompute), 50% (a budget that keeps the smaller half) and 100% of blocks.

Peak memory: the live bytes of the weights bound at rest (resident weights; streamed ones live in
the offload files) plus every storage the step creates (activations, gradients, dequantized or
loaded weights, optimizer updates), tracked by `plan._peak_tracker.StorageTracker`; what the
mapped offload files occupy in the page cache is not counted. Time: median of the timed steps after
a warm-up step (which is also the step a checkpointing budget measures on); the zoo model runs on
one thread (its ops are too small to split), the full-width one on every core. Models: the zoo's
FLUX-architecture "flux-shapes" model, and a full-width FLUX transformer built from its config
(3072 wide, 24 heads x 128, 2 double + 2 single blocks, random weights).

    python benchmarks/training.py [--steps 3] [--tokens 256] [--text 64] [--only zoo|full] [--json out.json]
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
import tempfile
import time
import warnings

import torch

import hookwise
from hookwise.core.outputs import sample_of
from hookwise.plan._peak_tracker import StorageTracker

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
GIB = 2**30
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def zoo_model(batch: int) -> tuple[torch.nn.Module, dict]:
    from hookwise.zoo import load_reference

    ref = load_reference("flux-shapes", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = ref.noise(batch, generator=g).to(torch.bfloat16)
    t = torch.full((batch,), 0.5 * ref.spec.timestep_scale, dtype=torch.bfloat16)
    inputs = dict(hidden_states=x, timestep=t, return_dict=False, **ref.conditioning(list(range(batch))))
    return ref.transformer, inputs


def full_width_model(
    tokens: int, text: int, double: int = 2, single: int = 2, dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu", heads: int = 24,
) -> tuple[torch.nn.Module, dict]:
    """FLUX at full width (`heads` x 128; 24 heads: 3072 wide) with `double` + `single` blocks, random
    weights of trained-like magnitude, and inputs of `tokens` image + `text` text tokens. The attention,
    kernels and quantization benchmarks build their full-width model here too."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).to(device=device, dtype=dtype)  # fmt: skip
    with torch.no_grad():  # trained-like magnitudes, so fp8 scaling sees realistic ranges
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features**-0.5)
    g = torch.Generator().manual_seed(0)
    i = torch.arange(tokens)
    width = max(int(tokens**0.5), 1)
    img_ids = torch.stack([torch.zeros(tokens), (i // width).float(), (i % width).float()], -1)  # a grid, row by row
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 64, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, text, 4096, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 768, generator=g).to(dtype),
        timestep=torch.full((1,), 0.5, dtype=dtype),
        guidance=torch.full((1,), 3.5, dtype=dtype),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    return model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def add_lora(model: torch.nn.Module, rank: int = 16) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n.split(".", 3)[-1] for n, _ in model.named_modules()}
    targets = [t for t in TARGETS if t in present or t.split(".")[0] in present]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # trainers keep the adapters in float32 over a bf16 base


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class Runner:
    def __init__(self, model: torch.nn.Module, inputs: dict) -> None:
        self.model, self.inputs = model, inputs
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.target = None

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out = sample_of(self.model(**self.inputs), "bench").float()
        if self.target is None:
            self.target = torch.zeros_like(out)
        loss = torch.nn.functional.mse_loss(out, self.target)
        del out
        loss.backward()
        self.optimizer.step()

    def peak(self) -> int:
        tracker = StorageTracker()
        rest = [t for t in list(self.model.parameters()) + list(self.model.buffers())]
        for t in rest:
            tracker.register(t)
        for state in self.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker.register(v)
        for v in self.inputs.values():
            if isinstance(v, torch.Tensor):
                tracker.register(v, count=False)
        tracker.reset_peak()
        with tracker:
            self.step()
        return tracker.peak_bytes("cpu")


def run_variant(name: str, base: torch.nn.Module, inputs: dict, configs, steps: int) -> dict:
    model = copy.deepcopy(base)
    add_lora(model)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if configs:
        hookwise.apply(model, *configs(model))
    apply_s = time.perf_counter() - t0
    runner = Runner(model, inputs)
    t0 = time.perf_counter()
    runner.step()  # warm-up; a checkpointing budget measures here
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - t0)
    peak = runner.peak()
    row = dict(variant=name, step_s=statistics.median(times), times=times, first_step_s=first_s, apply_s=apply_s,
               peak_bytes=peak, load=os.getloadavg()[0])  # fmt: skip
    try:
        report = hookwise.checkpointing_report(model)
        row["checkpointed"] = f"{len(report.checkpointed)}/{len(report.blocks)}"
        row["measured"] = {p: vars(m) for p, m in report.measured.items()}
    except hookwise.ConfigError:
        row["checkpointed"] = "-"
    print(f"  {name:<44} {row['step_s']:8.3f} s  peak {peak / GIB:7.3f} GiB  ckpt {row['checkpointed']}  "
          f"(load {row['load']:.1f})", flush=True)
    hookwise.remove(model)
    del model, runner
    return row


def variants(base: torch.nn.Module, inputs: dict, steps: int, disk: str) -> list[dict]:
    fp8_bytes = None

    def fp8():
        return hookwise.LayerwiseCasting()

    def offload(model):
        nonlocal fp8_bytes
        # Half of the weights as fp8 stores them (measured on the cast model at apply time).
        fp8_bytes = fp8_bytes or _fp8_bytes(base)
        return hookwise.Offload(onload_device="cpu", offload_device="disk", disk_path=disk, granularity="block",
                                vram_budget=fp8_bytes // 2)  # fmt: skip

    rows = [run_variant("plain bf16", base, inputs, None, steps)]
    rows.append(run_variant("fp8", base, inputs, lambda m: [fp8()], steps))
    rows.append(run_variant("fp8 + 50% resident", base, inputs, lambda m: [fp8(), offload(m)], steps))
    zero = run_variant("fp8 + 50% resident + checkpointing 0%", base, inputs,
                       lambda m: [fp8(), offload(m), hookwise.Checkpointing(budget="1TB")], steps)  # fmt: skip
    rows.append(zero)
    measured = zero["measured"]
    smallest = sorted(m["saved_bytes"] for m in measured.values())[: len(measured) // 2]
    half = sum(m["input_bytes"] for m in measured.values()) + sum(smallest)
    rows.append(run_variant("fp8 + 50% resident + checkpointing 50%", base, inputs,
                            lambda m: [fp8(), offload(m), hookwise.Checkpointing(budget=half)], steps))  # fmt: skip
    rows.append(run_variant("fp8 + 50% resident + checkpointing 100%", base, inputs,
                            lambda m: [fp8(), offload(m), hookwise.Checkpointing()], steps))  # fmt: skip
    return rows


def _fp8_bytes(base: torch.nn.Module) -> int:
    model = copy.deepcopy(base).requires_grad_(False)  # casting refuses weights that are trainable
    hookwise.apply(model, hookwise.LayerwiseCasting())
    return weight_bytes(model)


def table(title: str, rows: list[dict]) -> str:
    plain = rows[0]
    lines = [f"### {title}", "", "| stack | blocks checkpointed | s/step | peak GiB | time vs plain | peak vs plain |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['variant']} | {r['checkpointed']} | {r['step_s']:.3f} | {r['peak_bytes'] / GIB:.3f} | "
                     f"{r['step_s'] / plain['step_s']:.2f} | {r['peak_bytes'] / plain['peak_bytes']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of the full-width model")
    parser.add_argument("--text", type=int, default=64, help="text tokens of the full-width model")
    parser.add_argument("--batch", type=int, default=4, help="batch of the zoo model")
    parser.add_argument("--only", choices=["zoo", "full"], default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    threads = torch.get_num_threads()
    meta = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, machine=f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} CPU cores", commit=commit, threads=f"zoo 1, full {threads}", args=vars(args))  # fmt: skip
    print(json.dumps(meta))
    out = dict(meta=meta)
    with tempfile.TemporaryDirectory(prefix="hookwise-bench-") as disk:
        if args.only in (None, "zoo"):
            # One thread: the zoo model's ops are too small to split, and on a shared CPU the pool's
            # contention makes them many times slower.
            torch.set_num_threads(1)
            base, inputs = zoo_model(args.batch)
            print(f"zoo flux-shapes: {weight_bytes(base) / GIB:.3f} GiB bf16, batch {args.batch}", flush=True)
            out["zoo"] = variants(base, inputs, args.steps, os.path.join(disk, "zoo"))
            print(table("zoo", out["zoo"]))
            save(args.json, out)
        if args.only in (None, "full"):
            torch.set_num_threads(threads)
            base, inputs = full_width_model(args.tokens, args.text)
            print(f"full-width 4-block FLUX: {weight_bytes(base) / GIB:.3f} GiB bf16, {args.tokens} + {args.text} tokens",
                  flush=True)  # fmt: skip
            out["full"] = variants(base, inputs, args.steps, os.path.join(disk, "full"))
            print(table("full", out["full"]))
            save(args.json, out)


def save(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
