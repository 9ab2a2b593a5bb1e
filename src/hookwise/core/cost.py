"""Cost declarations: what a technique does to the bytes and time of a step, stated next to its code.

Each technique may register a `TechniqueCost` with `register_technique(..., cost=...)`:

- `effect(placement, config, ctx) -> Placement`: the component's placement after the technique,
  from the placement before it (techniques compose in layer order: casting shrinks the footprint
  first, then offloading places what casting left). A placement says the weight bytes resident on
  the compute device, the transient device buffers (prefetch slots, one dequantized weight), bytes
  in host RAM / pinned / on disk, bytes moved host -> device and read from disk per step, a compute
  factor relative to the plain model, and the quality class ("exact", "fp8", "cached@41 dB").
  A placement may also state the step's activation bytes under the stack (`activation_bytes`;
  None keeps the planner's estimate for the job): checkpointing trades them for recompute, reading
  the planner's estimate split per block from `CostContext.activations`.
- `options(placement, ctx) -> configs`: the configs worth trying for this footprint and machine
  (offloading: the budget solved to fill the room the device has for weights; casting: each
  scaling). The planner enumerates stacks from the technique table and these options, so a new
  technique adds its own rows to `hookwise plan` without the planner changing.

Everything here is plain data: the footprint is built by the planner from the model map, and the
hardware and job objects are the planner's (read by attribute), so `core` imports nothing else.
Sizes are parsed by one grammar (`parse_size`): "24GB" = 24e9 bytes, "24GiB" = 24 * 2**30.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from ..errors import ConfigError

_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[f"{_p}b"] = 1000**_i
    _UNITS[f"{_p}ib"] = 1024**_i
    _UNITS[_p] = 1024**_i


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from an int or a size string: "24GB" = 24e9, "24GiB" = 24 * 2**30, "512MB", "1.5TB".

    The grammar is the offload budget's (a bare "24G" is binary, as there). Raises `ConfigError`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}={value!r} is not a size; use bytes (a number) or a string such as '24GB' or '24GiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what}={value} must not be negative")
        return int(value)
    match = _SIZE.match(value)
    if match is None or match["unit"].lower() not in _UNITS:
        raise ConfigError(f"{what}={value!r} is not a size; use bytes, '24GB' (10^9) or '24GiB' (2^30), '512MB'")
    return int(float(match["num"]) * _UNITS[match["unit"].lower()])


def parse_rate(value: int | float | str, what: str = "rate") -> float:
    """Bytes per second from a number or "25GB/s" (also "25GB" and "25 GiB/s")."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
        rate = float(parse_size(text, what))
    else:
        rate = float(parse_size(value, what))
    if rate <= 0:
        raise ConfigError(f"{what}={value!r} must be a positive rate such as '25GB/s'")
    return rate


# ---- what a technique sees ---------------------------------------------------------------------
@dataclass(frozen=True)
class LeafBytes:
    """One Linear / Conv / Embedding leaf: its weight shape, its stored bytes and where it sits."""

    path: str
    kind: str  # "linear" | "conv" | "embedding"
    shape: tuple[int, ...]  # weight shape
    nbytes: int  # parameter bytes as stored now (weight, bias, scales)
    itemsize: int  # bytes per weight element as stored now
    block: int | None  # index in `Footprint.blocks` of the block holding it, None outside the towers
    keep: str | None  # why it keeps its dtype (high precision, adapter, already cast), None if castable


