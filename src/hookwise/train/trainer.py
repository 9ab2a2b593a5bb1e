"""The reference LoRA trainer: `hookwise.train_lora(...)` and `hookwise train-lora`.

    result = hookwise.train_lora("flux-shapes", "runs/cross", steps=300)
    print(result.files["diffusers"], result.distances)

It trains a LoRA (peft, rank `rank`, on the attention projections of the model map unless `targets`
says otherwise) with rectified flow (x_t = (1 - t) x0 + t noise, the model predicts noise - x0,
t logit-normal), on:

- a `hookwise.zoo` reference model, which learns a class it never saw (`NEW_IMAGE_CLASS`, a
  yellow cross) through the LoRA and a new row of its class-embedding table, trained together and
  saved side by side; a PNG grid shows the new class before and after, and `distances` measures it;
- any diffusers transformer with its latents cached on disk (`data=` a folder of `save_latents` files).

The base model is float32, bf16 or fp8 (`LayerwiseCasting` storage); the stack is the planner's
choice for this training job on this machine (`stack="plan"`), a given `Stack` / configs, or none.
The optimizer is bitsandbytes' 8-bit AdamW when bitsandbytes is installed and the model is on CUDA,
torch's AdamW otherwise (`result.optimizer` says which). The output folder holds the LoRA in every
format of `lora_io` (`lora-<format>.safetensors`), the new embedding row, and `training_state.pt`
(optimizer state, step, random generator states), from which `resume=` continues the run
bit-identically on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, HookwiseError, require
from ..introspect import describe
from ..introspect.architectures import detect_architecture
from ..introspect.lora_keys import group_of_module
from ..memory import LayerwiseCasting
from ..plan import Job, make_plan
from ..plan.footprint import LORA_TARGETS
from ..stack import Stack, applied
from ..stack import apply as apply_stack
from ..zoo.reference import ReferenceModel, load_reference, reference_names
from ..zoo.grid import save_rows_png
from ._lora_tasks import LatentsTask, ZooTask, class_distances
from ._ranks import Ranks, join_ranks
from .lora_io import FORMATS, load_lora, save_lora
from .validation import validation

logger = logging.getLogger("hookwise.train.trainer")

BASES = ("float32", "bf16", "fp8")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
STATE_FILE = "training_state.pt"
_BASE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp8": None}


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as the progress callback sees it."""

    step: int  # steps done, 1-based
    steps: int
    loss: float
    step_seconds: float
    peak_bytes: int  # CUDA: allocator peak; CPU: the process's peak resident set
    validation: Path | None = None  # the validation grid written after this step, if any


@dataclass
class LoraTrainingResult:
    """What a `train_lora` run did and wrote."""

    out: Path
    files: dict[str, Path]  # format -> LoRA file
    embedding: Path | None  # the new class's embedding row (zoo models)
    steps: int
    start_step: int  # > 0 when resumed
    losses: list[float]
    optimizer: str
    stack: list[str]  # the applied techniques, innermost first
    plan: str | None  # the planner's explanation when it chose the stack
    seconds: float
    step_seconds: float  # mean over this run's steps
    peak_bytes: int
    peak_what: str
    validations: list[Path] = field(default_factory=list)
    grid: Path | None = None  # before / after PNG (zoo models)
    distances: dict[str, tuple[float, float]] = field(default_factory=dict)  # "before"/"after" -> (new, old)
    skipped_formats: dict[str, str] = field(default_factory=dict)  # format -> why it was not written
    switches: list[Any] = field(default_factory=list)  # hookwise.validation reports (switch costs), one per sampling

    def learned(self) -> bool | None:
        """Whether the samples moved towards the new class relative to the old ones (zoo models)."""
        if "before" not in self.distances or "after" not in self.distances:
            return None
        (bn, bo), (an, ao) = self.distances["before"], self.distances["after"]
        return an / ao < bn / bo


