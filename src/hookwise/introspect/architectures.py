"""Known architectures and their exact defaults.

Recognised by class name (diffusers transformers) or by module naming (musubi-tuner style DiTs).
A known architecture fixes which towers are the main ones and in what order the model calls them,
adds high-precision patterns beyond the structural rules, and names the timestep argument.
Anything else is mapped structurally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    matches: Callable[[nn.Module], bool]
    towers: tuple[str, ...]  # main towers, in the order the model calls them
    high_precision: tuple[str, ...] = ()  # regular expressions searched in module paths
    timestep_arg: str | None = None  # None: detect from the forward signature
    notes: tuple[str, ...] = field(default=())


def _by_class(*names: str) -> Callable[[nn.Module], bool]:
    return lambda m: type(m).__name__ in names


def _has_lists(*names: str) -> Callable[[nn.Module], bool]:
    def check(model: nn.Module) -> bool:
        return all(isinstance(getattr(model, n, None), (nn.ModuleList, nn.Sequential)) for n in names)

    return check


def _musubi_single_stream(model: nn.Module) -> bool:
    # Wan-style: one `blocks` list, with embedders named as in the reference code.
    return (
        _has_lists("blocks")(model)
        and not hasattr(model, "double_blocks")
        and any(hasattr(model, n) for n in ("patch_embedding", "img_in", "x_embedder"))
        and any(hasattr(model, n) for n in ("head", "final_layer", "proj_out"))
    )


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "flux",
        "FLUX (diffusers FluxTransformer2DModel)",
        _by_class("FluxTransformer2DModel"),
        ("transformer_blocks", "single_transformer_blocks"),
        (r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)$",),
        "timestep",
    ),
    Architecture(
        "wan",
        "Wan 2.x (diffusers WanTransformer3DModel)",
        _by_class("WanTransformer3DModel"),
        ("blocks",),
        (r"^(patch_embedding|condition_embedder|rope|norm_out|proj_out|scale_shift_table)$",),
        "timestep",
    ),
    Architecture(
        "hunyuanvideo",
        "HunyuanVideo (diffusers HunyuanVideoTransformer3DModel)",
        _by_class("HunyuanVideoTransformer3DModel"),
        ("transformer_blocks", "single_transformer_blocks"),
        (r"^(x_embedder|context_embedder|time_text_embed|rope|norm_out|proj_out)$",),
        "timestep",
    ),
    Architecture(
        "ltx-video",
        "LTX-Video (diffusers LTXVideoTransformer3DModel)",
        _by_class("LTXVideoTransformer3DModel"),
        ("transformer_blocks",),
        (r"^(proj_in|time_embed|caption_projection|rope|norm_out|proj_out|scale_shift_table)$",),
        "timestep",
    ),
    Architecture(
        "sd3",
        "Stable Diffusion 3 / 3.5 (diffusers SD3Transformer2DModel)",
        _by_class("SD3Transformer2DModel"),
        ("transformer_blocks",),
        (r"^(pos_embed|time_text_embed|context_embedder|norm_out|proj_out)$",),
        "timestep",
    ),
    Architecture(
        "qwen-image",
        "Qwen-Image (diffusers QwenImageTransformer2DModel)",
        _by_class("QwenImageTransformer2DModel"),
        ("transformer_blocks",),
        (r"^(img_in|txt_in|txt_norm|time_text_embed|pos_embed|norm_out|proj_out)$",),
        "timestep",
    ),
    Architecture(
        "musubi-double-single",
        "double/single-stream DiT, musubi-tuner naming (FLUX / HunyuanVideo reference code)",
        _has_lists("double_blocks", "single_blocks"),
        ("double_blocks", "single_blocks"),
        (r"^(img_in|txt_in|time_in|vector_in|guidance_in|final_layer)$", r"(^|\.)(img_mod|txt_mod|modulation)$"),
    ),
    Architecture(
        "musubi-blocks",
        "single-tower DiT, musubi-tuner naming (Wan reference code)",
        _musubi_single_stream,
        ("blocks",),
        (
            r"^(patch_embedding|text_embedding|time_embedding|time_projection|img_emb|head|final_layer)$",
            r"(^|\.)modulation$",
        ),
    ),
)


def detect_architecture(model: nn.Module) -> Architecture | None:
    """The known architecture of `model`, or None."""
    return next((a for a in ARCHITECTURES if a.matches(model)), None)


def architecture_named(name: str) -> Architecture:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise ConfigError(f"unknown architecture {name!r}; known: {[a.name for a in ARCHITECTURES]}")
