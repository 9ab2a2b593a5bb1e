"""GGUF files: load a pre-quantized `.gguf` into a model and keep its weights quantized.

`load_gguf(model, path)` (the same as `hookwise.apply(model, GGUFFile(path))`) reads the file
memory-mapped (`gguf.GGUFReader`; reading and matching live in `_gguf_file.py`), maps its tensor names to the model's keys (`introspect/gguf_keys.py`:
FLUX's BFL names, Wan's original names, or the model's own names), checks every shape, and only then
installs the weights:

- a quantized tensor of a Linear / Conv leaf's `weight` stays quantized: the leaf's `weight` becomes a
  plain uint8 parameter holding the file's GGUF blocks (frozen), and a hook dequantizes it to the
  compute dtype at each forward (`_gguf_dequant.py` in torch ops; Triton kernels on CUDA). So what
  offloading streams, and what `state_dict()` holds, are the quantized bytes. In training the hook
  saves only those bytes for backward and dequantizes again there (no compute-dtype copy stays alive);
  LoRA adapters (PEFT) on top train in the compute dtype.
- F32 / F16 / BF16 tensors, and quantized tensors of anything else (a norm scale, a modulation table,
  a layer whose weight dtype some forward reads), load as ordinary weights in the model's dtype (or
  `compute_dtype` when given).

The model may be built on `meta` (`with torch.device("meta"): Model(config)`, or accelerate's
`init_empty_weights(include_buffers=False)` where the model has buffers no file holds, such as rope
tables): nothing full-precision is materialised, so peak RAM is about the file's size. Loading is
all-or-nothing: a file of another architecture, a missing or unexpected key, a shape that does not
fit or a type hookwise cannot dequantize is an error before anything changes.

Removing (`hookwise.remove(model, "gguf")`) gives each quantized leaf a compute-dtype weight again: the
file's values dequantized, exactly. The weights the model held before loading are not restored (the
file replaced them), which the removal says in a warning.

The config is data: the file path, the key map and the file's type map (`types`, filled by
`load_gguf`), so a saved stack applied to a fresh model reloads the same file and checks that the
file still holds what it held.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import TechniqueConfig, parse_dtype
from ..core.cost import CostContext, Placement, TechniqueCost
from ..core.hooks import HookRegistry, Layer, ModelHook, add_hook, hooks_named, unwrap
from ..core.marks import mark_frozen
from ..core.techniques import applied_configs, apply_techniques, register_technique, remove_techniques, technique_of
from ..core.transaction import transaction
from ..errors import CompatibilityError, ConfigError, MissingDependencyError, NoTargetError
from ..introspect.precision import REASON_DTYPE_READ, find_dtype_readers
from ..introspect.gguf_keys import KEY_MAPS
from ..introspect.model_map import describe
from ._gguf_dequant import TYPES, dequantize, gguf_type
from ._gguf_file import GGUFLoadError, file_types, match_file, piece_tensor, read_gguf
from ._inner import is_class_forward, run_inner

logger = logging.getLogger("hookwise.quant.gguf")

NAME = "gguf"
HOOK_NAME = "hookwise.gguf"
KERNELS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class GGUFFile(TechniqueConfig):
    """Weights from a GGUF file, quantized tensors kept quantized and dequantized per layer at forward.

    - `path`: the `.gguf` file.
    - `architecture`: the key map: `"auto"` (the model's own names when the file has them, else the
      map of the model's architecture), `"identity"`, `"flux"` (BFL names) or `"wan"` (original Wan).
    - `compute_dtype`: the dtype quantized weights are dequantized to, and the dtype every other
      tensor of the file loads in. Default: the dtype the model's weights have now (`meta` ones
      included), each tensor keeping its own.
    - `device`: where the loaded weights go (default: where the model's weights are; the CPU for a
      `meta` model).
    - `kernels`: `"auto"` (Triton kernels for weights on CUDA when Triton is installed, torch ops
      elsewhere), `"torch"`, or `"triton"` (an error at apply time where Triton is missing).
    - `types`: the file's {tensor name: GGUF type}; `load_gguf` fills it from the file, and applying
      a config that has it checks the file still holds those tensors in those types.
    """

    path: str = ""
    architecture: str = "auto"
    compute_dtype: torch.dtype | None = None
    device: str | None = None
    kernels: str = "auto"
    types: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", parse_dtype(self.compute_dtype, "compute_dtype"))
        types = self.types.items() if isinstance(self.types, dict) else self.types
        object.__setattr__(self, "types", tuple((str(k), str(v)) for k, v in types))
        super().__post_init__()

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("GGUFFile needs path=, the .gguf file to load")
        if self.architecture != "auto" and self.architecture not in KEY_MAPS:
            raise ConfigError(f"architecture={self.architecture!r}: use 'auto' or one of {sorted(KEY_MAPS)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels={self.kernels!r}: use one of {KERNELS}")
        if self.compute_dtype is not None and (
            not self.compute_dtype.is_floating_point or self.compute_dtype.itemsize < 2
        ):
            raise ConfigError(f"compute_dtype={self.compute_dtype} cannot compute; use float32, bfloat16 or float16")
        for _, type_name in self.types:
            gguf_type(type_name)


# ---- the hook -----------------------------------------------------------------------------------------
class _Dequantizer:
    """Dequantizes GGUF blocks: Triton kernels for CUDA tensors when enabled, torch ops elsewhere."""

    def __init__(self, kernels: str) -> None:
        self.kernels = kernels
        self._triton: Any = None
        if kernels == "torch":
            return
        try:
            from ._gguf_triton import SUPPORTED, available
            from ._gguf_triton import dequantize as triton_dequantize
        except ImportError as exc:
            if kernels == "triton":
                raise MissingDependencyError(
                    f"kernels='triton' needs Triton, which cannot be imported ({exc}): pip install 'hookwise[triton]', "
                    f"or pass kernels='auto' / 'torch' (the same values from torch ops)"
                ) from exc
            return
        if available():
            self._triton = (SUPPORTED, triton_dequantize)
        elif kernels == "triton":
            raise ConfigError(
                "kernels='triton': the Triton kernels run on CUDA and there is no CUDA device here; pass "
                "kernels='auto' (Triton where weights are on CUDA) or 'torch' (the same values from torch ops)"
            )

    def __call__(self, raw: torch.Tensor, type_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self._triton is not None and raw.is_cuda and type_name in self._triton[0]:
            return self._triton[1](raw, type_name, shape, dtype)
        return dequantize(raw, type_name, shape, dtype)


@dataclass
class GGUFRecord:
    """What one application of a GGUF file did; shared by the hooks it attached."""

    config: GGUFFile
    key_map: str
    compute_dtype: torch.dtype
    dequant: _Dequantizer
    types: dict[str, str]  # model key -> GGUF type of what it holds


class _GGUFLinearFn(torch.autograd.Function):
    """y = x @ dequant(blocks).T + b, saving only the blocks for backward."""

    @staticmethod
    def forward(ctx, x, raw, bias, hook):
        weight = hook.dequantize(raw, x.dtype)
        ctx.hook, ctx.x_dtype = hook, x.dtype
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(raw)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (raw,) = ctx.saved_tensors
            grad_x = grad_out.matmul(ctx.hook.dequantize(raw, grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class GGUFHook(ModelHook):
    """On a Linear / Conv holding GGUF blocks: dequantize them to the compute dtype and compute."""

    layer = Layer.QUANT

    def __init__(self, record: GGUFRecord, type_name: str, shape: tuple[int, ...], requires_grad: bool, path: str):
        self.record = record
        self.type_name = type_name
        self.shape = shape  # the weight's shape (its blocks are stored as rows of bytes)
        self.requires_grad = requires_grad  # the replaced weight's flag, restored on removal
        self.path = path
        self.set_compute_attr = False

    def dequantize(self, raw: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.record.dequant(raw, self.type_name, self.shape, dtype or self.record.compute_dtype)

    def new_forward(self, module: nn.Module, next_fn, *args, **kwargs):
        if not is_class_forward(module, next_fn):
            # A forward set on the instance (a kohya-style LoRA) or an observer hook sits inside: run it,
            # computing the layer's own F.linear / conv on its weight wherever it happens in there.
            return run_inner(module, next_fn, args, kwargs, self._inner_op, "GGUF blocks", self.path or type(module).__name__)
        x = args[0] if args else kwargs["input"]
        return self.compute(module, x)

    def _inner_op(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        if func is F.linear:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _GGUFLinearFn.apply(args[0] if args else kwargs["input"], weight, bias, self)
        rest = list(args)
        rest[1] = self.dequantize(weight)
        return func(*rest, **kwargs)

    def compute(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's own computation on `x` with its weight dequantized from the blocks."""
        if isinstance(module, nn.Linear):
            return _GGUFLinearFn.apply(x, module.weight, module.bias, self)
        return module._conv_forward(x, self.dequantize(module.weight), module.bias)


