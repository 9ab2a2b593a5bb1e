"""Saving a quantized model as it is stored, and loading it without the full-precision weights.

    hookwise.save_quantized(transformer, "flux-nf4")          # flux-nf4/model.safetensors + stack.json
    model = hookwise.load_quantized("flux-nf4", lambda: FluxTransformer2DModel(**config))

`save_quantized` writes `model.state_dict()` (quantized leaves as their stored tensors, the rest as
they are) to `model.safetensors`, and the applied stack (with its stated map) to `stack.json`.

`load_quantized` builds the model with its parameters on `meta` (a factory is called under
accelerate's `init_empty_weights(include_buffers=False)` when accelerate is installed, so buffers
computed at construction stay real, else under `torch.device("meta")`; a model given must be on
`meta` already or is used as it is), freezes it, applies the quantization techniques of the stack
on `meta` (which gives every quantized leaf its stored tensors' shapes), checks every key and shape
of the file against the model, reads the saved tensors one by one into the model (read, not
memory-mapped, as `load_and_quantize` reads), then applies the rest of the stack (offloading ...).
No full-precision copy of a quantized weight is ever made: the peak is the quantized model itself
(anonymous memory) plus one tensor in flight. Memory-mapping the file instead (`load_file` +
`load_state_dict(assign=True)`, what this did before) costs nothing at load, but the model's tensors
then live in the file's pages: they enter the process as file-backed memory of the same size on the
first forward, change if the file is rewritten, and sit at the file's (unaligned) offsets. Measured on
the full-width FLUX block stack, int8 (BENCHMARKS.md): after reading every tensor both hold 1316 MiB
RSS for a 1312 MiB model, anonymous here, file-backed there. The originals of `keep_original=True`
are not saved, so a loaded model's quantization has `keep_original=False`.

Quantizing while loading a full-precision checkpoint (the full-precision model never exists):

    model = hookwise.load_and_quantize(
        lambda: FluxTransformer2DModel.from_config(config), "FLUX.1-dev/transformer", Quantize("nf4"),
        Offload(onload_device="cuda"), dtype=torch.bfloat16,
    )

`load_and_quantize` builds the model with its parameters on `meta` as `load_quantized` does,
applies the `Quantize` configs there (every quantized leaf gets its stored tensors' shapes and its
hook; a scheme's context does not depend on the values), then reads the checkpoint one tensor at a
time (safetensors, memory-mapped): a quantized leaf's weight is quantized as soon as it is read and
its full-precision copy dropped; every other tensor is assigned as it is (in `dtype`). So the peak
is about the quantized model plus one full-precision weight, instead of the full model plus the
quantized one of load-then-quantize. Then the rest of the stack is applied. The checkpoint is a
`.safetensors` file, a list of them, or a folder (a diffusers component folder: its
`*.safetensors.index.json` shards, or every `*.safetensors` in it) with the model's own key names;
every key and shape is checked against the model before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import ModelHook, hooks_named, unwrap
from ..core.marks import WAS_TRAINABLE, mark_frozen
from ..core.ledger import open_ledger, stated_map
from ..core.techniques import applied_configs, apply_techniques, technique_named, technique_of
from ..core.transaction import Transaction, transaction
from ..errors import ConfigError
from ._formats import QUANT_HOOK

WEIGHTS = "model.safetensors"
STACK = "stack.json"
FORMAT = "hookwise.stack"
VERSION = 1
QUANT_TECHNIQUES = ("quantization",)


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write a quantized model's stored tensors and its stack to the folder `path`; returns it."""
    from safetensors.torch import save_file

    root = unwrap(model)
    configs = applied_configs(root)
    if not any(technique_of(c).name in QUANT_TECHNIQUES for c in configs):
        raise ConfigError(
            f"save_quantized: no quantization is applied to this {type(root).__name__}; apply Quantize first "
            f"(or save a plain model with its own save_pretrained / torch.save of the state dict)"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in root.state_dict().items()}
    # Tensors that share storage (tied weights) are saved once each: safetensors refuses aliases.
    seen: dict[tuple[int, int], str] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen and value.numel():
            state[key] = value.clone()
        seen[ident] = key
    save_file(state, str(folder / WEIGHTS), metadata={"format": "hookwise.quantized"})
    stack: dict[str, Any] = {"format": FORMAT, "version": VERSION, "techniques": [c.to_dict() for c in configs]}
    stated = stated_map(root)
    if stated:
        stack["map"] = {key: list(paths) for key, paths in stated.items()}
    (folder / STACK).write_text(json.dumps(stack, indent=2))
    return folder


