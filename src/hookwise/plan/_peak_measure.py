"""Peak memory of a job's step measured on real tensors, with the tracker `estimate_peak` uses.

This is the reference the fake-tensor estimate is checked against on a CPU (tests, benchmark) and
what a plan's first real step can be compared with where no CUDA allocator statistics exist. The
run is independent of the estimate's modelling: LoRA comes from peft itself, the optimizer is
torch's AdamW (its state made by one step before the measured one), checkpointing from diffusers'
`enable_gradient_checkpointing` where the model has it and the stack has no `Checkpointing`,
attention from the CPU kernel that `sdpa_kernel` selects. It runs on a deep copy, so the caller's
model is untouched.

With a stack, the techniques are applied for real to the copy, computing on the CPU (an offload's
`onload_device` becomes "cpu"). The device and the host are then one memory; the host copies an
offload streams from (its groups' flat masters, read from `offload_report`) are moved to a "host"
count, so the "cpu" peak is what the compute device would hold: resident weights, slots, what the
step creates.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.outputs import sample_of
from ..core.techniques import technique_named, technique_of
from ..errors import ConfigError, require
from ..stack import apply as apply_stack
from ._peak_stack import CHECKPOINTING, configs_of
from ._peak_tracker import StorageTracker, storage_bytes
from ._peak_training import lora_targets
from .job import Job

_KERNELS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def measure_peak(
    model: nn.Module, inputs: dict[str, Any], job: Job, *, attention_backend: str = "math", stack: Any = None
) -> dict[str, int]:
    """Live-byte peak of one real step of `job` on the CPU: `peak_bytes`, `weight_bytes`,
    `optimizer_bytes`, `activation_bytes`, `saved_for_backward_bytes`, `host_bytes` (weights are
    counted as resident unless an offload in `stack` streams them)."""
    if attention_backend not in _KERNELS:
        raise ConfigError(f"a real CPU run takes attention_backend 'math' or 'flash', got {attention_backend!r}")
    configs = [_on_cpu(c) for c in configs_of(stack)]
    names = {technique_of(c).name for c in configs}
    model = copy.deepcopy(model)
    optimizer = None
    if job.training:
        peft = require("peft", "train", "measuring a LoRA training step")
        targets = lora_targets(model)
        config = peft.LoraConfig(r=job.lora_rank, lora_alpha=job.lora_rank, target_modules=targets)
        model = peft.inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        if job.uses_checkpointing and CHECKPOINTING not in names:
            if hasattr(model, "enable_gradient_checkpointing"):
                model.enable_gradient_checkpointing()
            else:
                configs.append(technique_named(CHECKPOINTING).config_cls())
    else:
        configs = [c for c in configs if technique_of(c).name != CHECKPOINTING]
    tracker = StorageTracker()
    for w in [*model.parameters(), *model.buffers()]:
        tracker.register(w)
    with tracker:
        if configs:
            apply_stack(model, *configs)
    gc.collect()  # what applying replaced may sit in reference cycles
    host = _host_masters(model) if "offload" in names else []
    host_bytes = sum(tracker.move(t, "host") for t in host)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    weight_bytes = tracker.live_bytes("cpu") - storage_bytes(lora)
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            tracker.register(t)
    optimizer_bytes = 0
    if job.training:
        optimizer = torch.optim.AdamW(lora, lr=1e-4)
        with sdpa_kernel(_KERNELS[attention_backend]):
            _train_step(model, inputs, optimizer)  # makes the optimizer's state, as a second step finds it
        optimizer.zero_grad(set_to_none=True)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        optimizer_bytes = sum(tracker.register(t) for t in state)
    tracker.reset_peak()
    start = tracker.live_bytes("cpu")
    saved = 0
    with sdpa_kernel(_KERNELS[attention_backend]), tracker:
        if not job.training:
            with torch.no_grad():
                first = sample_of(model(**inputs), "measure_peak")
                if job.cfg == "separate":
                    sample_of(model(**inputs), "measure_peak")
                del first
        else:
            saved = _train_step(model, inputs, optimizer, tracker, start)
    peak = tracker.peak_bytes("cpu")
    return dict(peak_bytes=peak, weight_bytes=weight_bytes, optimizer_bytes=optimizer_bytes,
                activation_bytes=peak - weight_bytes - optimizer_bytes, saved_for_backward_bytes=saved,
                host_bytes=host_bytes)  # fmt: skip


def _train_step(model: nn.Module, inputs: dict[str, Any], optimizer: Any, tracker: StorageTracker | None = None,
                start: int = 0) -> int:  # fmt: skip
    """Forward, MSE loss, backward, optimizer step; returns the bytes the forward left for backward."""
    out = sample_of(model(**inputs), "measure_peak")
    loss = F.mse_loss(out.float(), torch.zeros(out.shape, dtype=torch.float32))
    del out
    saved = tracker.live_bytes("cpu") - start if tracker is not None else 0
    loss.backward()
    del loss
    optimizer.step()
    return saved


def _on_cpu(config: Any) -> Any:
    if technique_of(config).name == "offload" and not str(config.onload_device).startswith("cpu"):
        return dataclasses.replace(config, onload_device="cpu", pin="auto" if config.pin == "all" else config.pin,
                                   use_streams=None)  # fmt: skip
    return config


def _host_masters(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of the streamed groups (views of their host masters), from the offload report."""
    from ..memory import offload_report  # noqa: PLC0415 - only when an offload is in the stack

    report = offload_report(model)
    kept = set(report.always_resident)
    out = []
    for group in report.groups:
        if group.resident:
            continue
        for path in group.modules:
            module = model.get_submodule(path)
            for name, t in [*module.named_parameters(prefix=path), *module.named_buffers(prefix=path)]:
                if name not in kept:
                    out.append(t)
    return out