# ---- apply / remove ------------------------------------------------------------------------------------
def load_gguf(model: nn.Module, path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Load the GGUF file at `path` into `model`, quantized weights kept quantized; returns `gguf_summary`.

    `options` are `GGUFFile`'s fields (`architecture`, `compute_dtype`, `device`, `kernels`). The same as
    `hookwise.apply(model, GGUFFile(path, ...))`, with the file's type map recorded in the config.
    """
    config = GGUFFile(path=os.fspath(path), **options)
    if not config.types:
        config = replace(config, types=file_types(read_gguf(config.path)))
    return apply_gguf(model, config)


def save_gguf(
    model: nn.Module, path: str | os.PathLike, qtype: str = "Q8_0", skip: str = "auto", arch: str | None = None
) -> dict[str, str]:
    """Write `model`'s weights as a GGUF file under its own key names (which `load_gguf` reads back).

    The weights of the model map's Linear leaves whose input width holds whole blocks of `qtype` are
    quantized to it (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 by the `gguf` package; Q4_K, Q5_K, Q6_K by hookwise's
    own quantizer, `_gguf_write.py`); with `skip="auto"` only those inside the towers that the map does
    not keep in high precision, with `skip="none"` every Linear. Every other tensor is written as it is
    (F32 / F16 / BF16). `arch` is the file's `general.architecture` (default: the model's class name).
    Returns {tensor name: GGUF type}. Nothing is written when a tensor cannot be (an error first).
    """
    from ._gguf_write import WRITABLE, quantize, write_file

    type_name = gguf_type(qtype).name
    if type_name not in WRITABLE:
        raise ConfigError(f"save_gguf writes types {list(WRITABLE)}, not {type_name}")
    if skip not in ("auto", "none"):
        raise ConfigError(f"skip={skip!r}: use 'auto' (keep what the model map keeps in high precision) or 'none'")
    model = unwrap(model)
    block = TYPES[type_name].block_size
    model_map = describe(model)
    modules = dict(model.named_modules())
    chosen = set()
    for leaf in model_map.leaves:
        weight = getattr(modules[leaf.path], "weight", None)
        if leaf.kind != "linear" or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if skip == "auto" and (leaf.block is None or leaf.keep is not None):
            continue
        if weight.shape[1] % block == 0:
            chosen.add(f"{leaf.path}.weight")
    if not chosen:
        raise NoTargetError(
            f"save_gguf found no Linear weight of {type(model).__name__} to store in {type_name}: their input widths "
            f"must be multiples of {block}" + ("; skip='none' also takes what the map keeps in high precision" if skip == "auto" else "")
        )
    plain = {torch.float32: np.float32, torch.float16: np.float16}
    tensors: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if value.device.type == "meta" or not value.is_floating_point() or value.dtype.itemsize < 2:
            raise ConfigError(
                f"save_gguf cannot write {name!r} ({value.dtype} on {value.device}): it writes a model holding its "
                f"full-precision weights (load them first; remove quantization or a loaded GGUF file)"
            )
        value = value.detach().cpu()
        if name in chosen:
            tensors[name] = (quantize(value.float().numpy(), type_name), type_name)
        elif value.dtype in plain:
            tensors[name] = value.numpy()
        else:  # bfloat16 and other 2-byte floats: raw BF16 bytes, one row of bytes per row
            raw = value.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*value.shape[:-1], -1)
            tensors[name] = (raw.numpy(), "BF16")
    write_file(path, tensors, arch or type(model).__name__.lower())
    return {name: (v[1] if isinstance(v, tuple) else ("F16" if v.dtype == np.float16 else "F32")) for name, v in tensors.items()}


def apply_gguf(model: nn.Module, config: GGUFFile) -> dict[str, Any]:
    """Apply a `GGUFFile` config (as `hookwise.apply(model, config)`); returns `gguf_summary(model)`."""
    apply_techniques(model, [config])
    return gguf_summary(model)


def remove_gguf(model: nn.Module) -> list[str]:
    """Remove the GGUF technique: quantized leaves get the file's values dequantized (see the module docstring)."""
    return remove_techniques(model, [NAME])


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _apply_gguf(model: nn.Module, config: GGUFFile) -> None:
    model = unwrap(model)
    if gguf_leaves(model):
        raise ConfigError("a GGUF file is already loaded into this model; remove it first to load another")
    above = [technique_of(c).name for c in applied_configs(model) if technique_of(c).layer > Layer.QUANT]
    if above:
        # Those techniques hold the weights the file would replace (offloading's group buffers).
        raise CompatibilityError(
            f"load the GGUF file before applying {above}: hookwise.remove(model), then load_gguf, then apply them "
            f"again (or pass them all to one hookwise.apply call)"
        )
    contents = read_gguf(config.path)
    if config.types and file_types(contents) != tuple(sorted(config.types)):
        raise GGUFLoadError(
            f"{config.path!r} no longer holds the tensors and types this config recorded (the file changed since "
            f"the stack was saved); load it again with hookwise.load_gguf to record what it holds now"
        )
    key_map, pieces = match_file(model, contents, config)
    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules(remove_duplicate=False))
    # A forward that reads a layer's weight dtype (`x.to(self.time_embedder.linear_1.weight.dtype)`) would
    # read uint8 from a layer holding blocks: such layers get their weights dequantized at load instead.
    candidates = {p.key.rpartition(".")[0]: modules[p.key.rpartition(".")[0]] for p in pieces if p.quantized}
    readers = find_dtype_readers(model, candidates)
    for piece in pieces:
        why = readers.get(piece.key.rpartition(".")[0])
        if piece.quantized and why:
            logger.warning("hookwise gguf: dequantizing %s at load (%s: %s)", piece.key, REASON_DTYPE_READ, why)
            piece.quantized = False
    targets = [state[p.key] for p in pieces if p.quantized]
    if not pieces:
        raise GGUFLoadError(f"{config.path!r} holds no tensors; nothing to load")
    compute = config.compute_dtype or _dominant_dtype(targets) or torch.float32
    device = torch.device(config.device) if config.device else _model_device(model)
    record = GGUFRecord(config, key_map.name, compute, _Dequantizer(config.kernels), {})
    installed: set[tuple[int, str]] = set()
    with transaction() as txn:
        for piece in pieces:
            module_path, _, name = piece.key.rpartition(".")
            module = modules[module_path]
            if (id(module), name) in installed:
                continue  # a module registered under two paths (a reused block): its first path filled it
            installed.add((id(module), name))
            original = state[piece.key]
            dtype = (config.compute_dtype or original.dtype) if original.is_floating_point() else original.dtype
            value = piece_tensor(piece, original, dtype, device)
            is_param = name in module._parameters
            holder = module._parameters if is_param else module._buffers
            txn.on_rollback(lambda h=holder, n=name, o=holder[name]: h.__setitem__(n, o), f"gguf {piece.key}")
            record.types[piece.key] = piece.tensor.type_name
            if is_param:
                grad = bool(original.requires_grad) and not piece.quantized
                holder[name] = nn.Parameter(value, requires_grad=grad)
                if piece.quantized:  # frozen because blocks cannot be trained: offloading reads the user's flag
                    mark_frozen(holder[name], original.requires_grad)
            else:
                holder[name] = value
            if piece.quantized:
                hook = GGUFHook(record, piece.tensor.type_name, tuple(original.shape), original.requires_grad, module_path)
                if "compute_dtype" not in module.__dict__:
                    # PEFT gives adapters the dtype of `base_layer.compute_dtype` when it exists (its path
                    # for quantized bases), so LoRA layers added later compute in the compute dtype.
                    module.compute_dtype = compute
                    hook.set_compute_attr = True
                txn.on_rollback(lambda m=module, h=hook: _drop_compute_attr(m, h), f"gguf {module_path} dtype")
                add_hook(module, hook, HOOK_NAME)
    summary = gguf_summary(model)
    logger.info(
        "hookwise gguf: %s -> %d quantized leaves, %d plain tensors (key map %s, %.1f MiB)",
        config.path, len(summary["quantized"]), len(pieces) - len(summary["quantized"]), key_map.name,
        summary["bytes"] / 2**20,
    )  # fmt: skip


