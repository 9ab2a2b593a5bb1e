"""Offloading: hookwise vs diffusers group offloading, in one process and run.

On a GPU (`--device cuda`, the default when CUDA is available): a FLUX-architecture transformer at
full size with random bf16 weights (1024x1024 latents: 4096 image + 512 text tokens), and with
`--wan` a Wan-14B-architecture one. Variants: resident; hookwise with the budget at 100%, 50% and
25% of the weights and streaming everything; diffusers `apply_group_offloading` block-level and
leaf-level with streams. Also a LoRA training step (gradient checkpointing) at 50% resident vs
resident, and the pinned host->device bandwidth, so each hookwise time is printed as a ratio to the
bound `max(resident compute time, streamed bytes / bandwidth)`.

On the CPU (`--device cpu`, the default without CUDA): a reduced FLUX-architecture model (full
block width, fewer blocks, bf16, 256x256 latents) offloaded to *disk* and computed on the CPU:
resident in RAM; hookwise disk (block, stream-all and 50%; leaf stream-all); diffusers disk
(block, leaf). "cold" drops the offload files from the page cache before each step (a real disk
read), "warm" leaves them cached. The bound uses the disk read bandwidth measured in the same run.

    python benchmarks/offload.py [--device cpu|cuda] [--steps 3] [--wan] [--json out.json] [--trace t.json.gz]
    python benchmarks/offload.py --device cpu --gpu-path --small   # the GPU path's plumbing, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

import hookwise
from hookwise.memory import Offload, apply_offload, offload_report
from hookwise.memory.offload import _offloader

GiB = 2**30


# ---- measuring -----------------------------------------------------------------------------------
class RssPeak:
    """Peak resident set size of this process while the block runs (sampled every 10 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> RssPeak:
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_page_cache(paths) -> None:
    """Evict files from the OS page cache (clean pages, not mapped by anyone): the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.safetensors")]


def disk_read_bandwidth(paths: list[str]) -> float:
    """Bytes per second reading `paths` cold, sequentially (what streaming from this disk can reach)."""
    drop_page_cache(paths)
    buf = bytearray(64 * 2**20)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.perf_counter() - start)


def h2d_bandwidth(device: torch.device, nbytes: int = GiB) -> float:
    """Pinned host->device copy bandwidth in bytes per second (on the CPU: a plain host copy)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


# ---- models ----------------------------------------------------------------------------------------
def flux_config(double: int, single: int, heads: int = 24, text_dim: int = 4096) -> dict:
    return dict(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


def flux_inputs(latent: int, text: int, device, dtype, text_dim: int = 4096) -> dict:
    g = torch.Generator().manual_seed(0)
    h = w = latent // 2  # 2x2 packed latent patches
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(1, h * w, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text, text_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, 768, generator=g).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(text, 3, device=device),
    )


def wan14b_config() -> dict:
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )


def wan_inputs(frames: int, height: int, width: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, frames, height // 8, width // 8, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).to(device, dtype),
        timestep=torch.tensor([500], device=device),
    )


