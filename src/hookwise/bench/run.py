"""One run of the step-cache quality harness (`hookwise bench cache`).

For a reference model and a prompt set it samples once without a cache (the reference), then
with each cache at its default and over a sweep of settings, and with diffusers' own
implementations of the same methods at equal settings, all in one process on one loaded model.
Per run it reports the block (and attention) evaluations as a fraction of the uncached run
(counted per sample by `SampleCounter` hooks inside every cache), the wall time and speed-up,
and PSNR / SSIM against the reference, computed in float.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch

from .. import Layer, ModelHook, add_hook, describe, remove_hook
from ..errors import ConfigError
from ..sampling import psnr, sample, ssim
from .methods import DIFFUSERS_METHODS, HOOKWISE_METHODS, Method, diffusers_methods, hookwise_methods

PEER_IMPLS = ("diffusers", "cache-dit")  # a peer's failure is recorded with its error; hookwise's own errors propagate

logger = logging.getLogger("hookwise.bench")

COUNT_HOOK = "hookwise.bench.count"


@dataclass
class RunResult:
    """One run of the harness: evaluations as fractions of the uncached run, time, and quality."""

    method: str
    impl: str  # "hookwise" | "diffusers" | "reference"
    setting: str
    block_frac: float
    attn_frac: float
    seconds: float
    speedup: float
    psnr: float
    ssim: float
    default: bool = False
    note: str = ""
    config: list[dict[str, Any]] | None = None  # the hookwise configs run (calibrated ones with their data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: infinite PSNR (identical samples) as "inf", a failed run's numbers as None."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = "inf" if value == math.inf else None
        return out


class SampleCounter(ModelHook):
    """Innermost hook: counts samples that really went through a module (skipped calls never get here)."""

    layer = Layer.PROBE

    def __init__(self) -> None:
        self.n = 0

    def pre_forward(self, module, args, kwargs):
        for v in (*args, *kwargs.values()):
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                self.n += v.shape[0]
                break
        return args, kwargs


class _PlainCounter:
    """`SampleCounter`'s count as a PyTorch forward pre-hook, for a model a peer patches (no hookwise hooks there)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, module, args):
        for v in args:
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                self.n += v.shape[0]
                break


def _failed(m: Method, exc: Exception) -> RunResult:
    """A peer's run that raised: recorded, not hidden (hookwise's own errors propagate)."""
    message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240]}" if str(exc) else type(exc).__name__
    logger.warning("%s %s %s failed: %s", m.impl, m.method, m.setting, message)
    nan = float("nan")
    return RunResult(m.method, m.impl, m.setting, nan, nan, nan, nan, nan, nan, m.default, f"failed: {message}")


