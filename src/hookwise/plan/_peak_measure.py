"""Peak memory of a job's step measured on real tensors, with the tracker `estimate_peak` uses.

This is the reference the fake-tensor estimate is checked against on a CPU (tests, benchmark) and
what a plan's first real step can be compared with where no CUDA allocator statistics exist. The
run is independent of the estimate's modelling: LoRA comes from peft itself, checkpointing from
diffusers' `enable_gradient_checkpointing` where the model has it, attention from the CPU kernel
that `sdpa_kernel` selects. It runs on a deep copy, so the caller's model is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.outputs import sample_of
from ..errors import ConfigError, require
from ._peak_tracker import StorageTracker, storage_bytes
from ._peak_training import attached, checkpoint_blocks, lora_targets
from .job import Job

_KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def measure_peak(
    model: nn.Module, inputs: dict[str, Any], job: Job, *, attention_backend: str = "math"
) -> dict[str, int]:
    """Live-byte peak of one real step of `job` on the CPU: `peak_bytes`, `weight_bytes`,
    `activation_bytes`, `saved_for_backward_bytes` (weights are counted as resident)."""
    if attention_backend not in _KERNELS:
        raise ConfigError(f"a real CPU run takes attention_backend 'math' or 'flash', got {attention_backend!r}")
    model = copy.deepcopy(model)
    blocks: list[str] = []
    if job.training:
        peft = require("peft", "train", "measuring a LoRA training step")
        targets = lora_targets(model)
        config = peft.LoraConfig(r=job.lora_rank, lora_alpha=job.lora_rank, target_modules=targets)
        model = peft.inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        if job.checkpointing is not False:
            if hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()
            else:
                blocks = checkpoint_blocks(model)
    tracker = StorageTracker()
    weights = list(model.parameters()) + list(model.buffers())
    for w in weights:
        tracker.register(w)
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            tracker.register(t)
    weight_bytes = storage_bytes([w for w in weights if "lora_" not in _name_of(model, w)])
    tracker.reset_peak()
    start = tracker.live_bytes("cpu")
    saved = 0
    with sdpa_kernel(_KERNELS[attention_backend]), attached(model, {}, blocks), tracker:
        if not job.training:
            with torch.no_grad():
                first = sample_of(model(**inputs), "measure_peak")
                if job.cfg == "separate":
                    sample_of(model(**inputs), "measure_peak")
                del first
        else:
            out = sample_of(model(**inputs), "measure_peak")
            loss = F.mse_loss(out.float(), torch.zeros(out.shape, dtype=torch.float32))
            del out
            saved = tracker.live_bytes("cpu") - start
            loss.backward()
            del loss
    peak = tracker.peak_bytes("cpu")
    return dict(peak_bytes=peak, weight_bytes=weight_bytes, activation_bytes=peak - weight_bytes,
                saved_for_backward_bytes=saved)


def _name_of(model: nn.Module, tensor: torch.Tensor) -> str:
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    return ""
