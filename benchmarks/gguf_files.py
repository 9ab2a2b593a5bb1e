"""GGUF files: hookwise's load_gguf vs diffusers' GGUF loading vs the plain model, one run.

`--model zoo` (default): the FLUX-architecture zoo model (`hookwise.zoo.load_reference("flux-shapes")`,
fp32, 64 wide); quality is the PSNR / SSIM of sampled images against the plain model's (same seeds,
same labels). `--model wide`: a FLUX transformer of `--heads` x 128 width (default 2: 256 wide, wide
enough for K-quant super-blocks of 256 in every block Linear) with 2 double + 2 single blocks, random
weights N(0, 1/fan_in), fp32, 256 image + 64 text tokens; quality is the PSNR of one forward's output
against the plain output, over its range (no sampler exists for random weights).

Each type is written as a GGUF file twice, with the original BFL key names (as the common FLUX GGUF
files have them) and with the model's own (diffusers) names, the same quantized rows in both: every
weight whose rows hold whole blocks in that type, the rest F32. Legacy types are quantized by the
`gguf` package; K-quants (Q6_K, Q5_K, Q4_K) by hookwise's own quantizer (`quant/_gguf_write.py`, a
simple scale search, not llama.cpp's), since the package only dequantizes them. Each file is loaded
into a model built on `meta` by `hookwise.load_gguf`, and by diffusers'
`FluxTransformer2DModel.from_single_file` with `GGUFQuantizationConfig` where that runs. Reported per
file: file bytes, the loaded model's weight bytes, quality, load time (median over `--load-repeats`
loads, interleaved) and forward time against the plain model (median of shuffled interleaved rounds,
so that load changes hit every variant alike).

    python benchmarks/gguf_files.py [--model zoo|wide] [--types Q8_0 Q5_1 Q4_0] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import tempfile
import time
import warnings

import sys

import numpy as np
import torch

import hookwise
import hookwise.zoo
from hookwise.introspect.gguf_keys import KEY_MAPS
from hookwise.quant._gguf_write import quantize
from hookwise.sampling import psnr, ssim
from hookwise.sampling.flow import sample_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)


def bfl_tensors(state: dict[str, torch.Tensor], blocks: int) -> dict[str, np.ndarray]:
    """The model's tensors under FLUX's BFL names (fused q/k/v stacked on rows, final shift/scale swapped)."""
    key_map = KEY_MAPS["flux"]
    templates = [(r.original, (".weight", ".bias")) for r in key_map.modules]
    templates += [(original, ("",)) for original, _ in key_map.renames]
    out: dict[str, np.ndarray] = {}
    for template, suffixes in templates:
        for n in range(blocks) if "{n}" in template else (None,):
            for suffix in suffixes:
                name = (template.replace("{n}", str(n)) if n is not None else template) + suffix
                target = key_map.target(name)
                if target is None or not all(k in state for k in target.keys):
                    continue
                value = torch.cat([state[k] for k in target.keys]).numpy()
                if target.swap_halves:
                    half = value.shape[0] // 2
                    value = np.concatenate([value[half:], value[:half]])
                out[name] = value
    return out


def write_file(path: str, tensors: dict[str, np.ndarray], type_name: str) -> dict[str, str]:
    """Write `tensors` as a GGUF file, each weight with whole blocks in `type_name`; returns {name: type}."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(path, "flux")
    types = {}
    for name, value in tensors.items():
        if value.ndim == 2 and value.shape[1] % block == 0:
            writer.add_tensor(name, quantize(value, type_name), raw_dtype=qtype)
            types[name] = type_name
        else:
            writer.add_tensor(name, value.astype(np.float32))
            types[name] = "F32"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def hookwise_model(plain, path: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = type(plain).from_config(plain.config)
    hookwise.load_gguf(model, path)
    return model.eval()


def diffusers_model(path: str, folder: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    return FluxTransformer2DModel.from_single_file(
        path, config=folder, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    ).eval()  # fmt: skip


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def timed(model, inputs) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs, return_dict=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["zoo", "wide"], default="zoo")
    parser.add_argument("--heads", type=int, default=2, help="--model wide: heads of 128 (2: 256 wide)")
    parser.add_argument("--types", nargs="+", default=None, help="default: Q8_0 Q5_1 Q4_0 (zoo), Q8_0 Q6_K Q5_K Q4_K Q4_0 (wide)")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--load-repeats", type=int, default=3, help="loads of every file (median reported)")
    parser.add_argument("--labels", type=int, default=8, help="samples (class ids 0..n-1, seed 0)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each variant once per round)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.types = args.types or (["Q8_0", "Q5_1", "Q4_0"] if args.model == "zoo" else ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"])
    torch.set_num_threads(args.threads)

    tmp = tempfile.mkdtemp(prefix="hookwise-gguf-")
    if args.model == "zoo":
        reference = hookwise.zoo.load_reference("flux-shapes")
        folder = str(hookwise.zoo.reference_path("flux-shapes"))
        plain = reference.transformer
        labels = list(range(min(args.labels, reference.null_class)))
        expected = sample_reference(reference, labels, seed=0)
        g = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=reference.noise(1, generator=g), timestep=torch.tensor([0.5]), **reference.conditioning([0]))

        def quality(model):
            samples = sample_reference(reference, labels, seed=0, model=model)
            return psnr(samples, expected), ssim(samples, expected)

        described = f"zoo flux-shapes; {len(labels)} samples, seed 0"
    else:
        from training import full_width_model

        plain, inputs = full_width_model(256, 64, double=2, single=2, dtype=torch.float32, heads=args.heads)
        plain = plain.eval().requires_grad_(False)
        inputs.pop("return_dict", None)
        folder = os.path.join(tmp, "config")
        plain.save_config(folder)
        with torch.no_grad():
            exact = plain(**inputs, return_dict=False)[0]
        span = float(exact.max() - exact.min())

        def quality(model):
            with torch.no_grad():
                out = model(**inputs, return_dict=False)[0]
            return psnr(out, exact, data_range=span), None

        described = "wide random-weight FLUX, 256 image + 64 text tokens; PSNR of the output over its range"
    config = plain.config
    tensors = bfl_tensors(plain.state_dict(), max(config.num_layers, config.num_single_layers))
    models = {"plain fp32": plain}
    rows = [dict(variant="plain fp32", file_bytes=None, weight_bytes=weight_bytes(plain), psnr=None, ssim=None)]
    notes = []
    loads_of = {}
    for type_name in args.types:
        # The same quantized rows under two namings: BFL (the common FLUX files) and the model's own.
        bfl = os.path.join(tmp, f"{args.model}-{type_name}-bfl.gguf")
        own = os.path.join(tmp, f"{args.model}-{type_name}-diffusers-names.gguf")
        types = write_file(bfl, tensors, type_name)
        write_file(own, {k: v.numpy() for k, v in plain.state_dict().items()}, type_name)
        quantized = sum(t != "F32" for t in types.values())
        loaders = {
            ("hookwise", "BFL names", bfl): lambda p=bfl: hookwise_model(plain, p),
            ("diffusers", "BFL names", bfl): lambda p=bfl: diffusers_model(p, folder),
            ("hookwise", "diffusers names", own): lambda p=own: hookwise_model(plain, p),
            ("diffusers", "diffusers names", own): lambda p=own: diffusers_model(p, folder),
        }
        for (impl, naming, path), load in loaders.items():
            name = f"{impl} {type_name} ({naming})"
            try:
                start = time.perf_counter()
                model = load()
                first_load = time.perf_counter() - start
            except Exception as exc:  # a peer's loader that cannot read this file is reported, not fatal
                notes.append(f"{name}: failed to load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                continue
            value, structural = quality(model)
            models[name] = model
            loads_of[name] = (load, [first_load])
            rows.append(dict(
                variant=name, file_bytes=os.path.getsize(path), weight_bytes=weight_bytes(model),
                psnr=value, ssim=structural, quantized_tensors=quantized, tensors=len(types),
            ))  # fmt: skip
    rng = random.Random(0)
    for _ in range(args.load_repeats - 1):  # further loads of every file, interleaved
        order = list(loads_of)
        rng.shuffle(order)
        for n in order:
            load, seconds = loads_of[n]
            start = time.perf_counter()
            load()
            seconds.append(time.perf_counter() - start)
    names = list(models)
    times = {n: [] for n in names}
    for n in names:
        timed(models[n], inputs)  # warm-up
    loads = []
    for _ in range(args.repeats):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            times[n].append(timed(models[n], inputs))
        loads.append(os.getloadavg()[0])
    for row in rows:
        row["forward_s"] = statistics.median(times[row["variant"]])
        row["forward_ratio"] = row["forward_s"] / statistics.median(times["plain fp32"])
        row["load_s"] = statistics.median(loads_of[row["variant"]][1]) if row["variant"] in loads_of else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"{described} (width {config.num_attention_heads * config.attention_head_dim}, {config.num_layers} double + "
        f"{config.num_single_layers} single blocks), fp32 compute, CPU {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, commit {commit}; load: median of {args.load_repeats}; forward: median of {args.repeats} "
        f"shuffled rounds (1-min load average per round: {', '.join(f'{x:.1f}' for x in loads)})"
    )
    print(f"{'variant':38s} {'file KiB':>9s} {'weights KiB':>12s} {'x plain':>8s} {'PSNR dB':>8s} {'SSIM':>7s} "
          f"{'load ms':>8s} {'fwd ms':>8s} {'x plain':>8s}")  # fmt: skip
    plain_bytes = rows[0]["weight_bytes"]
    for r in rows:
        file_kib = f"{r['file_bytes'] / 1024:9.1f}" if r["file_bytes"] else f"{'-':>9s}"
        value = f"{r['psnr']:8.2f}" if r["psnr"] is not None else f"{'-':>8s}"
        structural = f"{r['ssim']:7.4f}" if r.get("ssim") is not None else f"{'-':>7s}"
        load_ms = f"{r['load_s'] * 1e3:8.1f}" if r.get("load_s") is not None else f"{'-':>8s}"
        print(
            f"{r['variant']:38s} {file_kib} {r['weight_bytes'] / 1024:12.1f} {r['weight_bytes'] / plain_bytes:8.3f} "
            f"{value} {structural} {load_ms} {r['forward_s'] * 1e3:8.2f} {r['forward_ratio']:8.3f}"
        )
    for note in notes:
        print("  note:", note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "commit": commit, "loads": loads, "rows": rows, "notes": notes}, f, indent=2)


if __name__ == "__main__":
    main()
