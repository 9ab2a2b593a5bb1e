"""The reports of `hookwise bench cache`: the Markdown table of every run, the quality plot, and
hookwise's PSNR against diffusers' at equal work."""

from __future__ import annotations

import math
from typing import Any

from ..errors import require
from .run import RunResult


def to_markdown(results: list[RunResult]) -> str:
    """Every run as a Markdown table row; each method's default setting in bold."""
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
    """The rows of `compare_at_equal_work` as a Markdown table."""
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


def best_at_work(results: list[RunResult], fractions: tuple[float, ...] = (0.2, 0.25, 0.34, 0.5)) -> list[dict[str, Any]]:
    """Per method and implementation, the best PSNR of any setting doing at most each fraction of the
    block evaluations (None where no setting does that little work): the frontier at equal work."""
    out = []
    keys = sorted({(r.method, r.impl) for r in results if r.impl != "reference" and math.isfinite(r.block_frac)})
    for method, impl in keys:
        runs = [r for r in results if (r.method, r.impl) == (method, impl) and math.isfinite(r.block_frac)]
        best = {}
        for f in fractions:
            ok = [r for r in runs if r.block_frac <= f + 1e-9 and math.isfinite(r.psnr)]
            best[f] = max((min(r.psnr, 99.0) for r in ok), default=None)
        out.append(dict(method=method, impl=impl, best=best))
    return out


def best_at_work_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of `best_at_work` as a Markdown table (PSNR dB; '-' where no setting does that little work)."""
    fractions = list(rows[0]["best"]) if rows else []
    lines = [
        "| method | impl | " + " | ".join(f"<= {f:.2f} of the block evals ({1 / f:.1f}x)" for f in fractions) + " |",
        "|---|---|" + "---:|" * len(fractions),
    ]
    for r in rows:
        cells = ["-" if v is None else f"{v:.2f}" for v in r["best"].values()]
        lines.append(f"| {r['method']} | {r['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
