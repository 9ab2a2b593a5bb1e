"""Layerwise casting: weights stored in a low-precision dtype (fp8), computed in the model's dtype.

Each targeted Linear / Conv keeps its `weight` parameter in `storage_dtype`, optionally with scales
beside it (`weight_scale` buffer: one per tensor, per output channel, or per block of 64 input
columns). Its forward runs inside an autograd function that dequantizes the weight, computes, and
saves only the stored weight and its scale for backward, where it dequantizes again. So during
training no compute-dtype copy of a cast weight stays alive between forward and backward: the
memory saving holds in training too (diffusers' casting keeps that copy alive).

What is cast comes from the model map: `skip="auto"` keeps norms, embeddings, modulation, patch /
position embeddings, input / output projections and the model's own keep-in-fp32 list in high
precision. LoRA / PEFT adapter layers are never cast. Modules whose dtype a forward reads
(`x.to(self.proj.weight.dtype)`, `next(self.embedder.parameters()).dtype`, a model's `.dtype`) are
detected from the source of their ancestors' forwards and kept in high precision, with a warning.

A leaf whose `forward` was replaced on the instance (kohya / musubi LoRA networks set
`org_module.forward = lora.forward`, the LoRA calling the original inside) runs that forward: if it
was set before casting, the cast computation takes the place of the layer's own `F.linear` /
`F.conv*` on its weight inside it (a forward that never computes one is refused with an error); if
it was set after, it calls hookwise's forward as its original. Removing casting leaves the instance
the forward it has then, and a forward captured before removal passes straight through.

The storage format (quantize, dequantize, the fused dequantize kernels) lives in `_dequant.py`, the
choice of targets in `_cast_targets.py`, the autograd functions and the instance-forward mode in
`_cast_ops.py`, and the cost declaration for the planner in `_cost.py`.
With `compute="fp8"` a Linear multiplies the stored weight in fp8 instead of dequantizing it,
quantizing its activations at every call (`_fp8.py`: the path, its error bound against the upcast
path, and its backward, which is the upcast path's); convolutions keep the upcast path.

Removing the technique gives back compute-dtype weights, but lossily: the storage rounding stays.

Saving: `model.state_dict()` of a cast model holds what is stored, each cast weight in the storage
dtype with its `weight_scale` beside it. It loads back into a cast model as is (and a full-precision
state dict loads too: it is quantized on the way in), not into the plain model.
`casting_state_dict(model, "compute")` gives the compute-dtype form instead (dequantized weights, no
scales: what the plain model loads), `casting_state_dict(model, "stored")` the stored form; both as
tensors of their own, also under offloading.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import TechniqueConfig, parse_dtype
from ..core.hooks import HookRegistry, Layer, ModelHook, add_hook, hooks_named, iter_registries, unwrap
from ..core.marks import mark_frozen
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import transaction
from ..errors import ConfigError, HookError
from ..introspect.precision import REASON_DTYPE_READ
from ._cast_ops import CONV_FUNCS, CastCompute, CastConvFn, CastLinearFn, is_class_forward, leaf_func
from ._cast_targets import cast_targets, check_compute
from ._dequant import Dequantizer, Layout, dequantize, probe_fused, quantize
from ._fp8 import ACTIVATION_SCALINGS, FP8_WEIGHTS, Fp8LinearFn, fp8_matmul_failure
from ._fp8 import SCALINGS as FP8_SCALINGS

logger = logging.getLogger("hookwise.memory.casting")

HOOK_NAME = "hookwise.casting"
SCALINGS = ("none", "tensor", "channel", "block")
STORAGE_DTYPES = tuple(
    d
    for d in (
        getattr(torch, n, None)
        for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float16", "bfloat16")
    )
    if d is not None
)

@dataclass(frozen=True)
class LayerwiseCasting(TechniqueConfig):
    """Store weights of Linear / Conv leaves in `storage_dtype`, compute in `compute_dtype`.

    - `storage_dtype`: fp8 (e4m3fn, e5m2) or fp16 / bf16.
    - `compute_dtype`: default the dtype most of the targeted weights have now.
    - `skip`: `"auto"` keeps high precision where the model map says (norms, embeddings,
      modulation, input / output projections, the model's keep-in-fp32 list); `"none"` casts every
      castable leaf (dtype-read modules and adapters are still kept).
    - `skip_patterns`, `skip_classes`: more modules to keep: regular expressions searched in module
      paths, and class names of the module or any of its ancestors. Each must match something.
    - `scaling`: `"none"` (plain cast, as diffusers does), `"tensor"`, `"channel"` (one scale per
      output channel), `"block"` (one per `block_size` input columns of each output channel; falls
      back to per channel where the width does not divide, and for convolutions).
    - `cast_modulation`: also cast the modulation Linears inside the towers' blocks (adaptive norms,
      `img_mod` ...). On FLUX they hold about a quarter of the weight bytes.
    - `exact_undo`: keep each original weight until `hookwise.apply` returns, so a failure anywhere
      in the stack restores the model exactly. With False they are freed as casting proceeds (peak
      memory: the model plus one layer) and a failure restores dequantized (rounded) weights.
    - `compute`: `"upcast"` (default) dequantizes each weight to the compute dtype and multiplies
      there; `"fp8"` multiplies Linear layers in fp8 (`torch._scaled_mm`) on the stored weight, with
      the activations quantized to e4m3 at every call (`_fp8.py`): same stored values, the
      activation's rounding the only difference. Needs an fp8 `storage_dtype` (e4m3fn / e5m2),
      `scaling` "channel", "tensor" or "none", and a device with fp8 matmul (the CPU; CUDA GPUs of
      compute capability 8.9+); convolutions keep the upcast path.
    - `activation_scaling`: with `compute="fp8"`, one activation scale per row (`"row"`, default)
      or per tensor (`"tensor"`).
    - `fused`: dequantize each weight with one generated kernel (`torch.compile`: Triton on CUDA,
      C++ on the CPU) instead of two eager ops: on a GPU it moves 3 bytes per weight element
      instead of 7. The values are the same either way. None (default): for weights computed on
      CUDA when Triton is installed (generated at the first use, once per process; a failure falls
      back to eager ops with a warning); True: on every device, and an error at apply time if they
      cannot be generated where the weights are; False: eager ops.
    """

    storage_dtype: torch.dtype = torch.float8_e4m3fn
    compute_dtype: torch.dtype | None = None
    skip: str = "auto"
    skip_patterns: tuple[str, ...] = ()
    skip_classes: tuple[str, ...] = ()
    scaling: str = "block"
    block_size: int = 64
    cast_modulation: bool = False
    exact_undo: bool = True
    fused: bool | None = None
    compute: str = "upcast"
    activation_scaling: str | None = None

    def __post_init__(self) -> None:
        # Accept dtype names and lists for convenience; store canonical values.
        object.__setattr__(self, "storage_dtype", parse_dtype(self.storage_dtype, "storage_dtype"))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", parse_dtype(self.compute_dtype, "compute_dtype"))
        for name in ("skip_patterns", "skip_classes"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                # tuple("attn") would be the patterns "a", "t", "t", "n": say so instead.
                raise ConfigError(f"{name}={value!r} must be a list or tuple of names, e.g. {name}=({value!r},)")
            object.__setattr__(self, name, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"storage_dtype={self.storage_dtype} cannot store weights for layerwise casting; use one of "
                f"{[str(d).removeprefix('torch.') for d in STORAGE_DTYPES]} (integer formats are quantization)"
            )
        if self.compute_dtype is not None:
            check_compute(self.storage_dtype, self.compute_dtype)
        if self.skip not in ("auto", "none"):
            raise ConfigError(f"skip={self.skip!r}: use 'auto' or 'none', and skip_patterns / skip_classes to add more")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"scaling={self.scaling!r}: use one of {SCALINGS}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size!r}: must be a positive whole number of input columns")
        if self.fused not in (None, True, False):
            raise ConfigError(f"fused={self.fused!r}: use None (on CUDA with Triton), True or False")
        self._validate_compute()
        for pattern in self.skip_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"skip pattern {pattern!r} is not a valid regular expression: {exc}") from exc


    def _validate_compute(self) -> None:
        if self.compute not in ("upcast", "fp8"):
            raise ConfigError(f"compute={self.compute!r}: use 'upcast' (dequantize, then multiply) or 'fp8' (fp8 matmul)")
        if self.compute == "upcast":
            if self.activation_scaling is not None:
                raise ConfigError(
                    f"activation_scaling={self.activation_scaling!r} is used only with compute='fp8' (the upcast path "
                    f"does not quantize activations); drop it or pass compute='fp8'"
                )
            return
        if self.activation_scaling not in (None, *ACTIVATION_SCALINGS):
            raise ConfigError(f"activation_scaling={self.activation_scaling!r}: use one of {ACTIVATION_SCALINGS}")
        if self.storage_dtype not in FP8_WEIGHTS:
            raise ConfigError(
                f"compute='fp8' multiplies the stored weight in fp8, but storage_dtype={self.storage_dtype}; use "
                f"storage_dtype=torch.float8_e4m3fn (or float8_e5m2), or compute='upcast'"
            )
        if self.scaling not in FP8_SCALINGS:
            raise ConfigError(
                f"compute='fp8' cannot apply scaling={self.scaling!r}: block scales (one per {self.block_size} input "
                f"columns) sit inside the sum an fp8 matmul does in one go; use scaling='channel' (one scale per "
                f"output channel) or 'tensor', or compute='upcast'"
            )

    @property
    def activation_scale(self) -> str:
        """How `compute="fp8"` scales activations: "row" unless `activation_scaling` says otherwise."""
        return self.activation_scaling or "row"


@dataclass
class CastingRecord:
    """What one application of layerwise casting did; shared by the hooks it attached."""

    config: LayerwiseCasting
    compute_dtype: torch.dtype
    kept: dict[str, str]  # leaf path -> why it keeps high precision
    dequant: Dequantizer


class CastHook(ModelHook):
    """Innermost hook of a cast leaf: runs the leaf through the casting autograd function."""

    layer = Layer.CAST

    def __init__(
        self, record: CastingRecord, layout: Layout, original_dtype: torch.dtype, requires_grad: bool, path: str = ""
    ) -> None:
        self.record = record
        self.compute_dtype = record.compute_dtype
        self.layout = layout
        self.original_dtype = original_dtype
        self.requires_grad = requires_grad  # the original weight's flag, restored on removal
        self.path = path
        self.set_compute_attr = False
        self.load_hook: Any = None
        # Set on removal: a forward captured before it (an adapter's `org_forward`) still calls this
        # hook, which must then leave the restored weight to the layer's own forward.
        self.detached = False

    def new_forward(self, module: nn.Module, next_fn, *args, **kwargs):
        if self.detached:
            return next_fn(*args, **kwargs)
        if not is_class_forward(module, next_fn):
            # A forward set on the instance (a LoRA network's) or an observer sits inside: run it,
            # casting the layer's own computation wherever it happens in there.
            return self._run_inner(module, next_fn, args, kwargs)
        x = args[0] if args else kwargs["input"]
        return self.compute(module, x)

    def compute(self, module: nn.Module, x: torch.Tensor, padding: Any = None) -> torch.Tensor:
        """The leaf's own computation on input `x`, with the stored weight.

        `padding`: a convolution's padding argument when the caller padded `x` itself (the class
        forward with a padding mode other than zeros passes 0); None pads as the module says.
        """
        scale = module._buffers.get("weight_scale")
        if isinstance(module, nn.Linear):
            config = self.record.config
            if config.compute == "fp8":
                _check_fp8_device(module.weight.device, self.path)
                return Fp8LinearFn.apply(
                    x, module.weight, scale, module.bias, self.compute_dtype, self.layout, self.record.dequant,
                    config.activation_scale,
                )  # fmt: skip
            return CastLinearFn.apply(
                x, module.weight, scale, module.bias, self.compute_dtype, self.layout, self.record.dequant
            )
        kind = next(k for k in CONV_FUNCS if isinstance(module, k))
        if padding is None or isinstance(padding, str):
            padding = module.padding
            if module.padding_mode != "zeros" or isinstance(padding, str):
                # Pad explicitly ("same", reflect, ...) so the input-gradient function sees plain numbers.
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
                padding = 0
        return CastConvFn.apply(
            x, module.weight, scale, module.bias, self.compute_dtype, self.layout, self.record.dequant, kind,
            module.stride, padding, module.dilation, module.groups,
        )  # fmt: skip

    def _run_inner(self, module: nn.Module, next_fn, args: tuple, kwargs: dict) -> Any:
        with CastCompute(self, module) as mode:
            out = next_fn(*args, **kwargs)
        if not mode.hits:
            where = self.path or type(module).__name__
            forward = module.__dict__.get("forward")
            name = getattr(forward, "__qualname__", type(forward).__name__)
            raise HookError(
                f"the forward set on {where} ({name}) never computes the layer's own "
                f"{leaf_func(module).__name__} on its weight, so layerwise casting cannot take its place and "
                f"the weight would be read as stored ({module.weight.dtype}); keep this module in high "
                f'precision with skip_patterns=[r"^{re.escape(where)}$"]'
            )
        return out

    def dequantized(self, module: nn.Module) -> torch.Tensor:
        return dequantize(module.weight.data, module._buffers.get("weight_scale"), self.compute_dtype, self.layout)

    def _load_pre_hook(self, module, state_dict, prefix, *args) -> None:
        # A full-precision checkpoint loaded into a cast model is quantized on the way in, with fresh
        # scales, instead of being copied into the storage dtype without them.
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if incoming is None or incoming.dtype == module.weight.dtype:
            return
        stored, scale, _ = quantize(
            incoming.to(module.weight.device), module.weight.dtype, self.layout.scaling, self.layout.block or 1,
            self.compute_dtype,
        )  # fmt: skip
        state_dict[key] = stored
        if scale is not None:
            state_dict[prefix + "weight_scale"] = scale


def _device_can_hold(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "meta":
        return True
    try:
        torch.zeros(2, device=device).to(dtype).to(torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# ---- apply / remove ------------------------------------------------------------------------------
def apply_casting(model: nn.Module, config: LayerwiseCasting | None = None, **kwargs: Any) -> dict[str, Any]:
    """Apply layerwise casting (as `hookwise.apply(model, LayerwiseCasting(...))`); returns its summary."""
    config = config or LayerwiseCasting(**kwargs)
    apply_techniques(model, [config])
    return casting_summary(model)


def remove_casting(model: nn.Module) -> list[str]:
    """Remove layerwise casting applied with `hookwise.apply` (lossy: the storage rounding stays)."""
    return remove_techniques(model, ["casting"])


def _apply_casting(model: nn.Module, config: LayerwiseCasting) -> None:
    model = unwrap(model)
    if cast_leaves(model):
        raise ConfigError("layerwise casting is already applied to this model; remove it first to change it")
    chosen = cast_targets(model, config)
    devices = {m.weight.device for m in chosen.targets.values()}
    for device in devices:
        if not _device_can_hold(device, config.storage_dtype):
            raise ConfigError(
                f"device {device} cannot hold {config.storage_dtype} tensors; use storage_dtype=torch.bfloat16 or "
                f"torch.float16 there, or move the model to a device that supports it"
            )
        if config.compute == "fp8" and any(isinstance(m, nn.Linear) for m in chosen.targets.values()):
            failure = fp8_matmul_failure(device)
            if failure is not None:
                raise ConfigError(_fp8_message(device, failure))
    for path, why in chosen.skipped.items():
        if why.startswith(REASON_DTYPE_READ):
            logger.warning("hookwise casting keeps %s in high precision: %s", path, why)
    record = CastingRecord(config, chosen.compute_dtype, dict(chosen.skipped), _dequantizer(config, devices, chosen.compute_dtype))
    with transaction() as txn:
        for path, module in chosen.targets.items():
            original = module.weight
            stored, scale, layout = quantize(
                original, config.storage_dtype, config.scaling, config.block_size, chosen.compute_dtype
            )
            hook = CastHook(record, layout, original.dtype, original.requires_grad, path)
            stored_param = nn.Parameter(stored, requires_grad=False)
            # Frozen because fp8 cannot be trained, not by the user: offloading reads the user's flag.
            mark_frozen(stored_param, original.requires_grad)
            module._parameters["weight"] = stored_param
            if scale is not None:
                module.register_buffer("weight_scale", scale, persistent=True)
            if "compute_dtype" not in module.__dict__:
                # PEFT gives adapters the dtype of `base_layer.compute_dtype` when it exists (its path
                # for quantized bases), so LoRA layers added after casting stay in the compute dtype.
                module.compute_dtype = chosen.compute_dtype
                hook.set_compute_attr = True
            hook.load_hook = module._register_load_state_dict_pre_hook(hook._load_pre_hook, with_module=True)
            keep = original if config.exact_undo else None
            txn.on_rollback(lambda m=module, h=hook, o=keep: _restore_leaf(m, h, o), f"casting of {path}")
            add_hook(module, hook, HOOK_NAME)
            del original, keep
    summary = casting_summary(model)
    logger.info(
        "hookwise casting: %d leaves to %s (%.1f -> %.1f MiB), %d kept",
        len(summary["cast"]), config.storage_dtype, summary["bytes_before"] / 2**20, summary["bytes_after"] / 2**20,
        len(chosen.skipped),
    )  # fmt: skip


def _fp8_message(device: torch.device, failure: str) -> str:
    return (
        f"compute='fp8' needs an fp8 matmul (torch._scaled_mm) on {device}, which failed there ({failure}); on "
        f"CUDA it needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell). Use compute='upcast' "
        f"(same stored weights, multiplied in the compute dtype)"
    )


def _check_fp8_device(device: torch.device, path: str) -> None:
    """Raise `HookError` when the weight of `path` is computed on a device without fp8 matmul (a
    device other than the one casting checked: offloading streams weights to where they compute)."""
    failure = fp8_matmul_failure(device)
    if failure is not None:
        raise HookError(f"{path or 'a cast layer'}: " + _fp8_message(device, failure))


def _dequantizer(config: LayerwiseCasting, devices: set[torch.device], compute_dtype: torch.dtype) -> Dequantizer:
    """The dequantizer of this application; `fused=True` first proves the kernels can be generated."""
    if config.fused:
        for device in sorted({d for d in devices if d.type != "meta"}, key=str):
            failure = probe_fused(device, config.storage_dtype, compute_dtype, config.block_size)
            if failure is not None:
                raise ConfigError(
                    f"fused=True, but the fused dequantize kernels cannot be generated on {device} ({failure}); "
                    f"install what torch.compile needs there (Triton on CUDA, a C++ compiler on the CPU) or pass "
                    f"fused=None (kernels on CUDA only) / False for eager ops (same values)"
                )
    return Dequantizer(config.fused)


def _restore_leaf(module: nn.Module, hook: CastHook, original: torch.Tensor | None) -> None:
    """Undo the casting of one leaf: the original weight if kept, else the dequantized one."""
    if original is not None:
        weight = original
    else:
        weight = nn.Parameter(hook.dequantized(module), requires_grad=hook.requires_grad)
    module._parameters["weight"] = weight
    module._buffers.pop("weight_scale", None)
    if hook.set_compute_attr:
        module.__dict__.pop("compute_dtype", None)
    if hook.load_hook is not None:
        hook.load_hook.remove()
        hook.load_hook = None
    hook.detached = True
    registry = HookRegistry.of(module)
    if registry is not None and HOOK_NAME in registry:
        _remove_hook(module, registry)


def _remove_hook(module: nn.Module, registry: HookRegistry) -> None:
    """Take the cast hook off `module`, leaving the instance whatever forward it has now.

    An adapter that replaced the forward after casting, calling hookwise's as its original (kohya's
    `org_forward`), keeps its forward; the detached hook it still calls passes through.
    """
    registry.remove(HOOK_NAME, keep_wrapper=True)


def _remove_casting(model: nn.Module, config: LayerwiseCasting | None = None) -> int:
    """Give every cast leaf a compute-dtype weight again; returns how many."""
    model = unwrap(model)
    count = 0
    for _, registry in list(iter_registries(model)):
        hook = registry.get(HOOK_NAME)
        if isinstance(hook, CastHook):
            _restore_leaf(registry.module, hook, None)
            count += 1
    if count:
        warnings.warn(
            "hookwise: removing layerwise casting restores compute-dtype weights, but the storage rounding "
            "stays (the original full-precision values are gone); reload the weights for exact values",
            stacklevel=4,  # the caller of hookwise.remove / remove_casting
        )
    return count


def cast_leaves(model: nn.Module) -> dict[str, CastHook]:
    """{path: hook} of every cast leaf of the model."""
    return hooks_named(model, HOOK_NAME, CastHook)


def casting_state_dict(model: nn.Module, form: str = "compute") -> dict[str, torch.Tensor]:
    """The state dict of a cast model in `form`, every entry a tensor of its own.

    - "compute": each cast weight dequantized to the compute dtype and no `weight_scale` entries;
      it loads into the plain (uncast) model, and into a cast model (quantized on the way in).
    - "stored": what `state_dict()` holds: cast weights in the storage dtype with their scales.
    """
    if form not in ("compute", "stored"):
        raise ConfigError(f"form={form!r}: use 'compute' (loads into the plain model) or 'stored' (fp8 + scales)")
    model = unwrap(model)
    leaves = cast_leaves(model)
    if not leaves:
        raise ConfigError("this model has no layerwise casting; model.state_dict() is already its plain form")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if form == "stored":
        return state
    for path, hook in leaves.items():
        prefix = f"{path}." if path else ""
        key = prefix + "weight"
        if key not in state:
            continue
        scale = state.pop(prefix + "weight_scale", None)
        state[key] = dequantize(state[key], scale, hook.compute_dtype, hook.layout).clone()
    return state


def casting_summary(model: nn.Module) -> dict[str, Any]:
    """What casting did to `model`: cast and kept leaves, dtypes, and weight bytes before / after."""
    leaves = cast_leaves(model)
    modules = dict(unwrap(model).named_modules())
    before = after = 0
    kept: dict[str, str] = {}
    records = []
    for path, hook in leaves.items():
        module = modules[path]
        before += module.weight.numel() * hook.original_dtype.itemsize
        scale = module._buffers.get("weight_scale")
        after += module.weight.numel() * module.weight.element_size()
        after += scale.numel() * scale.element_size() if scale is not None else 0
        if hook.record not in records:
            records.append(hook.record)
            kept.update(hook.record.kept)
    record = records[0] if records else None
    return {
        "cast": list(leaves),
        "kept": kept,
        "storage_dtype": record.config.storage_dtype if record else None,
        "compute_dtype": record.compute_dtype if record else None,
        "scaling": record.config.scaling if record else None,
        "compute": record.config.compute if record else None,  # "upcast" or "fp8" (fp8 matmul for Linears)
        "fused": record.config.fused if record else None,  # None: generated kernels on CUDA (with Triton)
        "fused_failed": dict(record.dequant.failed) if record else {},  # device type -> why it fell back
        "bytes_before": before,
        "bytes_after": after,
    }


register_technique(
    "casting",
    LayerwiseCasting,
    apply=_apply_casting,
    remove=_remove_casting,
    layer=Layer.CAST,
    conflicts=("quantization",),
    description="fp8 / fp16 / bf16 weight storage with on-the-fly upcast, training-safe",
)  # its cost is declared in _cost.py
