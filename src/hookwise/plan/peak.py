"""Peak memory of a job's step, from running the full-size model on fake tensors.

`estimate_peak` runs the model's real forward (and, when training, the backward with LoRA adapters
trainable and the rest frozen, checkpointing per the job) under PyTorch's `FakeTensorMode`: every
operation computes shapes, dtypes and strides but allocates nothing, so a 12B model at 1024x1024
runs in seconds on a CPU without weights. A dispatch-mode tracker counts the storages the run
creates and frees (`_peak_tracker`), and attention runs as the kernel chosen for the compute device
would (`_peak_attention`), not as the CPU's math path. The model itself is never changed: the run
uses a copy whose weights are fake tensors (`_peak_stack.fake_copy`).

With `stack=` the stack's techniques are applied to that copy, so the run has their hooks in place:
cast weights in their storage dtype with each layer's dequantized weight alive while it computes,
the project's `Checkpointing` recomputing blocks in backward, offloading streaming the groups it does
not keep resident through its prefetch slots (its host copies counted apart, as `host_bytes`). Where
an offload cannot be applied to the copy, its resident groups and slots come from its cost
declaration (`_peak_stack`), and the report says so. A training step also holds the optimizer's state: AdamW's two float32 moments
per trainable (LoRA) parameter, counted as `optimizer_bytes`, resident for the whole step.

The step runs with the fake mode entered only around building the copy, the stack and the inputs:
the fake tensors dispatch to it by themselves, and the per-sample scalars (the timestep) stay real,
because the run state hook reads the timestep on the host as it does on a real run.

What cannot run on fake tensors (an operation without a fake kernel, control flow that reads tensor
values) falls back to a formula calibrated on measured peaks (`_peak_formula`), and says so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_map

from ..core.outputs import sample_of
from ..errors import ConfigError, HookwiseError
from ._peak_attention import AttentionBackend, check_backend
from ._peak_formula import formula_estimate
from ..core.techniques import technique_of
from ..stack import apply as apply_stack
from ._peak_inputs import build_inputs, known_target
from ._peak_stack import (
    apply_offload_fake,
    checkpointed_blocks,
    configs_of,
    fake_copy,
    modelled_weights,
    overflow_note,
    quiet_schedule,
    split,
)
from ._peak_tracker import CUDA_BLOCK, StorageTracker, storage_bytes
from ._peak_training import ADAM_MOMENTS, attached, lora_targets, make_lora
from .footprint import label
from .job import Job

logger = logging.getLogger("hookwise.plan.peak")

_DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PeakReport:
    """Peak memory of one step of a job on the compute device, and how it was obtained."""

    peak_bytes: int  # peak live bytes on the compute device over the job's step
    weight_bytes: int  # parameter + buffer bytes resident on the compute device at the start
    activation_bytes: int  # peak_bytes - weight_bytes (what the computation adds)
    saved_for_backward_bytes: int  # 0 unless training
    method: str  # "fake" (ran under fake tensors) or "formula" (fallback, calibrated)
    modelled: tuple[str, ...]  # what was modelled rather than run, in plain words
    optimizer_bytes: int = 0  # AdamW state of the trainable parameters (training), resident all step
    host_bytes: int = 0  # weight bytes an offload keeps in host memory (or on disk)
    stack: tuple[str, ...] = ()  # the techniques the run had in place (and those modelled)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["modelled"] = list(self.modelled)
        out["stack"] = list(self.stack)
        return out


def estimate_peak(
    model: nn.Module,
    job: Job,
    *,
    example_inputs: Any = None,
    attention_backend: str = "flash",
    compute_device: str = "cuda",
    weights_on_device: bool = True,
    stack: Any = None,
    hardware: Any = None,
) -> PeakReport:
    """Peak bytes on the compute device over one step of `job` (one call, two for separate CFG, or a
    training forward + backward), from running the model on fake tensors.

    `model` may be on `meta` or hold real weights; it is left exactly as it was. `example_inputs`
    (keyword arguments of one call, real, fake or `meta` tensors) replace the inputs built from the
    job, which exist for FLUX and Wan transformers and the zoo models. `attention_backend` is the
    kernel the compute device would run ("flash", "efficient", "math"); `compute_device` "cuda"
    rounds storages to the CUDA allocator's 512 B blocks. With `weights_on_device=False` only what
    the computation adds is counted (the caller adds the weights a stack keeps resident).

    `stack` (a `hookwise.Stack` or technique configs, as `hookwise.apply` takes them) is applied to
    the fake copy first; `model` must then be the plain model. `hardware` (a `plan.Hardware`) sizes
    offload budgets given as a share of the device.
    """
    _check(model, job, attention_backend, compute_device)
    configs = configs_of(stack)
    target, builder = known_target(model)
    if example_inputs is None and builder is None:
        build_inputs(model, job, torch.float32)  # raises the error that says to pass example_inputs
    try:
        return _fake_run(model, job, example_inputs, attention_backend, compute_device, weights_on_device,
                         configs, hardware)  # fmt: skip
    except _FAKE_FAILURES as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        logger.warning("fake execution of %s failed (%s); using the calibrated formula", type(target).__name__, reason)
        return formula_estimate(
            model, job, example_inputs=example_inputs, attention_backend=attention_backend,
            compute_device=compute_device, weights_on_device=weights_on_device, reason=reason,
        )


def _fake_failures() -> tuple[type[BaseException], ...]:
    from torch._subclasses import fake_tensor

    names = ("DataDependentOutputException", "DynamicOutputShapeException", "UnsupportedOperatorException",
             "UnsupportedFakeTensorException")
    found = tuple(getattr(fake_tensor, n) for n in names if hasattr(fake_tensor, n))
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    # RuntimeError / NotImplementedError: a kernel that refuses fake or mixed-device tensors.
    return found + (GuardOnDataDependentSymNode, RuntimeError, NotImplementedError)


_FAKE_FAILURES = _fake_failures()


def _check(model: Any, job: Any, backend: str, device: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"estimate_peak() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(job, Job):
        raise ConfigError(f"estimate_peak() needs a hookwise Job, got {type(job).__name__}")
    check_backend(backend)
    if device not in _DEVICES:
        raise ConfigError(f"compute_device={device!r} is not supported; use one of {', '.join(_DEVICES)}")
    if job.cfg not in (None, "batched", "separate"):
        raise ConfigError(f"Job.cfg={job.cfg!r} is not a CFG mode; use 'batched', 'separate' or None")
    if min(job.height, job.width, job.frames, job.batch, job.text_len) < 1 or (job.training and job.lora_rank < 1):
        raise ConfigError(f"every size of the job must be at least 1, got {job}")


def _fake_run(
    model: nn.Module, job: Job, example_inputs: Any, backend: str, compute_device: str, weights_on_device: bool,
    configs: tuple[Any, ...] = (), hardware: Any = None,
) -> PeakReport:
    target, _ = known_target(model)
    block = CUDA_BLOCK if compute_device == "cuda" else 1
    tracker = StorageTracker(block)
    attention = AttentionBackend(backend, upcast_math=compute_device == "cuda")
    run, modelled = split(configs, job)
    configs_of_offload = list(modelled)
    adapters_of: list[str] = []
    if job.training:
        adapters_of = lora_targets(target)
        if not adapters_of:
            raise ConfigError(
                f"a training job puts LoRA on the attention Linears, and describe() found none in "
                f"{type(target).__name__}; state them with hookwise.describe(model, attention=[...])"
            )

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_copy(target, mode, frozen=job.training)
    notes: list[str] = []
    with mode:
        if run:
            apply_stack(fake, *run)  # the stack's hooks, in place on the copy
        originals = dict(target.named_modules())
        # Adapters in the dtype the layer computes in: the model's own (casting stores, not computes, fp8).
        adapters = {
            p: make_lora(originals[p], job.lora_rank, torch.empty(0, dtype=originals[p].weight.dtype))
            for p in adapters_of
        }
        trainable = storage_bytes([t for ab in adapters.values() for t in ab])
        host_bytes = 0
        slots: list[torch.Tensor] = []
        if modelled:
            try:
                slots, host, notes = apply_offload_fake(fake, modelled, hardware, trainable)
            except HookwiseError as exc:
                # What a real apply would refuse too (a budget below the partition's minimum): the
                # declaration still gives the planner a figure, and the report says it was modelled.
                notes = [f"offload could not be applied to the fake copy ({exc}); modelled instead"]
            else:
                host_bytes = storage_bytes(host)
                for h in host:  # the streamed weights' host copies: known, not device bytes
                    tracker.register(h, count=False)
                modelled = []
        weights = _distinct([*fake.parameters(), *fake.buffers(), *slots])
        if modelled:
            device, slot_bytes, host_bytes, declared = modelled_weights(
                fake, modelled, job, hardware, trainable, checkpointed_blocks(fake, run)
            )
            notes += declared
            weight_bytes = device + slot_bytes if weights_on_device else 0
        before = tracker.live_bytes("cpu")
        for w in weights:  # resident weights and offload slots (a host copy is known already: not counted)
            tracker.register(w, count=weights_on_device and not modelled)
        if modelled:
            tracker.reserve("cpu", weight_bytes)
        else:
            weight_bytes = tracker.live_bytes("cpu") - before
        dtype = next((p.dtype for p in [*target.parameters(), *target.buffers()] if p.is_floating_point()), torch.float32)
        if example_inputs is None:
            inputs = build_inputs(model, job, dtype)
        else:
            inputs = tree_map(lambda v: _to_fake(v, mode), example_inputs)
        inputs = _host_scalars(inputs)
        for t in _tensors(inputs):
            tracker.register(t)
        state = [torch.zeros(t.shape, dtype=torch.float32) for ab in adapters.values() for t in ab for _ in range(ADAM_MOMENTS)]
        for a, b in adapters.values():
            tracker.register(a)
            tracker.register(b)
        optimizer_bytes = sum(tracker.register(t) for t in state)
    tracker.reset_peak()
    start_live = tracker.live_bytes("cpu")
    # The fake tensors carry their mode into every operation; factory calls without tensor inputs
    # (small: position tables, timestep frequencies) run for real, as the run state's read does.
    with attached(fake, adapters), attention, tracker, quiet_schedule():
        saved = _step(fake, inputs, job, tracker, start_live)
    if configs_of_offload and not modelled:
        overflow = overflow_note(fake)
        if overflow is not None:
            notes.append(overflow)
    peak = tracker.peak_bytes("cpu")
    del state
    modelled_notes = _notes(job, backend, compute_device, weights_on_device, attention, adapters, run, modelled)
    return PeakReport(
        peak_bytes=peak,
        weight_bytes=weight_bytes,
        activation_bytes=peak - weight_bytes - optimizer_bytes,
        saved_for_backward_bytes=saved if job.training else 0,
        method="fake",
        modelled=(*modelled_notes, *notes),
        optimizer_bytes=optimizer_bytes,
        host_bytes=host_bytes,
        stack=tuple(label(c) for c in (*run, *configs_of_offload)),
    )


def _distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]


def _host_scalars(inputs: Any) -> Any:
    """The inputs with per-sample scalars (1-D, at most one value per sample) as real host tensors:
    the run state reads the timestep on the host."""

    def real(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() <= _SCALARS:
            with unset_fake_temporarily():
                return torch.zeros(v.shape, dtype=v.dtype)
        return v

    return tree_map(real, inputs)


_SCALARS = 64  # at most this many values: a per-sample scalar (timestep, guidance), not a sequence


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return sample_of(model(**inputs), "estimate_peak")
    if isinstance(inputs, (tuple, list)):
        return sample_of(model(*inputs), "estimate_peak")
    return sample_of(model(inputs), "estimate_peak")


def _step(model: nn.Module, inputs: Any, job: Job, tracker: StorageTracker, start_live: int) -> int:
    """Run the job's step; returns the bytes the forward leaves alive for the backward (0 for sampling)."""
    if not job.training:
        with torch.no_grad():
            first = _call(model, inputs)
            if job.cfg == "separate":  # the second branch runs while the first one's output waits
                _call(model, inputs)
            del first
        return 0
    out = _call(model, inputs)
    loss = F.mse_loss(out.float(), torch.zeros(out.shape, dtype=torch.float32, device=out.device))
    del out
    saved = tracker.live_bytes("cpu") - start_live
    _backward(loss)
    return saved


