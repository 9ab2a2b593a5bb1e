"""Predict and choose: every stack the technique table offers, its predicted peaks, time and quality.

Stacks are enumerated from the table: every compatible set of techniques that declare a cost (by
the table's conflicts, at most one of an `exclusive` group, only those that serve the job), each
expanded into the configs its cost declaration offers for the footprint and machine, in layer
order (casting shrinks the footprint before offloading places it), without a config that refuses
to follow one before it (or that one to precede it: `hookwise.apply`'s order check). A new technique with a cost
declaration appears here by itself.

For each stack:

- device peak = max over the phases of a generation of what the device holds: while denoising,
  the denoiser's resident weights + transient buffers (slots, a dequantized weight) + activations
  (+ the LoRA with its gradients and Adam states when training) + the other components left on
  the device; while the VAE decodes, the VAE and its decode buffers (tiling / slicing bound them);
- RAM: the weights kept in host memory;
- time per step relative to the all-resident model: max(compute x compute factor + 50 us per group
  loaded, bytes moved / host->device rate + bytes read / disk rate) / compute, the bound the
  offload benchmark uses, with compute = the job's FLOPs / the device's rate; on several GPUs
  (`Hardware.gpus`), plus the bytes a rank sends to the others / the link's rate, not overlapped
  (the parallel techniques' declared model: an estimate, not a measurement);
- quality class: "exact", or each lossy technique's class.

What fits: every resource under its size less a margin (5% + 512 MiB by default). Ranking by goal:
"quality" (exact first, then the fastest), "speed" (the fastest, step caches included), "memory"
(the smallest device peak), "balanced" (the fastest without skipping computation; fp8 only where
it is clearly faster than every exact stack that fits).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..core.cost import ActivationTerm, CostContext, Placement
from ..core.techniques import Technique, refusal, techniques
from ..errors import ConfigError
from .estimate import formula_activation, latent_shape, sequence_length
from .footprint import Target, hidden_size, label
from .hardware import Hardware
from .job import Job

GOALS = ("balanced", "quality", "speed", "memory")
MIB = 2**20
GIB = 2**30
DEFAULT_MARGIN = (0.05, 512 * MIB)
BALANCED_FP8_GAIN = 0.15  # fp8 storage is chosen over exact stacks only when this much faster
TRANSFER_OVERHEAD = 50e-6  # seconds of hooks and copy launches per group loaded, on the compute stream
LORA_BYTES_PER_PARAM = 2 + 2 + 8  # bf16 parameter and gradient, fp32 Adam moments


def margin_of(size: int, margin: tuple[float, int] = DEFAULT_MARGIN) -> int:
    share, fixed = margin
    return int(size * share + fixed)


def usable(size: int, margin: tuple[float, int] = DEFAULT_MARGIN) -> int:
    """What a plan may use of `size` bytes: the size less the margin."""
    return max(size - margin_of(size, margin), 0)


def fmt(n: float) -> str:
    """Bytes for people, in GiB above 1 GiB."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB" if abs(n) >= MIB else f"{n / 1024:.0f} KiB"


@dataclass(frozen=True)
class Inputs:
    """Everything a prediction reads besides the stack."""

    target: Target
    job: Job
    hardware: Hardware
    activation_bytes: int
    activation_method: str
    lora_bytes: int
    flops: float
    measurements: dict[str, Any] = field(default_factory=dict)
    margin: tuple[float, int] = DEFAULT_MARGIN
    vae_bytes: dict[tuple[bool, bool], int] = field(default_factory=dict)  # (tiling, slicing) -> decode bytes
    modelled: tuple[str, ...] = ()