def run_cache_bench(
    reference: Any,
    *,
    labels: Iterable[int] | None = None,
    seed: int = 0,
    steps: int | None = None,
    repeats: int = 2,
    methods: Iterable[str] | None = None,
    compare_diffusers: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
    device: str | torch.device | None = None,
    calibration_labels: Iterable[int] | None = None,
    compare_cache_dit: bool = False,
    bracket: bool = True,
) -> list[RunResult]:
    """Benchmark the caches on a `hookwise.zoo` reference model; returns one result per run.

    `labels`: class ids of the prompt set (default: every class once). `repeats`: timed runs
    per setting (the fastest counts); each setting's speed-up is against the faster of two uncached
    runs made right before and right after it. `methods`: names to keep (default: all).
    `device`: where to sample; the reference model is moved there (default: where it is).
    `calibration_labels`: the classes the calibrated caches are calibrated on (with seed `seed + 1`);
    then `labels` must not hold any of them and defaults to the other classes. Without it the
    calibrations sample the evaluated classes.
    `compare_cache_dit`: also run cache-dit's DBCache, TaylorSeer and DBCache + TaylorSeer (on a deep copy
    of the model: cache-dit patches the instance it is given for good).
    `bracket`: time an uncached run right before and after each setting (its speed-up is against the faster);
    False: against the session's reference runs only (a third of the runs; speed-ups noisier under load).
    """
    from .cache_dit import CACHE_DIT_METHODS, cache_dit_methods

    known = [*HOOKWISE_METHODS, *(m for m in CACHE_DIT_METHODS if m not in HOOKWISE_METHODS)]
    wanted = set(methods) if methods is not None else set(known)
    unknown = wanted - set(known)
    if unknown:
        raise ConfigError(f"unknown method(s) {sorted(unknown)}; known: {known}")
    if device is not None:
        reference.to(device)
    spec = reference.spec
    model = reference.transformer
    twin = copy.deepcopy(model) if compare_cache_dit else None  # before any hook: cache-dit's runs go there
    steps = steps or spec.steps
    cal_labels = sorted(set(calibration_labels)) if calibration_labels is not None else None
    if labels is None:
        labels = [c for c in range(len(spec.classes)) if cal_labels is None or c not in cal_labels]
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if cal_labels is not None and set(labels.tolist()) & set(cal_labels):
        raise ConfigError(
            f"calibration classes {cal_labels} and evaluated classes {labels.tolist()} overlap; keep them disjoint"
        )
    generator = torch.Generator().manual_seed(seed)
    noise = reference.noise(labels.shape[0], generator)
    cond = reference.conditioning(labels)
    uncond = reference.conditioning(torch.full_like(labels, -1))
    if cal_labels is not None:
        cal = torch.as_tensor(cal_labels, dtype=torch.long)
        cal_inputs = (
            reference.noise(cal.shape[0], torch.Generator().manual_seed(seed + 1)),
            reference.conditioning(cal),
            reference.conditioning(torch.full_like(cal, -1)),
        )
    else:
        cal_inputs = None
    model_map = describe(model)
    main_blocks = {b.path for t in model_map.main_towers for b in t.blocks}
    blocks = [model.get_submodule(b.path) for b in model_map.blocks if b.path in main_blocks]
    attn = [model.get_submodule(a.path) for a in model_map.attention]
    counters = [(SampleCounter(), m) for m in blocks]
    attn_counters = [(SampleCounter(), m) for m in attn]
    twin_counters: list[tuple[_PlainCounter, Any]] = []
    twin_attn_counters: list[tuple[_PlainCounter, Any]] = []
    if twin is not None:
        for paths, into in (([b.path for b in model_map.blocks if b.path in main_blocks], twin_counters),
                            ([a.path for a in model_map.attention], twin_attn_counters)):
            for path in paths:
                c = _PlainCounter()
                into.append((c, twin.get_submodule(path).register_forward_pre_hook(c)))
    current_t = {"t": 1000.0}

    def record_t(module, args, kwargs):
        t = kwargs.get("timestep")
        if isinstance(t, torch.Tensor):
            # diffusers' callbacks take timesteps in 0..1000; the model gets t * timestep_scale, t in [0, 1].
            current_t["t"] = float(t.reshape(-1)[0]) * 1000.0 / spec.timestep_scale
        return None

    pre = model.register_forward_pre_hook(record_t, with_kwargs=True)
    for c, m in counters + attn_counters:
        add_hook(m, c, COUNT_HOOK)

    def synchronize() -> None:
        # CUDA runs asynchronously: a wall time must wait for the work it times.
        if noise.device.type == "cuda":
            torch.cuda.synchronize(noise.device)

    def once(cfg: str, branch_context=None, wrap=None, inputs=None, net=None) -> tuple[torch.Tensor, float]:
        synchronize()
        start = time.perf_counter()
        ctx = wrap() if wrap is not None else contextlib.nullcontext()
        x0, c, u = inputs or (noise, cond, uncond)
        with ctx:
            latents = sample(
                model if net is None else net, x0, c, u, steps=steps, guidance_scale=spec.guidance_scale, cfg=cfg,
                timestep_scale=spec.timestep_scale, branch_context=branch_context,
            )
        # On the host: the metrics run there (ssim's window is made on the CPU), and the copy waits for the work.
        images = reference.decode(latents).cpu()
        synchronize()
        return images, time.perf_counter() - start

    def counted(fn: Callable[[], tuple[torch.Tensor, float]], on_twin: bool = False) -> tuple[torch.Tensor, float, int, int]:
        blocks_c, attn_c = (twin_counters, twin_attn_counters) if on_twin else (counters, attn_counters)
        for c, _ in blocks_c + attn_c:
            c.n = 0
        images, seconds = fn()
        return images, seconds, sum(c.n for c, _ in blocks_c), sum(c.n for c, _ in attn_c)

    try:
        results: list[RunResult] = []
        reference_images: dict[str, torch.Tensor] = {}
        base_counts: dict[str, tuple[int, int]] = {}
        base_seconds: dict[str, float] = {}
        for cfg in ("separate", "batched"):
            times = []
            for _ in range(max(1, repeats)):
                images, seconds, nb, na = counted(lambda: once(cfg))
                times.append(seconds)
            reference_images[cfg], base_counts[cfg], base_seconds[cfg] = images, (nb, na), min(times)
            results.append(RunResult("none", "reference", f"cfg={cfg}", 1.0, 1.0, min(times), 1.0, math.inf, 1.0, True))

        def calibrate() -> torch.Tensor:
            return once("separate", inputs=cal_inputs)[0]

        def calibrate_diffusers() -> None:
            once("separate", branch_context=lambda name: model.cache_context(name), inputs=cal_inputs)

        todo = hookwise_methods(model, calibrate, steps, len(blocks), wanted)
        if compare_diffusers and wanted & set(DIFFUSERS_METHODS):
            todo += diffusers_methods(model, lambda: current_t["t"], calibrate_diffusers, steps, wanted)
        if compare_cache_dit and wanted & set(CACHE_DIT_METHODS):
            try:
                todo += cache_dit_methods(steps, wanted)
            except Exception as exc:  # not installed, or it does not import here: every row says why
                results.extend(_failed(m, exc) for m in _cache_dit_placeholders(wanted))
        todo = [m for m in todo if m.method in wanted]
        for index, m in enumerate(todo):
            if progress is not None:
                progress(index, len(todo), f"{m.impl} {m.method} {m.setting}")
            # Other processes may share the CPU: each setting is timed between two uncached runs made
            # just before and just after it, and its speed-up is against the faster of those two.
            local_base = once(m.cfg)[1] if bracket else base_seconds[m.cfg]
            net = twin if m.own_model else model
            try:
                m.apply(net)
            except Exception as exc:
                if m.impl not in PEER_IMPLS:
                    raise
                results.append(_failed(m, exc))
                continue
            failed = None
            try:
                if m.impl == "diffusers":
                    branch_context = lambda name: model.cache_context(name)  # noqa: E731
                    wrap = (lambda: model.cache_context("batched")) if m.cfg == "batched" else None
                else:
                    branch_context, wrap = None, None
                times = []
                for _ in range(max(1, repeats)):
                    if m.impl == "diffusers":
                        model._reset_stateful_cache()  # diffusers needs it between runs; hookwise detects new runs
                    if m.reset is not None:
                        m.reset(net)
                    images, seconds, nb, na = counted(lambda: once(m.cfg, branch_context, wrap, net=net), m.own_model)
                    times.append(seconds)
            except Exception as exc:
                if m.impl not in PEER_IMPLS:
                    raise
                failed = _failed(m, exc)
            finally:
                m.remove(net)
            if bracket:
                local_base = min(local_base, once(m.cfg)[1])
            base_seconds[m.cfg] = min(base_seconds[m.cfg], local_base)
            if failed is not None:
                results.append(failed)
                continue
            ref = reference_images[m.cfg]
            b0, a0 = base_counts[m.cfg]
            if m.own_model and nb and not na:
                na = math.nan  # the peer reaches attention without calling its modules: not counted, not zero
            best = min(times)
            results.append(
                RunResult(
                    m.method, m.impl, m.setting, nb / b0, (na / a0) if a0 else 1.0, best, local_base / best,
                    psnr(images, ref), ssim(images, ref), m.default, f"cfg={m.cfg}",
                    [c.to_dict() for c in m.configs] or None,
                )
            )
        for r in results:
            if r.impl == "reference":  # the fastest uncached run of the whole session
                r.seconds = base_seconds[r.setting.removeprefix("cfg=")]
        if progress is not None:
            progress(len(todo), len(todo), "done")
        return results
    finally:
        pre.remove()
        for c, m in counters + attn_counters:
            remove_hook(m, COUNT_HOOK, missing_ok=True)
        for _, handle in twin_counters + twin_attn_counters:
            handle.remove()


def _cache_dit_placeholders(wanted: set[str]) -> list[Method]:
    """One row per cache-dit method when cache-dit cannot be used: the failure says why."""
    from .cache_dit import CACHE_DIT_METHODS

    noop = lambda m: None  # noqa: E731
    return [Method(name, "cache-dit", "-", noop, noop) for name in CACHE_DIT_METHODS if name in wanted]
