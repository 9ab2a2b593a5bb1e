"""Reading a GGUF file and matching its tensors to a model's keys (the machinery of `gguf.py`).

`read_gguf` maps the file (nothing is read until used) and checks every tensor's type; `match_file`
pairs each tensor with the model key(s) it fills under a key map (`introspect/gguf_keys.py`), splitting
fused tensors by rows, and lists everything that does not fit in one `GGUFLoadError`; `piece_tensor`
gives the tensor a piece installs (GGUF blocks kept as uint8 rows, or plain values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, require
from ..introspect.architectures import detect_architecture
from ..introspect.gguf_keys import KEY_MAPS, GGUFKeyMap, KeyTarget, key_map_named
from ._gguf_dequant import TYPES, dequantize

_ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF stores the shape of tensors it reshaped to quantize


class GGUFLoadError(ConfigError):
    """A GGUF file does not fit the model it is loaded into (architecture, keys, shapes or types)."""


# ---- reading a file ---------------------------------------------------------------------------------
@dataclass
class FileTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]  # the logical (numpy-order) shape of the weight
    data: np.ndarray  # memory-mapped: values for plain types, uint8 blocks for quantized ones


@dataclass
class GGUFContents:
    path: str
    architecture: str | None
    tensors: dict[str, FileTensor]


def read_gguf(path: str) -> GGUFContents:
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
        tensors[t.name] = FileTensor(t.name, type_name, shape, t.data)
    return GGUFContents(path, architecture, tensors)


def file_types(contents: GGUFContents) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, t.type_name) for name, t in contents.tensors.items()))


# ---- matching a file to a model ---------------------------------------------------------------------
@dataclass
class Piece:
    """One model key and the part of a file tensor that fills it."""

    key: str
    tensor: FileTensor
    rows: tuple[int, int] | None  # the rows of the file tensor this key takes; None: all of it
    swap_halves: bool
    quantized: bool  # kept as GGUF blocks under a hook (a Linear / Conv weight)


def _hookable(module: nn.Module) -> bool:
    """A Linear / Conv whose forward is its class's own (so the hook can compute it)."""
    for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, base) and type(module).forward is base.forward:
            return True
    return False


def _choose_map(config: Any, model: nn.Module, contents: GGUFContents, keys: set[str]) -> GGUFKeyMap:
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


def match_file(model: nn.Module, contents: GGUFContents, config: Any) -> tuple[GGUFKeyMap, list[Piece]]:
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
    pieces: list[Piece] = []
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
    # A buffer on meta that the file lacks was computed by a constructor that ran on meta (a persistent
    # one, as SD3's position embedding, or one outside the state dict, as rope tables): it is named as such.
    meta_buffers = {n: n in state for n, b in model.named_buffers() if b.is_meta and n not in filled}
    missing = [k for k in state if k not in filled and k not in meta_buffers]
    missing += [f"{n} (a {'' if persistent else 'non-persistent '}buffer on meta)" for n, persistent in meta_buffers.items()]
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


def _fit(target: KeyTarget, tensor: FileTensor, state: dict, pieces: list[Piece], modules: dict) -> str | None:
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
        pieces.append(Piece(key, tensor, rows, target.swap_halves, keep))
    return None


def _raw_rows(piece: Piece) -> np.ndarray:
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


def piece_tensor(piece: Piece, like: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