def _read_stack(folder: Path) -> tuple[list[TechniqueConfig], dict[str, tuple[str, ...]]]:
    try:
        data = json.loads((folder / STACK).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{folder / STACK} cannot be read ({exc}); was the folder written by save_quantized?") from exc
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"{folder / STACK} is not a hookwise stack of version {VERSION}")
    configs = [technique_named(e["technique"]).config_cls.from_dict(e) for e in data.get("techniques", [])]
    return configs, {k: tuple(v) for k, v in data.get("map", {}).items()}


def _empty_model(factory: Callable[[], nn.Module]) -> nn.Module:
    """`factory()` with its parameters on meta (buffers real where accelerate is installed)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        context: Any = torch.device("meta")
    else:
        context = init_empty_weights(include_buffers=False)
    with context:
        return factory()


def load_quantized(path: str | Path, model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Load a folder written by `save_quantized` into `model` (on `meta`) or a model built by a factory.

    Returns the model with the saved stack applied and every tensor of the file in place. The model
    is frozen (`requires_grad_(False)`): a quantized base is not trained; add adapters afterwards.
    """
    folder = Path(path)
    if not (folder / WEIGHTS).is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS}; pass the folder save_quantized wrote")
    configs, stated = _read_stack(folder)
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ConfigError(f"load_quantized needs a model on meta or a function that builds one, got {model!r}")
        model = _empty_model(model)
    root = unwrap(model)
    quant = [
        dataclasses.replace(c, keep_original=False) if getattr(c, "keep_original", False) else c
        for c in configs if technique_of(c).name in QUANT_TECHNIQUES
    ]  # fmt: skip
    rest = [c for c in configs if technique_of(c).name not in QUANT_TECHNIQUES]
    files = [folder / WEIGHTS]
    headers = _headers(files)
    with transaction() as txn:
        _freeze(txn, root)
        if stated:
            open_ledger(root).state_map(stated)
        meta_buffers = _meta_buffers(root)
        apply_techniques(root, quant)
        state = root.state_dict(keep_vars=True)
        # Every parameter (still on meta) and every buffer the file holds, in the dtype the file stores it;
        # a buffer on meta that the file lacks is `_check_meta_buffers`'s error, which says what to do.
        expected = {
            key: (tuple(t.shape), headers[key].dtype if key in headers else t.dtype, None)
            for key, t in state.items() if key in headers or (t.device.type == "meta" and isinstance(t, nn.Parameter))
        }  # fmt: skip
        _check_keys(expected, headers, files, set(state), "build the model with the configuration of the one saved")
        _check_meta_buffers(meta_buffers, headers, files)
        _fill(txn, dict(root.named_modules()), expected, headers, torch.device("cpu"))
        _check_filled(root)
        if rest:
            apply_techniques(root, rest)
    return model


# ---- quantizing a full-precision checkpoint as it loads ----------------------------------------------
def checkpoint_files(checkpoint: str | Path | Iterable[str | Path]) -> list[Path]:
    """The safetensors files of a checkpoint given as a file, a list of files or a folder."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if indexes:
                weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
                files = [path / name for name in sorted(set(weight_map.values()))]
            else:
                files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{path} holds no .safetensors file; pass a checkpoint file or a folder holding them")
        else:
            files = [path]
    else:
        files = [Path(p) for p in checkpoint]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"checkpoint file(s) {missing} do not exist")
    for f in files:
        if f.suffix != ".safetensors":
            raise ConfigError(f"{f} is not a .safetensors file; load_and_quantize reads safetensors checkpoints")
    return files


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    """Where one tensor of a safetensors file is: its file, shape, dtype and byte range."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the file
    nbytes: int


