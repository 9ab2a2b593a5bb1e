"""Peak host memory of quantizing a full-precision checkpoint: load-then-quantize vs `load_and_quantize`.

Each variant runs in a fresh process (so allocator caches and earlier peaks do not carry over), on
the same safetensors checkpoint:

- `load then quantize`: the model built on `meta`, `load_state_dict(load_file(ckpt), assign=True)`
  (the full-precision model exists, and not twice), then `hookwise.apply(model, Quantize(scheme))`.
- `load_and_quantize`: `hookwise.load_and_quantize(factory, ckpt, Quantize(scheme))`, each weight
  read (not memory-mapped) and quantized as it is read.
- `load_quantized` (with `--variants`): `hookwise.load_quantized(folder, factory)` of the checkpoint
  quantized and written by `save_quantized`, each stored tensor read on its own; against
  `mapped load_quantized`, what it did before: `load_state_dict(load_file(...), assign=True)` into the
  model quantized on `meta` (the stored tensors stay in the file's mapped pages).

Reported: the peak anonymous memory above the process's level just before loading (RssAnon, sampled
every 2 ms by a thread: the file's pages that safetensors maps are page cache, not the model), the
peak of the whole RSS above that level (VmHWM after resetting it through /proc/self/clear_refs; it
includes the pages of a memory-mapped file: `load_file` maps the checkpoint and `assign=True` keeps
the model's tensors in those pages, so there the full-precision model is file-backed memory), and
the bytes of the loaded model. Models: the FLUX-architecture
zoo model (`flux-shapes`, bf16) and the full-width FLUX block stack of `benchmarks/training.py`
(3072 wide, 2 double + 2 single blocks, bf16).

    python benchmarks/quant_load.py [--models zoo full] [--schemes nf4 int8-weight]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _factory(model_name: str):
    """A function that builds the model (on meta under `load_and_quantize`, or under torch.device("meta"))."""
    import torch
    from diffusers import FluxTransformer2DModel

    if model_name == "zoo":
        from hookwise.zoo import load_reference

        config = dict(load_reference("flux-shapes").transformer.config)
        return lambda: FluxTransformer2DModel.from_config(config).to(torch.bfloat16).eval()
    sys.path.insert(0, HERE)
    from training import full_width_model  # noqa: E402

    return lambda: full_width_model(8, 8, device="meta")[0].eval()


def child(model_name: str, variant: str, scheme: str, ckpt: str) -> dict:
    """One measurement, in this (fresh) process."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    import hookwise
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    factory = _factory(model_name)
    with torch.device("meta"):
        warm = factory()  # imports and builds once, so the baseline holds every library
    del warm
    hookwise.Quantize(scheme)
    # Import the scheme's backend before the baseline (its import costs memory of its own).
    from hookwise.quant._formats import backend_module

    backend_module("torchao" if scheme != "nf4" else "bitsandbytes")
    peak = [0]
    done = threading.Event()
    base = _status("RssAnon")

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.002)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss_base = _status("VmRSS")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if variant == "load then quantize":
        with torch.device("meta"):
            model = factory()
        model.load_state_dict(load_file(ckpt), assign=True)
        model.requires_grad_(False)
        hookwise.apply(model, hookwise.Quantize(scheme))
    elif variant == "load_quantized":  # `ckpt` is a folder written by save_quantized
        model = hookwise.load_quantized(ckpt, factory)
    elif variant == "mapped load_quantized":  # what load_quantized did before it read tensor by tensor
        with torch.device("meta"):
            model = factory()
        model.requires_grad_(False)
        hookwise.apply(model, hookwise.Quantize(scheme))
        model.load_state_dict(load_file(os.path.join(ckpt, "model.safetensors")), assign=True)
    else:
        model = hookwise.load_and_quantize(factory, ckpt, hookwise.Quantize(scheme))
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    peak[0] = max(peak[0], _status("RssAnon"))
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    rss_peak = _status("VmHWM") - rss_base
    # Read one element per page of every tensor, as a first forward would: a memory-mapped tensor's
    # pages enter the process (file-backed) only then.
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            flat = t.detach().reshape(-1)
            if flat.numel():
                flat[:: max(1, 4096 // t.element_size())].sum()
    return dict(model=model_name, variant=variant, scheme=scheme, anon_peak=peak[0] - base,
                rss_peak=rss_peak, model_bytes=stored, seconds=seconds,
                rss_after_touch=_status("VmRSS") - rss_base, anon_after_touch=_status("RssAnon") - base)  # fmt: skip


def write_checkpoint(model_name: str, folder: str) -> tuple[str, int]:
    import torch
    from safetensors.torch import save_file

    path = os.path.join(folder, f"{model_name}.safetensors")
    if model_name == "zoo":
        from hookwise.zoo import load_reference

        model = load_reference("flux-shapes").transformer.to(torch.bfloat16)
    else:
        sys.path.insert(0, HERE)
        from training import full_width_model  # noqa: E402

        model, _ = full_width_model(8, 8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    return path, sum(v.numel() * v.element_size() for v in state.values())


def save_quantized_copy(model_name: str, ckpt: str, scheme: str, folder: str) -> str:
    """The checkpoint quantized with `scheme` and written by `save_quantized` (what `load_quantized` reads)."""
    import hookwise

    out = os.path.join(folder, f"{model_name}-{scheme}")
    model = hookwise.load_and_quantize(_factory(model_name), ckpt, hookwise.Quantize(scheme))
    hookwise.save_quantized(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["zoo", "full"])
    parser.add_argument("--schemes", nargs="+", default=["nf4", "int8-weight"])
    parser.add_argument("--variants", nargs="+", default=["load then quantize", "load_and_quantize"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    folder = tempfile.mkdtemp(prefix="hookwise-quant-load-")
    rows = []
    loads = [os.getloadavg()[0]]
    for model_name in args.models:
        ckpt, full_bytes = write_checkpoint(model_name, folder)
        for scheme in args.schemes:
            saved = None
            if any("load_quantized" in v and v != "load_and_quantize" for v in args.variants):
                saved = save_quantized_copy(model_name, ckpt, scheme, folder)
            for variant in args.variants:
                source = saved if "load_quantized" in variant and variant != "load_and_quantize" else ckpt
                out = subprocess.run(
                    [sys.executable, __file__, "--child", model_name, variant, scheme, source],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["checkpoint_bytes"] = full_bytes
                rows.append(row)
                loads.append(os.getloadavg()[0])
                print(
                    f"{model_name:5s} {scheme:12s} {variant:20s} anon peak {row['anon_peak'] / 2**20:9.1f} MiB  "
                    f"RSS peak {row['rss_peak'] / 2**20:9.1f} MiB  model {row['model_bytes'] / 2**20:9.1f} MiB  "
                    f"checkpoint {full_bytes / 2**20:9.1f} MiB  {row['seconds']:.1f} s  load {loads[-1]:.1f}  after "
                    f"reading every tensor: RSS {row['rss_after_touch'] / 2**20:.1f} MiB, anon "
                    f"{row['anon_after_touch'] / 2**20:.1f} MiB",
                    flush=True,
                )
            if saved:
                shutil.rmtree(saved)
        os.remove(ckpt)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loads": loads}, f, indent=1)


if __name__ == "__main__":
    main()
