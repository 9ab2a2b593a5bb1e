"""Quality metrics against a reference sample, computed in float (never on uint8 differences).

Subtracting uint8 arrays wraps around (3 - 5 = 254), which caps the error and inflates PSNR: two
unrelated images then score about 28 dB. Every metric here converts to float64 first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ConfigError(f"cannot compare samples of shapes {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(x: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (inf when identical)."""
    x, ref = _as_float(x), _as_float(reference)
    _check(x, ref)
    mse = float(torch.mean((x - ref) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def psnr_per_sample(x: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> list[float]:
    """PSNR of each sample along dimension 0."""
    return [psnr(a, b, data_range) for a, b in zip(x, reference)]


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004, Gaussian window) over a batch of images or videos.

    Inputs are (B, C, H, W) or (B, C, F, H, W) (each frame of a video is an image). The window
    shrinks to the image size for small images.
    """
    x, ref = _as_float(x), _as_float(reference)
    _check(x, ref)
    if x.ndim == 5:  # videos: frames as images
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, *x.shape[1:2], *x.shape[3:])
        ref = ref.permute(0, 2, 1, 3, 4).reshape(-1, *ref.shape[1:2], *ref.shape[3:])
    if x.ndim != 4:
        raise ConfigError(f"ssim takes (B, C, H, W) images or (B, C, F, H, W) videos, got shape {tuple(x.shape)}")
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    sxx = blur(x * x) - mu_x**2
    syy = blur(ref * ref) - mu_y**2
    sxy = blur(x * ref) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