@dataclass(frozen=True)
class Footprint:
    """One component's weight bytes as a technique sees them: exact, from the model map."""

    name: str
    total_bytes: int  # parameters + buffers
    blocks: tuple[int, ...]  # bytes of each tower block (parameters + buffers), main towers first
    leaves: tuple[LeafBytes, ...]
    high_precision_bytes: int
    param_count: int
    compute_itemsize: int = 2  # bytes per element of the dtype the model computes in

    def __hash__(self) -> int:
        # The planner keys its caches by footprint (hundreds of leaves): the hash is computed once.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.total_bytes, self.blocks, self.leaves, self.high_precision_bytes,
                           self.param_count, self.compute_itemsize))  # fmt: skip
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        # Never carry the cached hash to another process: str hashes differ between processes.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def outside_bytes(self) -> int:
        """Bytes outside every tower block (embedders, output layers)."""
        return self.total_bytes - sum(self.blocks)

    @property
    def largest_block(self) -> int:
        return max(self.blocks, default=0)

    @property
    def largest_leaf(self) -> int:
        return max((leaf.nbytes for leaf in self.leaves), default=0)

    @property
    def leaf_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)

    def with_leaves(self, leaves: Sequence[LeafBytes]) -> Footprint:
        """The footprint with `leaves` replaced (matched by path); block and total bytes follow."""
        new = {leaf.path: leaf for leaf in leaves}
        blocks = list(self.blocks)
        total = self.total_bytes
        out = []
        for leaf in self.leaves:
            changed = new.get(leaf.path, leaf)
            delta = changed.nbytes - leaf.nbytes
            total += delta
            if leaf.block is not None:
                blocks[leaf.block] += delta
            out.append(changed)
        return replace(self, total_bytes=total, blocks=tuple(blocks), leaves=tuple(out))


@dataclass(frozen=True)
class Placement:
    """Where one component's weights live under a stack, and what a step costs because of it."""

    footprint: Footprint  # the weights as stored now
    device_bytes: int  # weight bytes resident on the compute device for the whole step
    transient_bytes: int = 0  # device buffers besides: prefetch slots, a dequantized weight
    host_bytes: int = 0  # weight bytes in host RAM
    pinned_bytes: int = 0  # of which page-locked
    disk_bytes: int = 0  # weight bytes in files on disk
    moved_bytes: int = 0  # host -> device per step
    disk_read_bytes: int = 0  # read from disk per step
    transfers: int = 0  # separate loads per step (each costs a hook call and a copy launch)
    compute_factor: float = 1.0  # compute time relative to the plain model (dequantizing > 1, caches < 1)
    quality: tuple[str, ...] = ()  # each lossy technique's class; () is exact
    notes: tuple[str, ...] = field(default=())
    activation_bytes: int | None = None  # device bytes of activations under the stack; None: the job's estimate
    # Several GPUs (the parallel techniques): bytes each rank sends to the others per step, over the
    # GPUs' link (`hardware.link`); the planner adds their time to the step, not overlapped (a bound).
    comm_bytes: int = 0
    # The share of the job's activations each device holds (the parallel techniques split the tokens or the
    # batch over the ranks); applies to `activation_bytes` or, when that is None, the job's estimate.
    activation_share: float = 1.0
    # How the parallel techniques of the stack so far split the GPUs, outermost first: (("cfg", 2), ("context", 4))
    # on 8 GPUs. A later parallel technique takes the GPUs left (`hardware.gpus` / `ranks`); the planner keeps a
    # parallel stack only when its split uses every GPU.
    mesh: tuple[tuple[str, int], ...] = ()
    # The share of the LoRA's parameters, gradients and optimizer state each device holds (sharded training: 1/N).
    lora_share: float = 1.0

    @property
    def ranks(self) -> int:
        """The GPUs the stack's parallel techniques spread one step over (1: one GPU)."""
        out = 1
        for _, degree in self.mesh:
            out *= degree
        return out

    @classmethod
    def resident(cls, footprint: Footprint) -> Placement:
        """Everything on the compute device: the plain model."""
        return cls(footprint, device_bytes=footprint.total_bytes)

    def note(self, text: str) -> Placement:
        return replace(self, notes=(*self.notes, text))

    def stored_as(self, footprint: Footprint, *, transient: int, factor: float, quality: str) -> Placement:
        """The weights stored smaller (`footprint`): the bytes saved leave the device, `transient` bytes
        (one dequantized weight) are added as a device buffer, compute scales by `factor`, and the
        storage's quality class is appended. Casting, quantization and GGUF files state this one way."""
        saved = self.footprint.total_bytes - footprint.total_bytes
        return replace(
            self,
            footprint=footprint,
            device_bytes=max(self.device_bytes - saved, 0),
            transient_bytes=self.transient_bytes + transient,
            compute_factor=self.compute_factor * factor,
            quality=(*self.quality, quality),
        )