@dataclass(frozen=True)
class Option:
    """One candidate stack and its prediction."""

    configs: tuple[Any, ...]  # techniques on the denoiser
    pipeline_configs: tuple[Any, ...] = ()  # techniques on the pipeline (component offloading)
    settings: tuple[str, ...] = ()  # pipeline settings: "vae_tiling", "vae_slicing"
    device_peak: int = 0
    ram_peak: int = 0
    disk_bytes: int = 0
    weights_on_device: int = 0
    transient_bytes: int = 0
    activation_bytes: int = 0
    moved_bytes: int = 0
    disk_read_bytes: int = 0
    comm_bytes: int = 0  # sent by each GPU to the others per step (parallel techniques)
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    time_rel: float = 1.0
    quality: tuple[str, ...] = ()
    fits: bool = True
    failure: str | None = None  # the first resource that fails, and by how much
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        parts = [label(c) for c in self.configs] + [label(c) for c in self.pipeline_configs] + list(self.settings)
        return " + ".join(parts) or "all resident"

    @property
    def quality_class(self) -> str:
        return ", ".join(self.quality) if self.quality else "exact"

    @property
    def quality_rank(self) -> float:
        """0 exact, 1 lower-precision storage, 2+ step caches (lower PSNR ranks lower)."""
        rank = 0.0
        for q in self.quality:
            if q.startswith("cached"):
                psnr = _psnr(q)
                rank = max(rank, 2.0 + (max(60.0 - psnr, 0.0) / 100.0 if psnr is not None else 0.5))
            else:
                rank = max(rank, 1.0)
        return rank

    @property
    def bound(self) -> str:
        return "transfer-bound" if self.step_seconds > self.compute_seconds * 1.0001 else "compute-bound"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "techniques": [c.to_dict() for c in self.configs],
            "pipeline_techniques": [c.to_dict() for c in self.pipeline_configs],
            "settings": list(self.settings),
            "device_peak": self.device_peak,
            "ram_peak": self.ram_peak,
            "disk_bytes": self.disk_bytes,
            "weights_on_device": self.weights_on_device,
            "transient_bytes": self.transient_bytes,
            "activation_bytes": self.activation_bytes,
            "moved_bytes": self.moved_bytes,
            "disk_read_bytes": self.disk_read_bytes,
            "comm_bytes": self.comm_bytes,
            "compute_seconds": self.compute_seconds,
            "step_seconds": self.step_seconds,
            "time_rel": self.time_rel,
            "quality": self.quality_class,
            "fits": self.fits,
            "failure": self.failure,
            "notes": list(self.notes),
        }


def _psnr(quality: str) -> float | None:
    try:
        return float(quality.split("@", 1)[1].split("dB")[0])
    except (IndexError, ValueError):
        return None


def _serves(tech: Technique, job: Job) -> bool:
    cost = tech.cost
    return cost is not None and (cost.training if job.training else cost.sampling)


def _compatible(group: Sequence[Technique]) -> bool:
    for a, b in itertools.combinations(group, 2):
        if b.name in a.conflicts or a.name in b.conflicts:
            return False
        if a.cost.exclusive is not None and a.cost.exclusive == b.cost.exclusive:
            return False
    return True


def _sets(candidates: Sequence[Technique]) -> list[tuple[Technique, ...]]:
    out = []
    for size in range(len(candidates) + 1):
        for group in itertools.combinations(candidates, size):
            if _compatible(group):
                out.append(tuple(sorted(group, key=lambda t: (t.layer, t.name))))
    return out


def _expand(
    group: Sequence[Technique],
    placement: Placement,
    ctx: CostContext,
    before: tuple[Any, ...] = (),
    memo: dict[tuple[Any, ...], Any] | None = None,
) -> list[tuple[tuple[Any, ...], Placement]]:
    """Every config sequence for `group` (in layer order) with the placement it leads to; a config that
    refuses to follow one of `before` (or one of those to precede it) is not offered after it.

    `memo` (one per `ctx`) keeps each technique's options and effects by placement and config: the
    sets of techniques share their members, so the same step is reached from many sets (a declared
    effect is a function of its placement, config and context)."""
    if not group:
        return [((), placement)]
    first, rest = group[0], group[1:]
    out = []
    for config in _memoized(memo, ("options", first.name, placement), lambda: first.cost.options(placement, ctx)):
        if any(refusal(earlier, config) for earlier in before):
            continue
        after = _memoized(memo, ("effect", first.name, placement, config), lambda: first.cost.effect(placement, config, ctx))
        for configs, final in _expand(rest, after, ctx, (*before, config), memo):
            out.append(((config, *configs), final))
    return out


