"""`hookwise.optimize()` and `Plan`: measure, predict, choose, apply, verify.

    plan = hookwise.optimize(pipe, hookwise.Job(height=1024, width=1024), goal="balanced", vram="24GB")
    print(plan.explain())

`make_plan` measures the target (exact bytes from the model map), estimates the step's activations,
enumerates and predicts every stack the technique table offers (`choose.py`) and ranks them.
`optimize` also applies the choice and watches the first real call of the denoiser: it measures the
peak (CUDA allocator statistics; on the CPU the storages the call creates) and warns when it is
more than 10% off the prediction; an out-of-memory error in that call falls back, once, to the next
strategy: the techniques that differ are removed (exactly: a technique whose removal is lossy is
only ever kept, never swapped), the next one applied, the call run again, and the plan says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..core.hooks import Layer, ModelHook, add_hook, get_hook, remove_hook, unwrap
from ..core.techniques import technique_named, technique_of
from ..errors import ConfigError
from ..introspect import describe_cache
from ..stack import Stack
from ..stack import apply as apply_stack
from ..stack import remove as remove_stack
from . import choose
from ._measure import measure_call
from .estimate import ActivationEstimate, ActivationEstimator, estimate_activations, stack_peak, step_flops, vae_decode_bytes
from .footprint import DENOISER_NAMES, Target, hidden_size, lora_params, measure, modules_of, storage_table
from .hardware import Hardware
from .job import Job

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

logger = logging.getLogger("hookwise.plan")

VERIFY_HOOK = "hookwise.plan.first_step"
TOLERANCE = 0.10  # a measured peak this far from the prediction is worth a warning
# The step-cache harness results ship inside the package (docs/ holds the same files for people), one
# file per kind of job (video or image) and step count the harness measured at.
HARNESS_DATA = "data"
HARNESS_FILES: dict[str, dict[int, str]] = {
    "image": {28: "cache-flux-shapes.json", 50: "cache-flux-shapes-50.json"},
    "video": {28: "cache-wan-moving.json", 50: "cache-wan-moving-50.json"},
}


def harness_steps(job: Job) -> int:
    """The step count of the shipped harness rows nearest the job's `num_steps` (on a tie, the fewer steps:
    the rows measured with larger skips, so the quality they state is not the better one)."""
    measured = HARNESS_FILES["video" if job.frames > 1 else "image"]
    return min(measured, key=lambda steps: (abs(steps - job.num_steps), steps))


def harness_file(job: Job, folder: Path | None = None) -> Traversable:
    """Where the step-cache harness rows for this kind of job (video or image), measured at the step
    count nearest the job's (`harness_steps`), are read from: `folder`, or the copy installed with the package."""
    name = HARNESS_FILES["video" if job.frames > 1 else "image"][harness_steps(job)]
    if folder is not None:
        return Path(folder) / name
    return resources.files(__package__).joinpath(HARNESS_DATA, name)


def harness_results(job: Job, folder: Path | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """The shipped step-cache harness rows for this kind of job (video or image) at the step count nearest
    the job's, and their file."""
    path = harness_file(job, folder)
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], None
    return (rows if isinstance(rows, list) else []), str(path)