@dataclass(frozen=True)
class ActivationTerm:
    """A training job's activation estimate split so that a technique can change it per block.

    `running`: bytes live while one block runs and not kept for backward; `kept[i]`: bytes tower
    block i keeps for backward when it is not checkpointed, `inputs[i]`: when it is (its inputs).
    `checkpointed`: the job itself checkpoints every block (its estimate already assumes it).
    """

    running: int
    kept: tuple[int, ...]
    inputs: tuple[int, ...]
    checkpointed: bool = False

    def total(self, checkpointed: int) -> int:
        """Device bytes with the first `checkpointed` blocks recomputed, the rest keeping activations."""
        n = max(0, min(checkpointed, len(self.kept)))
        return self.running + sum(self.inputs[:n]) + sum(self.kept[n:])


@dataclass(frozen=True)
class CostContext:
    """What a cost function may read besides the placement.

    `hardware` and `job` are the planner's objects (`hookwise.plan.Hardware`, `hookwise.plan.Job`):
    read `hardware.vram`, `.ram`, `.h2d`, `.disk_read`, `.pinned_limit`, `.device`, and `job.training`,
    `job.frames`... `device_room` is what the compute device can give weights once activations and
    the margin are taken; `ram_room` the same for host RAM. `activations` splits a training job's
    activation estimate per block (None for sampling). `passes` is how many times a step runs
    through the weights (two CFG calls, or forward and backward). `measurements` holds measured
    results a technique may quote (the step-cache harness rows under "cache").

    For the parallel techniques: `hardware.gpus` (how many ranks) and `hardware.link` (bytes per second
    between them); `tokens` (one sample's attention sequence), `hidden` (the residual width),
    `attention_layers` (attention modules per call), `trainable_bytes` (the LoRA's parameter bytes:
    each rank's gradient bytes to synchronise) and `output_bytes` (one call's output).
    """

    hardware: Any
    job: Any
    device_room: int
    ram_room: int
    passes: int = 1
    training: bool = False
    video: bool = False
    cfg: str | None = None
    measurements: dict[str, Any] = field(default_factory=dict)
    activations: ActivationTerm | None = None
    tokens: int = 0
    hidden: int = 0
    attention_layers: int = 0
    trainable_bytes: int = 0
    output_bytes: int = 0


Effect = Callable[[Placement, Any, CostContext], Placement]
Options = Callable[[Placement, CostContext], Sequence[Any]]


@dataclass(frozen=True)
class TechniqueCost:
    """A technique's cost declaration (see the module docstring).

    `scope` is "model" for techniques applied to the denoiser, "pipeline" for those applied to a
    pipeline of components (component offloading); `training` and `sampling` say which jobs it
    serves. Techniques of one `exclusive` group are never proposed together (step caches: each
    was measured alone, so their effects do not compose). `exact_undo=False` says removing the
    technique does not give the original weights back (casting's rounding stays), so a fallback
    keeps it rather than swapping it. `fake_run=False` says the planner's fake run cannot model the
    technique (it needs several processes), so a stack with it keeps its declared peak. `offered(ctx)`
    (optional) says whether the technique has any option at all for this job and machine, whatever the
    placement (the parallel techniques: only on several GPUs): the planner leaves it out of every set
    otherwise, rather than expanding each set to find it empty.
    """

    effect: Effect
    options: Options
    scope: str = "model"
    training: bool = True
    sampling: bool = True
    exclusive: str | None = None
    exact_undo: bool = True
    fake_run: bool = True
    offered: Callable[[CostContext], bool] | None = None

    def __post_init__(self) -> None:
        if self.scope not in ("model", "pipeline"):
            raise ConfigError(f"TechniqueCost(scope={self.scope!r}): use 'model' or 'pipeline'")
        if not (callable(self.effect) and callable(self.options)):
            raise ConfigError("TechniqueCost needs callable effect and options functions")


def harness_row(ctx: CostContext, method: str) -> dict[str, Any] | None:
    """The measured default setting of a step cache `method` in the shipped harness results, or None."""
    rows = ctx.measurements.get("cache") or ()
    for row in rows:
        if row.get("method") == method and row.get("impl") == "hookwise" and row.get("default"):
            return row
    return None


