"""Quantize per scheme against bf16 and against diffusers' own quantized loading, on the CPU (or a GPU).

Zoo model (`hookwise.zoo.load_reference("flux-shapes")`, bf16): for every scheme that runs on the
device, the weight bytes (all parameters and buffers, quantized tensors as stored), the PSNR / SSIM
of its samples against the bf16 model's (same seeds, every class, the reference sampler), and the
forward time against bf16 (median of rounds in which every variant runs once, shuffled). Next to
it, diffusers' quantized loading of the same weights (`from_pretrained` of a saved copy with
`TorchAoConfig` / `BitsAndBytesConfig`) where diffusers supports the scheme, measured the same way.

Full-width FLUX block stack (`benchmarks/training.py`'s model: 3072 wide, 2 double + 2 single
blocks by default, `--double` / `--single`, random weights N(0, 1/fan_in), bf16, 256 image + 64 text
tokens by default): weight bytes, output error against bf16, forward time, and the memory of one LoRA
training step (rank 16 on the attention projections, adapters in fp32, AdamW), each scheme in its
own fresh process that builds the stack, quantizes it in place, adds LoRA and runs one step: the
peak RSS of building + quantizing, the RSS held before the step and the step's peak RSS (VmHWM reset
just before it), each above the process's RSS before the build, and the step's peak tensor bytes
(`plan._peak_tracker.StorageTracker`, as in training.py). `--lora-only` measures only that (no
forward rounds in the parent, which then holds no model). Full-size FLUX.1-dev (the shipped spec,
built on `meta` and quantized there): the weight bytes of every scheme, exact.

    python benchmarks/quantization.py [--only zoo|full|size] [--rounds 5] [--device cpu] [--json out.json]
    python benchmarks/quantization.py --only full --lora-only --schemes int8-weight,fp8-weight,nf4
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

import hookwise
from hookwise.core.outputs import sample_of
from hookwise.sampling import psnr, sample_reference, ssim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training import Runner, add_lora, full_width_model  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
MIB = 2**20
CPU_SCHEMES = ["int8-weight", "int8-dynamic", "fp8-weight", "int8", "nf4", "fp4"]
GPU_SCHEMES = ["int8-weight", "int8-dynamic", "int4-weight", "fp8-weight", "fp8-dynamic", "int8", "nf4", "fp4"]


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as stored: a tensor subclass counts its inner tensors,
    a bitsandbytes parameter its quant state."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        data = t.data if isinstance(t, torch.nn.Parameter) else t
        if hasattr(data, "__tensor_flatten__") and type(data) is not torch.Tensor:
            names, _ = data.__tensor_flatten__()
            total += sum(getattr(data, n).numel() * getattr(data, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if x is not None)
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


class InDtype(torch.nn.Module):
    """Calls `model` with the sampler's float32 latents and timesteps in the model's dtype."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, hidden_states, timestep, **kwargs):
        out = sample_of(self.model(hidden_states=hidden_states.to(self.dtype), timestep=timestep.to(self.dtype),
                                   **kwargs), "bench")  # fmt: skip
        return out.float()


def ours(base: torch.nn.Module, scheme: str) -> torch.nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)
    hookwise.apply(model, hookwise.Quantize(scheme))
    return model


