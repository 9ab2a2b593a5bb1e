"""Quantizing while loading a full-precision checkpoint: the full-precision model never exists.

    model = hookwise.load_and_quantize(
        lambda: FluxTransformer2DModel.from_config(config), "FLUX.1-dev/transformer", Quantize("nf4"),
        Offload(onload_device="cuda"), dtype=torch.bfloat16,
    )

`load_and_quantize` builds the model with its parameters on `meta` (as `load_quantized` does: a
factory under accelerate's `init_empty_weights(include_buffers=False)`, or a model already on
`meta`), applies the `Quantize` configs there (every quantized leaf gets its stored tensors' shapes
and its hook; the scheme's context does not depend on the values), then reads the checkpoint one
tensor at a time (safetensors, memory-mapped): a quantized leaf's weight is quantized as soon as it
is read and its full-precision copy dropped; every other tensor is assigned as it is (in `dtype`).
So the peak is about the quantized model plus one full-precision weight, instead of the full
model plus the quantized one of load-then-quantize. Then the rest of the stack is applied.

The checkpoint is a `.safetensors` file, a list of them, or a folder (a diffusers component folder:
its `*.safetensors.index.json` shards, or every `*.safetensors` in it), with the model's own key
names. Every key is checked against the model before anything is read: a missing or unexpected key,
or a shape that does not fit, is an error naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import unwrap
from ..core.marks import mark_frozen
from ..core.techniques import apply_techniques, technique_of
from ..core.transaction import Transaction, transaction
from ..errors import ConfigError
from .quantize import TECHNIQUE, QuantHook, quantized_leaves
from .save import build_on_meta

logger = logging.getLogger("hookwise.quant.load")


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


def _headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{key: (file, shape)} read from the files' headers only."""
    from safetensors import safe_open

    keys: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                keys[key] = (f, tuple(handle.get_slice(key).get_shape()))
    return keys


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
    quant = [c for c in configs if technique_of(c).name == TECHNIQUE]
    rest = [c for c in configs if technique_of(c).name != TECHNIQUE]
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
        model = build_on_meta(model)
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
        flags = {p: p.requires_grad for p in root.parameters()}
        txn.on_rollback(lambda: [p.requires_grad_(f) for p, f in flags.items()], "freezing")
        root.requires_grad_(False)
        if dtype is not None:
            old = {k: t for k, t in root.state_dict(keep_vars=True).items()}
            txn.on_rollback(lambda: root.load_state_dict(old, assign=True), "dtype")
            root.to(dtype)  # on meta: free; real buffers (rope tables) keep their values
        state = root.state_dict(keep_vars=True)
        apply_techniques(root, quant)
        leaves = quantized_leaves(root)
        modules = dict(root.named_modules())
        expected = _expected_keys(root, state, leaves)
        _check_keys(expected, headers, files, set(state))
        _fill(txn, modules, expected, headers, device)
        still_meta = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.device.type == "meta"]
        if still_meta:
            raise ConfigError(
                f"{len(still_meta)} tensors of the loaded model are still on meta (e.g. {still_meta[0]!r}): buffers "
                f"computed at construction that no checkpoint holds; pass a factory (with accelerate installed) or "
                f"build the model under accelerate's init_empty_weights(include_buffers=False)"
            )
        if rest:
            apply_techniques(root, rest)
    return model


def _expected_keys(
    root: nn.Module, state: dict[str, torch.Tensor], leaves: dict[str, QuantHook]
) -> dict[str, tuple[tuple[int, ...], torch.dtype, QuantHook | None]]:
    """{checkpoint key: (full-precision shape, dtype, the quantizing hook or None)} the model needs."""
    expected = {}
    for key, tensor in state.items():
        if tensor.device.type != "meta":
            continue  # a buffer computed at construction; a checkpoint may still hold it (read if so)
        expected[key] = (tuple(tensor.shape), tensor.dtype, None)
    for path, hook in leaves.items():
        module = root.get_submodule(path)
        prefix = f"{path}." if path else ""
        for slot in hook.slots():
            expected.pop(prefix + slot, None)
        expected[prefix + "weight"] = ((module.out_features, module.in_features), hook.original_dtype, hook)
    return expected


def _check_keys(expected: dict, headers: dict, files: list[Path], model_keys: set[str]) -> None:
    missing = [k for k in expected if k not in headers]
    unexpected = [k for k in headers if k not in model_keys]
    wrong = [f"{k}: {headers[k][1]} in the file, {expected[k][0]} in the model" for k in expected
             if k in headers and headers[k][1] != expected[k][0]]  # fmt: skip
    if missing or wrong or unexpected:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise ConfigError(
            f"{where} does not fit this model: {len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:3]}), {len(wrong)} shapes differ (e.g. {wrong[:2]}); the checkpoint must use the model's own key names "
            f"and configuration (for a diffusers component, its folder)"
        )


def _fill(txn: Transaction, modules: dict, expected: dict, headers: dict, device: torch.device) -> None:
    """Read each expected tensor from its file, quantizing a quantized leaf's weight as soon as it is read."""
    from safetensors import safe_open

    def put(holder: dict, name: str, value: torch.Tensor) -> None:
        txn.on_rollback(lambda h=holder, n=name, o=holder[name]: h.__setitem__(n, o), f"loading {name}")
        holder[name] = value

    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(headers[key][0], []).append(key)
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in keys:
                _, dtype, hook = expected[key]
                module_path, _, name = key.rpartition(".")
                module = modules[module_path]
                read = handle.get_tensor(key)
                # A fresh allocation, as loading into a built model gives: a tensor read from the file sits
                # at the file's offset, unaligned, and the CPU's matmul then sums in another order.
                value = torch.empty(read.shape, dtype=dtype if read.is_floating_point() else read.dtype, device=device)
                value.copy_(read)
                del read
                if hook is None:
                    is_param = name in module._parameters
                    put(module._parameters if is_param else module._buffers, name,
                        nn.Parameter(value, requires_grad=False) if is_param else value)  # fmt: skip
                    continue
                tensors, _ = hook.format.quantize(value)
                del value  # the full-precision weight goes as soon as it is quantized
                for i, (slot_name, slot) in enumerate(zip(hook.names, hook.slots())):
                    # As Quantize stores them: small constants (bitsandbytes' code table) get their own copy.
                    stored = tensors[slot_name].detach()
                    stored = stored.clone() if i and stored.numel() <= 256 else stored
                    if i == 0:
                        put(module._parameters, slot, mark_frozen(nn.Parameter(stored, requires_grad=False), False))
                    else:
                        put(module._buffers, slot, stored)
