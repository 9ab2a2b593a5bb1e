"""Quantize: weights of the towers' Linear leaves stored in 8 or 4 bits by torchao or bitsandbytes.

    hookwise.apply(transformer, Quantize("nf4"))
    hookwise.apply(transformer, Quantize("int8-weight", modules={r"\\.ff\\.": "nf4"}), Offload(...))

Schemes (each from the library made for it; optional extras `torchao` / `bnb`, or `quant` for both):

| scheme         | backend       | stored per weight             | compute                          | CPU |
|----------------|---------------|-------------------------------|----------------------------------|-----|
| `int8-weight`  | torchao       | int8 + fp32 scale per row     | dequantize, matmul in the dtype  | yes |
| `int8-dynamic` | torchao       | int8 + fp32 scale per row     | int8 activations, int8 matmul    | yes |
| `int4-weight`  | torchao       | int4 + bf16 scale/zero per group | tinygemm (CUDA, bf16)         | no  |
| `fp8-weight`   | torchao       | fp8 e4m3 + fp32 scale per row | dequantize, matmul in the dtype  | yes |
| `fp8-dynamic`  | torchao       | fp8 e4m3 + fp32 scale per row | fp8 activations, `_scaled_mm`    | no (SM 8.9+) |
| `nf4`, `fp4`   | bitsandbytes  | 4 bits + fp32 absmax per group | `matmul_4bit`                   | yes |
| `int8`         | bitsandbytes  | int8 + fp32 scale per row     | LLM.int8 (outliers in float)     | yes |

Targets come from the model map (`_targets.py`): the Linear leaves of the towers, minus what the map
keeps in high precision; `modules={"regex": scheme or None}` chooses per leaf. Each quantized leaf
keeps plain tensors (its `weight` holds the quantized data, `weight_scale`, `weight_absmax` ... sit
beside it as buffers) and the backend's object is rebuilt from them at each forward (`_formats.py`),
so offloading streams the quantized bytes and `state_dict()` holds them.

Training (QLoRA): a quantized weight is frozen; its forward runs in an autograd function that saves
only the stored tensors and dequantizes again in backward, so no full-precision copy of a weight is
held for backward. Adapters added with peft on top train in the model's dtype.

Removal: with `keep_original=True` the original weights are kept (where they were, costing their
bytes) and removal gives them back exactly. Without it nothing is kept: removal gives dequantized
weights, with a warning that the rounding stays; for the exact weights reload the checkpoint. To
keep a quantized model, `hookwise.save_quantized` / `load_quantized` (`save.py`).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.cost import CostContext, LeafBytes, Placement, TechniqueCost
from ..core.hooks import HookRegistry, Layer, ModelHook, add_hook, hooks_named, unwrap
from ..core.marks import mark_frozen
from ..core.techniques import apply_techniques, register_technique, remove_techniques
from ..core.transaction import transaction
from ..errors import ConfigError
from ._bnb import BNB_DEFAULT_GROUP, BnbFormat
from ._formats import QUANT_HOOK, Format, stored_slot
from ._inner import is_class_forward, run_inner
from ._targets import choose_targets
from ._torchao import INT4_DEFAULT_GROUP, TorchaoFormat

logger = logging.getLogger("hookwise.quant.quantize")

HOOK_NAME = QUANT_HOOK
TECHNIQUE = "quantization"
SCHEMES = {
    "int8-weight": "torchao",
    "int8-dynamic": "torchao",
    "int4-weight": "torchao",
    "fp8-weight": "torchao",
    "fp8-dynamic": "torchao",
    "nf4": "bitsandbytes",
    "fp4": "bitsandbytes",
    "int8": "bitsandbytes",
}
_GROUPED = {"int4-weight": INT4_DEFAULT_GROUP, "nf4": BNB_DEFAULT_GROUP, "fp4": BNB_DEFAULT_GROUP}


@dataclass(frozen=True)
class Quantize(TechniqueConfig):
    """Store the towers' Linear weights quantized; see the module docstring for the schemes.

    - `scheme`: one of `SCHEMES` (the default for every target).
    - `backend`: "auto" (the scheme's library), or "torchao" / "bitsandbytes" to insist on it.
    - `skip`: "auto" keeps what the model map keeps in high precision (norms, embeddings,
      modulation, input / output projections); "none" quantizes every Linear leaf of the towers.
    - `modules`: {regular expression searched in leaf paths: scheme, or None to keep the leaf},
      first match wins; each pattern must match a target.
    - `group_size`: weights per scale for the grouped schemes (int4-weight: 128, nf4 / fp4: 64);
      None for the default. The per-row schemes take none.
    - `keep_original`: keep the original weights so that removal restores them exactly.
    """

    scheme: str = "int8-weight"
    backend: str = "auto"
    skip: str = "auto"
    modules: tuple[tuple[str, str | None], ...] | None = None
    group_size: int | None = None
    keep_original: bool = False

    def __post_init__(self) -> None:
        # Accept a dict (the natural spelling) and store pairs, which keep the config hashable.
        if self.modules is not None:
            items = self.modules.items() if isinstance(self.modules, dict) else self.modules
            try:
                pairs = tuple((p, s) for p, s in items)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"modules={self.modules!r}: use a dict {{'regex': 'scheme' or None}}") from exc
            object.__setattr__(self, "modules", pairs or None)
        super().__post_init__()

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme={self.scheme!r} is not a quantization scheme; use one of {list(SCHEMES)}")
        if self.backend not in ("auto", "torchao", "bitsandbytes"):
            raise ConfigError(f"backend={self.backend!r}: use 'auto', 'torchao' or 'bitsandbytes'")
        for pattern, scheme in self.modules or ():
            if not isinstance(pattern, str):
                raise ConfigError(f"modules= keys are regular expressions (strings), got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"modules= pattern {pattern!r} is not a valid regular expression: {exc}") from exc
            if scheme is not None and scheme not in SCHEMES:
                raise ConfigError(f"modules={{{pattern!r}: {scheme!r}}}: use one of {list(SCHEMES)} or None (keep)")
        schemes = self.schemes()
        if self.backend != "auto":
            other = [s for s in schemes if SCHEMES[s] != self.backend]
            if other:
                raise ConfigError(
                    f"backend={self.backend!r} cannot run scheme(s) {other} (they are {SCHEMES[other[0]]}'s); "
                    f"use backend='auto' or a {self.backend} scheme"
                )
        if self.skip not in ("auto", "none"):
            raise ConfigError(f"skip={self.skip!r}: use 'auto' or 'none' (and modules={{pattern: None}} to keep more)")
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 16:
                raise ConfigError(f"group_size={self.group_size!r}: use a whole number of weights >= 16, or None")
            if not any(s in _GROUPED for s in schemes):
                raise ConfigError(
                    f"group_size={self.group_size} applies to the grouped schemes {list(_GROUPED)}; "
                    f"{sorted(schemes)} scale per output row: leave group_size=None"
                )
        if not isinstance(self.keep_original, bool):
            raise ConfigError(f"keep_original={self.keep_original!r}: use True or False")

    def schemes(self) -> set[str]:
        """Every scheme this config may use."""
        return {self.scheme} | {s for _, s in self.modules or () if s is not None}


def make_format(scheme: str, group_size: int | None) -> Format:
    """The storage format of `scheme` (group size only for the grouped schemes)."""
    group = group_size if scheme in _GROUPED else None
    cls = TorchaoFormat if SCHEMES[scheme] == "torchao" else BnbFormat
    return cls(scheme, SCHEMES[scheme], group)


# ---- compute --------------------------------------------------------------------------------------
class _QuantLinearFn(torch.autograd.Function):
    """y = backend linear(x, W_q) + b; saves only the stored tensors, dequantizes again in backward."""

    @staticmethod
    def forward(ctx, x, bias, hook, *stored):
        tensors = dict(zip(hook.names, stored))
        ctx.hook, ctx.x_dtype = hook, x.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*stored)
        return hook.format.linear(x, tensors, hook.ctx, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            hook = ctx.hook
            weight = hook.format.dequantize(dict(zip(hook.names, ctx.saved_tensors)), hook.ctx, grad_out.dtype)
            grad_x = grad_out.matmul(weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        # one None per stored tensor, counted from the hook: non-reentrant checkpointing lets each saved
        # tensor be unpacked once, so `ctx.saved_tensors` must not be read a second time here
        return (grad_x, grad_bias, None, *([None] * len(ctx.hook.names)))


_slot = stored_slot


class QuantHook(ModelHook):
    """Innermost hook of a quantized Linear: computes with its stored tensors through the backend."""

    layer = Layer.QUANT

    def __init__(
        self, scheme: str, fmt: Format, ctx: Any, names: tuple[str, ...], original_dtype: torch.dtype,
        requires_grad: bool, path: str, original: nn.Parameter | None,
    ) -> None:  # fmt: skip
        self.scheme = scheme
        self.format = fmt
        self.ctx = ctx
        self.names = names
        self.original_dtype = original_dtype
        self.requires_grad = requires_grad
        self.path = path
        self.original = original
        self.set_compute_attr = False

    def slots(self) -> list[str]:
        """Where the stored tensors live on the module: `weight` (a parameter), then `weight_<name>` buffers."""
        return [_slot(name, i == 0) for i, name in enumerate(self.names)]

    def tensors(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The stored tensors, read from the module at each call (offloading swaps them)."""
        out = {}
        for i, name in enumerate(self.names):
            slot = _slot(name, i == 0)
            out[name] = module._parameters[slot] if i == 0 else module._buffers[slot]
        return out

    def new_forward(self, module: nn.Module, next_fn, *args: Any, **kwargs: Any) -> Any:
        if not is_class_forward(module, next_fn):
            # An observer hook below this one, or a forward set on the instance, sits inside: run it,
            # computing the layer's own F.linear on its stored weight wherever it happens in there.
            def linear(func, a: tuple, k: dict) -> torch.Tensor:
                return self.compute(module, a[0] if a else k["input"])

            return run_inner(module, next_fn, args, kwargs, linear, f"{self.scheme} data", self.path or type(module).__name__)
        x = args[0] if args else kwargs["input"]
        return self.compute(module, x)

    def compute(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The leaf's own computation on `x` with its stored tensors, through the backend."""
        tensors = self.tensors(module)
        bias = module.bias
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _QuantLinearFn.apply(x, bias, self, *tensors.values())
        return self.format.linear(x, tensors, self.ctx, bias)

    def dequantized(self, module: nn.Module) -> torch.Tensor:
        return self.format.dequantize(self.tensors(module), self.ctx, self.original_dtype)


# ---- apply / remove -------------------------------------------------------------------------------
def apply_quantize(model: nn.Module, config: Quantize | None = None, **kwargs: Any) -> dict[str, Any]:
    """Apply quantization (as `hookwise.apply(model, Quantize(...))`); returns its summary."""
    config = config or Quantize(**kwargs)
    apply_techniques(model, [config])
    return quantize_summary(model)


def remove_quantize(model: nn.Module) -> list[str]:
    """Remove quantization: exact with `keep_original=True`, else dequantized weights (lossy, warns)."""
    return remove_techniques(model, [TECHNIQUE])


def _fits(group_size: int | None):
    def fits(scheme: str, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        return make_format(scheme, group_size).fits(shape, dtype)

    return fits


def _apply_quantize(model: nn.Module, config: Quantize) -> None:
    model = unwrap(model)
    if quantized_leaves(model):
        raise ConfigError("quantization is already applied to this model; remove it first to change it")
    chosen = choose_targets(model, config.scheme, config.skip, config.modules or (), _fits(config.group_size))
    formats = {s: make_format(s, config.group_size) for s in {s for _, s in chosen.chosen.values()}}
    # Every backend and device is checked before anything changes.
    for scheme, fmt in sorted(formats.items()):
        for device in sorted({m.weight.device for m, s in chosen.chosen.values() if s == scheme}, key=str):
            fmt.check(device)
    with transaction() as txn:
        for path, (module, scheme) in chosen.chosen.items():
            original = module.weight
            tensors, ctx = formats[scheme].quantize(original)
            names = tuple(tensors)
            hook = QuantHook(
                scheme, formats[scheme], ctx, names, original.dtype, original.requires_grad, path,
                original if config.keep_original else None,
            )  # fmt: skip
            txn.on_rollback(lambda m=module, h=hook, o=original: _restore_leaf(m, h, o), f"quantization of {path}")
            for i, name in enumerate(names):
                # A tensor of its own per slot: backends share constants (bitsandbytes' code table)
                # that offloading would otherwise pin as tied and safetensors refuse to save.
                value = tensors[name].detach()
                value = value.clone() if i and value.numel() <= 256 else value
                if i == 0:
                    # Frozen because quantized bytes cannot be trained, not by the user: offloading
                    # reads the user's flag from the mark.
                    module._parameters["weight"] = mark_frozen(nn.Parameter(value, requires_grad=False), original.requires_grad)
                else:
                    module.register_buffer(_slot(name, False), value, persistent=True)
            if "compute_dtype" not in module.__dict__:
                # PEFT gives adapters the dtype of `base_layer.compute_dtype` when it exists (its path
                # for quantized bases), so LoRA layers added later compute in the model's dtype.
                module.compute_dtype = original.dtype
                hook.set_compute_attr = True
            add_hook(module, hook, HOOK_NAME)
            del original
    summary = quantize_summary(model)
    logger.info(
        "hookwise quantization: %d leaves (%s), %.1f -> %.1f MiB, %d kept", len(summary["quantized"]),
        ", ".join(sorted(formats)), summary["bytes_before"] / 2**20, summary["bytes_after"] / 2**20, len(chosen.kept),
    )  # fmt: skip


def _restore_leaf(module: nn.Module, hook: QuantHook, original: nn.Parameter | None) -> None:
    """Undo one leaf: the original weight if given, else the dequantized one."""
    if original is None:
        original = nn.Parameter(hook.dequantized(module).detach(), requires_grad=hook.requires_grad)
    for i, name in enumerate(hook.names):
        if i:
            module._buffers.pop(_slot(name, False), None)
    module._parameters["weight"] = original
    if hook.set_compute_attr:
        module.__dict__.pop("compute_dtype", None)
    registry = HookRegistry.of(module)
    if registry is not None and HOOK_NAME in registry:
        registry.remove(HOOK_NAME)


def _remove_quantize(model: nn.Module, config: Quantize | None = None) -> int:
    model = unwrap(model)
    lossy = 0
    leaves = quantized_leaves(model)
    modules = dict(model.named_modules())
    for path, hook in leaves.items():
        if hook.original is None:
            lossy += 1
        _restore_leaf(modules[path], hook, hook.original)
        hook.original = None
    if lossy:
        warnings.warn(
            f"hookwise: removing quantization gives {lossy} leaves dequantized weights; the rounding stays (the "
            f"originals were not kept). Apply Quantize(keep_original=True) for an exact undo, or reload the "
            f"checkpoint; hookwise.save_quantized keeps a quantized model as it is",
            stacklevel=4,
        )
    return len(leaves)


def quantized_leaves(model: nn.Module) -> dict[str, QuantHook]:
    """{path: hook} of every quantized leaf of the model."""
    return hooks_named(model, HOOK_NAME, QuantHook)


def quantize_summary(model: nn.Module) -> dict[str, Any]:
    """What quantization did: {path: scheme} quantized, and the targeted weight bytes before / after."""
    leaves = quantized_leaves(model)
    modules = dict(unwrap(model).named_modules())
    before = after = 0
    for path, hook in leaves.items():
        module = modules[path]
        stored = hook.tensors(module)
        before += module.in_features * module.out_features * hook.original_dtype.itemsize
        after += sum(t.numel() * t.element_size() for t in stored.values())
    return {
        "quantized": {path: hook.scheme for path, hook in leaves.items()},
        "bytes_before": before,
        "bytes_after": after,
    }


# ---- cost declaration (for the planner) ---------------------------------------------------------
# Bytes per weight element as stored, per output row (scale, zero point) or per group (scale, zero
# point / block maximum) and per leaf (bitsandbytes' 16-entry fp32 code table); the forward time of
# a quantized Linear relative to the plain one (assumed from the kernels: one dequantize next to the
# matmul for the weight-only schemes, fp8 matmul faster, LLM.int8's outlier split slower); and the
# quality class: the relative L2 error of the dequantized weight, measured on a Gaussian bf16 weight
# of FLUX's width (3072 x 3072, seed 0) with each backend's own quantizer (int4: torchao's groupwise
# affine quantizer at group 128, the math of its tinygemm layout, measured on the CPU).
SCHEME_COST: dict[str, dict[str, Any]] = {
    "int8-weight": {"bytes": 1.0, "rows": 5, "compute": 1.1, "quality": "int8 (0.9% weight error)"},
    "int8-dynamic": {"bytes": 1.0, "rows": 5, "compute": 1.0, "quality": "int8 dynamic (0.9% weight error)"},
    "int4-weight": {"bytes": 0.5, "group": 4, "compute": 1.1, "quality": "int4 (10% weight error)"},
    "fp8-weight": {"bytes": 1.0, "rows": 4, "compute": 1.1, "quality": "fp8 (2.7% weight error)"},
    "fp8-dynamic": {"bytes": 1.0, "rows": 4, "compute": 0.7, "quality": "fp8 dynamic (2.7% weight error)"},
    "nf4": {"bytes": 0.5, "group": 4, "table": 64, "compute": 1.2, "quality": "nf4 (9% weight error)"},
    "fp4": {"bytes": 0.5, "group": 4, "table": 64, "compute": 1.2, "quality": "fp4 (12% weight error)"},
    "int8": {"bytes": 1.0, "rows": 4, "compute": 1.3, "quality": "LLM.int8 (0.9% weight error)"},
}


def stored_bytes(scheme: str, shape: tuple[int, ...], group_size: int | None = None) -> int:
    """Bytes a weight of `shape` takes under `scheme`: data plus its scales."""
    cost = SCHEME_COST[scheme]
    out, numel = shape[0], 1
    for n in shape:
        numel *= n
    data = int(numel * cost["bytes"])
    if "group" in cost:
        group = group_size or _GROUPED[scheme]
        return data + -(-numel // group) * cost["group"] + cost.get("table", 0)
    return data + out * cost["rows"]


def _leaf_scheme(config: Quantize, path: str) -> str | None:
    """The scheme `config` gives the leaf at `path` (its `modules=` overrides first, first match wins)."""
    for pattern, scheme in config.modules or ():
        if re.search(pattern, path):
            return scheme
    return config.scheme


def _quantize_effect(placement: Placement, config: Quantize, ctx: CostContext) -> Placement:
    """Targeted tower Linears shrink to their scheme's bytes (per-module overrides included), which is
    also what offloading then streams; one dequantized weight is transient; compute scales by the
    slowest scheme's dequant factor; the quality class names each scheme used with its measured error."""
    fp = placement.footprint
    changed: list[LeafBytes] = []
    used: set[str] = set()
    for leaf in fp.leaves:
        if leaf.kind != "linear" or leaf.block is None or len(leaf.shape) != 2:
            continue
        if leaf.keep is not None and (config.skip == "auto" or leaf.keep in ("adapter", "cast")):
            continue
        scheme = _leaf_scheme(config, leaf.path)
        if scheme is None:
            continue
        used.add(scheme)
        numel = leaf.shape[0] * leaf.shape[1]
        new = stored_bytes(scheme, leaf.shape, config.group_size)
        changed.append(replace(leaf, nbytes=leaf.nbytes - numel * leaf.itemsize + new, itemsize=1, keep="quantized"))
    largest = max((leaf.shape[0] * leaf.shape[1] * fp.compute_itemsize for leaf in changed), default=0)
    factor = max((SCHEME_COST[s]["compute"] for s in used), default=1.0)
    quality = " + ".join(SCHEME_COST[s]["quality"] for s in sorted(used)) or SCHEME_COST[config.scheme]["quality"]
    return placement.stored_as(fp.with_leaves(changed), transient=largest, factor=factor, quality=quality)


def _quantize_options(placement: Placement, ctx: CostContext) -> list[Quantize]:
    """int8 weight-only and nf4 (both run everywhere), fp8 dynamic where the GPU has fp8 matmul."""
    if not any(leaf.keep is None and leaf.kind == "linear" and leaf.block is not None for leaf in placement.footprint.leaves):
        return []
    options = [Quantize("int8-weight"), Quantize("nf4")]
    device = str(getattr(ctx.hardware, "device", ""))
    # the hardware profile's fp8 flag (detected from the compute capability, or stated with --fp8 / --no-fp8)
    if device.startswith("cuda") and getattr(ctx.hardware, "fp8", False) and not ctx.training:
        options.append(Quantize("fp8-dynamic"))
    return options


register_technique(
    TECHNIQUE,
    Quantize,
    apply=_apply_quantize,
    remove=_remove_quantize,
    layer=Layer.QUANT,
    conflicts=("casting",),
    description="int8 / int4 / fp8 / nf4 weights through torchao or bitsandbytes, QLoRA-safe",
    cost=TechniqueCost(_quantize_effect, _quantize_options, exact_undo=False),
)