def diffusers_loaded(folder: str, scheme: str, device: str) -> torch.nn.Module | str:
    """The zoo transformer loaded by diffusers with its quantization config, or why it cannot be."""
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel, TorchAoConfig

    try:
        if scheme in ("int8-weight", "int8-dynamic", "fp8-weight", "int4-weight", "fp8-dynamic"):
            from torchao import quantization as q

            make = {
                "int8-weight": q.Int8WeightOnlyConfig, "int8-dynamic": q.Int8DynamicActivationInt8WeightConfig,
                "fp8-weight": q.Float8WeightOnlyConfig, "int4-weight": q.Int4WeightOnlyConfig,
                "fp8-dynamic": q.Float8DynamicActivationFloat8WeightConfig,
            }  # fmt: skip
            config = TorchAoConfig(make[scheme]())
        elif scheme == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_compute_dtype=torch.bfloat16)
        model = FluxTransformer2DModel.from_pretrained(folder, quantization_config=config, torch_dtype=torch.bfloat16)
        return model.to(device) if scheme not in ("int8", "nf4", "fp4") else model
    except Exception as error:  # noqa: BLE001 - reported in the table as what diffusers says
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def timed(models: dict[str, torch.nn.Module], call, rounds: int) -> dict[str, float]:
    """Median seconds of `call(model)` per variant over rounds that run every variant once, shuffled."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        call(model)  # warm-up
    for _ in range(rounds):
        order = list(models)
        random.shuffle(order)
        for name in order:
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t0 = time.perf_counter()
            call(models[name])
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def zoo(device: str, rounds: int, schemes: list[str]) -> list[dict]:
    from hookwise.zoo import load_reference

    ref = load_reference("flux-shapes", dtype=torch.bfloat16)
    ref.to(device)
    base = ref.transformer.eval()
    labels = list(range(len(ref.spec.classes)))
    exact = sample_reference(ref, labels, seed=0, model=InDtype(base, torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    x = ref.noise(len(labels), generator=g).to(device, torch.bfloat16)
    inputs = dict(hidden_states=x, timestep=torch.full((len(labels),), 0.5, device=device, dtype=torch.bfloat16),
                  return_dict=False, **{k: v.to(device) for k, v in ref.conditioning(labels).items()})  # fmt: skip
    models: dict[str, torch.nn.Module] = {"bf16": base}
    rows = [dict(impl="-", scheme="bf16", bytes=stored_bytes(base), psnr=float("inf"), ssim=1.0)]
    with tempfile.TemporaryDirectory(prefix="hookwise-quant-") as folder:
        base.save_pretrained(folder)
        for scheme in schemes:
            for impl in ("hookwise", "diffusers"):
                model = ours(base, scheme) if impl == "hookwise" else diffusers_loaded(folder, scheme, device)
                if isinstance(model, str):
                    rows.append(dict(impl=impl, scheme=scheme, error=model))
                    print(f"  {impl:<9} {scheme:<13} {model}", flush=True)
                    continue
                with torch.no_grad():
                    pixels = sample_reference(ref, labels, seed=0, model=InDtype(model, torch.bfloat16))
                row = dict(impl=impl, scheme=scheme, bytes=stored_bytes(model), psnr=psnr(pixels, exact),
                           ssim=ssim(pixels, exact))  # fmt: skip
                rows.append(row)
                models[f"{impl} {scheme}"] = model
                print(f"  {impl:<9} {scheme:<13} {row['bytes'] / MIB:7.3f} MiB  PSNR {row['psnr']:6.2f} dB  "
                      f"SSIM {row['ssim']:.4f}", flush=True)  # fmt: skip

    def forward(model):
        with torch.no_grad():
            sample_of(model(**inputs), "bench")

    seconds = timed(models, forward, rounds)
    for row in rows:
        name = "bf16" if row["scheme"] == "bf16" else f"{row['impl']} {row['scheme']}"
        if name in seconds:
            row["forward_s"] = seconds[name]
            row["forward_x"] = seconds[name] / seconds["bf16"]
    return rows


def full(
    device: str, rounds: int, schemes: list[str], tokens: int, text: int, lora_steps: int, double: int = 2, single: int = 2
) -> list[dict]:
    """Every scheme on one full-width block stack: bytes, output PSNR against bf16, forward time interleaved
    with bf16 in the same rounds, then (with `lora_steps`) the peak of a LoRA step, each scheme in its own
    process (`lora_in_subprocess`)."""
    base, inputs = full_width_model(tokens, text, double=double, single=single)
    base = base.to(device).eval().requires_grad_(False)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        exact = sample_of(base(**inputs), "bench").float()
    span = float(exact.max() - exact.min())  # PSNR of the output over its own range
    models, rows = {}, []
    for scheme in ["bf16", *schemes]:
        model = base if scheme == "bf16" else ours(base, scheme)
        with torch.no_grad():
            out = sample_of(model(**inputs), "bench").float()
        models[scheme] = model
        rows.append(dict(scheme=scheme, bytes=stored_bytes(model), error=((out - exact).norm() / exact.norm()).item(),
                         psnr=psnr(out, exact, data_range=span), lora_peak=None))  # fmt: skip
    with torch.no_grad():
        seconds = timed(models, lambda m: m(**inputs), rounds)
    for row in rows:
        row["forward_s"] = seconds[row["scheme"]]
        row["forward_x"] = row["forward_s"] / seconds["bf16"]
    for row in rows if lora_steps else ():
        row.update(lora_in_subprocess(row["scheme"], tokens, text, double, single))
    for row in rows:
        peak = f"{row['lora_peak'] / MIB:9.1f} MiB" if row.get("lora_peak") else "-"
        print(f"  {row['scheme']:<13} {row['bytes'] / MIB:9.1f} MiB  err {row['error']:.4f}  PSNR {row['psnr']:.2f} dB  "
              f"forward {row['forward_s']:.3f} s ({row['forward_x']:.2f}x bf16)  LoRA step peak {peak}", flush=True)  # fmt: skip
    return rows


def lora_only(schemes: list[str], tokens: int, text: int, double: int, single: int) -> list[dict]:
    """The LoRA-step memory of bf16 and every scheme, one process each, printed as a table."""
    rows = []
    print(f"  {'scheme':<13} {'weights':>9} {'build+quantize RSS':>18} {'RSS before step':>15} {'step RSS peak':>13} "
          f"{'step tensors peak':>17} {'step s':>7}  (MiB above the RSS before the build)", flush=True)  # fmt: skip
    for scheme in ["bf16", *schemes]:
        row = dict(scheme=scheme, **lora_in_subprocess(scheme, tokens, text, double, single))
        rows.append(row)
        if "lora_error" in row:
            print(f"  {scheme:<13} failed: {row['lora_error']}", flush=True)
            continue
        print(f"  {scheme:<13} {row['weights'] / MIB:9.1f} {row['build_rss_peak'] / MIB:18.1f} "
              f"{row['rss_before_step'] / MIB:15.1f} {row['step_rss_peak'] / MIB:13.1f} {row['lora_peak'] / MIB:17.1f} "
              f"{row['step_s']:7.1f}", flush=True)  # fmt: skip
    return rows


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _trim() -> None:
    """Give freed heap pages back to the system, so the RSS after a step shows what is still held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def lora_step_memory(scheme: str, tokens: int, text: int, double: int, single: int) -> dict:
    """In this process: build the full-width stack (bf16), quantize it in place with `scheme` ("bf16": none),
    add LoRA, run one LoRA step; the peak RSS of building + quantizing and of the step (VmHWM reset before
    it), each above the RSS before the model was built, and the step's peak tensor bytes (StorageTracker)."""
    _trim()
    base_rss = _status("VmRSS")
    model, inputs = full_width_model(tokens, text, double=double, single=single)
    model.requires_grad_(False).eval()
    if scheme != "bf16":
        hookwise.apply(model, hookwise.Quantize(scheme))
    _trim()
    build_peak, held = _status("VmHWM") - base_rss, _status("VmRSS") - base_rss
    weights = stored_bytes(model)
    add_lora(model)
    model.train()
    runner = Runner(model, inputs)
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS: the step's peak alone from here
    before_step = _status("VmRSS") - base_rss
    t0 = time.perf_counter()
    tensor_peak = runner.peak()  # runs one step under the storage tracker
    seconds = time.perf_counter() - t0
    return dict(scheme=scheme, weights=weights, build_rss_peak=build_peak, rss_after_quantize=held,
                rss_before_step=before_step, step_rss_peak=_status("VmHWM") - base_rss, lora_peak=tensor_peak,
                step_s=seconds, base_rss=base_rss)  # fmt: skip


