"""The validation switch: what `hookwise.validation` costs to enter and leave, against remove + apply.

A LoRA training stack is applied (block offloading under a budget of 50% of the weights, one slot, in RAM or on disk;
LoRA rank 16 from peft on the attention projections), a training step records the offload order,
then each round enters validation (the same offloading with every weight resident, plus a
first-block cache), makes one sampling call, leaves, and takes a training step. The switch is
timed both ways with its bytes copied, files written, hashes computed and host buffers pinned
(`Validation.report`). The alternative without an in-place switch, removing the training stack
and applying the validation one (and back), is timed on the same model in the same run.

Models: the FLUX-architecture zoo model (`hookwise.zoo.load_reference("flux-shapes")`, fp32 as
shipped) and a full-width FLUX-architecture transformer with 2 double + 2 single blocks, random
bf16 weights.

    python benchmarks/validation_switch.py [--rounds 3] [--models zoo,full] [--image-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import hookwise
import hookwise.zoo
from hookwise.memory.offload import offload_report

MiB = 2**20


def zoo_case() -> tuple[torch.nn.Module, dict]:
    ref = hookwise.zoo.load_reference("flux-shapes")
    model = ref.transformer
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=ref.noise(1, generator=g), timestep=torch.tensor([500.0]), **ref.conditioning([0]))
    return model, inputs


def full_case(image_tokens: int, text_tokens: int) -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    config = dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random weights at a trained model's scale
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    side = int(image_tokens**0.5)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g, dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=g, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 768, generator=g, dtype=torch.bfloat16),
        timestep=torch.tensor([0.5], dtype=torch.bfloat16),
        guidance=torch.tensor([3.5], dtype=torch.bfloat16),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    return model.eval(), inputs


def add_lora(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = next(model.parameters()).dtype
    for p in trainable:
        p.data = p.data.to(dtype)
    return trainable


def train_step(model, inputs, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    (out.float() ** 2).mean().backward()
    optimizer.step()


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run(name: str, make, where: str, rounds: int, folder: Path) -> dict:
    model, inputs = make()
    trainable = add_lora(model)
    total = weight_bytes(model)
    disk = dict(offload_device="disk", disk_path=str(folder)) if where == "disk" else {}
    # One slot (prefetch=False): with two slots of a full-width double block (648 MiB each), 50% of the
    # 4-block model leaves nothing resident.
    training = [hookwise.Offload(onload_device="cpu", vram_budget=total // 2, granularity="block", prefetch=False, **disk)]
    inside = [dataclasses.replace(training[0], vram_budget=2 * total), hookwise.FirstBlockCache()]
    start = time.perf_counter()
    hookwise.apply(model, *training)
    applied_s = time.perf_counter() - start
    resident = sum(g.nbytes for g in offload_report(model).groups if g.resident)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    step_times = []
    start = time.perf_counter()
    train_step(model, inputs, optimizer)
    step_times.append(time.perf_counter() - start)
    enters, exits = [], []
    for _ in range(rounds):
        with hookwise.validation(model, stack=inside) as v, torch.no_grad():
            model(**inputs)
        enters.append(v.report.enter)
        exits.append(v.report.exit)
        start = time.perf_counter()
        train_step(model, inputs, optimizer)
        step_times.append(time.perf_counter() - start)
    # The way without an in-place switch: remove the training stack, apply the validation one, and back.
    naive_in, naive_out = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        hookwise.remove(model)
        hookwise.apply(model, *inside)
        naive_in.append(time.perf_counter() - start)
        with torch.no_grad():
            model(**inputs)
        start = time.perf_counter()
        hookwise.remove(model)
        hookwise.apply(model, *training)
        naive_out.append(time.perf_counter() - start)
    files = len(list(folder.glob("*.safetensors"))) if where == "disk" else 0
    hookwise.remove(model)

    def agg(costs, field):
        return statistics.median(getattr(c, field) for c in costs)

    return {
        "model": name,
        "offload": where,
        "weights_MiB": total / MiB,
        "resident_in_training_MiB": resident / MiB,
        "offload_files": files,
        "apply_training_stack_s": applied_s,
        "train_step_s": statistics.median(step_times),
        "enter_s": agg(enters, "seconds"),
        "enter_MiB_copied": agg(enters, "bytes_copied") / MiB,
        "exit_s": agg(exits, "seconds"),
        "exit_MiB_copied": agg(exits, "bytes_copied") / MiB,
        "files_written": sum(c.files_written for c in enters + exits),
        "hashes": sum(c.hashes for c in enters + exits),
        "pins": sum(c.pins for c in enters + exits),
        "enter_steps": enters[-1].steps,
        "remove_apply_in_s": statistics.median(naive_in),
        "remove_apply_out_s": statistics.median(naive_out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="zoo,full", help="comma-separated: zoo, full")
    parser.add_argument("--image-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = []
    if "zoo" in args.models.split(","):
        cases.append(("zoo flux-shapes (fp32)", zoo_case))
    if "full" in args.models.split(","):
        cases.append(("full-width FLUX 2+2 blocks (bf16)", lambda: full_case(args.image_tokens, args.text_tokens)))
    rows = []
    for name, make in cases:
        for where in ("ram", "disk"):
            with tempfile.TemporaryDirectory(prefix="hookwise-validation-") as tmp:
                row = run(name, make, where, args.rounds, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "commit": commit,
    }
    print(json.dumps(meta))
    print(f"| model | offload | weights | enter | exit | copied in / out | files written, hashes, pins | remove + apply in / out | train step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['offload']} | {r['weights_MiB']:.0f} MiB | {r['enter_s'] * 1e3:.1f} ms | "
            f"{r['exit_s'] * 1e3:.1f} ms | {r['enter_MiB_copied']:.0f} / {r['exit_MiB_copied']:.0f} MiB | "
            f"{r['files_written']}, {r['hashes']}, {r['pins']} | {r['remove_apply_in_s'] * 1e3:.0f} / "
            f"{r['remove_apply_out_s'] * 1e3:.0f} ms | {r['train_step_s']:.2f} s |"
        )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
