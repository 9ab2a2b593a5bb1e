"""Saving a quantized model as it is stored, and loading it without the full-precision weights.

    hookwise.save_quantized(transformer, "flux-nf4")          # flux-nf4/model.safetensors + stack.json
    model = hookwise.load_quantized("flux-nf4", lambda: FluxTransformer2DModel(**config))

`save_quantized` writes `model.state_dict()` (quantized leaves as their stored tensors, the rest as
they are) to `model.safetensors`, and the applied stack (with its stated map) to `stack.json`.

`load_quantized` builds the model with its parameters on `meta` (a factory is called under
accelerate's `init_empty_weights(include_buffers=False)` when accelerate is installed, so buffers
computed at construction stay real, else under `torch.device("meta")`; a model given must be on
`meta` already or is used as it is), freezes it, applies the quantization techniques of the stack
on `meta` (which gives every quantized leaf its stored tensors' shapes), assigns the saved tensors,
then applies the rest of the stack (offloading ...). No full-precision copy of a quantized weight is
ever made: the peak is the file's tensors. The originals of `keep_original=True` are not saved, so a
loaded model's quantization has `keep_original=False`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import TechniqueConfig
from ..core.hooks import unwrap
from ..core.ledger import open_ledger, stated_map
from ..core.techniques import applied_configs, apply_techniques, technique_named, technique_of
from ..core.transaction import transaction
from ..errors import ConfigError

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


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
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
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / WEIGHTS).is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS}; pass the folder save_quantized wrote")
    configs, stated = _read_stack(folder)
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise ConfigError(f"load_quantized needs a model on meta or a function that builds one, got {model!r}")
        model = build_on_meta(model)
    root = unwrap(model)
    root.requires_grad_(False)
    quant = [
        dataclasses.replace(c, keep_original=False) if getattr(c, "keep_original", False) else c
        for c in configs if technique_of(c).name in QUANT_TECHNIQUES
    ]  # fmt: skip
    rest = [c for c in configs if technique_of(c).name not in QUANT_TECHNIQUES]
    with transaction():
        if stated:
            open_ledger(root).state_map(stated)
        apply_techniques(root, quant)
        state = load_file(str(folder / WEIGHTS))
        missing, unexpected = root.load_state_dict(state, strict=False, assign=True)
        del state
        if unexpected or missing:
            raise ConfigError(
                f"{folder / WEIGHTS} does not fit this {type(root).__name__}: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}; build the model with the configuration of the one saved"
            )
        still_meta = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.device.type == "meta"]
        if still_meta:
            raise ConfigError(
                f"{len(still_meta)} tensors of the loaded model are still on meta (e.g. {still_meta[0]!r}): buffers "
                f"that are computed at construction and not saved; build the model with real buffers (pass a "
                f"factory and install accelerate, or build it under accelerate's init_empty_weights(include_buffers=False))"
            )
        if rest:
            apply_techniques(root, rest)
    return model