@dataclass
class Plan:
    """A chosen stack with its prediction, every option considered, and what happened when applied."""

    job: Job
    hardware: Hardware
    goal: str
    chosen: choose.Option | None
    ranked: list[choose.Option]
    options: list[choose.Option]
    explanation: str
    activation: ActivationEstimate
    model_cls: str = ""
    storage: list[dict[str, Any]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # fallbacks and verification, in order
    measured: dict[str, Any] | None = None
    # Where the chosen option's device peak comes from: "declarations" (composed from each technique's
    # cost declaration and the activation estimate) or "fake run with the stack" (`stack_check`).
    peak_source: str = "declarations"

    # ---- reading ------------------------------------------------------------------------------
    @property
    def stack(self) -> Stack:
        """The denoiser's stack, as data."""
        return Stack(*(self.chosen.configs if self.chosen else ()))

    @property
    def pipeline_configs(self) -> tuple[Any, ...]:
        return self.chosen.pipeline_configs if self.chosen else ()

    @property
    def settings(self) -> tuple[str, ...]:
        return self.chosen.settings if self.chosen else ()

    @property
    def prediction(self) -> dict[str, Any]:
        return self.chosen.to_dict() if self.chosen else {}

    def explain(self) -> str:
        """The choice and why, in a paragraph (with what happened since, if anything)."""
        return self.explanation + ("" if not self.events else " " + " ".join(self.events))

    def python_line(self, name: str = "model") -> str:
        """The Python that applies this plan's stack to `name` (the denoiser)."""
        if self.chosen is None:
            return "# nothing fits"
        lines = []
        if self.chosen.configs:
            args = ", ".join(_config_source(c) for c in self.chosen.configs)
            lines.append(f"hookwise.apply({name}, {args})")
        for config in self.chosen.pipeline_configs:
            lines.append(f"hookwise.memory.apply_component_offload(pipe, {_config_source(config)})")
        for setting in self.chosen.settings:
            lines.append(f"pipe.vae.enable_{setting.removeprefix('vae_')}()")
        return "\n".join(lines) or "# nothing to apply: the model fits as it is"

    # ---- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "hookwise.plan",
            "version": 1,
            "model": self.model_cls,
            "goal": self.goal,
            "job": self.job.to_dict(),
            "hardware": self.hardware.to_dict(),
            "activation": {
                "bytes": self.activation.activation_bytes,
                "method": self.activation.method,
                "saved_for_backward_bytes": self.activation.saved_for_backward_bytes,
                "modelled": list(self.activation.modelled),
            },
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "options": [o.to_dict() for o in self.ranked] + [o.to_dict() for o in choose.unfit(self.options)],
            "explanation": self.explanation,
            "storage": self.storage,
            "events": list(self.events),
            "measured": self.measured,
            "peak_source": self.peak_source,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != "hookwise.plan":
            raise ConfigError("not a hookwise plan: expected the JSON that Plan.to_json() writes")
        options = [_option_from_dict(o) for o in data.get("options", [])]
        chosen = _option_from_dict(data["chosen"]) if data.get("chosen") else None
        act = data.get("activation", {})
        return cls(
            job=Job.from_dict(data["job"]),
            hardware=Hardware.from_dict(data["hardware"]),
            goal=data.get("goal", "balanced"),
            chosen=chosen,
            ranked=[o for o in options if o.fits],
            options=options,
            explanation=data.get("explanation", ""),
            activation=ActivationEstimate(int(act.get("bytes", 0)), act.get("method", "given"),
                                          int(act.get("saved_for_backward_bytes", 0)), tuple(act.get("modelled", ()))),
            model_cls=data.get("model", ""),
            storage=list(data.get("storage", [])),
            events=list(data.get("events", [])),
            measured=data.get("measured"),
            peak_source=data.get("peak_source", "declarations"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"plan JSON does not parse: {exc}") from exc
        return cls.from_dict(data)

    # ---- applying -----------------------------------------------------------------------------
    def apply(self, model_or_pipe: Any) -> Plan:
        """Apply the chosen stack (and pipeline techniques and settings) to `model_or_pipe`."""
        if self.chosen is None:
            raise ConfigError("this plan has no stack that fits; plan again for a larger machine or a smaller job")
        _apply_option(model_or_pipe, self.chosen)
        return self


def _config_source(config: Any) -> str:
    defaults = None
    try:
        defaults = type(config)()
    except Exception:  # a config with required fields: show them all
        pass
    args = []
    for f in fields(config):
        value = getattr(config, f.name)
        if defaults is not None and getattr(defaults, f.name) == value:
            continue
        if isinstance(value, torch.dtype):
            text = f"torch.{str(value).removeprefix('torch.')}"
        else:
            text = repr(value)
        args.append(f"{f.name}={text}")
    return f"hookwise.{type(config).__name__}({', '.join(args)})"


def _option_from_dict(data: dict[str, Any]) -> choose.Option:
    def configs(entries: Sequence[dict[str, Any]]) -> tuple[Any, ...]:
        return tuple(technique_named(e["technique"]).config_cls.from_dict(e) for e in entries)

    quality = data.get("quality", "exact")
    return choose.Option(
        configs=configs(data.get("techniques", [])),
        pipeline_configs=configs(data.get("pipeline_techniques", [])),
        settings=tuple(data.get("settings", [])),
        **{k: data[k] for k in ("device_peak", "ram_peak", "disk_bytes", "weights_on_device", "transient_bytes",
                                 "activation_bytes", "moved_bytes", "disk_read_bytes", "comm_bytes", "compute_seconds",
                                 "step_seconds", "time_rel", "fits", "failure") if k in data},
        quality=() if quality == "exact" else tuple(quality.split(", ")),
        notes=tuple(data.get("notes", ())),
    )  # fmt: skip


# ---- planning ---------------------------------------------------------------------------------------
def make_plan(
    model_or_pipe: Any,
    job: Job | None = None,
    hardware: Hardware | None = None,
    goal: str = "balanced",
    *,
    activation_estimator: ActivationEstimator | None = None,
    attention_backend: str = "flash",
    example_inputs: Any = None,
    margin: tuple[float, int] = choose.DEFAULT_MARGIN,
    measurements: dict[str, Any] | None = None,
    target: Target | None = None,
    stack_check: bool | None = None,
) -> Plan:
    """Measure, predict and choose without changing the model (it may live on `meta`).

    With `stack_check`, the best ranked options of a single model are run on fake tensors with their
    stack in place (`plan.peak.estimate_peak(stack=...)`), and the first that fits by that peak is
    chosen, its device peak the fake run's; where the run cannot be made, the declarations stand.
    `Plan.peak_source` says which. None (the default) checks, unless `activation_estimator` states the
    activations (a fake run would replace what the caller stated); False trusts the declarations
    alone (faster: no fake run per option).

    The model is described once per plan (`describe_cache`): every step that maps it reuses the map
    while the model is unchanged."""
    with describe_cache():
        return _make_plan(
            model_or_pipe, job, hardware, goal, activation_estimator=activation_estimator,
            attention_backend=attention_backend, example_inputs=example_inputs, margin=margin,
            measurements=measurements, target=target, stack_check=stack_check,
        )  # fmt: skip


def _make_plan(
    model_or_pipe: Any,
    job: Job | None,
    hardware: Hardware | None,
    goal: str,
    *,
    activation_estimator: ActivationEstimator | None,
    attention_backend: str,
    example_inputs: Any,
    margin: tuple[float, int],
    measurements: dict[str, Any] | None,
    target: Target | None,
    stack_check: bool | None,
) -> Plan:
    job = job or Job()
    if stack_check is None:
        stack_check = activation_estimator is None
    if not isinstance(job, Job):
        raise ConfigError(f"job must be a hookwise.Job, got {type(job).__name__}")
    if goal not in choose.GOALS:
        raise ConfigError(f"goal={goal!r}: use one of {', '.join(choose.GOALS)}")
    hardware = hardware or Hardware.detect()
    target = target or measure(model_or_pipe)
    denoiser = target.denoiser
    hidden = hidden_size(denoiser.model_map)
    activation = estimate_activations(
        activation_estimator, denoiser.module, denoiser.model_map, job, hidden,
        compute_device=hardware.device, attention_backend=attention_backend, example_inputs=example_inputs,
        itemsize=denoiser.footprint.compute_itemsize,
    )  # fmt: skip
    lora = lora_params(denoiser.model_map, job.lora_rank) * choose.LORA_BYTES_PER_PARAM if job.training else 0
    modelled = list(activation.modelled)
    if job.training:
        modelled.append(f"LoRA rank {job.lora_rank} on the attention projections: parameter, gradient (bf16) and Adam state (fp32)")
    # The caller's figures by kind ("speed", "cache", ...); a kind not given is what hookwise ships (the
    # step-cache harness rows), so stating speed figures does not drop the cache options.
    measurements = dict(measurements or {})
    if "cache" not in measurements:
        rows, source = harness_results(job)
        measurements["cache"] = rows
        if rows and not job.training:
            steps = harness_steps(job)
            at = f"measured at {steps} steps" + ("" if steps == job.num_steps else f", the nearest to the job's {job.num_steps}")
            modelled.append(f"step-cache speed and PSNR from the shipped harness on a tiny reference model "
                            f"({Path(source).name}, {at})")  # fmt: skip
    vae = target.vae
    vae_bytes = {}
    if vae is not None:
        for tiling in (False, True):
            for slicing in (False, True):
                vae_bytes[(tiling, slicing)] = vae_decode_bytes(vae, job, tiling=tiling, slicing=slicing)
        modelled.append("VAE decode buffers by formula")
    if hardware.assumed:
        modelled.append("assumed " + ", ".join(hardware.assumed))
    inputs = choose.Inputs(
        target=target,
        job=job,
        hardware=hardware,
        activation_bytes=activation.activation_bytes,
        activation_method=activation.method,
        lora_bytes=lora,
        flops=step_flops(denoiser.model_map, job, hidden),
        measurements=measurements,
        margin=margin,
        vae_bytes=vae_bytes,
        modelled=tuple(modelled),
    )
    options = choose.enumerate_options(inputs)
    ranked = choose.rank(options, goal)
    chosen = ranked[0] if ranked else None
    source = "declarations"
    if stack_check and ranked and not target.pipeline:
        chosen, ranked, source = _check_stacks(
            denoiser.module, job, hardware, ranked, margin, attention_backend=attention_backend,
            example_inputs=example_inputs,
        )  # fmt: skip
    return Plan(
        job=job,
        hardware=hardware,
        goal=goal,
        chosen=chosen,
        ranked=ranked,
        options=options,
        explanation=choose.explain(inputs, chosen, ranked, options, goal),
        activation=activation,
        model_cls=denoiser.model_map.model_cls,
        storage=storage_table(target),
        peak_source=source,
    )


STACK_CHECKS = 3  # ranked options run with their stack before the declarations' choice stands


def _check_stacks(
    model: nn.Module, job: Job, hardware: Hardware, ranked: list[choose.Option], margin: tuple[float, int], *,
    attention_backend: str, example_inputs: Any,
) -> tuple[choose.Option | None, list[choose.Option], str]:
    """(chosen, ranked, peak source): the first of the best ranked options whose fake run with the
    stack fits, with the run's peak; the declarations' choice where no run could be made or none fits."""
    room = choose.usable(hardware.ram if hardware.shared else hardware.vram_free, margin)
    checked = list(ranked)
    for i, option in enumerate(ranked[:STACK_CHECKS]):
        unmodelled = [technique_of(c).name for c in option.configs if not technique_of(c).cost.fake_run]
        if unmodelled:  # several processes (the parallel techniques): the fake run cannot make them
            note = f"device peak per rank from the declarations: a fake run cannot model {', '.join(unmodelled)}"
            checked[i] = dataclasses.replace(option, notes=(*option.notes, note))
            return checked[i], checked, "declarations"
        report = stack_peak(model, job, option.configs, hardware=hardware, attention_backend=attention_backend,
                            example_inputs=example_inputs)  # fmt: skip
        if report is None:
            return ranked[0], ranked, "declarations"
        need = report.peak_bytes + (option.ram_peak if hardware.shared else 0)
        note = (f"device peak {choose.fmt(report.peak_bytes)} from a fake run with the stack in place (the "
                f"declarations gave {choose.fmt(option.device_peak)})")  # fmt: skip
        fits = need <= room
        checked[i] = dataclasses.replace(
            option, device_peak=int(report.peak_bytes), fits=fits, notes=(*option.notes, note),
            failure=None if fits else f"device memory by the fake run: needs {choose.fmt(need)}, {choose.fmt(room)} usable",
        )  # fmt: skip
        if fits:
            return checked[i], [o for o in checked if o.fits], "fake run with the stack"
    return ranked[0], ranked, "declarations"


def optimize(
    model_or_pipe: Any,
    job: Job | None = None,
    goal: str = "balanced",
    vram: int | str | None = None,
    ram: int | str | None = None,
    *,
    activation_estimator: ActivationEstimator | None = None,
    attention_backend: str = "flash",
    example_inputs: Any = None,
    margin: tuple[float, int] = choose.DEFAULT_MARGIN,
    verify: bool = True,
    stack_check: bool | None = None,
    **hardware: Any,
) -> Plan:
    """Plan for `model_or_pipe` (a module, a diffusers pipeline or a dict of modules), apply the
    choice and return the `Plan`.

    `vram`, `ram` and the other `Hardware.detect` keywords (`h2d="25GB/s"`, `gpu=`, `device=`,
    `tflops=`...) replace what would be measured; `stack_check` as for `make_plan` (on unless the
    activations are stated). With `verify`, the denoiser's first real call
    is measured against the prediction and falls back to the next strategy on out-of-memory.
    """
    hw = Hardware.detect(vram=vram, ram=ram, **hardware)
    with describe_cache():
        target = measure(model_or_pipe)
        plan = make_plan(
            model_or_pipe, job, hw, goal, activation_estimator=activation_estimator,
            attention_backend=attention_backend, example_inputs=example_inputs, margin=margin, target=target,
            stack_check=stack_check,
        )  # fmt: skip
    if plan.chosen is None:
        raise ConfigError(f"hookwise.optimize: no stack fits. {plan.explanation}")
    _apply_option(model_or_pipe, plan.chosen)
    logger.info("hookwise plan: %s", plan.explanation)
    if verify:
        denoiser = target.denoiser.module
        if get_hook(denoiser, VERIFY_HOOK) is None:
            add_hook(denoiser, _FirstStep(plan, model_or_pipe), VERIFY_HOOK)
    return plan


# ---- applying, restoring, falling back -----------------------------------------------------------
def _denoiser_of(obj: Any) -> nn.Module:
    """The denoiser module of a model, pipeline or dict, found as `measure` finds it (without mapping)."""
    if isinstance(obj, nn.Module):
        return unwrap(obj)
    modules = modules_of(obj) or {}
    for name in DENOISER_NAMES:
        if name in modules:
            return unwrap(modules[name])
    return unwrap(max(modules.values(), key=lambda m: sum(p.numel() for p in m.parameters())))


def _apply_option(obj: Any, option: choose.Option, *, keep: Sequence[Any] = ()) -> None:
    """Apply `option` to `obj`; configs in `keep` are on the model already."""
    denoiser = _denoiser_of(obj)
    new = [c for c in option.configs if c not in keep]
    if new:
        apply_stack(denoiser, *new)  # all or nothing
    done: list[Any] = []
    try:
        for config in option.pipeline_configs:
            technique_of(config).apply(obj, config)
            done.append(config)
        vae = _vae_of(obj)
        for setting in option.settings:
            getattr(vae, f"enable_{setting.removeprefix('vae_')}")()
    except BaseException:
        # Leave nothing half applied: what this call added goes again, newest first.
        for config in reversed(done):
            technique_of(config).remove(obj, config)
        if new:
            remove_stack(denoiser, *[technique_of(c).name for c in new])
        raise


def _restore(obj: Any, option: choose.Option, *, keep: Sequence[Any] = ()) -> None:
    """Undo what `_apply_option` did, except the configs in `keep`."""
    vae = _vae_of(obj)
    for setting in reversed(option.settings):
        getattr(vae, f"disable_{setting.removeprefix('vae_')}")()
    for config in reversed(option.pipeline_configs):
        technique = technique_of(config)
        if technique.remove is not None:
            technique.remove(obj, config)
    names = [technique_of(c).name for c in option.configs if c not in keep]
    if names:
        remove_stack(_denoiser_of(obj), *names)


def _vae_of(obj: Any) -> Any:
    if isinstance(obj, dict):
        return obj.get("vae")
    return getattr(obj, "vae", None)


def _lossy_undo(config: Any) -> bool:
    cost = technique_of(config).cost
    return cost is not None and not cost.exact_undo


def next_strategy(plan: Plan, failed: choose.Option) -> choose.Option | None:
    """The next ranked option after `failed` with a smaller device peak that keeps every config of
    `failed` whose removal would not restore the weights exactly; one of no lower quality if any."""
    lossy = [c for c in failed.configs if _lossy_undo(c)]
    ranked = plan.ranked
    start = ranked.index(failed) + 1 if failed in ranked else 0
    smaller = [
        o for o in ranked[start:] if o.device_peak < failed.device_peak and all(c in o.configs for c in lossy)
    ]
    as_good = [o for o in smaller if o.quality_rank <= failed.quality_rank]
    return (as_good or smaller or [None])[0]


class _FirstStep(ModelHook):
    """Measures the denoiser's first call against the plan; on out-of-memory, falls back once."""

    # Added after the stack (and its first-call check), at the outermost layer: it sees the whole call.
    layer = Layer.STATE

    def __init__(self, plan: Plan, obj: Any) -> None:
        self.plan = plan
        self.obj = obj

    def new_forward(self, module: nn.Module, next_fn: Any, *args: Any, **kwargs: Any) -> Any:
        plan = self.plan
        device = plan.hardware.device
        try:
            out, peak, how = measure_call(lambda: next_fn(*args, **kwargs), device)
        except torch.OutOfMemoryError as exc:
            remove_hook(module, VERIFY_HOOK)
            failed = plan.chosen
            fallback = next_strategy(plan, failed)
            if fallback is None:
                plan.events.append(f"The first step ran out of memory under {failed.label} and no smaller strategy is left.")
                raise
            keep = [c for c in failed.configs if c in fallback.configs]
            _restore(self.obj, failed, keep=keep)
            _apply_option(self.obj, fallback, keep=keep)
            plan.chosen = fallback
            message = (
                f"The first step ran out of memory under {failed.label} ({str(exc).splitlines()[0][:120]}); the model was "
                f"restored and the next strategy applied: {fallback.label} (predicted peak {choose.fmt(fallback.device_peak)})."
            )
            plan.events.append(message)
            warnings.warn("hookwise.optimize: " + message, stacklevel=2)
            out, peak, how = measure_call(lambda: module(*args, **kwargs), device)
        else:
            remove_hook(module, VERIFY_HOOK)
        _record(plan, peak, how)
        return out


def _record(plan: Plan, peak: int, how: str) -> None:
    chosen = plan.chosen
    predicted = chosen.device_peak
    if how == "cuda allocator":
        measured = peak
    else:  # what the call allocated, on top of what the plan keeps there for the whole step
        measured = chosen.weights_on_device + chosen.transient_bytes + peak
        if plan.job.training:
            measured += max(predicted - chosen.weights_on_device - chosen.transient_bytes - chosen.activation_bytes, 0)
    error = (measured - predicted) / predicted if predicted else 0.0
    plan.measured = {"peak": measured, "predicted": predicted, "error": error, "how": how, "call_bytes": peak}
    text = f"First step: measured peak {choose.fmt(measured)} ({how}) vs predicted {choose.fmt(predicted)} ({error:+.0%})."
    plan.events.append(text)
    if abs(error) > TOLERANCE:
        warnings.warn(f"hookwise.optimize: {text} The prediction is off by more than {TOLERANCE:.0%}.", stacklevel=3)