def attention_targets(model: nn.Module) -> list[str]:
    """Module paths of the attention projections (the Linears peft targets by default for DiTs).

    Where the model's original checkpoint fuses a projection with another Linear (FLUX's single
    blocks: q, k, v and the MLP input are one `linear1`), the other Linear is added, so the LoRA can
    be saved in every format (kohya and BFL files name the fused module).
    """
    model_map = describe(model)
    found = []
    for role in model_map.attention:
        module = model.get_submodule(role.path)
        for name, child in module.named_modules():
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                found.append(f"{role.path}.{name}")
    arch = detect_architecture(model)
    if arch is not None and arch.lora_names:
        for path in list(found):
            group = group_of_module(arch.lora_names, path)
            for member in group.modules if group is not None else ():
                if member not in found and isinstance(_submodule(model, member), nn.Linear):
                    found.append(member)
    if not found:
        raise ConfigError(
            f"no attention projection Linears ({', '.join(LORA_TARGETS)}) found in {type(model).__name__}'s attention "
            "modules; pass targets=[module paths] to choose the LoRA's modules"
        )
    return found


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _peak(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocator peak"
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def _optimizer(params: list[dict[str, Any]], kind: str, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    if kind not in OPTIMIZERS:
        raise ConfigError(f"optimizer={kind!r}: use one of {', '.join(OPTIMIZERS)}")
    if kind == "adamw8bit" or (kind == "auto" and device.type == "cuda"):
        try:
            bnb = require("bitsandbytes", "train", "8-bit AdamW")
        except HookwiseError:
            if kind == "adamw8bit":
                raise
        else:
            return bnb.optim.AdamW8bit(params, betas=(0.9, 0.99), weight_decay=0.0), "AdamW8bit (bitsandbytes)"
    return torch.optim.AdamW(params, betas=(0.9, 0.99), weight_decay=0.0), "AdamW (torch)"


def _load_model(model: str | nn.Module, data: str | Path | None) -> ReferenceModel | nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model in reference_names():
        return load_reference(model)
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {model!r}: use a zoo reference model ({', '.join(reference_names())}) or a diffusers "
                          "transformer folder (with config.json)")  # fmt: skip
    diffusers = require("diffusers", "diffusers", "loading a transformer folder")
    cls_name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ConfigError(f"{folder}/config.json names class {cls_name!r}, which diffusers does not have")
    return cls.from_pretrained(folder)


def _sample_validation(task: Any, model: nn.Module, labels: Sequence[int], *, seed: int = 0,
                       stack: Any = None, reports: list[Any] | None = None) -> torch.Tensor:
    """Samples under no_grad in eval mode; the mode is restored.

    With `stack` ("plan" for the planner's inference stack, or a `Stack` / configs) and a training
    stack on the model, sampling runs inside `hookwise.validation(model, stack=...)`, which switches
    to the inference stack and back exactly (its cost is appended to `reports`). With `stack=None`,
    or no stack applied, the samples come from the model as it is.
    """
    if stack is not None and applied(model).configs:
        with validation(model, stack=None if stack == "plan" else stack) as v:
            with torch.no_grad():
                out = task.sample(model, labels, seed=seed)
        if reports is not None:
            reports.append(v.report)
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return task.sample(model, labels, seed=seed)
    finally:
        model.train(was_training)


def _write_validation(task: Any, model: nn.Module, path: Path, *, title: str, per_class: int = 4,
                      stack: Any = None, reports: list[Any] | None = None, write: bool = True) -> Path:
    """Validation samples as a PNG grid (zoo models) or a safetensors file of latents (`write=False`: sampled,
    not written; the path it would have)."""
    labels, names = task.validation_labels(per_class)
    out = _sample_validation(task, model, labels, stack=stack, reports=reports)
    if not write:
        return path.with_suffix(".png" if task.kind == "zoo" else ".safetensors")
    if task.kind == "zoo":
        rows = [(name, out[i * per_class : (i + 1) * per_class]) for i, name in enumerate(names)]
        return save_rows_png(rows, path.with_suffix(".png"), title=title)
    from safetensors.torch import save_file

    path = path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": out.contiguous().cpu()}, str(path), metadata={"title": title})
    return path


def _settings_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one."""
    return {k: settings[k] for k in ("rank", "alpha", "targets", "base", "batch", "lr", "seed", "task", "optimizer")}


def train_lora(
    model: str | nn.Module = "flux-shapes",
    out: str | Path = "lora-run",
    *,
    data: str | Path | None = None,
    steps: int = 300,
    batch: int = 16,
    rank: int = 8,
    alpha: float | None = None,
    lr: float = 2e-3,
    targets: Sequence[str] | None = None,
    base: str = "float32",
    stack: str | Stack | Sequence[Any] | None = "plan",
    optimizer: str = "auto",
    validate_every: int = 0,
    validation_stack: str | Stack | Sequence[Any] | None = "plan",
    resume: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    seed: int = 0,
    device: str | torch.device | None = None,
    timestep_scale: float | None = None,
    prior: float = 0.25,
    sample_steps: int = 20,
    progress: Callable[[StepInfo], None] | None = None,
    accumulate: int = 1,
) -> LoraTrainingResult:
    """Train a LoRA on `model` (a zoo name, a `ReferenceModel`, a diffusers transformer folder or
    module) and save it into `out` in every format of `formats`; see the module docstring.

    `data`: a folder of cached latents (`save_latents`), required for models other than zoo ones.
    `steps` counts all steps, also when resuming from `resume` (a folder this function wrote).
    `stack`: "plan", a `Stack` or configs, or None. `base`: "float32", "bf16" or "fp8".
    `validate_every`: write validation samples every so many steps (0: only before and after).
    `validation_stack`: the stack those samples are taken under, through `hookwise.validation`
    ("plan": the planner's inference stack fitted to the training one; None: the training stack as
    is). The before / after samples that measure learning always use the training stack as is.
    A model passed as a module is changed in place: it keeps the LoRA and the stack afterwards.

    Under `torchrun` (or with torch.distributed initialised) it trains data-parallel: each rank takes its
    slice of the same global batch (`batch` must split evenly), the gradients are averaged
    (`DataParallel`), every rank uses rank 0's stack, and only rank 0 writes files (`result.files` is
    empty on the others); the losses are the whole batch's, as in one process.

    `accumulate=k` computes each step's `batch` as k micro-batches of batch / k (each split over the ranks),
    summing their gradients before the optimizer steps: the same step as one pass over the whole batch,
    with the activations of a micro-batch. Under several ranks the first k - 1 backward passes keep their
    gradients local (`hookwise.parallel.no_sync`): one gradient average per optimizer step.
    """
    for name, value in (("steps", steps), ("batch", batch), ("rank", rank), ("sample_steps", sample_steps),
                        ("accumulate", accumulate)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"train_lora({name}={value!r}): must be a whole number >= 1")
    if base not in BASES:
        raise ConfigError(f"train_lora(base={base!r}): use one of {', '.join(BASES)}")
    if not isinstance(validate_every, int) or validate_every < 0:
        raise ConfigError(f"train_lora(validate_every={validate_every!r}): a whole number of steps, 0 for none")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"train_lora(formats=...): unknown {unknown}; choose from {FORMATS}")
    if not (isinstance(validation_stack, (Stack, list, tuple)) or validation_stack in ("plan", None)):
        raise ConfigError(f"train_lora(validation_stack={validation_stack!r}): use 'plan', a hookwise.Stack, a list of "
                          "configs, or None")  # fmt: skip
    if not (isinstance(stack, (Stack, list, tuple)) or stack in ("plan", None)):
        raise ConfigError(f"train_lora(stack={stack!r}): use 'plan', a hookwise.Stack, a list of configs, or None")
    peft = require("peft", "peft", "LoRA training")
    ranks, device = join_ranks(device)
    try:
        ranks.check_batch(batch, accumulate)
        return _train_lora(
            ranks, peft, model, out, data=data, steps=steps, batch=batch, rank=rank, alpha=alpha, lr=lr, targets=targets,
            base=base, stack=stack, optimizer=optimizer, validate_every=validate_every, validation_stack=validation_stack,
            resume=resume, formats=formats, seed=seed, device=device, timestep_scale=timestep_scale, prior=prior,
            sample_steps=sample_steps, progress=progress, accumulate=accumulate,
        )  # fmt: skip
    finally:
        ranks.close()


def _train_lora(ranks: Ranks, peft: Any, model: Any, out: Any, *, data: Any, steps: int, batch: int, rank: int,
                alpha: float | None, lr: float, targets: Any, base: str, stack: Any, optimizer: str, validate_every: int,
                validation_stack: Any, resume: Any, formats: Sequence[str], seed: int, device: Any,
                timestep_scale: float | None, prior: float, sample_steps: int,
                progress: Callable[[StepInfo], None] | None, accumulate: int = 1) -> LoraTrainingResult:  # fmt: skip
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    alpha = float(rank if alpha is None else alpha)

    loaded = _load_model(model, data)
    if isinstance(loaded, ReferenceModel):
        if data is not None:
            raise ConfigError("train_lora: data= is for diffusers transformers; zoo models generate their own data")
        task: Any = ZooTask(loaded, prior=prior, sample_steps=sample_steps)
    else:
        if data is None:
            raise ConfigError(f"train_lora: {type(loaded).__name__} is not a zoo model; pass data= a folder of cached latents "
                              "(hookwise.train.save_latents)")  # fmt: skip
        task = LatentsTask(loaded, data, timestep_scale=timestep_scale, sample_steps=sample_steps)
    transformer = task.transformer
    transformer.requires_grad_(False)
    if _BASE_DTYPES[base] not in (None, next(transformer.parameters()).dtype):
        transformer.to(_BASE_DTYPES[base])
    task.to(device)
    compute_dtype = next(transformer.parameters()).dtype
    targets = list(targets) if targets else attention_targets(transformer)
    settings = dict(rank=rank, alpha=alpha, targets=targets, base=base, batch=batch, lr=lr, seed=seed,
                    task=task.kind if task.kind == "latents" else f"zoo:{loaded.spec.name}:{task.class_name}",
                    optimizer=optimizer, steps=steps)  # fmt: skip

    # The plan is made for the base model: the planner counts the LoRA's bytes itself.
    explanation = None
    configs: list[Any] = []
    if stack == "plan" and ranks.main:  # the other ranks take rank 0's plan
        job = Job(training=True, batch=batch // accumulate, lora_rank=rank)  # a micro-batch's activations
        plan = make_plan(transformer, job, example_inputs=task.example_inputs(batch // accumulate, compute_dtype))
        if plan.chosen is None:
            raise ConfigError(f"train_lora: no training stack fits this machine. {plan.explanation}")
        configs, explanation = list(plan.stack.configs), plan.explanation
    elif isinstance(stack, Stack):
        configs = list(stack.configs)
    elif stack is not None:
        configs = list(stack)
    if base == "fp8" and not any(isinstance(c, LayerwiseCasting) for c in configs):
        configs.append(LayerwiseCasting(storage_dtype=torch.float8_e4m3fn))
    configs, explanation = ranks.same_stack(configs, explanation)

    torch.manual_seed(seed)  # peft's initialisation of the LoRA's down weights
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
    peft.inject_adapter_in_model(config, transformer)
    # A bf16 / fp16 base gets a float32 adapter (peft's autocast): its small updates survive rounding.
    from peft.tuners.tuners_utils import cast_adapter_dtype

    cast_adapter_dtype(transformer, "default", autocast_adapter_dtype=True)
    transformer.to(device)
    g = torch.Generator().manual_seed(seed)
    start = 0
    state = None
    if resume is not None:
        resume = Path(resume)
        state_path = resume / STATE_FILE
        if not state_path.is_file():
            raise ConfigError(f"resume={str(resume)!r}: no {STATE_FILE} there; resume from a folder train_lora wrote")
        state = torch.load(state_path, weights_only=True)
        saved = json.loads(state["settings"])
        if _settings_key(saved) != _settings_key(settings):
            diff = sorted(k for k in _settings_key(settings) if saved.get(k) != settings[k])
            raise ConfigError(f"resume: the saved run differs in {diff}; resume with the same settings or start afresh")
        load_lora(resume / "lora-diffusers.safetensors", transformer)
        task.load(resume)
        start = int(state["step"])
        if start >= steps:
            raise ConfigError(f"resume: the saved run already did {start} steps; ask for steps > {start}")
        g.set_state(state["generator"])
    applied_stack = apply_stack(transformer, *configs) if configs else Stack()
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    opt, opt_name = _optimizer(
        [{"params": lora_params, "lr": lr}, {"params": task.parameters(), "lr": lr}], optimizer, device
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    params = lora_params + task.parameters()
    warmup = max(1, min(20, steps // 10))

    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    result = LoraTrainingResult(
        out=out, files={}, embedding=None, steps=steps, start_step=start, losses=[], optimizer=opt_name,
        stack=applied_stack.names(), plan=explanation, seconds=0.0, step_seconds=0.0, peak_bytes=0, peak_what="",
    )  # fmt: skip
    before = None
    if task.kind == "zoo":
        before = _sample_validation(task, transformer, [task.new_label] * 8, seed=7)
        result.distances["before"] = class_distances(before)
    transformer.train()
    began = time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        x0, cond = task.batch(batch, g, compute_dtype)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g)).to(device)
        opt.zero_grad(set_to_none=True)
        local = 0.0
        for i in range(accumulate):  # micro-batches of the global batch every rank drew; each split over the ranks
            micro = ranks.part(task, batch, accumulate, i, x0, noise, t, cond)
            xm, nm, tm, cm = ranks.shard(task, batch // accumulate, *micro)
            tt = tm.view(-1, *([1] * (xm.ndim - 1)))
            xt = ((1 - tt) * xm + tt * nm).to(compute_dtype)
            # all but the last micro-step keep their gradients on this rank: one average per optimizer step
            with ranks.no_sync(transformer) if i < accumulate - 1 else contextlib.nullcontext():
                pred = task.call(transformer, xt, tm * task.timestep_scale, cm)
                loss = torch.nn.functional.mse_loss(pred.float(), nm - xm) / accumulate
                # the condition (a trained embedding's output) is shared by the micro-batches: keep its graph
                loss.backward(retain_graph=i < accumulate - 1)
            local += float(loss.detach())
        whole = ranks.loss(torch.tensor(local))  # the whole batch's loss (every rank gets the same, so all stop together)
        if not math.isfinite(whole):
            raise HookwiseError(f"train_lora: the loss is {whole} at step {step + 1}; lower lr (now {lr})")
        scale = min(1.0, (step + 1) / warmup)
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ranks.sync_extra(task.parameters())  # the LoRA's gradients are averaged by DataParallel
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seconds = time.perf_counter() - t0
        result.losses.append(whole)
        written = None
        if validate_every and (step + 1) % validate_every == 0 and step + 1 < steps:
            written = _write_validation(task, transformer, out / "validation" / f"step-{step + 1:06d}",
                                         title=f"step {step + 1}", stack=validation_stack,
                                         reports=result.switches, write=ranks.main)  # fmt: skip
            result.validations.append(written)
        if progress is not None:
            progress(StepInfo(step + 1, steps, result.losses[-1], seconds, _peak(device)[0], written))
    result.seconds = time.perf_counter() - began
    result.step_seconds = result.seconds / max(1, steps - start)
    result.peak_bytes, result.peak_what = _peak(device)
    result.validations.append(_write_validation(task, transformer, out / "validation" / f"step-{steps:06d}",
                                                 title=f"step {steps}", stack=validation_stack,
                                                 reports=result.switches, write=ranks.main))  # fmt: skip
    if not ranks.main:
        return result
    if before is not None:
        after = _sample_validation(task, transformer, [task.new_label] * 8, seed=7)
        result.distances["after"] = class_distances(after)
        name = task.class_name
        result.grid = save_rows_png(
            [(f"{name}: before", before), (f"{name}: step {steps}", after)], out / "before-after.png",
            title=f"{loaded.spec.name} + LoRA rank {rank}: {name!r}",
        )  # fmt: skip
    _save(result, transformer, task, opt, g, steps, settings, formats)
    return result


def _save(result: LoraTrainingResult, transformer: nn.Module, task: Any, opt: torch.optim.Optimizer,
          g: torch.Generator, step: int, settings: dict[str, Any], formats: Sequence[str]) -> None:  # fmt: skip
    out = result.out
    metadata = {"hookwise_training": json.dumps({**settings, "step": step})}
    for fmt in ("diffusers", *[f for f in formats if f != "diffusers"]):  # diffusers always: resume reads it
        path = out / f"lora-{fmt}.safetensors"
        try:
            save_lora(transformer, path, fmt, metadata)
        except ConfigError as exc:  # bfl / kohya original names exist only for known architectures
            result.skipped_formats[fmt] = str(exc)
            logger.warning("LoRA not saved in the %s format: %s", fmt, exc)
            continue
        result.files[fmt] = path
    result.embedding = task.save(out)
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "generator": g.get_state(),
        "torch_rng": torch.get_rng_state(),
        "settings": json.dumps(settings),
    }
    torch.save(state, out / STATE_FILE)
    summary = {k: v for k, v in result.__dict__.items() if k not in ("losses",)}
    summary["final_loss"] = result.losses[-1] if result.losses else None
    (out / "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
