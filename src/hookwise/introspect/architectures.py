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
from .lora_keys import LoraNameRule, rule


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    matches: Callable[[nn.Module], bool]
    towers: tuple[str, ...]  # main towers, in the order the model calls them
    high_precision: tuple[str, ...] = ()  # regular expressions searched in module paths
    timestep_arg: str | None = None  # None: detect from the forward signature
    notes: tuple[str, ...] = field(default=())
    # LoRA file names: the original (reference-code) module names and the model modules they stand for.
    lora_names: tuple[LoraNameRule, ...] = ()


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


_WAN_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        "flux",
        "FLUX (diffusers FluxTransformer2DModel)",
        _by_class("FluxTransformer2DModel"),
        ("transformer_blocks", "single_transformer_blocks"),
        (r"^(x_embedder|context_embedder|time_text_embed|pos_embed|norm_out|proj_out)$",),
        "timestep",
        lora_names=(
            # BFL names (kohya / ComfyUI files); a fused qkv is to_q, to_k, to_v concatenated on outputs.
            rule("double_blocks.{n}.img_attn.qkv", *(f"transformer_blocks.{{n}}.attn.to_{c}" for c in "qkv")),
            rule("double_blocks.{n}.img_attn.proj", "transformer_blocks.{n}.attn.to_out.0"),
            rule("double_blocks.{n}.img_mlp.0", "transformer_blocks.{n}.ff.net.0.proj"),
            rule("double_blocks.{n}.img_mlp.2", "transformer_blocks.{n}.ff.net.2"),
            rule("double_blocks.{n}.img_mod.lin", "transformer_blocks.{n}.norm1.linear"),
            rule("double_blocks.{n}.txt_attn.qkv", *(f"transformer_blocks.{{n}}.attn.add_{c}_proj" for c in "qkv")),
            rule("double_blocks.{n}.txt_attn.proj", "transformer_blocks.{n}.attn.to_add_out"),
            rule("double_blocks.{n}.txt_mlp.0", "transformer_blocks.{n}.ff_context.net.0.proj"),
            rule("double_blocks.{n}.txt_mlp.2", "transformer_blocks.{n}.ff_context.net.2"),
            rule("double_blocks.{n}.txt_mod.lin", "transformer_blocks.{n}.norm1_context.linear"),
            rule(
                "single_blocks.{n}.linear1",
                *(f"single_transformer_blocks.{{n}}.attn.to_{c}" for c in "qkv"),
                "single_transformer_blocks.{n}.proj_mlp",
                weights=(1, 1, 1, 4),
            ),
            rule("single_blocks.{n}.linear2", "single_transformer_blocks.{n}.proj_out"),
            rule("single_blocks.{n}.modulation.lin", "single_transformer_blocks.{n}.norm.linear"),
            rule("img_in", "x_embedder"),
            rule("txt_in", "context_embedder"),
            rule("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
            rule("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
            rule("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
            rule("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
            rule("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
            rule("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
            rule("final_layer.linear", "proj_out"),
            # BFL's last layer yields (shift, scale), diffusers' norm_out (scale, shift).
            rule("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True),
        ),
    ),
    Architecture(
        "wan",
        "Wan 2.x (diffusers WanTransformer3DModel)",
        _by_class("WanTransformer3DModel"),
        ("blocks",),
        (r"^(patch_embedding|condition_embedder|rope|norm_out|proj_out|scale_shift_table)$",),
        "timestep",
        lora_names=(
            # Original Wan names (musubi-tuner / ComfyUI files).
            *(rule(f"blocks.{{n}}.self_attn.{o}", f"blocks.{{n}}.attn1.{c}") for o, c in _WAN_ATTN),
            *(rule(f"blocks.{{n}}.cross_attn.{o}", f"blocks.{{n}}.attn2.{c}") for o, c in _WAN_ATTN),
            rule("blocks.{n}.cross_attn.k_img", "blocks.{n}.attn2.add_k_proj"),
            rule("blocks.{n}.cross_attn.v_img", "blocks.{n}.attn2.add_v_proj"),
            rule("blocks.{n}.ffn.0", "blocks.{n}.ffn.net.0.proj"),
            rule("blocks.{n}.ffn.2", "blocks.{n}.ffn.net.2"),
            rule("patch_embedding", "patch_embedding"),
            rule("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
            rule("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
            rule("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
            rule("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
            rule("time_projection.1", "condition_embedder.time_proj"),
            rule("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
            rule("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
            rule("head.head", "proj_out"),
        ),
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
