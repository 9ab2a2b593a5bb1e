"""The reference models: small class-conditional flow-matching DiTs with diffusers architectures.

Each reference model is a diffusers transformer (FLUX or Wan architecture) trained by
`python -m hookwise.zoo.train` on procedurally generated data, plus a learned table of class
embeddings that stands in for a text encoder (row `num_classes` is the empty prompt, used for
classifier-free guidance). `ReferenceModel` holds both and knows the model's input layout:
`noise()` draws latents, `conditioning()` turns class ids into the transformer's keyword
arguments, `decode()` turns latents back into pixels in [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, require
from .data import IMAGE_CLASSES, VIDEO_CLASSES

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONDITIONING_FILE = "conditioning.safetensors"
META_FILE = "hookwise_reference.json"


@dataclass(frozen=True)
class ReferenceSpec:
    """What defines a reference model: its architecture, data layout and sampling defaults."""

    name: str
    kind: str  # "image" | "video"
    diffusers_class: str
    config: dict[str, Any]
    classes: tuple[str, ...]
    text_tokens: int  # tokens per class embedding
    text_dim: int  # width of a class-embedding token (the transformer's text input width)
    pooled_dim: int | None  # width of the pooled embedding (FLUX), None when the model takes none
    pixel_shape: tuple[int, ...]  # (3, H, W) or (3, F, H, W)
    pack: tuple[int, ...]  # pixels per token side packed by the sampler (FLUX); () when the model patchifies
    timestep_scale: float  # the model's `timestep` argument is t * timestep_scale, t in [0, 1]
    steps: int = 28
    guidance_scale: float = 4.0
    notes: tuple[str, ...] = field(default=())


SPECS: dict[str, ReferenceSpec] = {
    "flux-shapes": ReferenceSpec(
        name="flux-shapes",
        kind="image",
        diffusers_class="FluxTransformer2DModel",
        config=dict(
            patch_size=1,
            in_channels=12,
            num_layers=2,
            num_single_layers=6,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),
        classes=IMAGE_CLASSES,
        text_tokens=4,
        text_dim=32,
        pooled_dim=32,
        pixel_shape=(3, 16, 16),
        pack=(2, 2),
        timestep_scale=1.0,  # FluxTransformer2DModel multiplies its timestep by 1000 itself
        guidance_scale=2.0,
    ),
    "wan-moving": ReferenceSpec(
        name="wan-moving",
        kind="video",
        diffusers_class="WanTransformer3DModel",
        config=dict(
            patch_size=(2, 2, 2),
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=3,
            out_channels=3,
            text_dim=32,
            freq_dim=64,
            ffn_dim=256,
            num_layers=8,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=64,
        ),
        classes=VIDEO_CLASSES,
        text_tokens=4,
        text_dim=32,
        pooled_dim=None,
        pixel_shape=(3, 8, 12, 12),
        pack=(),
        timestep_scale=1000.0,
    ),
}


def reference_names() -> list[str]:
    return list(SPECS)


def get_reference_spec(name: str) -> ReferenceSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise ConfigError(f"no reference model named {name!r}; shipped: {', '.join(SPECS)}")
    return spec


def build_transformer(spec: ReferenceSpec) -> nn.Module:
    """A freshly initialised transformer of the spec's architecture (float32, CPU)."""
    diffusers = require("diffusers", "diffusers", f"the {spec.name} reference model")
    cls = getattr(diffusers, spec.diffusers_class)
    return cls(**spec.config)


