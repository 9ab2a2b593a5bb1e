"""Full-size model specs for planning without weights: diffusers configs built on the `meta` device.

Building one allocates nothing; `describe()` on it gives exact block sizes for the real model.
The parameter counts in `ModelSpec.params` are the counts the built models have (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelResolveError, require


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    diffusers_class: str
    config: dict[str, Any]
    params: int  # parameter count of the built model
    aliases: tuple[str, ...] = field(default=())


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "flux.1-dev",
        "FLUX.1-dev transformer (12B)",
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        11_901_408_320,
        ("flux", "flux-dev", "flux.1"),
    ),
    ModelSpec(
        "wan2.1-t2v-14b",
        "Wan2.1 text-to-video 14B transformer",
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        ),
        14_288_491_584,
        ("wan-14b", "wan2.1-14b"),
    ),
    ModelSpec(
        "wan2.1-t2v-1.3b",
        "Wan2.1 text-to-video 1.3B transformer",
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        ),
        1_418_996_800,
        ("wan-1.3b", "wan2.1-1.3b"),
    ),
    ModelSpec(
        "hunyuanvideo",
        "HunyuanVideo transformer (13B)",
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
        12_821_012_544,
        ("hunyuan-video", "hunyuan"),
    ),
    ModelSpec(
        "ltx-video",
        "LTX-Video 0.9 transformer (2B)",
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=128,
            out_channels=128,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=32,
            attention_head_dim=64,
            cross_attention_dim=2048,
            num_layers=28,
            caption_channels=4096,
            qk_norm="rms_norm_across_heads",
        ),
        1_923_385_472,
        ("ltx", "ltxv"),
    ),
    ModelSpec(
        "qwen-image",
        "Qwen-Image transformer (20B)",
        "QwenImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        20_430_401_088,
        ("qwenimage",),
    ),
    ModelSpec(
        "sd3.5-large",
        "Stable Diffusion 3.5 Large transformer (8B)",
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=38,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
        8_056_627_520,
        ("sd3.5", "sd35-large"),
    ),
)


def spec_names() -> list[str]:
    return [s.name for s in SPECS]


def find_spec(name: str) -> ModelSpec | None:
    key = name.strip().lower()
    for spec in SPECS:
        if key == spec.name or key in spec.aliases:
            return spec
    return None


def get_spec(name: str) -> ModelSpec:
    spec = find_spec(name)
    if spec is None:
        raise ModelResolveError(f"no shipped spec named {name!r}; shipped specs: {', '.join(spec_names())}")
    return spec


def build_diffusers_model(class_name: str, config: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    """Construct a diffusers model class from its config on the `meta` device (nothing allocated)."""
    diffusers = require("diffusers", "diffusers", f"building {class_name}")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelResolveError(
            f"diffusers {diffusers.__version__} has no model class {class_name!r}; upgrade diffusers"
        )
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(**config)
    if dtype is not None:
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-kept modules, which matter
        # only when loading weights, and meta tensors hold none.
        nn.Module.to(model, dtype)
    return model.eval()


def build_spec(name: str, dtype: torch.dtype | None = torch.bfloat16) -> nn.Module:
    """The full-size model `name` on the `meta` device, in `dtype` (bf16 by default, as shipped)."""
    spec = get_spec(name)
    return build_diffusers_model(spec.diffusers_class, spec.config, dtype)


def _flux_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    image, text = 16, 8  # tokens: enough to run every path, small enough to be instant
    inputs = dict(
        hidden_states=torch.zeros(1, image, config.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, text, config.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.ones(1, device=device, dtype=dtype),
        img_ids=torch.zeros(image, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.ones(1, device=device, dtype=dtype)
    return inputs


def _wan_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    pt, ph, pw = config.patch_size
    return dict(
        hidden_states=torch.zeros(1, config.in_channels, pt, 2 * ph, 2 * pw, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, 8, config.text_dim, device=device, dtype=dtype),
        timestep=torch.ones(1, device=device, dtype=torch.long),
    )


def _hunyuan_video_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    p, pt = config.patch_size, config.patch_size_t
    return dict(
        hidden_states=torch.zeros(1, config.in_channels, pt, 2 * p, 2 * p, device=device, dtype=dtype),
        timestep=torch.ones(1, device=device, dtype=torch.long),
        encoder_hidden_states=torch.zeros(1, 8, config.text_embed_dim, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(1, 8, device=device, dtype=torch.long),
        pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype),
        guidance=torch.ones(1, device=device, dtype=dtype),
    )


def _ltx_video_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    frames, height, width = 1, 2, 2  # in latent patches: the model takes tokens, and their grid
    return dict(
        hidden_states=torch.zeros(1, frames * height * width, config.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, 8, config.caption_channels, device=device, dtype=dtype),
        timestep=torch.ones(1, device=device, dtype=torch.long),
        encoder_attention_mask=torch.ones(1, 8, device=device, dtype=torch.long),
        num_frames=frames,
        height=height,
        width=width,
    )


def _qwen_image_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    height = width = 2  # in patches
    return dict(
        hidden_states=torch.zeros(1, height * width, config.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, 8, config.joint_attention_dim, device=device, dtype=dtype),
        encoder_hidden_states_mask=torch.ones(1, 8, device=device, dtype=torch.long),
        timestep=torch.ones(1, device=device, dtype=dtype),
        img_shapes=[(1, height, width)],
    )


def _sd3_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    p = config.patch_size
    return dict(
        hidden_states=torch.zeros(1, config.in_channels, 2 * p, 2 * p, device=device, dtype=dtype),
        encoder_hidden_states=torch.zeros(1, 8, config.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.ones(1, device=device, dtype=torch.long),
    )


_INPUT_BUILDERS = {
    "FluxTransformer2DModel": _flux_inputs,
    "WanTransformer3DModel": _wan_inputs,
    "HunyuanVideoTransformer3DModel": _hunyuan_video_inputs,
    "LTXVideoTransformer3DModel": _ltx_video_inputs,
    "QwenImageTransformer2DModel": _qwen_image_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
}


def example_inputs(model: nn.Module) -> dict[str, Any]:
    """Small keyword inputs for one forward of a known diffusers transformer, on its device and dtype.

    On a `meta` model they are `meta` tensors, so `describe(model, example_inputs(model))` traces a
    full-size spec without allocating. Known: the transformers of every shipped spec (FLUX, Wan,
    HunyuanVideo, LTX-Video, Qwen-Image, SD3).
    """
    name = type(model).__name__
    builder = _INPUT_BUILDERS.get(name)
    if builder is None:
        raise ModelResolveError(
            f"no example-input builder for {name}; known: {sorted(_INPUT_BUILDERS)}. "
            f"Pass your own inputs to describe(model, example_inputs=...)"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return builder(model.config, device, dtype)
