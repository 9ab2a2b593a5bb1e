"""GGUF files: load a pre-quantized `.gguf` into a model and keep its weights quantized.

`load_gguf(model, path)` (the same as `hookwise.apply(model, GGUFFile(path))`) reads the file
memory-mapped (`gguf.GGUFReader`), maps its tensor names to the model's keys (`introspect/gguf_keys.py`:
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
from ..errors import CompatibilityError, ConfigError, MissingDependencyError, require
from ..introspect.architectures import detect_architecture
from ..introspect.precision import REASON_DTYPE_READ, find_dtype_readers
from ..introspect.gguf_keys import KEY_MAPS, GGUFKeyMap, KeyTarget, key_map_named
from ._gguf_dequant import TYPES, dequantize, gguf_type
from ._inner import is_class_forward, run_inner

logger = logging.getLogger("hookwise.quant.gguf")

NAME = "gguf"
HOOK_NAME = "hookwise.gguf"
KERNELS = ("auto", "torch", "triton")
_ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF stores the shape of tensors it reshaped to quantize


class GGUFLoadError(ConfigError):
    """A GGUF file does not fit the model it is loaded into (architecture, keys, shapes or types)."""


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


# ---- reading a file ---------------------------------------------------------------------------------
@dataclass
class _FileTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # the logical (numpy-order) shape of the weight
    data: np.ndarray  # memory-mapped: values for plain types, uint8 blocks for quantized ones


@dataclass
class _GGUFContents:
    path: str
    architecture: str | None
    tensors: dict[str, _FileTensor]


def read_gguf(path: str) -> _GGUFContents:
    """The tensors of a GGUF file, memory-mapped (nothing is read until used)."""
    gguf = require("gguf", "gguf", "loading GGUF files")
    if not os.path.isfile(path):
        raise GGUFLoadError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as exc:
        raise GGUFLoadError(f"{path!r} is not a readable GGUF file ({exc}); check that it is a complete .gguf") from exc
    arch_field = reader.fields.get("general.architecture")
    architecture = str(arch_field.contents()) if arch_field is not None else None
    tensors = {}
    for t in reader.tensors:
        type_name = t.tensor_type.name
        if type_name not in TYPES:
            raise GGUFLoadError(
                f"tensor {t.name!r} of {path!r} is stored as {type_name}, which hookwise cannot dequantize; "
                f"supported types: {sorted(TYPES)} (requantize the file to one of them)"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        orig = reader.fields.get(_ORIG_SHAPE + t.name)
        if orig is not None:
            shape = tuple(int(n) for n in orig.contents())
        tensors[t.name] = _FileTensor(t.name, type_name, shape, t.data)
    return _GGUFContents(path, architecture, tensors)


def _file_types(contents: _GGUFContents) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, t.type_name) for name, t in contents.tensors.items()))


# ---- matching a file to a model ---------------------------------------------------------------------
@dataclass
class _Piece:
    """One model key and the part of a file tensor that fills it."""

    key: str
    tensor: _FileTensor
    rows: tuple[int, int] | None  # the rows of the file tensor this key takes; None: all of it
    swap_halves: bool
    quantized: bool  # kept as GGUF blocks under a hook (a Linear / Conv weight)


def _hookable(module: nn.Module) -> bool:
    """A Linear / Conv whose forward is its class's own (so the hook can compute it)."""
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, base) and type(module).forward is base.forward:
            return True
    return False


def _choose_map(config: GGUFFile, model: nn.Module, contents: _GGUFContents, keys: set[str]) -> GGUFKeyMap:
    if config.architecture != "auto":
        return key_map_named(config.architecture)
    identity = KEY_MAPS["identity"]
    if all(identity.target(n).keys[0] in keys for n in contents.tensors):
        return identity
    arch = detect_architecture(model)
    if arch is not None and arch.name in KEY_MAPS:
        return KEY_MAPS[arch.name]
    if contents.architecture in KEY_MAPS:
        return KEY_MAPS[contents.architecture]
    return identity