def _drop_compute_attr(module: nn.Module, hook: GGUFHook) -> None:
    if hook.set_compute_attr:
        module.__dict__.pop("compute_dtype", None)


def _dominant_dtype(tensors: list[torch.Tensor]) -> torch.dtype | None:
    totals: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            totals[t.dtype] = totals.get(t.dtype, 0) + t.numel()
    return max(totals, key=totals.get) if totals else None


def _remove_gguf(model: nn.Module, config: GGUFFile | None = None) -> int:
    """Give every quantized leaf its dequantized weight back; returns how many."""
    model = unwrap(model)
    leaves = gguf_leaves(model)
    modules = dict(model.named_modules())
    for path, hook in leaves.items():
        module = modules[path]
        weight = hook.dequantize(module.weight.data)
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=hook.requires_grad)
        _drop_compute_attr(module, hook)
        HookRegistry.of(module).remove(HOOK_NAME)
    if leaves:
        warnings.warn(
            "hookwise: removing the GGUF technique leaves the file's weights in the model, dequantized to the "
            "compute dtype; the weights the model had before loading are not restored (reload them for that)",
            stacklevel=4,
        )
    return len(leaves)


def gguf_leaves(model: nn.Module) -> dict[str, GGUFHook]:
    """{path: hook} of every leaf holding GGUF blocks."""
    return hooks_named(model, HOOK_NAME, GGUFHook)


