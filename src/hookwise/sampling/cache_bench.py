"""The quality harness of the step caches (`hookwise bench cache`).

For a reference model and a prompt set it samples once without a cache (the reference), then
with each cache at its default and over a sweep of settings, and with diffusers' own
implementations of the same methods at equal settings, all in one process on one loaded model.
Per run it reports the block (and attention) evaluations as a fraction of the uncached run
(counted per sample, by hooks inside every cache), the wall time and speed-up, and PSNR / SSIM
against the reference, computed in float.

This module sits on top of `cache/` and `stack` (like the command line); `sampling.flow` and
`sampling.metrics` do not depend on it.
"""

from __future__ import annotations

import contextlib
import io
import ast
import logging
import math
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import cache as hw
from ..core.hooks import Layer, ModelHook, add_hook, remove_hook
from ..errors import ConfigError
from ..introspect.model_map import describe
from ..stack import apply as hw_apply
from ..stack import remove as hw_remove
from .flow import sample
from .metrics import psnr, ssim

logger = logging.getLogger("hookwise.sampling.cache_bench")

COUNT_HOOK = "hookwise.bench.count"


@dataclass
class RunResult:
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: infinite PSNR (identical samples) as "inf", a failed run's numbers as None."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = "inf" if value == math.inf else None
        return out


class SampleCounter(ModelHook):
    """Innermost hook: counts samples that really went through a module (skipped calls never get here)."""

    layer = Layer.CAST - 50

    def __init__(self) -> None:
        self.n = 0

    def pre_forward(self, module, args, kwargs):
        for v in (*args, *kwargs.values()):
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                self.n += v.shape[0]
                break
        return args, kwargs


@dataclass
class Method:
    """One benchmarked setting: how to apply and remove it, and its label."""

    method: str
    impl: str
    setting: str
    apply: Callable[[nn.Module], Any]
    remove: Callable[[nn.Module], Any]
    cfg: str = "separate"
    default: bool = False


# ---- sweeps ---------------------------------------------------------------------------------------
# The settings both libraries run, so that hookwise and diffusers are compared at equal settings.
FIRST_BLOCK_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
TAYLOR_SETTINGS = ((1, 2), (2, 2), (1, 3), (2, 3), (2, 4))  # (order, interval)
TAYLOR_WARMUP = 3
PAB_SPATIAL_RANGES = (2, 3, 4)
FASTERCACHE_SETTINGS = ((5, 2), (3, 2), (5, None), (2, 3))  # (uncond_range, attention_range)
MAGCACHE_THRESHOLDS = (0.03, 0.06, 0.12, 0.24)


def _hookwise(method: str, setting: str, *configs, cfg: str = "separate", default: bool = False) -> Method:
    return Method(method, "hookwise", setting, lambda m: hw_apply(m, *configs), lambda m: hw_remove(m), cfg, default)


def hookwise_methods(
    model: nn.Module, calibrate: Callable[[], None], steps: int, n_blocks: int, wanted: set[str] | None = None
) -> list[Method]:
    """Every hookwise cache at its default and over a sweep. Calibration runs `calibrate()` once each."""
    out: list[Method] = []
    wanted = wanted or set(HOOKWISE_METHODS)
    for th in FIRST_BLOCK_THRESHOLDS:
        out.append(_hookwise("first-block", f"threshold={th}", hw.FirstBlockCache(threshold=th), default=th == 0.1))
    for th in (0.05, 0.08, 0.15, 0.3, 0.5):
        out.append(_hookwise("dual-block", f"threshold={th}", hw.DualBlockCache(threshold=th), default=th == 0.08))
    for th in (0.15, 0.3, 0.5, 0.8):
        out.append(
            _hookwise("dual-block+taylorseer", f"threshold={th}, order=2", hw.DualBlockCache(threshold=th), hw.TaylorSeer(order=2))
        )
    for order, interval in TAYLOR_SETTINGS:
        out.append(
            _hookwise(
                "taylorseer",
                f"order={order}, interval={interval}",
                hw.TaylorSeer(order=order, interval=interval, warmup=TAYLOR_WARMUP),
                default=(order, interval) == (1, 3),
            )
        )
    for order, interval in TAYLOR_SETTINGS:
        out.append(
            _hookwise(
                "taylorseer-attention",
                f"order={order}, interval={interval}",
                hw.TaylorSeer(order=order, interval=interval, warmup=TAYLOR_WARMUP, targets="attention"),
                default=(order, interval) == (1, 3),
            )
        )
    for sr in PAB_SPATIAL_RANGES:
        out.append(
            _hookwise("pab", f"spatial_range={sr}", hw.PyramidAttentionBroadcast(spatial_range=sr), default=sr == 2)
        )
    for ur, ar in FASTERCACHE_SETTINGS:
        out.append(
            _hookwise(
                "fastercache",
                f"uncond_range={ur}, attention_range={ar}",
                hw.FasterCache(uncond_range=ur, attention_range=ar),
                cfg="batched",  # as diffusers', which only reuses the uncond half of a batched call
                default=(ur, ar) == (5, 2),
            )
        )
    if "magcache" in wanted:
        mag = hw.calibrate_magcache(model, calibrate)
        for th in MAGCACHE_THRESHOLDS:
            out.append(_hookwise("magcache", f"threshold={th}", mag.replace(threshold=th, num_steps=steps), default=th == 0.06))
    if "teacache" in wanted:
        tea = hw.calibrate_teacache(model, calibrate)
        for th in (0.05, 0.1, 0.2, 0.4):
            out.append(_hookwise("teacache", f"threshold={th}", tea.replace(threshold=th), default=th == 0.1))
    mid = n_blocks // 2
    out.append(_hookwise("layer-skip", f"blocks=({mid},), what=attention", hw.LayerSkip(blocks=(mid,), what="attention")))
    out.append(_hookwise("layer-skip", f"blocks=({mid},)", hw.LayerSkip(blocks=(mid,)), default=True))
    return out