def match_file(model: nn.Module, contents: _GGUFContents, config: GGUFFile) -> tuple[GGUFKeyMap, list[_Piece]]:
    """Every model key and the file data that fills it; a `GGUFLoadError` listing everything that does not fit."""
    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules(remove_duplicate=False))  # a block registered twice: both paths
    key_map = _choose_map(config, model, contents, set(state))
    arch = detect_architecture(model)
    model_arch = arch.name if arch is not None and arch.name in KEY_MAPS else None
    stated = config.architecture if config.architecture in ("flux", "wan") else model_arch
    if contents.architecture in KEY_MAPS and stated is not None and contents.architecture != stated:
        raise GGUFLoadError(
            f"{contents.path!r} holds a {contents.architecture!r} model (its general.architecture), but the model is "
            f"{type(model).__name__} ({stated}); load a file made for this architecture"
        )
    unexpected: list[str] = []
    mismatched: list[str] = []
    pieces: list[_Piece] = []
    filled: set[str] = set()
    for name, tensor in contents.tensors.items():
        target = key_map.target(name)
        if target is None or any(k not in state for k in target.keys):
            where = f" (-> {', '.join(target.keys)})" if target is not None else ""
            unexpected.append(name + where)
            continue
        problem = _fit(target, tensor, state, pieces, modules)
        if problem:
            mismatched.append(problem)
        filled.update(target.keys)
    missing = [k for k in state if k not in filled]
    # Buffers outside the state dict (rope tables) are no file's: on `meta` they would stay unusable.
    missing += [f"{n} (a non-persistent buffer on meta)" for n, b in model.named_buffers() if b.is_meta and n not in state]
    if unexpected or mismatched or missing:
        lines = [f"{contents.path!r} does not fit {type(model).__name__} (key map {key_map.name!r}):"]
        for title, items in (("missing from the file", missing), ("not in the model", unexpected),
                             ("shape mismatch", mismatched)):  # fmt: skip
            if items:
                more = f" ... and {len(items) - 12} more" if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:12])}{more}")
        lines.append(
            "  Load a file of this model's architecture and size; pass architecture= ('flux', 'wan', 'identity') "
            "if its names were not recognised."
        )
        if any(k.endswith("on meta)") for k in missing):
            lines.append(
                "  Build the model with its buffers materialised: accelerate.init_empty_weights(include_buffers=False) "
                "puts only the parameters on meta."
            )
        raise GGUFLoadError("\n".join(lines))
    return key_map, pieces


def _fit(target: KeyTarget, tensor: _FileTensor, state: dict, pieces: list[_Piece], modules: dict) -> str | None:
    """Add the pieces of one file tensor; or say why its shape does not fit."""
    shapes = [tuple(state[k].shape) for k in target.keys]
    t = TYPES[tensor.type_name]
    if len(target.keys) == 1 and not target.swap_halves:
        if shapes[0] != tensor.shape:
            return f"{tensor.name} {tensor.shape} -> {target.keys[0]} {shapes[0]}"
        bounds = [None]
    else:
        if any(s[1:] != tensor.shape[1:] for s in shapes) or sum(s[0] for s in shapes) != tensor.shape[0]:
            return f"{tensor.name} {tensor.shape} -> {', '.join(f'{k} {s}' for k, s in zip(target.keys, shapes))}"
        row = int(np.prod(tensor.shape[1:], dtype=np.int64))
        if t.quantized and row % t.block_size:
            return f"{tensor.name}: {tensor.type_name} blocks straddle its rows, so it cannot be split"
        starts = np.cumsum([0, *(s[0] for s in shapes)])
        bounds = [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    for key, rows in zip(target.keys, bounds):
        module_path, _, param = key.rpartition(".")
        module = modules.get(module_path)
        whole_rows = int(np.prod(state[key].shape[1:], dtype=np.int64)) % t.block_size == 0
        keep = t.quantized and param == "weight" and module is not None and _hookable(module) and whole_rows
        pieces.append(_Piece(key, tensor, rows, target.swap_halves, keep))
    return None


def _raw_rows(piece: _Piece) -> np.ndarray:
    """The file bytes / values of a piece: its rows of the file tensor (the halves swapped if asked)."""
    data = piece.tensor.data
    if piece.rows is None and not piece.swap_halves:
        return data
    data = data.reshape(piece.tensor.shape[0], -1)
    if piece.swap_halves:
        half = data.shape[0] // 2
        data = np.concatenate([data[half:], data[:half]])
    if piece.rows is not None:
        data = data[piece.rows[0] : piece.rows[1]]
    return data


def _piece_tensor(piece: _Piece, like: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The tensor a piece installs: GGUF blocks (uint8, rows of blocks) or plain values in `dtype`."""
    # A copy: the reader's arrays are views of the read-only file mapping.
    tensor = torch.from_numpy(np.array(_raw_rows(piece), copy=True)).to(device)
    shape = tuple(like.shape)
    type_name = piece.tensor.type_name
    if piece.quantized:
        return tensor.reshape(shape[0], -1) if len(shape) else tensor
    if type_name == "BF16" or TYPES[type_name].quantized:
        return dequantize(tensor.view(torch.uint8), type_name, shape, dtype)
    return tensor.reshape(shape).to(dtype)


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
        config = replace(config, types=_file_types(read_gguf(config.path)))
    return apply_gguf(model, config)


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
    if config.types and _file_types(contents) != tuple(sorted(config.types)):
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
            value = _piece_tensor(piece, original, dtype, device)
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
                               quality=f"gguf {'/'.join(kinds) or 'plain'}")  # fmt: skip


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