def gguf_summary(model: nn.Module) -> dict[str, Any]:
    """What the GGUF technique did: quantized leaves, {model key: type}, bytes of the loaded tensors."""
    model = unwrap(model)
    leaves = gguf_leaves(model)
    record = next(iter(leaves.values())).record if leaves else None
    state = model.state_dict(keep_vars=True)
    types = dict(record.types) if record else {}
    return {
        "path": record.config.path if record else None,
        "key_map": record.key_map if record else None,
        "compute_dtype": record.compute_dtype if record else None,
        "quantized": {p: h.type_name for p, h in leaves.items()},
        "types": types,
        "bytes": sum(state[k].numel() * state[k].element_size() for k in types if k in state),
    }


# ---- cost declaration (for the planner) ----------------------------------------------------------------
# Dequantizing is elementwise work next to a matmul that reads the same weight: a small factor, larger
# for the K-quants' two-level scales. Assumed from the shape of the kernels; BENCHMARKS.md has the
# ratios measured on the CPU with torch ops.
DEQUANT_FACTOR = {"legacy": 1.1, "k": 1.2}
# Quality class: the relative L2 error of the dequantized weight, measured with the `gguf` package's own
# quantizer on a Gaussian fp32 weight of FLUX's width (3072 x 3072, N(0, 1/3072), numpy seed 0). The
# package has no K-quant quantizer, so the K-quants' error is not measured (their class says so).
WEIGHT_ERROR = {"Q8_0": 0.0054, "Q5_1": 0.038, "Q5_0": 0.043, "Q4_1": 0.078, "Q4_0": 0.086}


