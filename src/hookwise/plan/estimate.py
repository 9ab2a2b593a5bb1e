"""What a step needs besides weights: tokens and FLOPs of the job, activation bytes, VAE decode bytes.

Activations come from `plan.peak.estimate_peak` (the job run on fake tensors) when it is there; the
planner takes them through an `activation_estimator` function so that another estimate can be
given. Without it, or where it cannot run the model, a formula stands in, and the plan says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import HookwiseError
from ..introspect import ModelMap
from .job import Job

logger = logging.getLogger("hookwise.plan")


@dataclass(frozen=True)
class ActivationEstimate:
    """Device bytes a step adds to the weights, and how they were found."""

    activation_bytes: int
    method: str  # "fake" (run on fake tensors), "formula", or what a given estimator says
    saved_for_backward_bytes: int = 0
    modelled: tuple[str, ...] = field(default=())


ActivationEstimator = Callable[..., Any]


def latent_shape(model_map: ModelMap, job: Job) -> tuple[int, int]:
    """(image tokens, latent frames) of one sample: VAE factor 8, patch 2x2, Wan's 4x temporal factor."""
    frames = 1 if job.frames == 1 else (job.frames - 1) // 4 + 1
    tokens = max(job.height // 16, 1) * max(job.width // 16, 1) * frames
    return tokens, frames


def sequence_length(model_map: ModelMap, job: Job) -> int:
    """Tokens in one sample's attention: image tokens plus the text for joint-attention models."""
    tokens, _ = latent_shape(model_map, job)
    joint = any(a.kind == "joint" for a in model_map.attention)
    return tokens + (job.text_len if joint else 0)


def step_flops(model_map: ModelMap, job: Job, hidden: int) -> float:
    """Matmul FLOPs of one step: 2 x tower parameters x tokens, plus attention, for every sample and
    call; backward doubles the forward, checkpointing adds one forward again."""
    seq = sequence_length(model_map, job)
    tower_params = sum(b.param_count for t in model_map.towers for b in t.blocks) or model_map.param_count
    self_attn = sum(1 for a in model_map.attention if a.kind != "cross")
    forward = 2.0 * tower_params * seq + 4.0 * seq * seq * hidden * self_attn
    forward *= job.effective_batch * job.calls_per_step
    if job.training:
        return forward * (4.0 if job.uses_checkpointing else 3.0)
    return forward


def formula_activation(model_map: ModelMap, job: Job, hidden: int, itemsize: int = 2) -> ActivationEstimate:
    """A formula for when nothing can run the model: per block about 34 x tokens x width bytes live
    in training (saved for backward), a peak of about 16 x tokens x width while one block runs.

    Calibrated on diffusers FLUX / Wan blocks with a flash-style attention (no sequence x sequence
    matrix); a rough bound, said to be one in the plan.
    """
    seq = sequence_length(model_map, job)
    batch = job.effective_batch
    unit = seq * hidden * itemsize * batch
    running = 16 * unit
    blocks = len(model_map.blocks) or 1
    saved = 0
    if job.training:
        saved = blocks * (2 * unit if job.uses_checkpointing else 34 * unit)
    return ActivationEstimate(
        running + saved,
        "formula",
        saved,
        (f"activations by formula (16 x tokens x width per running block{', plus what backward keeps' if job.training else ''}): "
         "no fake-tensor run",),
    )


def default_activation_estimator(model: nn.Module, job: Job, *, attention_backend: str = "flash",
                                 compute_device: str = "cuda", example_inputs: Any = None) -> ActivationEstimate:  # fmt: skip
    """`plan.peak.estimate_peak(..., weights_on_device=False)`: the job run on fake tensors."""
    from . import peak  # noqa: PLC0415 - the fake-tensor tracker is optional and heavy to import

    report = peak.estimate_peak(
        model, job, example_inputs=example_inputs, attention_backend=attention_backend,
        compute_device=compute_device, weights_on_device=False,
    )  # fmt: skip
    return ActivationEstimate(
        int(report.activation_bytes), str(report.method), int(report.saved_for_backward_bytes), tuple(report.modelled)
    )


def stack_peak(model: nn.Module, job: Job, configs: tuple[Any, ...], *, hardware: Any, attention_backend: str,
               example_inputs: Any = None) -> Any:  # fmt: skip
    """The device peak of one step with `configs` in place, from a fake run (`plan.peak.estimate_peak`
    with `stack=`), or None where it cannot run: the plan then keeps the declarations' peak."""
    from . import peak  # noqa: PLC0415 - as in default_activation_estimator

    device = "cpu" if getattr(hardware, "device", "cuda") == "cpu" else "cuda"
    try:
        report = peak.estimate_peak(model, job, example_inputs=example_inputs, attention_backend=attention_backend,
                                    compute_device=device, stack=configs, hardware=hardware)  # fmt: skip
    except (ImportError, HookwiseError, NotImplementedError, RuntimeError) as exc:
        logger.info("hookwise plan: no fake run with the stack (%s); the declarations' peak stands", exc)
        return None
    return report if report.method == "fake" else None


def estimate_activations(
    estimator: ActivationEstimator | None,
    model: nn.Module,
    model_map: ModelMap,
    job: Job,
    hidden: int,
    *,
    compute_device: str,
    attention_backend: str,
    example_inputs: Any = None,
    itemsize: int = 2,
) -> ActivationEstimate:
    """Run the estimator; fall back to the formula where it is missing or cannot run this model."""
    fn = estimator or default_activation_estimator
    try:
        result = fn(model, job, attention_backend=attention_backend, compute_device=compute_device,
                    example_inputs=example_inputs)  # fmt: skip
    except (ImportError, HookwiseError, NotImplementedError, RuntimeError) as exc:
        if estimator is not None:
            raise
        fallback = formula_activation(model_map, job, hidden, itemsize)
        why = "the fake-tensor tracker is not installed" if isinstance(exc, ImportError) else f"it could not run: {exc}"
        logger.info("hookwise plan: activations by formula (%s)", why)
        return ActivationEstimate(fallback.activation_bytes, fallback.method, fallback.saved_for_backward_bytes,
                                  (*fallback.modelled, f"no fake run: {why}"))  # fmt: skip
    if isinstance(result, ActivationEstimate):
        return result
    if isinstance(result, (int, float)):
        return ActivationEstimate(int(result), "given")
    return ActivationEstimate(  # a PeakReport-like object
        int(result.activation_bytes), str(getattr(result, "method", "given")),
        int(getattr(result, "saved_for_backward_bytes", 0)), tuple(getattr(result, "modelled", ())),
    )  # fmt: skip


def vae_decode_bytes(vae: nn.Module | None, job: Job, *, tiling: bool, slicing: bool) -> int:
    """Device bytes a VAE decode adds (formula): about 4 live full-resolution maps of the decoder's
    last width, per sample decoded at once; tiling bounds the map to one 512-pixel tile (and its
    overlap), slicing decodes one sample at a time."""
    if vae is None:
        return 0
    channels = 128
    config = getattr(vae, "config", None)
    widths = getattr(config, "block_out_channels", None) if config is not None else None
    if widths:
        channels = int(widths[0])
    param = next(vae.parameters(), None)
    itemsize = param.element_size() if param is not None else 2
    h, w = job.height, job.width
    if tiling:
        h, w = min(h, 640), min(w, 640)
    frames = 1 if job.frames == 1 else 4  # video VAEs decode a few frames at a time (causal chunks)
    batch = 1 if slicing else job.batch
    return int(4 * batch * frames * h * w * channels * itemsize)