def _backward(loss: torch.Tensor) -> None:
    # Straight into the autograd engine: `loss.backward()` is a torch function, and a function mode
    # is suspended while it handles one, so the attention model would miss the blocks that
    # checkpointing recomputes during the backward.
    grad = torch.ones_like(loss)
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


def _to_fake(value: Any, mode: FakeTensorMode) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type == "meta" or not isinstance(value, torch._subclasses.FakeTensor):
        fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
        return fake.requires_grad_(value.requires_grad) if value.is_floating_point() else fake
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _notes(job: Job, backend: str, device: str, weights_on_device: bool, attention: AttentionBackend,
           adapters: dict, run: list, modelled: list) -> tuple[str, ...]:
    notes = [f"ran the model on fake CPU tensors standing in for {device}; no weights were read or allocated"]
    if run:
        notes.append("with the stack's hooks in place on a fake copy: " + ", ".join(label(c) for c in run))
    if attention.calls:
        taken = ", ".join(sorted(attention.taken))
        notes.append(f"attention: {attention.calls} scaled_dot_product_attention calls modelled as the {taken} "
                     f"kernel's outputs and saved tensors (asked for {backend}; flash takes only fp16/bf16 "
                     f"without a mask, else memory-efficient)")
        if "math" in attention.taken and device == "cuda":
            notes.append("math attention computes fp16/bf16 inputs in float32, as PyTorch does on CUDA")
    if device == "cuda":
        notes.append("CUDA allocator: each storage rounded up to 512 B blocks; the caching allocator's "
                     "fragmentation, kernel workspaces (cuBLAS, flash backward scratch) and the CUDA context "
                     "are not counted")
    if not weights_on_device:
        notes.append("weights not counted (the caller adds what its stack keeps resident)")
    if job.cfg == "batched":
        notes.append("CFG batched: one call at twice the batch")
    elif job.cfg == "separate":
        notes.append("CFG separate: two calls, the first one's output kept during the second")
    if job.training:
        notes.append(f"LoRA rank {job.lora_rank} (peft layout) on {len(adapters)} attention Linears, the rest "
                     f"frozen; its parameters and gradients are counted as activation bytes")
        notes.append(f"optimizer: AdamW, {ADAM_MOMENTS} float32 moments per trainable parameter, resident all step "
                     f"(optimizer_bytes); the update's own temporaries come after backward and are not run")
        notes.append("loss: MSE in float32 against a target of the output's shape")
        if any(technique_of(c).name == "checkpointing" for c in run):
            notes.append("gradient checkpointing: hookwise Checkpointing (non-reentrant, per block) on the copy")
    return tuple(notes)