def measured_config(row: dict[str, Any] | None, make: Callable[[], Any], num_steps: int | None = None) -> Any | None:
    """The config a harness `row` measured (its recorded `config` of this technique, else `make()`), for
    sampling runs of `num_steps` steps; None where it cannot be stated for them.

    A config that states the length of the run it is scheduled for (a `num_steps` field: a schedule of
    computed steps, by a `budget` or as a `schedule` of step indices) is given the job's step count, its
    budget scaled to the same share of the steps and its schedule's steps placed at the same fractions
    of the run: a run of the job's length then never outlasts it. Measured at the job's step count, the
    recorded config is returned as it is; one that does not validate at the job's count (per-step
    fitted data) is not offered (None)."""
    default = make()
    config = default
    for entry in (row or {}).get("config") or ():
        if isinstance(entry, dict) and entry.get("technique") == default.to_dict()["technique"]:
            try:
                config = type(default).from_dict(entry)
            except (ConfigError, TypeError, ValueError):
                config = default  # a row written by another version: the declared default stands
            break
    measured = getattr(config, "num_steps", None)
    if num_steps is None or measured is None or measured == num_steps:
        return config
    share = num_steps / measured
    changes: dict[str, Any] = {"num_steps": num_steps}
    if getattr(config, "budget", None) is not None:
        changes["budget"] = max(1, min(num_steps, round(config.budget * share)))
    if getattr(config, "schedule", None) is not None:
        changes["schedule"] = tuple(sorted({min(round(step * share), num_steps - 1) for step in config.schedule}))
    try:
        return replace(config, **changes)
    except ConfigError:
        return None


def cached_cost(method: str, make: Callable[[], Any], *, needs_cfg: str | None = None) -> TechniqueCost:
    """The cost of a step cache whose default setting the shipped harness measured as `method`.

    `make()` builds the config the harness ran as that default (the row's recorded config, where it has
    one, is used instead: `measured_config`, for the job's `num_steps`). Offered for sampling only (and,
    with `needs_cfg`, only for that CFG mode), with its measured speed-up and PSNR as quality class;
    without a measurement it is not offered (a quality the planner cannot state is not a choice).
    """

    def effect(placement: Placement, config: Any, ctx: CostContext) -> Placement:
        row = harness_row(ctx, method)
        speedup = float(row["speedup"]) if row else 1.0
        psnr = row.get("psnr") if row else None
        quality = f"cached@{float(psnr):.0f} dB" if isinstance(psnr, (int, float)) else "cached"
        after = replace(
            placement, compute_factor=placement.compute_factor / max(speedup, 1e-6), quality=(*placement.quality, quality)
        )
        measured = measured_config(row, make) if row else None
        steps = getattr(measured, "num_steps", None)
        if steps is not None and getattr(config, "num_steps", steps) != steps:
            after = after.note(f"{method}: scheduled for {config.num_steps} steps; its speed and PSNR were measured with "
                               f"the same share of {steps} steps ({row.get('setting', '')})")  # fmt: skip
        return after

    def options(placement: Placement, ctx: CostContext) -> list[Any]:
        row = harness_row(ctx, method)
        if ctx.training or row is None or (needs_cfg and ctx.cfg != needs_cfg):
            return []
        config = measured_config(row, make, getattr(ctx.job, "num_steps", None))
        return [] if config is None else [config]

    return TechniqueCost(effect, options, training=False, exclusive="step-cache")


@dataclass(frozen=True)
class SpeedFigure:
    """A step's time under a speed technique relative to the step without it, measured on one device kind.

    `forward`: sampling (a forward pass); `backward`: a training step (forward + backward); None where
    not measured. `source` says where the figure comes from (benchmark, date, load), shown in the plan.
    """

    forward: float | None = None
    backward: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("SpeedFigure(source=...) must say where the figure was measured (benchmark, date, load)")
        for what in ("forward", "backward"):
            value = getattr(self, what)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"SpeedFigure({what}={value!r}) must be a positive time ratio or None")

    def factor(self, training: bool) -> float | None:
        value = self.backward if training else self.forward
        return float(value) if value is not None else None


def kind_of(device: str, name: str = "") -> str:
    """A device kind as spelled from its type and name: "<device>:<name>", lower-cased, spaces collapsed
    (just the device type without a name)."""
    name = " ".join(str(name or "").lower().split())
    return f"{device}:{name}" if name else str(device or "")


