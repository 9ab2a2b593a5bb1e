"""Peak memory of a job's step, from running the full-size model on fake tensors.

`estimate_peak` runs the model's real forward (and, when training, the backward with LoRA adapters
trainable and the rest frozen, checkpointing per the job) under PyTorch's `FakeTensorMode`: every
operation computes shapes, dtypes and strides but allocates nothing, so a 12B model at 1024x1024
runs in seconds on a CPU without weights. A dispatch-mode tracker counts the storages the run
creates and frees (`_peak_tracker`), and attention runs as the kernel chosen for the compute device
would (`_peak_attention`), not as the CPU's math path. The model itself is never changed: fake
copies of its parameters are swapped in for one call (`torch.func.functional_call`) and every hook
the run attaches is removed after it.

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
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from ..core.outputs import sample_of
from ..errors import ConfigError
from ._peak_attention import AttentionBackend, check_backend
from ._peak_formula import formula_estimate
from ._peak_inputs import build_inputs, known_target
from ._peak_tracker import CUDA_BLOCK, StorageTracker, storage_bytes
from ._peak_training import attached, checkpoint_blocks, lora_targets, make_lora
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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["modelled"] = list(self.modelled)
        return out


def estimate_peak(
    model: nn.Module,
    job: Job,
    *,
    example_inputs: Any = None,
    attention_backend: str = "flash",
    compute_device: str = "cuda",
    weights_on_device: bool = True,
) -> PeakReport:
    """Peak bytes on the compute device over one step of `job` (one call, two for separate CFG, or a
    training forward + backward), from running the model on fake tensors.

    `model` may be on `meta` or hold real weights; it is left exactly as it was. `example_inputs`
    (keyword arguments of one call, real, fake or `meta` tensors) replace the inputs built from the
    job, which exist for FLUX and Wan transformers and the zoo models. `attention_backend` is the
    kernel the compute device would run ("flash", "efficient", "math"); `compute_device` "cuda"
    rounds storages to the CUDA allocator's 512 B blocks. With `weights_on_device=False` only what
    the computation adds is counted (the caller adds the weights a stack keeps resident).
    """
    _check(model, job, attention_backend, compute_device)
    target, builder = known_target(model)
    if example_inputs is None and builder is None:
        build_inputs(model, job, torch.float32)  # raises the error that says to pass example_inputs
    try:
        return _fake_run(model, job, example_inputs, attention_backend, compute_device, weights_on_device)
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


def _checkpointing(job: Job) -> bool:
    return job.training if job.checkpointing is None else (job.training and job.checkpointing)


def _fake_run(
    model: nn.Module, job: Job, example_inputs: Any, backend: str, compute_device: str, weights_on_device: bool
) -> PeakReport:
    target, _ = known_target(model)
    block = CUDA_BLOCK if compute_device == "cuda" else 1
    tracker = StorageTracker(block)
    attention = AttentionBackend(backend, upcast_math=compute_device == "cuda")
    adapters_of: dict[str, nn.Linear] = {}
    blocks: list[str] = []
    if job.training:
        modules = dict(target.named_modules())
        adapters_of = {p: modules[p] for p in lora_targets(target)}
        if not adapters_of:
            raise ConfigError(
                f"a training job puts LoRA on the attention Linears, and describe() found none in "
                f"{type(target).__name__}; state them with hookwise.describe(model, attention=[...])"
            )
        blocks = checkpoint_blocks(target) if _checkpointing(job) else []

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes: dict[int, torch.Tensor] = {}

        def fake_of(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in fakes:
                fakes[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            return fakes[id(t)]

        params = {n: fake_of(p) for n, p in target.named_parameters()}
        buffers = {n: fake_of(b) for n, b in target.named_buffers()}
        weights = list(params.values()) + list(buffers.values())
        weight_bytes = storage_bytes(weights, block) if weights_on_device else 0
        for w in weights:
            tracker.register(w, count=weights_on_device)
        dtype = next((p.dtype for p in weights if p.is_floating_point()), torch.float32)
        if example_inputs is None:
            inputs = build_inputs(model, job, dtype)
        else:
            inputs = tree_map(lambda v: _to_fake(v, mode), example_inputs)
        for t in _tensors(inputs):
            tracker.register(t)
        adapters = {p: make_lora(m, job.lora_rank, params[f"{p}.weight"]) for p, m in adapters_of.items()}
        for a, b in adapters.values():
            tracker.register(a)
            tracker.register(b)
        tracker.reset_peak()
        start_live = tracker.live_bytes("cpu")
        saved = 0
        with attached(target, adapters, blocks), attention, tracker:
            step = _Step(target, lambda m: _step(m, inputs, job, tracker, start_live))
            saved = torch.func.functional_call(step, {**_prefixed(params), **_prefixed(buffers)}, ())
        peak = tracker.peak_bytes("cpu")
    modelled = _notes(job, backend, compute_device, weights_on_device, attention, adapters, blocks)
    return PeakReport(
        peak_bytes=peak,
        weight_bytes=weight_bytes,
        activation_bytes=peak - weight_bytes,
        saved_for_backward_bytes=saved if job.training else 0,
        method="fake",
        modelled=modelled,
    )


class _Step(nn.Module):
    """One step of a job as a module, so one `functional_call` covers its backward (and recomputation) too."""

    def __init__(self, target: nn.Module, fn: Any) -> None:
        super().__init__()
        self.m = target
        self.fn = fn

    def forward(self) -> Any:
        return self.fn(self.m)


def _prefixed(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"m.{k}": v for k, v in named.items()}


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
           adapters: dict, blocks: list[str]) -> tuple[str, ...]:
    notes = [f"ran the model on fake CPU tensors standing in for {device}; no weights were read or allocated"]
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
                     f"frozen; its parameters and gradients are counted as activation bytes; no optimizer state")
        notes.append("loss: MSE in float32 against a target of the output's shape")
        if blocks:
            notes.append(f"gradient checkpointing (non-reentrant) on each of {len(blocks)} blocks")
    return tuple(notes)
