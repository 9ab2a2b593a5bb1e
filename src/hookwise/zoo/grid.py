"""Sample grids of the reference models as PNG images (Pillow), with the class written on each row."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from ..errors import require
from ..sampling.flow import sample_reference
from .reference import load_reference, reference_names


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 for display only (metrics never use this)."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def save_sample_grid(
    reference,
    path: str | Path,
    *,
    per_class: int = 4,
    seed: int = 0,
    scale: int = 3,
    steps: int | None = None,
    guidance_scale: float | None = None,
) -> Path:
    """Sample `per_class` items of every class and save a labelled grid.

    Images: one row per class, `per_class` samples across. Videos: one row per sample (the first
    two of each class), its frames across.
    """
    spec = reference.spec
    n_classes = len(spec.classes)
    if spec.kind == "video":
        per_class = min(per_class, 2)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    pixels = sample_reference(reference, labels, seed=seed, steps=steps, guidance_scale=guidance_scale)
    if spec.kind == "image":
        rows = [(name, pixels[c * per_class : (c + 1) * per_class]) for c, name in enumerate(spec.classes)]
    else:  # one row per video, its frames across
        rows = [(spec.classes[int(c)], pixels[i].transpose(0, 1)) for i, c in enumerate(labels)]
    title = f"{spec.name}: {'frames across' if spec.kind == 'video' else 'samples across'}, seed {seed}"
    return save_rows_png(rows, path, title=title, scale=scale, label_width=150)


def save_rows_png(
    rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, *, title: str = "", scale: int = 3, label_width: int = 190
) -> Path:
    """A labelled PNG: one row per (name, images (N, 3, H, W) in [0, 1]), the name on the left."""
    Image = require("PIL.Image", "plot", "saving sample grids")
    ImageDraw = require("PIL.ImageDraw", "plot", "saving sample grids")
    h, w = rows[0][1].shape[-2:]
    pad, top = 2, 14
    cell_h, cell_w = h * scale + pad, w * scale + pad
    cols = max(images.shape[0] for _, images in rows)
    canvas = Image.new("RGB", (label_width + cols * cell_w, top + len(rows) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 1), title, fill=(0, 0, 0))
    for r, (name, images) in enumerate(rows):
        y = top + r * cell_h
        draw.text((4, y + cell_h // 2 - 6), name, fill=(0, 0, 0))
        for c, img in enumerate(_to_uint8(images.detach().float().cpu())):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_width + c * cell_w, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m hookwise.zoo.grid NAME PNG`: save the sample grid of a shipped reference model."""
    parser = argparse.ArgumentParser(prog="python -m hookwise.zoo.grid", description=main.__doc__)
    parser.add_argument("model", choices=reference_names())
    parser.add_argument("png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_sample_grid(load_reference(args.model), args.png, seed=args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
