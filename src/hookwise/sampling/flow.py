"""A small flow-matching Euler sampler with classifier-free guidance, batched or as two calls.

The model is any denoiser called as `model(hidden_states=x, timestep=t, **kwargs)` that predicts
the flow velocity `noise - data` (diffusers' FLUX, Wan, SD3, HunyuanVideo... transformers, and the
reference models of `hookwise.zoo`). Time runs from 1 (noise) to 0 (data); the model receives
`t * timestep_scale` (1 for FLUX, whose forward multiplies by 1000 itself; 1000 for Wan).

With guidance, the unconditional and conditional predictions come either from one call on a
doubled batch (`cfg="batched"`, unconditional half first, as diffusers' pipelines do) or from two
calls (`cfg="separate"`, conditional first), each inside `branch_context(name)`, which by default
is `hookwise.branch(model, name)` so step caches keep separate state per branch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from ..core.outputs import sample_of
from ..core.state import branch as _branch
from ..errors import ConfigError

COND, UNCOND = "cond", "uncond"


def flow_timesteps(steps: int, shift: float = 1.0, device: Any = None) -> torch.Tensor:
    """`steps + 1` times from 1 to 0; `shift > 1` spends more steps at high noise (SD3 / FLUX style)."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if shift <= 0:
        raise ConfigError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t.to(dtype=torch.float32, device=device)


def _batched_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """Keyword arguments for one call on [uncond, cond]: per-sample tensors are concatenated."""
    out: dict[str, Any] = {}
    for key, value in cond.items():
        other = uncond.get(key, value)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            if not (isinstance(other, torch.Tensor) and other.shape == value.shape):
                raise ConfigError(f"conditional and unconditional {key!r} must have the same shape for batched CFG")
            out[key] = torch.cat([other, value], dim=0)
        else:
            out[key] = value
    return out


def sample(
    model: nn.Module,
    noise: torch.Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None = None,
    *,
    steps: int = 28,
    guidance_scale: float = 1.0,
    cfg: str = "separate",
    timestep_scale: float = 1.0,
    shift: float = 1.0,
    branch_context: Callable[[str], ContextManager] | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate the flow from `noise` (t = 1) to data (t = 0) with `steps` Euler steps.

    `cond` / `uncond` are the model's keyword arguments besides `hidden_states` and `timestep`.
    Guidance runs when `uncond` is given and `guidance_scale != 1`. Returns the final latents.
    """
    if cfg not in ("batched", "separate"):
        raise ConfigError(f"cfg must be 'batched' or 'separate', got {cfg!r}")
    guided = uncond is not None and guidance_scale != 1.0
    if branch_context is None:

        def branch_context(name: str) -> ContextManager:
            return _branch(model, name)

    batch = noise.shape[0]
    times = flow_timesteps(steps, shift)
    both = _batched_kwargs(cond, uncond, batch) if guided and cfg == "batched" else None
    x = noise
    with torch.no_grad():
        for i in range(steps):
            t, t_next = float(times[i]), float(times[i + 1])
            if not guided:
                with branch_context(COND) if uncond is not None else contextlib.nullcontext():
                    ts = torch.full((batch,), t * timestep_scale, device=x.device)
                    v = sample_of(model(hidden_states=x, timestep=ts, **cond), "sampling")
            elif cfg == "batched":
                ts = torch.full((2 * batch,), t * timestep_scale, device=x.device)
                out = sample_of(model(hidden_states=torch.cat([x, x]), timestep=ts, **both), "sampling")
                v_uncond, v_cond = out.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                ts = torch.full((batch,), t * timestep_scale, device=x.device)
                with branch_context(COND):
                    v_cond = sample_of(model(hidden_states=x, timestep=ts, **cond), "sampling")
                with branch_context(UNCOND):
                    v_uncond = sample_of(model(hidden_states=x, timestep=ts, **uncond), "sampling")
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x = x + (t_next - t) * v.to(x.dtype)
            if callback is not None:
                callback(i, x)
    return x


def sample_reference(
    reference: Any,
    labels: torch.Tensor | list[int],
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    cfg: str = "separate",
    shift: float = 1.0,
    model: nn.Module | None = None,
    branch_context: Callable[[str], ContextManager] | None = None,
) -> torch.Tensor:
    """Sample a `hookwise.zoo` reference model for class ids `labels`; returns float pixels in [0, 1].

    `model` replaces the reference's transformer in the calls (a compiled or hooked copy of it).
    """
    spec = reference.spec
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    noise = reference.noise(labels.shape[0], generator)
    cond = reference.conditioning(labels)
    uncond = reference.conditioning(torch.full_like(labels, -1))
    latents = sample(
        model if model is not None else reference.transformer,
        noise,
        cond,
        uncond,
        steps=steps or spec.steps,
        guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
        cfg=cfg,
        timestep_scale=spec.timestep_scale,
        shift=shift,
        branch_context=branch_context,
    )
    return reference.decode(latents)