class Weights:
    """Random weights made once; every variant gets a fresh model holding its own copy of them."""

    def __init__(self, cls, config: dict, dtype: torch.dtype) -> None:
        self.cls, self.config, self.dtype = cls, config, dtype
        with torch.device("meta"):
            meta = cls(**config).to(dtype)
        # Random values tiled from one pool: drawing 12 B normal numbers one by one would take minutes.
        pool = (torch.randn(2**24, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
        self.state = {}
        offset = 0
        for name, t in list(meta.state_dict().items()):
            value = torch.empty(t.shape, dtype=dtype)
            if "norm" in name and name.endswith("weight") and t.dim() == 1:
                value.fill_(1.0)
            else:
                flat = value.view(-1)
                for start in range(0, flat.numel(), pool.numel()):
                    n = min(pool.numel(), flat.numel() - start)
                    begin = (offset + start) % (pool.numel() - n + 1)
                    flat[start : start + n].copy_(pool[begin : begin + n])
                offset += 7919  # a different phase for each tensor
            self.state[name] = value
        self.nbytes = sum(t.numel() * t.element_size() for t in self.state.values())

    def model(self, device: torch.device | None = None):
        """A fresh model with its own copy of the weights: on the CPU, or copied straight to `device`."""
        with torch.device("meta"):
            model = self.cls(**self.config).to(self.dtype)
        copy = (lambda v: v.to(device, copy=True)) if device is not None else (lambda v: v.clone())
        model.load_state_dict({k: copy(v) for k, v in self.state.items()}, assign=True)
        return model.eval().requires_grad_(False)


# ---- one variant ----------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    step_s: float
    steps: list[float]
    peak_vram_gib: float | None
    ram_gib: float  # host RAM the variant holds (weights, pinned buffers) plus its peak during a step
    ram_transient_gib: float  # the part that comes and goes within a step
    apply_s: float
    streamed_gib_per_step: float | None = None
    bound_s: float | None = None
    notes: dict = field(default_factory=dict)
    vram_after_apply_gib: float | None = None  # weights (and buffers) the variant keeps on the GPU between steps
    error: str | None = None  # the variant failed: what it raised (its numbers are NaN)


def failed(name: str, error: str) -> Result:
    nan = float("nan")
    return Result(name, nan, [], None, nan, nan, nan, error=error)


def free(device: torch.device) -> None:
    """Give back what the last variant held (its model, hooks, pinned buffers, cached GPU blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(name, weights, inputs, device, *, steps, warmup, setup, cold_files=None, train=False,
            on_device=False, trace=None) -> Result:
    """Build a fresh model, apply `setup(model)`, then time `steps` calls (forward, or a LoRA training step).

    `on_device`: the model's weights are copied straight to `device` (no CPU copy). `trace`: a path
    (.json.gz) for a torch.profiler trace of one more step after the timed ones."""
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = psutil.Process().memory_info().rss
    model = weights.model(device if on_device else None)
    try:
        start = time.perf_counter()
        extra = setup(model)
        extra = extra if isinstance(extra, dict) else {}  # e.g. model.to() returns the model
        sync(device)
        apply_s = time.perf_counter() - start
        if train:
            model = extra.pop("trainer")
        gc.collect()
        vram_after_apply = None
        if device.type == "cuda":
            vram_after_apply = torch.cuda.memory_allocated(device) / GiB
            torch.cuda.reset_peak_memory_stats(device)
        hw = _hookwise_stats(model)
        times = []
        rss_steps = psutil.Process().memory_info().rss

        def step():
            with torch.inference_mode() if not train else contextlib.nullcontext():
                out = model(**inputs)
                if train:
                    out = out.sample if hasattr(out, "sample") else out[0]
                    out.float().pow(2).mean().backward()
                    model.zero_grad(set_to_none=True)

        with RssPeak() as rss:  # the steps only: building the model and applying are not counted
            for i in range(warmup + steps):
                if cold_files is not None:
                    drop_page_cache(cold_files())
                if i == warmup:
                    hw = _hookwise_stats(model)
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                if i == 0:
                    apply_s += time.perf_counter() - t0  # diffusers writes / pins lazily on the first call
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            after = _hookwise_stats(model)
        peak_vram = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
        streamed = None
        if hw is not None and after is not None:
            streamed = (after["bytes_loaded"] - hw["bytes_loaded"]) / steps / GiB
        result = Result(
            name, statistics.median(times), times, peak_vram, (rss.peak - rss_start) / GiB, (rss.peak - rss_steps) / GiB,
            apply_s, streamed, notes=extra, vram_after_apply_gib=vram_after_apply,
        )
        if trace is not None:
            result.notes["trace"] = profile_step(step, device, trace)
        print(f"  {name}: {result.step_s:.3f} s/step, peak VRAM {peak_vram if peak_vram is None else round(peak_vram, 2)} GiB, "
              f"streamed {streamed if streamed is None else round(streamed, 2)} GiB/step, apply {apply_s:.1f} s", flush=True)
        return result
    finally:
        offloader = _offloader(model)
        if offloader is not None:
            offloader.engine.close()  # its copy threads and streams hold the weights otherwise
        del model
        free(device)


def profile_step(step, device: torch.device, path: str) -> str:
    """One step under torch.profiler, written as a gzipped Chrome trace at `path` if under 15 MB."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            step()
            sync(device)
        raw = path[: -len(".gz")] if path.endswith(".gz") else path + ".raw"
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        size = os.path.getsize(path)
        if size > 15 * 2**20:
            os.remove(path)
            return f"trace of {size / 2**20:.1f} MB dropped (over 15 MB)"
        return f"{os.path.basename(path)}: {size / 2**20:.1f} MB"
    except Exception as exc:  # a trace is a bonus: its failure must not cost the variant's numbers
        return f"trace failed: {type(exc).__name__}: {exc}"[:500]


def _hookwise_stats(model):
    try:
        return offload_report(model).stats
    except hookwise.ConfigError:
        return None


def settle_reads(variants) -> None:
    """Wait for every hookwise model's background read-ahead (the first groups of its next call, asked
    for when a call ends) to finish, so it neither loads the disk during another variant's timed step
    nor lands in the page cache after a cold variant's drop. The engine starts a new reader on demand."""
    for v in variants:
        offloader = _offloader(v.model)
        if offloader is not None:
            offloader.engine.close()


def hookwise_setup(**kw):
    def setup(model):
        report = apply_offload(model, Offload(**kw))
        return {"resident_groups": len(report.resident), "streamed_groups": len(report.streamed),
                "device_gib": round(report.device_bytes / GiB, 3), "granularity": report.granularity}

    return setup


def diffusers_setup(**kw):
    from diffusers.hooks import apply_group_offloading

    def setup(model):
        apply_group_offloading(model, **kw)
        return {}

    return setup


# ---- CPU + disk -------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    model: object
    apply_s: float
    held_gib: float  # RSS this variant added by being built and applied (weights it keeps in RAM)
    cold: object = None  # callable -> files to drop from the page cache before each timed step
    times: list[float] = field(default_factory=list)
    transient_gib: float = 0.0  # peak RSS above the step's start, over its steps
    streamed: int = 0
    first_call_s: float = 0.0
    notes: dict = field(default_factory=dict)


def cpu_bench(args) -> dict:
    """All variants built once, then timed in rounds, each variant once per round in a shuffled order
    (the speed of a shared machine drifts); the median over rounds is reported."""
    from diffusers import FluxTransformer2DModel

    device = torch.device("cpu")
    dtype = torch.bfloat16
    double, single = args.cpu_blocks
    weights = Weights(FluxTransformer2DModel, flux_config(double, single), dtype)
    inputs = flux_inputs(args.cpu_latent, args.cpu_text, device, dtype)
    print(f"FLUX-architecture, {double} double + {single} single full-width blocks, bf16, "
          f"{weights.nbytes / GiB:.2f} GiB of weights; {(args.cpu_latent // 2) ** 2} image + {args.cpu_text} text tokens")
    root = Path(tempfile.mkdtemp(prefix="hookwise-bench-", dir=args.tmp))
    hw_dir = root / "hookwise"
    hw = dict(onload_device="cpu", offload_device="disk", disk_path=str(hw_dir))
    plans = [
        ("resident (RAM)", lambda m: None, None),
        ("hookwise disk block, stream all, warm", hookwise_setup(granularity="block", **hw), None),
        ("hookwise disk block, stream all, cold", hookwise_setup(granularity="block", **hw), hw_dir),
        ("hookwise disk block, 50% resident, cold",
         hookwise_setup(granularity="block", vram_budget=weights.nbytes // 2, **hw), hw_dir),
        ("hookwise disk leaf, stream all, cold", hookwise_setup(granularity="leaf", **hw), hw_dir),
    ]
    for kind, label in (("block_level", "block_level(1)"), ("leaf_level", "leaf_level")):
        for temp in ("warm", "cold"):
            folder = root / f"diffusers-{kind}-{temp}"
            kw = dict(onload_device=device, offload_device=device, offload_type=kind, offload_to_disk_path=str(folder))
            if kind == "block_level":
                kw["num_blocks_per_group"] = 1
            plans.append((f"diffusers disk {label}, {temp}", diffusers_setup(**kw), folder if temp == "cold" else None))
    variants: list[Variant] = []
    proc = psutil.Process()
    try:
        for name, setup, cold_dir in plans:
            gc.collect()
            before = proc.memory_info().rss
            model = weights.model()
            t0 = time.perf_counter()
            notes = setup(model)
            notes = notes if isinstance(notes, dict) else {}
            apply_s = time.perf_counter() - t0
            gc.collect()
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(**inputs)  # the first call: diffusers writes its files here, hookwise records the order
            first_call_s = time.perf_counter() - t0
            gc.collect()
            held = (proc.memory_info().rss - before) / GiB
            cold = (lambda d=cold_dir: files_under(d)) if cold_dir is not None else None
            variants.append(Variant(name, model, apply_s, held, cold, first_call_s=first_call_s, notes=notes))
            print(f"built {name}: apply {apply_s:.1f} s, first call {first_call_s:.1f} s, holds {held:+.2f} GiB")
        bandwidth = disk_read_bandwidth(files_under(hw_dir))
        src, dst = torch.ones(GiB, dtype=torch.uint8), torch.zeros(GiB, dtype=torch.uint8)
        dst.copy_(src)
        t0 = time.perf_counter()
        dst.copy_(src)
        ram_bandwidth = GiB / (time.perf_counter() - t0)
        del src, dst
        print(f"disk read (cold) {bandwidth / 1e9:.2f} GB/s; RAM copy {ram_bandwidth / 1e9:.2f} GB/s")
        loads = []
        shuffle = random.Random(0)
        for round_ in range(args.steps):
            loads.append(os.getloadavg()[0])
            # A fresh order each round: a co-tenant's periodic load must not favour a position.
            for v in shuffle.sample(variants, len(variants)):
                settle_reads(variants)
                if v.cold is not None:
                    drop_page_cache(v.cold())
                else:
                    with torch.inference_mode():
                        v.model(**inputs)  # warm: the previous variant's cold drop must not count
                stats = _hookwise_stats(v.model)
                with RssPeak() as rss, torch.inference_mode():
                    start = rss.peak
                    t0 = time.perf_counter()
                    v.model(**inputs)
                    v.times.append(time.perf_counter() - t0)
                v.transient_gib = max(v.transient_gib, (rss.peak - start) / GiB)
                after = _hookwise_stats(v.model)
                if stats is not None:
                    v.streamed = after["bytes_loaded"] - stats["bytes_loaded"]
            print(f"round {round_ + 1} (load average {loads[-1]:.2f}): " + ", ".join(f"{v.times[-1]:.2f}" for v in variants))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    resident_s = statistics.median(variants[0].times)
    results = []
    for v in variants:
        r = Result(v.name, statistics.median(v.times), v.times, None, v.held_gib + v.transient_gib, v.transient_gib,
                   v.apply_s + v.first_call_s, v.streamed / GiB if v.streamed else None, notes=v.notes)
        if v.streamed:
            r.bound_s = max(resident_s, v.streamed / (bandwidth if v.cold is not None else ram_bandwidth))
        results.append(r)
    env = {"disk_read_GBps": bandwidth / 1e9, "ram_copy_GBps": ram_bandwidth / 1e9, "weights_gib": weights.nbytes / GiB,
           "load_average_per_round": loads}
    return {"results": results, "env": env, "resident_s": resident_s}


# ---- GPU ------------------------------------------------------------------------------------------------
def gpu_models(args):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    dtype = torch.bfloat16
    if args.small:  # the same code paths at a size any machine runs in seconds
        weights = Weights(FluxTransformer2DModel, flux_config(1, 24, heads=2, text_dim=64), dtype)
        yield "flux", weights, lambda d: flux_inputs(16, 16, d, dtype, text_dim=64)
        return
    yield "flux", Weights(FluxTransformer2DModel, flux_config(19, 38), dtype), lambda d: flux_inputs(128, 512, d, dtype)
    if args.wan:
        yield "wan14b", Weights(WanTransformer3DModel, wan14b_config(), dtype), lambda d: wan_inputs(21, 480, 832, d, dtype)


def gpu_bench(args, save=lambda out: None) -> dict:
    """Every variant on `args.device` (CUDA; the CPU for a dry run of this path with --gpu-path --small).

    Weights are made once in host RAM (bf16, tiled from one random pool, built on `meta`: no
    initialization of 12 B parameters); each variant gets a fresh model, copied straight to the GPU
    when it keeps every weight there. Warm-up `args.warmup` steps, then `args.steps` timed ones.

    Each variant runs in its own try/except: a failure is recorded with its error and the next runs.
    `save(out)` is called after every variant, so a run stopped from outside keeps what it measured."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out = {"env": {"device": str(device), "gpu": name, "small": args.small, "torch": torch.__version__}, "models": {}}
    try:
        bandwidth = h2d_bandwidth(device, GiB if not args.small else 64 * 2**20)
    except Exception as exc:
        traceback.print_exc()
        bandwidth = float("nan")
        out["env"]["h2d_error"] = f"{type(exc).__name__}: {exc}"
    out["env"]["h2d_GBps"] = bandwidth / 1e9
    print(f"{name}; {'pinned host->device' if device.type == 'cuda' else 'host copy'} {bandwidth / 1e9:.1f} GB/s", flush=True)
    save(out)
    common = dict(steps=args.steps, warmup=args.warmup)
    on_cuda = device.type == "cuda"
    for label, weights, make_inputs in gpu_models(args):
        t0 = time.perf_counter()
        inputs = make_inputs(device)
        print(f"\n{label}: {weights.nbytes / GiB:.2f} GiB of bf16 weights (made in {time.perf_counter() - t0:.1f} s)", flush=True)
        results: list[Result] = []
        model_out = out["models"][label] = {"results": results, "weights_gib": weights.nbytes / GiB}

        def attempt(variant: str, fn) -> None:
            try:
                result = fn()
            except Exception as exc:  # recorded; the next variant runs
                traceback.print_exc()
                result = failed(variant, f"{type(exc).__name__}: {exc}"[:2000])
            free(device)
            results.append(result)
            add_bounds(results, bandwidth, weights.nbytes)
            model_out["resident_s"] = results[0].step_s
            save(out)

        attempt("resident", lambda: measure("resident", weights, inputs, device, setup=lambda m: None, on_device=True, **common))
        for variant, budget in [("hookwise 100%", 1.0), ("hookwise 50%", 0.5), ("hookwise 25%", 0.25), ("hookwise stream all", None)]:
            kw = dict(onload_device=str(device), granularity="block")
            if budget is not None:
                kw["vram_budget"] = int(weights.nbytes * budget) + (GiB if budget == 1.0 else 0)
            # The stream-all variant moves the most bytes: it is the one traced, if a trace is asked for.
            trace = args.trace if budget is None and label == "flux" else None
            attempt(variant, lambda v=variant, kw=kw, trace=trace: measure(
                v, weights, inputs, device, setup=hookwise_setup(**kw), trace=trace, **common))
        for variant, kind in [("diffusers block+stream", "block_level"), ("diffusers leaf+stream", "leaf_level")]:
            kw = dict(onload_device=device, offload_device=torch.device("cpu"), offload_type=kind, use_stream=on_cuda)
            if kind == "block_level":
                kw["num_blocks_per_group"] = 1
            attempt(variant, lambda v=variant, kw=kw: measure(v, weights, inputs, device, setup=diffusers_setup(**kw), **common))
        if label == "flux":
            for variant, offload in [("LoRA train step, resident", False), ("LoRA train step, hookwise 50%", True)]:
                attempt(variant, lambda v=variant, o=offload: measure(
                    v, weights, inputs, device, setup=lora_trainer(o, weights, device), train=True, on_device=not o,
                    **common))
        del inputs
        free(device)
    return out


def add_bounds(results: list[Result], bandwidth: float, weights_nbytes: int) -> None:
    """Each offloaded time's bound: max(compute of its resident counterpart, streamed bytes / bandwidth).

    diffusers streams every weight on every step (it keeps nothing resident), so its streamed bytes
    are the weights' bytes; hookwise's are counted by its engine."""
    by = {r.name: r for r in results}
    for r in results:
        if r.error is not None:
            continue
        if r.name.startswith("diffusers"):
            r.streamed_gib_per_step = weights_nbytes / GiB
        compute = by.get("LoRA train step, resident" if r.name.startswith("LoRA") else "resident")
        if r.streamed_gib_per_step and compute is not None and compute.error is None and bandwidth == bandwidth:
            r.bound_s = max(compute.step_s, r.streamed_gib_per_step * GiB / bandwidth)


def lora_trainer(offload: bool, weights, device):
    from peft import LoraConfig, inject_adapter_in_model

    def setup(model):
        inject_adapter_in_model(LoraConfig(r=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model)
        model.enable_gradient_checkpointing()
        model.train()
        if offload:
            hookwise_setup(onload_device=str(device), granularity="block", vram_budget=weights.nbytes // 2)(model)
        else:
            model.to(device)
        return {"trainer": model}

    return setup


# ---- report --------------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    rows = ["| variant | s/step | peak VRAM GiB | host RAM GiB (transient) | apply (+first call) s | streamed GiB/step | bound s | / bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.error is not None:
            rows.append(f"| {r.name} | failed: {r.error.splitlines()[0][:150]} |")
            continue
        vram = f"{r.peak_vram_gib:.2f}" if r.peak_vram_gib is not None else "-"
        streamed = f"{r.streamed_gib_per_step:.2f}" if r.streamed_gib_per_step is not None else "-"
        bound = f"{r.bound_s:.3f}" if r.bound_s else "-"
        ratio = f"{r.step_s / r.bound_s:.2f}" if r.bound_s else "-"
        rows.append(f"| {r.name} | {r.step_s:.3f} | {vram} | {r.ram_gib:.2f} ({r.ram_transient_gib:.2f}) | "
                    f"{r.apply_s:.1f} | {streamed} | {bound} | {ratio} |")
    return "\n".join(rows)


def ratios(results: list[Result]) -> list[str]:
    by = {r.name: r for r in results}
    lines = []
    ok = [r for r in results if r.error is None]
    for hw in [r for r in ok if r.name.startswith("hookwise")]:
        for peer in [r for r in ok if r.name.startswith("diffusers")]:
            same_temp = ("cold" in hw.name) == ("cold" in peer.name)
            if not same_temp:
                continue
            mem_hw = hw.peak_vram_gib if hw.peak_vram_gib is not None else hw.ram_gib
            mem_peer = peer.peak_vram_gib if peer.peak_vram_gib is not None else peer.ram_gib
            lines.append(f"{hw.name} / {peer.name}: time {hw.step_s / peer.step_s:.2f}x, memory {mem_hw:.2f} vs {mem_peer:.2f} GiB")
    by = {r.name: r for r in ok}
    if "LoRA train step, resident" in by and "LoRA train step, hookwise 50%" in by:
        lines.append(f"LoRA step 50% / resident: {by['LoRA train step, hookwise 50%'].step_s / by['LoRA train step, resident'].step_s:.2f}x")
    return lines


def gpu_json(out: dict) -> dict:
    data = {"device": out["env"]["device"], "env": out["env"], "models": {}}
    for label, model_out in out["models"].items():
        data["models"][label] = [asdict(r) for r in model_out["results"]]
        data.setdefault("resident_s", {})[label] = model_out.get("resident_s")
    return data


def write_json(path: str | None, data: dict) -> None:
    """Write through a temporary file: a run killed while writing leaves the previous, whole file."""
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype notice on model.to() is noise here
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (GPU path)")
    parser.add_argument("--wan", action="store_true", help="also the Wan-14B architecture (GPU)")
    parser.add_argument("--gpu-path", action="store_true",
                        help="run the GPU benchmark's variants on --device even when it is the CPU (a dry run, with --small)")
    parser.add_argument("--small", action="store_true", help="GPU path: a tiny FLUX-architecture model (plumbing check)")
    parser.add_argument("--trace", default=None, help="GPU path: a .json.gz torch.profiler trace of one stream-all step")
    parser.add_argument("--cpu-blocks", type=int, nargs=2, default=(3, 6), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--cpu-latent", type=int, default=32, help="latent side on the CPU (32 = 256x256 pixels)")
    parser.add_argument("--cpu-text", type=int, default=64)
    parser.add_argument("--tmp", default=None, help="folder for the disk offload files (default: the system's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / GiB:.0f} GiB RAM, load average {os.getloadavg()[0]:.2f}", flush=True)
    load_start = os.getloadavg()[0]
    if args.device == "cpu" and not args.gpu_path:
        out = cpu_bench(args)
        print("\n" + table(out["results"]))
        print("\n".join(ratios(out["results"])))
        data = {"device": "cpu", **out, "results": [asdict(r) for r in out["results"]]}
    else:
        out = gpu_bench(args, save=lambda partial: write_json(args.json, {**gpu_json(partial), "partial": True}))
        data = gpu_json(out)
        for label, model_out in out["models"].items():
            print(f"\n{label}\n" + table(model_out["results"]))
            print("\n".join(ratios(model_out["results"])))
    print(f"load average at the end {os.getloadavg()[0]:.2f} (at the start {load_start:.2f})")
    data["load_average"] = [load_start, os.getloadavg()[0]]
    write_json(args.json, data)


if __name__ == "__main__":
    main()
