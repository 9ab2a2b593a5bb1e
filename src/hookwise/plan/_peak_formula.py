"""The fallback when a model cannot run on fake tensors: activation bytes from a calibrated formula.

With u = batch x tokens x width x element size (one hidden-state tensor of the step), the peak
activation bytes of a step are modelled as

    sampling                          SAMPLING x u
    training, checkpointing on        (CHECKPOINTED x blocks + TRAIN_BASE) x u
    training, checkpointing off       (SAVED x blocks + TRAIN_BASE) x u

plus, for the math attention kernel, batch x heads x tokens^2 score matrices: the logits and softmax
of the running block, and the softmax each block keeps for backward (one block when checkpointing,
every block when not).
The factors were fitted by `fit_factors` on peaks measured with the storage tracker on real runs
of the tiny FLUX and Wan models and the zoo models (`python benchmarks/plan_peak.py --calibrate`
prints the fit); full-size models, whose MLPs are wider relative to the width, land within the
spread of those fits (see the benchmark). Tokens and width come from the inputs and the model map
rather than from running the model, so they are rules too: sequence inputs (batch, tokens, channels)
count their tokens, latent grids (batch, channels, *grid) count one token per 2x2 patch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError
from ..introspect import describe
from ._peak_inputs import build_inputs, known_target
from ._peak_tracker import CUDA_BLOCK, storage_bytes
from ._peak_training import adam_state_bytes
from .job import Job

# Fitted by fit_factors on the tiny / zoo models (benchmarks/plan_peak.py --calibrate).
SAMPLING = 13.5
CHECKPOINTED = 1.0
SAVED = 11.4
TRAIN_BASE = 27.8


@dataclass(frozen=True)
class StepShape:
    """The sizes the formula needs: one call's batch and tokens, the hidden width, depth and heads."""

    batch: int
    tokens: int
    width: int
    blocks: int
    heads: int
    element_size: int

    @property
    def unit(self) -> int:
        return self.batch * self.tokens * self.width * self.element_size


def step_shape(model: nn.Module, job: Job, example_inputs: Any = None) -> StepShape:
    """Sizes of one call of `model` for `job` (or for `example_inputs`), read without running it."""
    target, _ = known_target(model)
    model_map = describe(target)
    widths = Counter(leaf.shape[1] for leaf in model_map.leaves if leaf.kind == "linear" and leaf.block)
    if not widths:
        raise ConfigError(
            f"no Linear layers in tower blocks of {type(target).__name__}, so the memory formula has no width; "
            f"state the towers with hookwise.describe(model, towers=[...])"
        )
    width = widths.most_common(1)[0][0]
    first = next((p for p in target.parameters() if p.is_floating_point()), None)
    dtype = first.dtype if first is not None else torch.float32
    inputs = build_inputs(model, job, dtype, "meta") if example_inputs is None else example_inputs
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    patch = _patch(target)
    tokens = sum(t.shape[1] for t in tensors if t.dim() == 3 and t.shape[1] > 1)
    tokens += sum(_grid_tokens(t.shape[2:], patch) for t in tensors if t.dim() >= 4)
    batch = max((t.shape[0] for t in tensors if t.dim() >= 3), default=1)
    modules = dict(target.named_modules())
    heads = max((int(getattr(modules[r.path], "heads", 0) or 0) for r in model_map.attention), default=0)
    return StepShape(batch, max(tokens, 1), width, max(len(model_map.blocks), 1), heads or max(width // 128, 1),
                     torch.empty((), dtype=dtype).element_size())


def _patch(model: nn.Module) -> tuple[int, ...]:
    """The model's patch size per grid dimension, last dimension last (2x2 when it does not say)."""
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and all(isinstance(p, int) for p in patch):
        return tuple(patch)
    if isinstance(patch, int):
        return (patch, patch)
    return (2, 2)


def _grid_tokens(grid: torch.Size, patch: tuple[int, ...]) -> int:
    tokens = 1
    patch = (1,) * max(len(grid) - len(patch), 0) + patch[-len(grid):]
    for size, p in zip(grid, patch):
        tokens *= max(size // p, 1)
    return tokens


def formula_activation(shape: StepShape, job: Job, backend: str, compute_device: str) -> int:
    """Peak activation bytes of the step by the calibrated formula (see the module docstring)."""
    if not job.training:
        factor, saved_scores = SAMPLING, 0
    elif job.checkpointing is not False:
        factor, saved_scores = CHECKPOINTED * shape.blocks + TRAIN_BASE, 1
    else:
        factor, saved_scores = SAVED * shape.blocks + TRAIN_BASE, shape.blocks
    total = factor * shape.unit
    if backend == "math":
        half = shape.element_size == 2
        score_size = 4 if (half and compute_device == "cuda") else shape.element_size
        scores = 2 + saved_scores  # logits and softmax of the running block, and the softmaxes kept
        total += scores * shape.batch * shape.heads * shape.tokens**2 * score_size
    return int(total)


def formula_estimate(model: nn.Module, job: Job, *, example_inputs: Any, attention_backend: str,
                     compute_device: str, weights_on_device: bool, reason: str):
    """A `PeakReport` by the formula, for a model fake execution could not run (`reason`)."""
    from .peak import PeakReport

    target, _ = known_target(model)
    shape = step_shape(model, job, example_inputs)
    block = CUDA_BLOCK if compute_device == "cuda" else 1
    weights = list(target.parameters()) + list(target.buffers())
    weight_bytes = storage_bytes(weights, block) if weights_on_device else 0
    activation = formula_activation(shape, job, attention_backend, compute_device)  # batch: one call's, CFG in
    saved = optimizer = 0
    if job.training:
        per_block = SAVED if job.checkpointing is False else CHECKPOINTED
        saved = int(per_block * shape.blocks * shape.unit)
        optimizer = adam_state_bytes(target, job.lora_rank)
    modelled = (
        f"fake execution could not run the model ({reason}); peak from a formula calibrated on measured "
        f"peaks of small FLUX / Wan models, expect tens of percent of error",
        f"assumed {shape.batch} x {shape.tokens} tokens x width {shape.width}, {shape.blocks} blocks, "
        f"{shape.heads} heads (tokens: 2x2 patches of latent grids plus sequence inputs)",
    )
    if job.training:
        modelled += ("optimizer: AdamW, 2 float32 moments per LoRA parameter (optimizer_bytes)",)
    return PeakReport(
        peak_bytes=weight_bytes + optimizer + activation,
        weight_bytes=weight_bytes,
        activation_bytes=activation,
        saved_for_backward_bytes=saved,
        method="formula",
        modelled=modelled,
        optimizer_bytes=optimizer,
    )


def fit_factors(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Factors fitted to measured samples: dicts with `shape` (a StepShape) and the measured activation
    bytes `sampling`, `checkpointed` and `saved` (training with checkpointing on / off).

    CHECKPOINTED stays 1: a checkpointed block keeps only its input, one hidden state. TRAIN_BASE is
    what checkpointed training holds beyond that; SAVED is then what each block adds without it.
    """
    n = len(samples)
    sampling = sum(s["sampling"] / s["shape"].unit for s in samples) / n
    base = sum(s["checkpointed"] / s["shape"].unit - CHECKPOINTED * s["shape"].blocks for s in samples) / n
    saved = sum((s["saved"] / s["shape"].unit - base) / s["shape"].blocks for s in samples) / n
    return dict(SAMPLING=sampling, CHECKPOINTED=CHECKPOINTED, SAVED=saved, TRAIN_BASE=base)