def quality_class(type_name: str) -> str:
    """A GGUF type's quality class: the type and its measured weight error, where measured."""
    error = WEIGHT_ERROR.get(type_name)
    return f"{type_name} ({error:.1%} weight error)" if error is not None else f"{type_name} (weight error not measured)"


def bytes_per_weight(type_name: str) -> float:
    """Bytes a weight element takes in a GGUF type (scales included): Q8_0 1.0625, Q4_K 0.5625..."""
    t = gguf_type(type_name)
    return t.type_size / t.block_size


def _gguf_effect(placement: Placement, config: GGUFFile, ctx: CostContext) -> Placement:
    """Leaves the file quantizes shrink to its type's bytes per weight; one dequantized weight is transient."""
    fp = placement.footprint
    types = dict(config.types)
    if not types:
        return placement.note("gguf: the file's type map is unknown (load it with load_gguf to record it)")
    # Which leaf each file tensor fills, under every key map (the planner has no model to choose one by).
    by_prefix: dict[str, str] = {}
    for name, type_name in types.items():
        for key_map in KEY_MAPS.values():
            found = key_map.target(name)
            for key in found.keys if found is not None else ():
                by_prefix.setdefault(key.removesuffix(".weight"), type_name)
    changed = []
    largest = 0
    factor = 1.0
    for leaf in fp.leaves:
        type_name = by_prefix.get(leaf.path)
        if type_name is None or not TYPES[type_name].quantized or leaf.kind not in ("linear", "conv"):
            continue
        numel = int(np.prod(leaf.shape, dtype=np.int64))
        stored = int(numel * bytes_per_weight(type_name))
        changed.append(replace(leaf, nbytes=leaf.nbytes - numel * leaf.itemsize + stored, itemsize=1, keep="cast"))
        largest = max(largest, numel * fp.compute_itemsize)
        factor = max(factor, DEQUANT_FACTOR["k" if type_name.endswith("_K") else "legacy"])
    kinds = sorted({by_prefix[leaf.path] for leaf in changed})
    return placement.stored_as(fp.with_leaves(changed), transient=largest, factor=factor,
                               quality=f"gguf {' + '.join(quality_class(k) for k in kinds) or 'plain'}")  # fmt: skip


def _gguf_options(placement: Placement, ctx: CostContext) -> list[GGUFFile]:
    """None: a GGUF file is the user's choice of weights, never one the planner can make up."""
    return []


register_technique(
    NAME,
    GGUFFile,
    apply=_apply_gguf,
    remove=_remove_gguf,
    layer=Layer.QUANT,
    conflicts=("casting", "quantization"),
    description="weights from a GGUF file, kept quantized and dequantized per layer at forward",
    cost=TechniqueCost(_gguf_effect, _gguf_options, exact_undo=False),
)