def lora_in_subprocess(scheme: str, tokens: int, text: int, double: int, single: int) -> dict:
    """`lora_step_memory` in a fresh process (nothing of another scheme's run left in the heap)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--lora-one", scheme, "--tokens", str(tokens), "--text",
           str(text), "--double", str(double), "--single", str(single)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in done.stdout.splitlines() if x.startswith("LORA_ROW ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(lora_error=f"exit {done.returncode}: {tail[0][:200]}")
    row = json.loads(lines[-1][len("LORA_ROW "):])
    row.pop("scheme", None)
    return row


def full_size(schemes: list[str]) -> list[dict]:
    """Bytes of the full-size FLUX.1-dev transformer per scheme, quantized on `meta` (exact, no weights)."""
    from hookwise.introspect import build_spec

    rows = []
    settings = [("bf16", "auto"), *((s, "auto") for s in schemes), ("int8-weight", "none"), ("nf4", "none")]
    for scheme, skip in settings:
        model = build_spec("flux.1-dev").requires_grad_(False)
        if scheme != "bf16":
            try:
                hookwise.apply(model, hookwise.Quantize(scheme, skip=skip))
            except hookwise.ConfigError as error:
                rows.append(dict(scheme=scheme, error=str(error).split(";")[0]))
                print(f"  FLUX.1-dev {scheme:<13} {rows[-1]['error']}", flush=True)
                continue
        rows.append(dict(scheme=scheme, skip=skip, bytes=stored_bytes(model)))
        print(f"  FLUX.1-dev {scheme:<13} skip={skip:<5} {rows[-1]['bytes'] / 2**30:7.2f} GiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["zoo", "full", "size"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--schemes", default=None, help="comma-separated; default: those that run on the device")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--lora-steps", type=int, default=1, help="0: no LoRA step (any other value: one, per process)")
    parser.add_argument("--double", type=int, default=2, help="full-width stack: double blocks")
    parser.add_argument("--single", type=int, default=2, help="full-width stack: single blocks")
    parser.add_argument("--lora-only", action="store_true", help="full: only the per-process LoRA-step memory")
    parser.add_argument("--lora-one", default=None, help=argparse.SUPPRESS)  # the child of lora_in_subprocess
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.lora_one:
        # One thread: the step's peak memory does not depend on it, and on shared cores a second thread
        # waits at every barrier for one that was descheduled.
        torch.set_num_threads(1)
        row = lora_step_memory(args.lora_one, args.tokens, args.text, args.double, args.single)
        print("LORA_ROW " + json.dumps(row), flush=True)
        return
    schemes = args.schemes.split(",") if args.schemes else (GPU_SCHEMES if args.device.startswith("cuda") else CPU_SCHEMES)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__, device=f"{args.device} ({device_name}, "
                f"{os.cpu_count()} CPU cores)", commit=commit, load=os.getloadavg(), args=vars(args))  # fmt: skip
    print(json.dumps(meta), flush=True)
    out: dict = dict(meta=meta)
    random.seed(0)
    if args.only in (None, "zoo"):
        torch.set_num_threads(1) if args.device == "cpu" else None  # the zoo model's ops are too small to split
        out["zoo"] = zoo(args.device, args.rounds, schemes)
        save(args.json, out)
    if args.only in (None, "size"):
        out["size"] = full_size(GPU_SCHEMES)
        save(args.json, out)
    if args.only in (None, "full"):
        torch.set_num_threads(os.cpu_count() or 1)
        if args.lora_only:
            out["full"] = lora_only(schemes, args.tokens, args.text, args.double, args.single)
        else:
            out["full"] = full(args.device, args.rounds, schemes, args.tokens, args.text, args.lora_steps,
                               args.double, args.single)  # fmt: skip
        save(args.json, out)
    out["meta"]["load_after"] = os.getloadavg()
    save(args.json, out)


def save(path: str | None, out: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