class ReferenceModel(nn.Module):
    """A reference transformer with its class-embedding table and its data layout."""

    def __init__(self, spec: ReferenceSpec, transformer: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.transformer = transformer if transformer is not None else build_transformer(spec)
        n = len(spec.classes) + 1  # + the empty prompt
        self.class_tokens = nn.Parameter(torch.randn(n, spec.text_tokens, spec.text_dim) * 0.5)
        self.class_pooled = nn.Parameter(torch.randn(n, spec.pooled_dim) * 0.5) if spec.pooled_dim else None
        if spec.pack:
            ph, pw = spec.pack
            _, h, w = spec.pixel_shape
            rows, cols = torch.meshgrid(torch.arange(h // ph), torch.arange(w // pw), indexing="ij")
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
            self.register_buffer("img_ids", ids, persistent=False)
            self.register_buffer("txt_ids", torch.zeros(spec.text_tokens, 3), persistent=False)

    # ---- layout --------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return len(self.spec.classes)

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent (no batch) as the transformer takes it."""
        if self.spec.pack:
            c, h, w = self.spec.pixel_shape
            ph, pw = self.spec.pack
            return ((h // ph) * (w // pw), c * ph * pw)
        return tuple(self.spec.pixel_shape)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the transformer's input layout (packing 2D patches into tokens for FLUX)."""
        if not self.spec.pack:
            return pixels
        b, c, h, w = pixels.shape
        ph, pw = self.spec.pack
        x = pixels.view(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float pixels in [0, 1], (B, 3, H, W) for images and (B, 3, F, H, W) for videos."""
        x = latents.float()
        if self.spec.pack:
            c, h, w = self.spec.pixel_shape
            ph, pw = self.spec.pack
            b = x.shape[0]
            x = x.view(b, h // ph, w // pw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return ((x + 1) / 2).clamp(0, 1)

    def noise(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape()), generator=generator).to(device or self.class_tokens.device)

    def conditioning(self, labels: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """The transformer's keyword arguments (besides `hidden_states` and `timestep`) for class ids.

        A label of -1 (or `null_class`) is the empty prompt.
        """
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.class_tokens.device)
        if labels.numel() and (labels.max() > self.null_class or labels.min() < -1):
            raise ConfigError(
                f"class ids for {self.spec.name} go from 0 to {self.null_class - 1} (or -1 for the empty prompt), "
                f"got {labels.tolist()}"
            )
        labels = torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
        dtype = next(self.transformer.parameters()).dtype
        out = {"encoder_hidden_states": self.class_tokens[labels].to(dtype)}
        if self.class_pooled is not None:
            out["pooled_projections"] = self.class_pooled[labels].to(dtype)
        if self.spec.pack:
            out["img_ids"] = self.img_ids
            out["txt_ids"] = self.txt_ids
        return out

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted flow velocity at `x`, time `t` in [0, 1] (1 = noise), for class ids `labels`."""
        out = self.transformer(
            hidden_states=x, timestep=t * self.spec.timestep_scale, return_dict=False, **self.conditioning(labels)
        )
        return out[0]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the transformer (diffusers `save_pretrained`), the class embeddings and a metadata file."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder, safe_serialization=True)
        tensors = {"class_tokens": self.class_tokens.detach().contiguous()}
        if self.class_pooled is not None:
            tensors["class_pooled"] = self.class_pooled.detach().contiguous()
        save_file(tensors, str(folder / CONDITIONING_FILE))
        info = {"name": self.spec.name, "classes": list(self.spec.classes), **(meta or {})}
        (folder / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return folder


def reference_path(name: str) -> Path:
    """The folder of a shipped reference model (loadable with diffusers' `from_pretrained`)."""
    get_reference_spec(name)
    folder = WEIGHTS_DIR / name
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"the weights of reference model {name!r} are missing from {folder}; "
            f"train them with: python -m hookwise.zoo.train {name}"
        )
    return folder


def load_reference(name: str, folder: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Load a shipped reference model (or one trained into `folder`), in eval mode."""

    spec = get_reference_spec(name)
    folder = Path(folder) if folder is not None else reference_path(name)
    diffusers = require("diffusers", "diffusers", f"the {name} reference model")
    transformer = getattr(diffusers, spec.diffusers_class).from_pretrained(folder, torch_dtype=dtype)
    model = ReferenceModel(spec, transformer)
    tensors = load_file(str(folder / CONDITIONING_FILE))
    with torch.no_grad():
        model.class_tokens.copy_(tensors["class_tokens"])
        if model.class_pooled is not None:
            model.class_pooled.copy_(tensors["class_pooled"])
    model.requires_grad_(False)
    return model.eval()
