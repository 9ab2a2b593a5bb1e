"""The inputs of one model call for a job, built for known architectures (FLUX, Wan, the zoo models).

Sizes follow the usual latent layouts: an 8x spatial VAE (4x in time for Wan's video VAE, with the
first frame on its own), FLUX packing 2x2 latent pixels into one token, Wan patchifying inside the
model. Builders create tensors with `torch.zeros`, so under a fake-tensor mode they are fake.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from .job import Job


def call_batch(job: Job) -> int:
    """The batch of one model call: doubled when CFG runs both branches in one call."""
    return job.batch * (2 if job.cfg == "batched" else 1)


def _flux(config: Any, job: Job, dtype: torch.dtype, device: str) -> dict[str, Any]:
    b, h, w = call_batch(job), job.height // 16, job.width // 16
    z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
    inputs = dict(
        hidden_states=z(b, h * w, config.in_channels),
        encoder_hidden_states=z(b, job.text_len, config.joint_attention_dim),
        pooled_projections=z(b, config.pooled_projection_dim),
        timestep=z(b),
        img_ids=z(h * w, 3),
        txt_ids=z(job.text_len, 3),
    )
    if config.guidance_embeds:
        inputs["guidance"] = z(b)
    return inputs


def _wan(config: Any, job: Job, dtype: torch.dtype, device: str) -> dict[str, Any]:
    b, f = call_batch(job), (job.frames - 1) // 4 + 1
    inputs = dict(
        hidden_states=torch.zeros(
            b, config.in_channels, f, job.height // 8, job.width // 8, dtype=dtype, device=device
        ),
        encoder_hidden_states=torch.zeros(b, job.text_len, config.text_dim, dtype=dtype, device=device),
        timestep=torch.zeros(b, dtype=torch.long, device=device),
    )
    if getattr(config, "image_dim", None):
        # Wan image-to-video: 257 CLIP image tokens next to the text.
        inputs["encoder_hidden_states_image"] = torch.zeros(b, 257, config.image_dim, dtype=dtype, device=device)
    return inputs


_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "FluxTransformer2DModel": _flux,
    "WanTransformer3DModel": _wan,
}


def _reference(model: nn.Module, job: Job, dtype: torch.dtype, device: str) -> dict[str, Any]:
    # A zoo model: pixels are its latents, FLUX-kind ones packed into tokens by the sampler.
    spec = model.spec
    b = call_batch(job)
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    inputs: dict[str, Any] = dict(
        encoder_hidden_states=z(b, spec.text_tokens, spec.text_dim),
        timestep=z(b),
    )
    if spec.pack:
        ph, pw = spec.pack
        tokens = (job.height // ph) * (job.width // pw)
        inputs.update(
            hidden_states=z(b, tokens, spec.pixel_shape[0] * ph * pw),
            img_ids=z(tokens, 3),
            txt_ids=z(spec.text_tokens, 3),
        )
    else:
        inputs["hidden_states"] = z(b, spec.pixel_shape[0], job.frames, job.height, job.width)
    if spec.pooled_dim:
        inputs["pooled_projections"] = z(b, spec.pooled_dim)
    return inputs


def known_target(model: nn.Module) -> tuple[nn.Module, str | None]:
    """The module whose forward a job calls, and the name of its input builder (None if unknown)."""
    transformer = getattr(model, "transformer", None)
    if hasattr(model, "spec") and hasattr(model, "latent_shape") and isinstance(transformer, nn.Module):
        return transformer, "reference"
    name = type(model).__name__
    return model, (name if name in _BUILDERS else None)


def build_inputs(model: nn.Module, job: Job, dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    """Keyword inputs of one call of `model` (or of a zoo model's transformer) for `job`."""
    _, builder = known_target(model)
    if builder is None:
        raise ConfigError(
            f"no input builder for {type(model).__name__} (known: {', '.join(sorted(_BUILDERS))} and the "
            f"hookwise.zoo reference models); pass example_inputs= with the keyword arguments of one call"
        )
    if builder == "reference":
        return _reference(model, job, dtype, device)
    return _BUILDERS[builder](model.config, job, dtype, device)


def text_tokens(model: nn.Module, job: Job) -> int:
    """The text tokens the built inputs carry (a zoo model has a fixed number per class)."""
    _, builder = known_target(model)
    return model.spec.text_tokens if builder == "reference" else job.text_len