def device_kind(hardware: Any) -> str:
    """The kind of compute device a speed figure holds for, e.g. "cuda:h100" or "cpu:amd epyc (2 cores)".

    The planner's `Hardware` states it (`Hardware.kind`: a GPU of its known table by the table's name, so
    a GPU stated as gpu="H100" and one detected as "NVIDIA H100 80GB HBM3" are one kind, "cuda:h100");
    other hardware objects are spelled from their `device` and `name` (`kind_of`)."""
    kind = getattr(hardware, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    return kind_of(str(getattr(hardware, "device", "") or ""), str(getattr(hardware, "name", "") or ""))


def _kinds(hardware: Any) -> tuple[str, ...]:
    """The keys a figure for this hardware may be stored under, most specific first: its kind, then its
    name as spelled (a figure keyed by the detected name, "cuda:nvidia h100 80gb hbm3", still holds)."""
    spelled = kind_of(str(getattr(hardware, "device", "") or ""), str(getattr(hardware, "name", "") or ""))
    return tuple(dict.fromkeys(k for k in (device_kind(hardware), spelled) if k))


def speed_figure(ctx: CostContext, technique: str, shipped: dict[str, SpeedFigure] | None = None) -> tuple[float, str] | None:
    """(factor, source) of a speed technique on the job's device and mode, or None where nothing was measured.

    `shipped` (the technique's own benchmark figures, next to its code) is keyed by device kind
    (`device_kind`, e.g. "cuda:h100"; the name as detected, "cuda:nvidia h100 80gb hbm3", is read too): a
    figure is offered only on the kind it was measured on. A user's own figures,
    `ctx.measurements["speed"][technique]`, are keyed the same way or by device type ("cuda", "cpu":
    the user measured their own machine) with `{"forward": ..., "backward": ...}` or a SpeedFigure,
    and win over the shipped ones.
    """
    kinds = _kinds(ctx.hardware)
    device = str(getattr(ctx.hardware, "device", "") or "")
    stated = ((ctx.measurements.get("speed") or {}).get(technique)) or {}
    for key in (*kinds, device):
        row = stated.get(key) if key else None
        if row is None:
            continue
        figure = row if isinstance(row, SpeedFigure) else SpeedFigure(
            forward=row.get("forward"), backward=row.get("backward"), source=row.get("source") or "your measurement"
        )
        factor = figure.factor(ctx.training)
        if factor is not None:
            return factor, figure.source
    figure = next((shipped[k] for k in kinds if k in (shipped or {})), None)
    factor = figure.factor(ctx.training) if figure is not None else None
    return (factor, figure.source) if factor is not None else None


def speed_factor(ctx: CostContext, technique: str, shipped: dict[str, SpeedFigure] | None = None) -> float | None:
    """The measured factor of `speed_figure`, or None."""
    found = speed_figure(ctx, technique, shipped)
    return found[0] if found else None


def speed_cost(technique: str, make: Callable[[], Any], shipped: dict[str, SpeedFigure] | None = None) -> TechniqueCost:
    """The cost of a speed technique (fused kernels, compile, attention backends): bytes unchanged, the
    compute time scaled by its measured factor (`speed_figure`), and offered to the planner only where
    a measured factor below 1 exists for the job's device kind and mode (an unmeasured speed-up is no
    choice). `shipped` is read at each plan, so figures added to it later count."""

    def effect(placement: Placement, config: Any, ctx: CostContext) -> Placement:
        found = speed_figure(ctx, technique, shipped)
        if found is None:
            elsewhere = sorted(k for k in (shipped or {}) if k not in _kinds(ctx.hardware))
            also = f" (measured on {', '.join(elsewhere)} only)" if elsewhere else ""
            return placement.note(f"{technique}: no speed-up measured on this device and mode{also}; time unchanged")
        factor, source = found
        return replace(placement, compute_factor=placement.compute_factor * factor).note(
            f"{technique}: measured x{factor:.2f} step time on {device_kind(ctx.hardware)} ({source})"
        )

    def options(placement: Placement, ctx: CostContext) -> list[Any]:
        found = speed_figure(ctx, technique, shipped)
        return [make()] if found is not None and found[0] < 1.0 else []

    return TechniqueCost(effect, options)