def _headers(files: list[Path]) -> dict[str, _Entry]:
    """{key: entry} from the files' headers only (the safetensors layout: a length, a JSON header, the data)."""
    keys: dict[str, _Entry] = {}
    for f in files:
        with open(f, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            try:
                header = json.loads(handle.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{f} is not a readable safetensors file ({exc})") from exc
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ConfigError(f"{f}: tensor {key!r} is stored as {info['dtype']}, which hookwise cannot load")
            begin, end = info["data_offsets"]
            keys[key] = _Entry(f, tuple(info["shape"]), _ST_DTYPES[info["dtype"]], 8 + size + begin, end - begin)
    return keys


def _read(entry: _Entry, handle: Any) -> torch.Tensor:
    """One tensor read from its file into a fresh (aligned) CPU tensor, without mapping the file.

    Reading rather than memory-mapping keeps the file's pages out of this process (a mapped file's
    pages count in its resident memory until unmapped), and a fresh allocation is aligned as a built
    model's weights are (a tensor viewed at the file's offset is not, and the CPU's matmul then sums
    in another order).
    """
    out = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        handle.seek(entry.start)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        if handle.readinto(view) != entry.nbytes:
            raise ConfigError(f"{entry.file} ends before tensor data it announces; the file is truncated")
    return out


def load_and_quantize(
    model: nn.Module | Callable[[], nn.Module],
    checkpoint: str | Path | Iterable[str | Path],
    *configs: TechniqueConfig,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build `model` on `meta`, quantize it there, fill it from a full-precision `checkpoint` tensor by tensor.

    `configs`: at least one `Quantize`; the others (offloading, caches ...) are applied after loading.
    `dtype`: the dtype of the model's floating-point tensors (and of the quantized weights' compute);
    None keeps the dtype the model was built in. `device`: where the loaded tensors go (quantizing
    there). Returns the model; it is frozen (`requires_grad_(False)`) as a quantized base is; add
    adapters afterwards.
    """
    quant = [c for c in configs if technique_of(c).name in QUANT_TECHNIQUES]
    rest = [c for c in configs if technique_of(c).name not in QUANT_TECHNIQUES]
    if not quant:
        raise ConfigError(
            "load_and_quantize needs a Quantize config (e.g. Quantize('nf4')); to load without quantizing use the "
            "model's own loader (from_pretrained, load_state_dict)"
        )
    if any(getattr(c, "keep_original", False) for c in quant):
        raise ConfigError("load_and_quantize never holds the original weights: use Quantize(keep_original=False)")
    files = checkpoint_files(checkpoint)
    device = torch.device(device)
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ConfigError(f"load_and_quantize needs a model on meta or a function that builds one, got {model!r}")
        model = _empty_model(model)
    root = unwrap(model)
    not_meta = [n for n, p in root.named_parameters() if p.device.type != "meta"]
    if not_meta:
        raise ConfigError(
            f"load_and_quantize fills a model built on meta, but {len(not_meta)} parameters hold values (e.g. "
            f"{not_meta[0]!r}); pass a function that builds the model, or build it under torch.device('meta'); to "
            f"quantize a loaded model use hookwise.apply(model, Quantize(...))"
        )
    headers = _headers(files)
    with transaction() as txn:
        _freeze(txn, root)
        if dtype is not None:
            old = {k: t for k, t in root.state_dict(keep_vars=True).items()}
            txn.on_rollback(lambda: root.load_state_dict(old, assign=True), "dtype")
            root.to(dtype)  # on meta: free; real buffers (rope tables) keep their values
        state = root.state_dict(keep_vars=True)
        meta_buffers = _meta_buffers(root)
        apply_techniques(root, quant)
        leaves = hooks_named(root, QUANT_HOOK, ModelHook)
        modules = dict(root.named_modules())
        expected = _expected_keys(root, state, leaves, headers)
        _check_keys(expected, headers, files, set(state), CHECKPOINT_HINT)
        _check_meta_buffers(meta_buffers, headers, files)
        _fill(txn, modules, expected, headers, device)
        _check_filled(root)
        if rest:
            apply_techniques(root, rest)
    return model


def _expected_keys(
    root: nn.Module, state: dict[str, torch.Tensor], leaves: dict[str, ModelHook], headers: dict[str, _Entry]
) -> dict[str, tuple[tuple[int, ...], torch.dtype, ModelHook | None]]:
    """{checkpoint key: (full-precision shape, dtype, the quantizing hook or None)} the model needs."""
    # Every parameter and every tensor the checkpoint holds (a buffer computed at construction is read
    # over if it does, as load_state_dict would); a buffer the checkpoint lacks keeps its values, or if
    # it is on meta, is `_check_meta_buffers`' error.
    expected = {
        key: (tuple(tensor.shape), tensor.dtype, None)
        for key, tensor in state.items() if key in headers or isinstance(tensor, nn.Parameter)
    }  # fmt: skip
    for path, hook in leaves.items():
        module = root.get_submodule(path)
        prefix = f"{path}." if path else ""
        for slot in hook.slots():
            expected.pop(prefix + slot, None)
        expected[prefix + "weight"] = ((module.out_features, module.in_features), hook.original_dtype, hook)
    return expected


CHECKPOINT_HINT = (
    "the checkpoint must use the model's own key names and configuration (for a diffusers component, its folder)"
)


def _freeze(txn: Transaction, root: nn.Module) -> None:
    """Freeze every parameter (a quantized base is not trained), restoring the flags on rollback."""
    flags = {p: p.requires_grad for p in root.parameters()}
    txn.on_rollback(lambda: [p.requires_grad_(f) for p, f in flags.items()], "freezing")
    root.requires_grad_(False)


def _meta_buffers(root: nn.Module) -> list[str]:
    """The model's own buffers on meta (taken before quantizing, whose stored tensors are filled by loading)."""
    return [n for n, b in root.named_buffers() if b.device.type == "meta"]


def _check_meta_buffers(meta_buffers: list[str], headers: dict[str, _Entry], files: list[Path]) -> None:
    """Before anything is read: every buffer on meta must be in the files, or it would stay without values.

    Such a buffer (a rope table, a position embedding) is computed by the model's constructor, which ran
    on meta; a checkpoint need not hold it (non-persistent buffers never are), so it is not a missing key
    of the file but a model built with too much on meta.
    """
    on_meta = [n for n in meta_buffers if n not in headers]
    if on_meta:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise ConfigError(
            f"{len(on_meta)} buffers of the model are on meta and {where} does not hold them (e.g. {on_meta[:3]}): "
            f"buffers the model computes when it is built (rope tables, position embeddings) would stay without "
            f"values. Build the model with only its parameters on meta: pass a function that builds it (with "
            f"accelerate installed, `pip install accelerate`), or build it under accelerate's "
            f"init_empty_weights(include_buffers=False) rather than torch.device('meta')"
        )


def _check_filled(root: nn.Module) -> None:
    """No tensor of the loaded model may stay on meta."""
    still_meta = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.device.type == "meta"]
    if still_meta:
        raise ConfigError(
            f"{len(still_meta)} tensors of the loaded model are still on meta (e.g. {still_meta[0]!r}): buffers "
            f"computed at construction that the file does not hold; pass a factory (with accelerate installed) or "
            f"build the model under accelerate's init_empty_weights(include_buffers=False)"
        )


def _check_keys(expected: dict, headers: dict, files: list[Path], model_keys: set[str], hint: str) -> None:
    """Every expected key in the files with its shape, and no key of the files unknown to the model."""
    missing = [k for k in expected if k not in headers]
    unexpected = [k for k in headers if k not in model_keys]
    wrong = [f"{k}: {headers[k].shape} in the file, {expected[k][0]} in the model" for k in expected
             if k in headers and headers[k].shape != expected[k][0]]  # fmt: skip
    if missing or wrong or unexpected:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise ConfigError(
            f"{where} does not fit this model: {len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}), {len(wrong)} shapes differ (e.g. {wrong[:2]}); {hint}"
        )


def _fill(txn: Transaction, modules: dict, expected: dict, headers: dict, device: torch.device) -> None:
    """Read each expected tensor from its file, quantizing a quantized leaf's weight as soon as it is read."""

    def put(holder: dict, name: str, value: torch.Tensor) -> None:
        txn.on_rollback(lambda h=holder, n=name, o=holder[name]: h.__setitem__(n, o), f"loading {name}")
        holder[name] = value

    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(headers[key].file, []).append(key)
    for f, keys in by_file.items():
        with open(f, "rb") as handle:
            for key in keys:
                _, dtype, hook = expected[key]
                module_path, _, name = key.rpartition(".")
                module = modules[module_path]
                value = _read(headers[key], handle)
                if value.is_floating_point() and value.dtype != dtype or device.type != "cpu":
                    value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
                if hook is None:
                    is_param = name in module._parameters
                    if is_param:  # a technique's mark on the parameter it built on meta stays on the real one
                        value = nn.Parameter(value, requires_grad=False)
                        was = getattr(module._parameters[name], WAS_TRAINABLE, None)
                        value = mark_frozen(value, was) if was is not None else value
                    put(module._parameters if is_param else module._buffers, name, value)
                    continue
                tensors, _ = hook.format.quantize(value)
                del value  # the full-precision weight goes as soon as it is quantized
                _give_back_freed_memory()
                for i, (slot_name, slot) in enumerate(zip(hook.names, hook.slots())):
                    # As Quantize stores them: small constants (bitsandbytes' code table) get their own copy.
                    stored = tensors[slot_name].detach()
                    stored = stored.clone() if i and stored.numel() <= 256 else stored
                    if i == 0:
                        put(module._parameters, slot, mark_frozen(nn.Parameter(stored, requires_grad=False), False))
                    else:
                        put(module._buffers, slot, stored)


def _give_back_freed_memory() -> None:
    """Return the heap pages freed since the last call to the OS (glibc's `malloc_trim`; elsewhere nothing).

    The full-precision weight and the quantizer's temporaries freed after each leaf sit between the
    quantized tensors kept; glibc keeps such free pages in the process unless asked, so without this
    the process's memory grows towards the size of everything read, not of what is kept.
    """
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