def _memoized(memo: dict[tuple[Any, ...], Any] | None, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """`compute()`, kept in `memo` under `key`; computed each time without a memo or for an unhashable key."""
    if memo is None:
        return compute()
    try:
        return memo[key]
    except KeyError:
        memo[key] = value = compute()
        return value
    except TypeError:  # a config with an unhashable field
        return compute()


def activation_term(inputs: Inputs) -> ActivationTerm | None:
    """A training job's activation estimate split per main-tower block, for checkpointing's cost.

    The estimate is one number (run on fake tensors, or the formula) for the job as stated; the
    formula's shares with and without checkpointing split it into what runs, what each block keeps
    for backward, and what it keeps when checkpointed (its inputs).
    """
    job = inputs.job
    if not job.training:
        return None
    model_map = inputs.target.denoiser.model_map
    hidden = hidden_size(model_map)
    itemsize = inputs.target.denoiser.footprint.compute_itemsize
    off = formula_activation(model_map, replace(job, checkpointing=False), hidden, itemsize)
    on = formula_activation(model_map, replace(job, checkpointing=True), hidden, itemsize)
    stated = on if job.uses_checkpointing else off
    scale = inputs.activation_bytes / stated.activation_bytes if stated.activation_bytes else 1.0
    every = len(model_map.blocks) or 1
    main = len([b for t in model_map.main_towers for b in t.blocks]) or len(model_map.blocks)
    kept = int(off.saved_for_backward_bytes / every * scale)
    kept_inputs = int(on.saved_for_backward_bytes / every * scale)
    # What the blocks outside the main towers keep stays with what runs: checkpointing leaves them be.
    running = max(int(off.activation_bytes * scale) - main * kept, 0)
    return ActivationTerm(running, (kept,) * main, (kept_inputs,) * main, checkpointed=job.uses_checkpointing)


def _context(inputs: Inputs, room: int, ram_room: int) -> CostContext:
    job = inputs.job
    passes = job.calls_per_step * (2 if job.training else 1)
    model_map = inputs.target.denoiser.model_map
    itemsize = inputs.target.denoiser.footprint.compute_itemsize
    linear = [leaf for leaf in model_map.leaves if leaf.kind == "linear" and len(leaf.shape) == 2]
    out_features = int(linear[-1].shape[0]) if linear else 0  # the output projection, last in the map
    lora_params = inputs.lora_bytes // LORA_BYTES_PER_PARAM
    return CostContext(
        hardware=inputs.hardware,
        job=job,
        device_room=room,
        ram_room=ram_room,
        passes=passes,
        training=job.training,
        video=job.frames > 1,
        cfg=job.cfg,
        measurements=inputs.measurements,
        activations=activation_term(inputs),
        tokens=sequence_length(model_map, job),
        hidden=hidden_size(model_map),
        attention_layers=sum(1 for a in model_map.attention if a.kind != "cross"),
        trainable_bytes=lora_params * 2,  # bf16 gradients, as the LoRA's bytes are counted
        output_bytes=latent_shape(model_map, job)[0] * job.effective_batch * out_features * itemsize,
    )


def _settings_options(inputs: Inputs) -> list[tuple[str, ...]]:
    vae = inputs.target.vae
    if vae is None:
        return [()]
    out: list[tuple[str, ...]] = [()]
    if hasattr(vae, "enable_tiling"):
        out.append(("vae_tiling",))
    if hasattr(vae, "enable_slicing") and inputs.job.batch > 1:
        out.append(("vae_slicing",))
        if hasattr(vae, "enable_tiling"):
            out.append(("vae_tiling", "vae_slicing"))
    return out


def enumerate_options(inputs: Inputs) -> list[Option]:
    """Every stack the table offers for this target, job and machine, predicted."""
    job, hw = inputs.job, inputs.hardware
    base_ctx = _context(inputs, 0, usable(hw.ram, inputs.margin))
    model_techs = [t for t in techniques() if _serves(t, job) and t.cost.scope == "model"
                   and (t.cost.offered is None or t.cost.offered(base_ctx))]  # fmt: skip
    pipe_techs = [t for t in techniques() if _serves(t, job) and t.cost.scope == "pipeline"] if inputs.target.pipeline else []
    device_usable = usable(hw.vram_free, inputs.margin)
    ram_usable = usable(hw.ram, inputs.margin)
    fp = inputs.target.denoiser.footprint
    others = inputs.target.others_footprint()
    options: list[Option] = []
    seen: set[str] = set()
    pipe_memo: dict[tuple[Any, ...], Any] = {}
    for pipe_group in _sets(pipe_techs):
        for pipe_configs, others_placed in _expand(pipe_group, Placement.resident(others), base_ctx, memo=pipe_memo):
            room = device_usable - inputs.activation_bytes - inputs.lora_bytes - others_placed.device_bytes
            ram_room = ram_usable - others_placed.host_bytes
            ctx = _context(inputs, room, ram_room)
            memo: dict[tuple[Any, ...], Any] = {}
            for group in _sets(model_techs):
                for configs, placed in _expand(group, Placement.resident(fp), ctx, memo=memo):
                    if placed.ranks > 1 and placed.ranks != getattr(hw, "gpus", 1):
                        continue  # a parallel split that leaves GPUs idle: another stack uses them all
                    for settings in _settings_options(inputs):
                        option = predict(inputs, configs, pipe_configs, settings, placed, others_placed, ctx)
                        key = option.label
                        if key not in seen:
                            seen.add(key)
                            options.append(option)
    return options


def predict(
    inputs: Inputs,
    configs: tuple[Any, ...],
    pipe_configs: tuple[Any, ...],
    settings: tuple[str, ...],
    placed: Placement,
    others: Placement,
    ctx: CostContext,
) -> Option:
    """The prediction for one stack, from the placements its cost declarations gave."""
    hw = inputs.hardware
    target = inputs.target
    tiling, slicing = "vae_tiling" in settings, "vae_slicing" in settings
    vae_decode = inputs.vae_bytes.get((tiling, slicing), 0)
    activations = inputs.activation_bytes if placed.activation_bytes is None else placed.activation_bytes
    activations = int(activations * placed.activation_share)
    lora = int(inputs.lora_bytes * placed.lora_share)  # sharded training holds 1/N of it per rank
    denoise = placed.device_bytes + placed.transient_bytes + activations + lora + others.device_bytes
    phases = [denoise]
    if target.pipeline:
        vae_weights = target.components["vae"].footprint.total_bytes if "vae" in target.components else 0
        if others.device_bytes == 0:  # component offloading: each other component alone, loaded when called
            largest_other = max((c.footprint.total_bytes for c in target.others), default=0)
            # A denoiser whose weights offloading manages stays as placed; else it is dropped too.
            managed = placed.host_bytes or placed.disk_bytes
            kept = placed.device_bytes + placed.transient_bytes if managed else 0
            phases.append(max(largest_other, vae_weights + vae_decode) + kept)
        else:
            phases.append(placed.device_bytes + placed.transient_bytes + others.device_bytes + vae_decode)
    device_peak = max(phases)
    ram_peak = placed.host_bytes + others.host_bytes
    rate = hw.tflops * 1e12
    plain_compute = inputs.flops / rate if rate > 0 else 0.0
    compute = plain_compute * placed.compute_factor + placed.transfers * TRANSFER_OVERHEAD
    transfer = 0.0
    if placed.moved_bytes:
        transfer += placed.moved_bytes / hw.h2d
    if placed.disk_read_bytes:
        transfer += placed.disk_read_bytes / hw.disk_read
    step = max(compute, transfer)
    if placed.comm_bytes:
        step += placed.comm_bytes / getattr(hw, "link", float("inf"))
    time_rel = step / plain_compute if plain_compute > 0 else 1.0
    if hw.shared:  # computing on the CPU: the "device" and the host are one RAM
        checks = [("RAM", device_peak + ram_peak, usable(hw.ram, inputs.margin), hw.ram)]
    else:
        checks = [
            ("device memory", device_peak, usable(hw.vram_free, inputs.margin), hw.vram_free),
            ("RAM", ram_peak, usable(hw.ram, inputs.margin), hw.ram),
        ]
    failure = None
    for what, need, has, size in checks:
        if need > has:
            failure = f"{what}: needs {fmt(need)}, {fmt(has)} usable of {fmt(size)} (short by {fmt(need - has)})"
            break
    return Option(
        configs=tuple(configs),
        pipeline_configs=tuple(pipe_configs),
        settings=settings,
        device_peak=int(device_peak),
        ram_peak=int(ram_peak),
        disk_bytes=int(placed.disk_bytes),
        weights_on_device=int(placed.device_bytes + others.device_bytes),
        transient_bytes=int(placed.transient_bytes),
        activation_bytes=int(activations),
        moved_bytes=int(placed.moved_bytes),
        disk_read_bytes=int(placed.disk_read_bytes),
        comm_bytes=int(placed.comm_bytes),
        compute_seconds=compute,
        step_seconds=step,
        time_rel=time_rel,
        quality=placed.quality + others.quality,
        fits=failure is None,
        failure=failure,
        notes=placed.notes + others.notes,
    )


def _complexity(option: Option) -> int:
    return len(option.configs) + len(option.pipeline_configs) + len(option.settings)


def rank(options: Sequence[Option], goal: str) -> list[Option]:
    """The options that fit, best first for `goal`; raises `ConfigError` for an unknown goal."""
    if goal not in GOALS:
        raise ConfigError(f"goal={goal!r}: use one of {', '.join(GOALS)}")
    fitting = [o for o in options if o.fits]

    def tie(o: Option) -> tuple:
        # Then the order the cost declarations offered their configs in (the sort is stable):
        # their most accurate or most resident variant first.
        return (_complexity(o),)

    def quick(o: Option) -> float:
        return round(o.time_rel, 2)

    if goal == "quality":
        return sorted(fitting, key=lambda o: (o.quality_rank, quick(o), *tie(o)))
    if goal == "speed":
        return sorted(fitting, key=lambda o: (quick(o), o.quality_rank, *tie(o)))
    if goal == "memory":
        return sorted(fitting, key=lambda o: (o.device_peak, o.quality_rank, quick(o), *tie(o)))
    # balanced: never skip computation; fp8 only when clearly faster than the best exact stack
    kept = [o for o in fitting if o.quality_rank < 2] or fitting
    exact = [o.time_rel for o in kept if o.quality_rank == 0]
    best_exact = min(exact) if exact else float("inf")

    def balanced(o: Option) -> tuple:
        if o.quality_rank == 0:
            score = quick(o)
        elif o.time_rel * (1 + BALANCED_FP8_GAIN) <= best_exact:
            score = quick(o)
        else:
            score = best_exact + quick(o)  # behind every exact stack
        return (score, o.quality_rank, *tie(o))

    ordered = sorted(kept, key=balanced)
    return ordered + sorted((o for o in fitting if o not in kept), key=lambda o: (quick(o), *tie(o)))


def unfit(options: Sequence[Option]) -> list[Option]:
    """The options that do not fit, closest to fitting first."""
    return sorted((o for o in options if not o.fits), key=lambda o: (o.device_peak, o.ram_peak))


def explain(inputs: Inputs, chosen: Option | None, ranked: Sequence[Option], options: Sequence[Option], goal: str) -> str:
    """A paragraph: what was chosen, what it costs, and why."""
    job, hw = inputs.job, inputs.hardware
    what = "LoRA training" if job.training else "sampling"
    shape = f"{job.height}x{job.width}" + (f"x{job.frames} frames" if job.frames > 1 else "") + f", batch {job.batch}"
    if job.cfg:
        shape += f", CFG {job.cfg}"
    if not job.training:
        shape += f", {job.num_steps} steps"
    head = (
        f"{what.capitalize()} {inputs.target.denoiser.model_map.model_cls} at {shape} on {hw.name} "
        f"({fmt(hw.vram_free)} device memory, {fmt(hw.ram)} RAM; margin {inputs.margin[0]:.0%} + {fmt(inputs.margin[1])} each): "
        f"{len(ranked)} of {len(options)} stacks fit."
    )
    if chosen is None:
        closest = unfit(options)[:1]
        tail = f" The closest, {closest[0].label}, fails on {closest[0].failure}." if closest else ""
        return head + " None fits." + tail + " Lower the resolution or batch, or plan for a larger machine."
    act = f"{fmt(chosen.activation_bytes)} of activations ({inputs.activation_method})"
    body = (
        f" Chosen for goal '{goal}': {chosen.label}. Predicted device peak {fmt(chosen.device_peak)} "
        f"({fmt(chosen.weights_on_device)} of weights resident, {fmt(chosen.transient_bytes)} of transient buffers, {act}"
        + (f", {fmt(inputs.lora_bytes)} of LoRA with gradients and optimizer state" if inputs.lora_bytes else "")
        + f"), {fmt(chosen.ram_peak)} in RAM"
        + (f", {fmt(chosen.disk_bytes)} on disk" if chosen.disk_bytes else "")
        + f"; a step takes about {chosen.time_rel:.2f}x the all-resident time ({chosen.bound}"
        + (f": {fmt(chosen.moved_bytes)} moved per step at {hw.h2d / 1e9:.0f} GB/s"
           if chosen.moved_bytes and hw.h2d != float("inf") else "")
        + f"); quality {chosen.quality_class}."
    )
    why = {
        "quality": " Goal 'quality' takes the most exact stack that fits, then the fastest of those.",
        "speed": " Goal 'speed' takes the fastest stack that fits, step caches included.",
        "memory": " Goal 'memory' takes the stack with the smallest device peak.",
        "balanced": " Goal 'balanced' takes the fastest stack that computes every step, preferring exact weights "
        f"unless fp8 storage is at least {BALANCED_FP8_GAIN:.0%} faster; simpler stacks win ties.",
    }[goal]
    plain = next((o for o in options if not o.configs and not o.pipeline_configs and not o.settings), None)
    if plain is not None and not plain.fits and plain is not chosen:
        why += f" All resident does not fit ({plain.failure})."
    runner = next((o for o in ranked if o is not chosen), None)
    if runner is not None:
        why += f" Next: {runner.label} ({runner.time_rel:.2f}x, {fmt(runner.device_peak)}, {runner.quality_class})."
    modelled = "; ".join(inputs.modelled)
    return head + body + why + (f" Modelled rather than run: {modelled}." if modelled else "")


def with_fallback_note(option: Option, note: str) -> Option:
    return replace(option, notes=(*option.notes, note))