HOOKWISE_METHODS = (
    "first-block", "dual-block", "dual-block+taylorseer", "taylorseer", "taylorseer-attention", "pab", "fastercache",
    "magcache", "teacache", "layer-skip",
)
DIFFUSERS_METHODS = ("first-block", "taylorseer-attention", "pab", "fastercache", "magcache")


def diffusers_methods(
    model: nn.Module,
    timestep_now: Callable[[], float],
    calibrate_diffusers: Callable[[], list[float]],
    steps: int,
    wanted: set[str] | None = None,
) -> list[Method]:
    """diffusers' own caches at the same settings as the hookwise sweep (where diffusers has the method)."""
    import diffusers.hooks as dh

    def enable(config: Any) -> Callable[[nn.Module], Any]:
        return lambda m: m.enable_cache(config)

    def disable(m: nn.Module) -> None:
        m.disable_cache()

    out: list[Method] = []
    mmap = describe(model)
    for th in FIRST_BLOCK_THRESHOLDS:
        out.append(
            Method("first-block", "diffusers", f"threshold={th}", enable(dh.FirstBlockCacheConfig(threshold=th)), disable,
                   default=th == 0.05)
        )
    # The modules hookwise's attention TaylorSeer predicts, named for diffusers: its default patterns
    # ("^blocks.*attn", fully matched) match no attention module of Wan ("blocks.0.attn1"), so with them it
    # would silently cache nothing there.
    attention_paths = [re.escape(a.path) for a in mmap.attention]
    for order, interval in TAYLOR_SETTINGS:
        config = dh.TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=TAYLOR_WARMUP, max_order=order, taylor_factors_dtype=torch.float32,
            cache_identifiers=attention_paths,
        )
        out.append(
            Method("taylorseer-attention", "diffusers", f"order={order}, interval={interval}", enable(config), disable,
                   default=(order, interval) == (1, 3))
        )
    for sr in PAB_SPATIAL_RANGES:
        config = dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=sr,
            temporal_attention_block_skip_range=3,
            cross_attention_block_skip_range=5,
            spatial_attention_timestep_skip_range=(100, 800),
            temporal_attention_timestep_skip_range=(100, 800),
            cross_attention_timestep_skip_range=(100, 900),
            current_timestep_callback=timestep_now,
        )
        out.append(Method("pab", "diffusers", f"spatial_range={sr}", enable(config), disable, default=sr == 2))
    fmt = "BCFHW" if mmap.architecture == "wan" else "BCHW"
    for ur, ar in FASTERCACHE_SETTINGS:
        config = dh.FasterCacheConfig(
            spatial_attention_block_skip_range=ar,
            spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=ur,
            unconditional_batch_timestep_skip_range=(-1, 641),
            attention_weight_callback=lambda _: 0.5,
            current_timestep_callback=timestep_now,
            tensor_format=fmt,
            # diffusers splits only these keyword arguments of a batched call; FLUX also needs its pooled
            # text embedding split, without which diffusers' FasterCache fails on FLUX.
            _unconditional_conditional_input_kwargs_identifiers=[
                "hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
                "pooled_projections",
            ],
        )
        out.append(
            Method("fastercache", "diffusers", f"uncond_range={ur}, attention_range={ar}", enable(config), disable,
                   cfg="batched", default=(ur, ar) == (5, 2))
        )
    if wanted is None or "magcache" in wanted:
        ratios = calibrate_diffusers()
        for th in MAGCACHE_THRESHOLDS:
            config = dh.MagCacheConfig(threshold=th, num_inference_steps=steps, mag_ratios=ratios)
            out.append(
                Method("magcache", "diffusers", f"threshold={th}", enable(config), disable, default=th == 0.06)
            )
    return out


