"""Procedurally generated training data for the reference models: no downloads, fully seeded.

- Images (`shapes`): 16x16 RGB, one filled shape on a dark background. The class is
  shape x colour (circle / square / triangle x red / green / blue: 9 classes); position, size and the
  exact hue vary.
- Videos (`moving`): 8 frames of 12x12 RGB, one shape moving in a straight line. The class is
  colour x axis of motion (red / green / blue x horizontal / vertical: 6 classes); the sense
  (right or left, down or up), the shape (circle or square), start, size and speed vary. (A first
  model with the sense in the class, 12 classes, learned colour and axis but not the sense in
  4000 steps, so the sense is not part of the class.)

Pixels are in [-1, 1]; shapes have soft (anti-aliased) edges so that the targets are smooth.

`make_new_class_images` draws a class the models never saw (`NEW_IMAGE_CLASS`, a yellow cross), which
the LoRA trainer teaches them.
"""

from __future__ import annotations

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
AXES = ("horizontally", "vertically")

IMAGE_CLASSES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # class id = shape * 3 + colour
VIDEO_CLASSES = tuple(f"{c}, moving {a}" for a in AXES for c in COLOURS)  # id = axis * 3 + colour

_RGB = torch.tensor([[0.9, 0.15, 0.1], [0.15, 0.85, 0.2], [0.15, 0.3, 0.95]])
_BACKGROUND = 0.12  # in [0, 1]


def _colours(colour: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """RGB in [0, 1] for colour indices, with a little jitter so a class is a distribution, not a point."""
    base = _RGB[colour]
    return (base + 0.08 * torch.randn(base.shape, generator=g)).clamp(0.0, 1.0)


def _coverage(kind: torch.Tensor, cx, cy, r, xs, ys) -> torch.Tensor:
    """Soft coverage in [0, 1] of shapes `kind` (0 circle, 1 square, 2 triangle) on a pixel grid.

    `cx, cy, r` have shape (N, 1, 1) (or broadcast against the grid); `xs, ys` are pixel centres.
    """
    dx, dy = xs - cx, ys - cy
    circle = r - torch.sqrt(dx**2 + dy**2)
    square = r * 0.85 - torch.maximum(dx.abs(), dy.abs())
    # Upward triangle: apex at (cx, cy - r), base at y = cy + 0.8 r; distance to its three edges.
    top, base = -r, 0.8 * r
    slope = 0.55
    edge = (dy - top) * slope - dx.abs()
    triangle = torch.minimum(torch.minimum(base - dy, dy - top), edge / (1 + slope**2) ** 0.5)
    sd = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return torch.sigmoid(sd * 3.0)


def make_images(labels: torch.Tensor, g: torch.Generator, size: int = 16) -> torch.Tensor:
    """Images (N, 3, size, size) in [-1, 1] for image class ids `labels`."""
    n = labels.shape[0]
    shape, colour = labels // 3, labels % 3
    cx, cy, r, xs, ys = _placed(n, g, size, 0.24)
    cover = _coverage(shape.view(n, 1, 1), cx, cy, r, xs, ys)  # (N, H, W)
    return _painted(cover, _colours(colour, g))


def _placed(n: int, g: torch.Generator, size: int, smallest: float) -> tuple[torch.Tensor, ...]:
    """Random centres `cx, cy` and radii `r` (each (n, 1, 1)) of shapes inside a size x size image,
    radius `smallest` to `smallest + 0.08` of the size, and the pixel centres `xs, ys`."""
    r = (smallest + 0.08 * torch.rand(n, generator=g)) * size
    margin = r + 1.0
    cx = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    cy = margin + torch.rand(n, generator=g) * (size - 2 * margin)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return cx.view(n, 1, 1), cy.view(n, 1, 1), r.view(n, 1, 1), xs, ys


def _painted(cover: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1]: colours `rgb` (N, 3) over the background where `cover` (N, H, W) is 1."""
    img = _BACKGROUND + cover[:, None] * (rgb[:, :, None, None] - _BACKGROUND)
    return img * 2 - 1


def make_videos(labels: torch.Tensor, g: torch.Generator, frames: int = 8, size: int = 12) -> torch.Tensor:
    """Videos (N, 3, frames, size, size) in [-1, 1] for video class ids `labels`."""
    n = labels.shape[0]
    axis, colour = labels // 3, labels % 3
    forward = torch.rand(n, generator=g) < 0.5  # right / down, else left / up
    kind = torch.randint(0, 2, (n,), generator=g)  # circle or square
    r = 1.6 + 0.5 * torch.rand(n, generator=g)
    speed = 1.0 + 0.25 * torch.rand(n, generator=g)
    travel = speed * (frames - 1)
    # Along the motion axis start so the whole path stays in frame; across it anywhere.
    lo = r + 0.5
    along = lo + torch.rand(n, generator=g) * (size - 2 * lo - travel).clamp(min=0.0)
    across = lo + torch.rand(n, generator=g) * (size - 2 * lo)
    sign = torch.where(forward, 1.0, -1.0)
    start = torch.where(sign > 0, along, size - along)
    horizontal = axis == 0
    t = torch.arange(frames, dtype=torch.float32)
    pos = start[:, None] + sign[:, None] * speed[:, None] * t[None]  # (N, F)
    cx = torch.where(horizontal[:, None], pos, across[:, None].expand(n, frames))
    cy = torch.where(horizontal[:, None], across[:, None].expand(n, frames), pos)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    view = lambda v: v.reshape(n, frames, 1, 1)  # noqa: E731
    cover = _coverage(view(kind[:, None].expand(n, frames)), view(cx), view(cy), view(r[:, None].expand(n, frames)), xs, ys)
    rgb = _colours(colour, g)
    vid = _BACKGROUND + cover[:, None] * (rgb[:, :, None, None, None] - _BACKGROUND)  # (N, 3, F, H, W)
    return vid * 2 - 1


# ---- a class the reference models never saw, for LoRA training (`hookwise train-lora`, `hookwise demo`)
# Separate from the classes above and drawing from its own calls on the generator, so the shipped
# models' training data is unchanged.

NEW_IMAGE_CLASS = "yellow cross"
_YELLOW = torch.tensor([0.95, 0.85, 0.1])


def _cross_coverage(cx, cy, r, xs, ys) -> torch.Tensor:
    """Soft coverage of an upright plus sign: two bars of half-length `r` and half-width `r / 3`."""
    dx, dy = (xs - cx).abs(), (ys - cy).abs()
    arm = r / 3
    bar_h = torch.minimum(r - dx, arm - dy)  # horizontal bar
    bar_v = torch.minimum(arm - dx, r - dy)  # vertical bar
    return torch.sigmoid(torch.maximum(bar_h, bar_v) * 3.0)


def make_new_class_images(n: int, g: torch.Generator, size: int = 16) -> torch.Tensor:
    """Images (n, 3, size, size) in [-1, 1] of `NEW_IMAGE_CLASS`: a yellow plus sign, a shape and a
    colour that none of `IMAGE_CLASSES` has; position, size and hue vary as in `make_images`."""
    cx, cy, r, xs, ys = _placed(n, g, size, 0.28)
    cover = _cross_coverage(cx, cy, r, xs, ys)
    rgb = (_YELLOW + 0.08 * torch.randn((n, 3), generator=g)).clamp(0.0, 1.0)
    return _painted(cover, rgb)
