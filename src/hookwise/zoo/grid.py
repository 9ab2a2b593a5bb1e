"""Sample grids of the reference models as PNG images (Pillow), with the class written on each row."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    Image = require("PIL.Image", "plot", "saving a sample grid")
    ImageDraw = require("PIL.ImageDraw", "plot", "saving a sample grid")
    spec = reference.spec
    n_classes = len(spec.classes)
    if spec.kind == "video":
        per_class = min(per_class, 2)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    pixels = sample_reference(reference, labels, seed=seed, steps=steps, guidance_scale=guidance_scale)
    pixels = _to_uint8(pixels)
    label_w, pad = 150, 2
    if spec.kind == "image":
        _, h, w = spec.pixel_shape
        rows = [[pixels[c * per_class + j] for j in range(per_class)] for c in range(n_classes)]
        names = list(spec.classes)
    else:
        _, f, h, w = spec.pixel_shape
        rows = [[pixels[i, :, k] for k in range(f)] for i in range(pixels.shape[0])]
        names = [spec.classes[int(c)] for c in labels]
    cell_h, cell_w = h * scale + pad, w * scale + pad
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_w + cols * cell_w, len(rows) * cell_h + 14), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title = f"{spec.name}: {'frames across' if spec.kind == 'video' else 'samples across'}, seed {seed}"
    draw.text((4, 1), title, fill=(0, 0, 0))
    for r, (name, row) in enumerate(zip(names, rows)):
        y = 14 + r * cell_h
        draw.text((4, y + cell_h // 2 - 6), name, fill=(0, 0, 0))
        for c, img in enumerate(row):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell_w, y))
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