# ---- running ----------------------------------------------------------------------------------------
def _failed(m: Method, exc: Exception) -> RunResult:
    """A peer's run that raised: recorded, not hidden (hookwise's own errors propagate)."""
    message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
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
) -> list[RunResult]:
    """Benchmark the caches on a `hookwise.zoo` reference model; returns one result per run.

    `labels`: class ids of the prompt set (default: every class once). `repeats`: timed runs
    per setting (the fastest counts); each setting's speed-up is against the faster of two uncached
    runs made right before and right after it. `methods`: names to keep (default: all).
    """
    wanted = set(methods) if methods is not None else set(HOOKWISE_METHODS)
    unknown = wanted - set(HOOKWISE_METHODS)
    if unknown:
        raise ConfigError(f"unknown method(s) {sorted(unknown)}; known: {list(HOOKWISE_METHODS)}")
    spec = reference.spec
    model = reference.transformer
    steps = steps or spec.steps
    labels = torch.as_tensor(list(labels) if labels is not None else range(len(spec.classes)), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    noise = reference.noise(labels.shape[0], generator)
    cond = reference.conditioning(labels)
    uncond = reference.conditioning(torch.full_like(labels, -1))
    mmap = describe(model)
    blocks = [model.get_submodule(b.path) for b in mmap.blocks if b.path in {x.path for t in mmap.main_towers for x in t.blocks}]
    attn = [model.get_submodule(a.path) for a in mmap.attention]
    counters = [(SampleCounter(), m) for m in blocks]
    attn_counters = [(SampleCounter(), m) for m in attn]
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

    def once(cfg: str, branch_context=None, wrap=None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        ctx = wrap() if wrap is not None else contextlib.nullcontext()
        with ctx:
            latents = sample(
                model, noise, cond, uncond, steps=steps, guidance_scale=spec.guidance_scale, cfg=cfg,
                timestep_scale=spec.timestep_scale, branch_context=branch_context,
            )
        return reference.decode(latents), time.perf_counter() - start

    def counted(fn: Callable[[], tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float, int, int]:
        for c, _ in counters + attn_counters:
            c.n = 0
        images, seconds = fn()
        return images, seconds, sum(c.n for c, _ in counters), sum(c.n for c, _ in attn_counters)

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

        def calibrate() -> None:
            once("separate")

        def calibrate_diffusers() -> list[float]:
            import diffusers.hooks as dh

            model.enable_cache(dh.MagCacheConfig(calibrate=True, num_inference_steps=steps))
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    once("separate", branch_context=lambda name: model.cache_context(name))
            finally:
                model.disable_cache()
            lists = [ast.literal_eval(line) for line in buffer.getvalue().splitlines() if line.startswith("[") and not line.startswith("[MagCache]")]
            if not lists:
                raise ConfigError("diffusers' MagCache calibration printed no ratios")
            return [statistics.fmean(v) for v in zip(*lists)]

        todo = hookwise_methods(model, calibrate, steps, len(blocks), wanted)
        if compare_diffusers and wanted & set(DIFFUSERS_METHODS):
            todo += diffusers_methods(model, lambda: current_t["t"], calibrate_diffusers, steps, wanted)
        todo = [m for m in todo if m.method in wanted]
        for index, m in enumerate(todo):
            if progress is not None:
                progress(index, len(todo), f"{m.impl} {m.method} {m.setting}")
            # Other processes may share the CPU: each setting is timed between two uncached runs made
            # just before and just after it, and its speed-up is against the faster of those two.
            local_base = once(m.cfg)[1]
            try:
                m.apply(model)
            except Exception as exc:
                if m.impl != "diffusers":
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
                    images, seconds, nb, na = counted(lambda: once(m.cfg, branch_context, wrap))
                    times.append(seconds)
            except Exception as exc:
                if m.impl != "diffusers":
                    raise
                failed = _failed(m, exc)
            finally:
                m.remove(model)
            local_base = min(local_base, once(m.cfg)[1])
            base_seconds[m.cfg] = min(base_seconds[m.cfg], local_base)
            if failed is not None:
                results.append(failed)
                continue
            ref = reference_images[m.cfg]
            b0, a0 = base_counts[m.cfg]
            best = min(times)
            results.append(
                RunResult(
                    m.method, m.impl, m.setting, nb / b0, (na / a0) if a0 else 1.0, best, local_base / best,
                    psnr(images, ref), ssim(images, ref), m.default, f"cfg={m.cfg}",
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


# ---- reporting --------------------------------------------------------------------------------------
def to_markdown(results: list[RunResult]) -> str:
    lines = [
        "| method | impl | setting | block evals | attention evals | seconds | speed-up | PSNR dB | SSIM |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        p = "inf" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
        name = f"**{r.setting}**" if r.default and r.impl != "reference" else r.setting
        lines.append(
            f"| {r.method} | {r.impl} | {name} ({r.note or 'ref'}) | {r.block_frac:.3f} | {r.attn_frac:.3f} | "
            f"{r.seconds:.2f} | {r.speedup:.2f}x | {p} | {r.ssim:.4f} |"
        )
    return "\n".join(lines)


_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def save_plot(results: list[RunResult], path: str, title: str = "") -> str:
    """PSNR against wall-clock speed-up and against block-evaluation reduction, per method (Pillow)."""
    from ..errors import require

    Image = require("PIL.Image", "plot", "drawing the quality plot")
    ImageDraw = require("PIL.ImageDraw", "plot", "drawing the quality plot")
    runs = [r for r in results if r.impl != "reference" and math.isfinite(r.psnr)]
    series: dict[tuple[str, str], list[RunResult]] = {}
    for r in runs:
        series.setdefault((r.method, r.impl), []).append(r)
    panel_w, panel_h, margin = 520, 380, 60
    legend_w = 230
    img = Image.new("RGB", (2 * panel_w + legend_w, panel_h + 40), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((10, 5), title or "quality vs speed", fill=(0, 0, 0))
    y_hi = max([r.psnr for r in runs] + [30.0])
    y_lo = min([r.psnr for r in runs] + [20.0])
    y_lo, y_hi = math.floor(y_lo / 5) * 5, math.ceil(y_hi / 5) * 5
    def work(r: RunResult) -> float:  # blocks for block caches, attention modules for attention-only ones
        return r.block_frac if r.block_frac < 0.999 else r.attn_frac

    panels = [  # wall time is noisy (a shared CPU): points only; the work axis is ordered: lines
        ("wall-clock speed-up (x)", lambda r: r.speedup, False),
        ("1 / fraction of block (attention) evaluations", lambda r: 1 / max(work(r), 1e-3), True),
    ]
    for p, (xlabel, xf, lines) in enumerate(panels):
        x0 = p * panel_w + margin
        x1 = (p + 1) * panel_w - 15
        top, bottom = 30, panel_h - 10
        xs = [xf(r) for r in runs] + [1.0]
        x_lo, x_hi = min(0.9, min(xs) * 0.95), max(xs) * 1.05 + 0.05

        def X(v: float) -> float:
            return x0 + (v - x_lo) / (x_hi - x_lo) * (x1 - x0)

        def Y(v: float) -> float:
            return bottom - (min(max(v, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * (bottom - top)

        draw.rectangle([x0, top, x1, bottom], outline=(0, 0, 0))
        for k in range(int(y_lo), int(y_hi) + 1, 5):
            draw.line([x0, Y(k), x1, Y(k)], fill=(225, 225, 225))
            draw.text((x0 - 28, Y(k) - 6), f"{k}", fill=(0, 0, 0))
        step = 0.5 if x_hi < 4 else 1.0
        v = math.ceil(x_lo / step) * step
        while v <= x_hi:
            draw.line([X(v), top, X(v), bottom], fill=(235, 235, 235))
            draw.text((X(v) - 8, bottom + 3), f"{v:g}", fill=(0, 0, 0))
            v += step
        draw.line([x0, Y(30), x1, Y(30)], fill=(200, 0, 0))
        draw.text((x0 + 4, Y(30) - 13), "30 dB", fill=(200, 0, 0))
        draw.text((x0 + 120, bottom + 16), xlabel, fill=(0, 0, 0))
        draw.text((x0 - 50, top - 14), "PSNR dB", fill=(0, 0, 0))
        for i, ((method, impl), rs) in enumerate(sorted(series.items())):
            colour = _PALETTE[sorted({m for m, _ in series}).index(method) % len(_PALETTE)]
            pts = sorted((X(xf(r)), Y(r.psnr)) for r in rs)
            if lines and len(pts) > 1:
                if impl == "hookwise":
                    draw.line(pts, fill=colour, width=2)
                else:
                    for a, b in zip(pts, pts[1:]):  # dashed for diffusers
                        for t in range(0, 10, 2):
                            draw.line([a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10,
                                       a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10], fill=colour, width=2)
            for x, y in pts:
                if impl == "hookwise":
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                else:
                    draw.rectangle([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    lx = 2 * panel_w + 5
    for i, (method, impl) in enumerate(sorted(series)):
        colour = _PALETTE[sorted({m for m, _ in series}).index(method) % len(_PALETTE)]
        y = 35 + i * 16
        if impl == "hookwise":
            draw.ellipse([lx, y + 2, lx + 8, y + 10], fill=colour)
        else:
            draw.rectangle([lx, y + 2, lx + 8, y + 10], outline=colour, width=2)
        draw.text((lx + 14, y), f"{method} ({impl})", fill=(0, 0, 0))
    draw.text((lx, 40 + len(series) * 16), "dots/solid: hookwise", fill=(0, 0, 0))
    draw.text((lx, 54 + len(series) * 16), "squares/dashed: diffusers", fill=(0, 0, 0))
    img.save(path)
    return path


def compare_at_equal_work(results: list[RunResult]) -> list[dict[str, Any]]:
    """For each method both implementations ran: hookwise's PSNR against diffusers', per setting.

    Two comparisons: with diffusers at the same setting (where it has it), and at equal work:
    hookwise's best PSNR among its settings doing at most that work against diffusers' best at
    most that work, interpolated linearly between diffusers' settings around it. Work is
    the block-evaluation fraction, or the attention-evaluation fraction for methods that never skip
    a block; hookwise settings outside diffusers' range of work get no interpolated value.
    """
    out: list[dict[str, Any]] = []
    methods = sorted({r.method for r in results if r.impl == "diffusers"})
    for method in methods:
        ours = [r for r in results if r.method == method and r.impl == "hookwise" and math.isfinite(r.block_frac)]
        theirs = [r for r in results if r.method == method and r.impl == "diffusers" and math.isfinite(r.block_frac)]
        if not ours or not theirs:
            continue
        use_blocks = any(r.block_frac < 0.999 for r in ours + theirs)
        key = (lambda r: r.block_frac) if use_blocks else (lambda r: r.attn_frac)
        def frontier(runs: list[RunResult]) -> dict[float, float]:
            """Work fraction -> the best PSNR of any setting doing at most that much work (a setting that
            does less work at a higher PSNR also answers for more work), the same on both sides."""
            fractions = sorted({round(key(r), 6) for r in runs})
            return {x: max(min(r.psnr, 99.0) for r in runs if round(key(r), 6) <= x) for x in fractions}

        ours_best = frontier(ours)
        points = sorted(frontier(theirs).items())
        same = {r.setting: r for r in theirs}
        for r in ours:
            x = round(key(r), 6)
            y = None
            if points[0][0] - 1e-9 <= x <= points[-1][0] + 1e-9:
                for (x0, y0), (x1, y1) in zip(points, points[1:] + [points[-1]]):
                    if x0 - 1e-9 <= x <= x1 + 1e-9:
                        y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
                        break
            twin = same.get(r.setting)
            out.append(
                dict(
                    method=method, setting=r.setting, work="blocks" if use_blocks else "attention", fraction=x,
                    hookwise_psnr=min(r.psnr, 99.0), hookwise_best=ours_best[x],
                    same_fraction=key(twin) if twin else None, same_psnr=min(twin.psnr, 99.0) if twin else None,
                    diffusers_psnr=y, delta=None if y is None else ours_best[x] - y,
                )
            )
    return out


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | setting | work | hookwise: fraction, PSNR | diffusers same setting: fraction, PSNR | "
        "hookwise best at this work | diffusers best at this work (interpolated) | hookwise - diffusers at equal work |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['work']} | {r['fraction']:.3f}, {r['hookwise_psnr']:.2f} | "
            f"{num(r['same_fraction'], '.3f')}, {num(r['same_psnr'], '.2f')} | {r['hookwise_best']:.2f} | "
            f"{num(r['diffusers_psnr'], '.2f')} | "
            f"{'-' if r['delta'] is None else format(r['delta'], '+.2f') + ' dB'} |"
        )
    return "\n".join(lines)
