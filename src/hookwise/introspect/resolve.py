"""Turn a model reference into a model: a shipped spec name, a local diffusers folder, or `module:factory`."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import torch
from torch import nn

from ..core.config import parse_dtype
from ..errors import ConfigError, HookwiseError, ModelResolveError
from .specs import build_diffusers_model, build_spec, find_spec, spec_names

_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _choices() -> str:
    return (
        f"a shipped spec ({', '.join(spec_names())}), a local diffusers model folder (with config.json), "
        f"or 'package.module:factory' (or 'path/to/file.py:factory')"
    )


def load_model(ref: str, *, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, str]:
    """(model, description) for `ref`. Specs and folders are built on `meta` (no weights loaded)."""
    if dtype is not None:
        dtype = parse_dtype(dtype, "dtype")
    spec = find_spec(ref)
    if spec is not None:
        return build_spec(spec.name, dtype or torch.bfloat16), f"spec {spec.name}: {spec.title}"
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_folder(path, dtype)
    if ":" in ref:
        return _load_factory(ref, dtype)
    if not path.exists() and (os.sep in ref or "/" in ref or ref.startswith((".", "~"))):
        raise ModelResolveError(f"{ref}: no such file or folder (expected {_choices()})")
    if path.exists():
        raise ModelResolveError(f"{ref} is a file, not a model folder; expected {_choices()}")
    raise ModelResolveError(f"unknown model {ref!r}: expected {_choices()}")


def _load_folder(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, str]:
    folder = path
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        for sub in ("transformer", "unet"):
            if (folder / sub / "config.json").is_file():
                folder = folder / sub
                break
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelResolveError(
            f"{path} has no config.json (nor a pipeline's transformer/config.json); expected {_choices()}"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelResolveError(f"{config_file} is not valid JSON: {exc}") from exc
    class_name = config.get("_class_name")
    if not class_name:
        raise ModelResolveError(f"{config_file} has no '_class_name'; it is not a diffusers model config")
    if dtype is None:
        dtype = _weights_dtype(folder) or _config_dtype(config) or torch.float32
    model = build_diffusers_model(class_name, config, dtype)
    return model, f"folder {folder} ({class_name}, built on meta from its config)"


def _config_dtype(config: dict) -> torch.dtype | None:
    value = config.get("torch_dtype")
    try:
        return parse_dtype(value) if value else None
    except ConfigError:
        return None


def _weights_dtype(folder: Path) -> torch.dtype | None:
    """The dtype holding most bytes in the folder's safetensors files, read from their headers only."""
    totals: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with file.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            start, end = entry.get("data_offsets", (0, 0))
            totals[entry.get("dtype", "")] = totals.get(entry.get("dtype", ""), 0) + (end - start)
    if not totals:
        return None
    return _SAFETENSORS_DTYPES.get(max(totals, key=totals.get))


def _load_factory(ref: str, dtype: torch.dtype | None) -> tuple[nn.Module, str]:
    module_name, _, attr = ref.rpartition(":")
    if not module_name or not attr:
        raise ModelResolveError(f"unknown model {ref!r}: expected {_choices()}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise ModelResolveError(f"{ref!r}: no file {file}")
            spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(file.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ModelResolveError:
        raise
    except ImportError as exc:
        raise ModelResolveError(f"{ref!r}: cannot import {module_name!r} ({exc}); expected {_choices()}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ModelResolveError(f"{ref!r}: module {module_name!r} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except HookwiseError:
        raise
    except Exception as exc:
        raise ModelResolveError(f"{ref!r}: calling {attr}() failed: {exc!r}") from exc
    if not isinstance(model, nn.Module):
        raise ModelResolveError(f"{ref!r}: {attr} gave a {type(model).__name__}, not a torch.nn.Module")
    if dtype is not None:
        model = model.to(dtype)
    return model, f"factory {ref}"
