"""The storage formats behind each scheme: how a weight is quantized, computed with and dequantized.

A format turns one full-precision weight into plain tensors (the first is stored as the module's
`weight`, the others as `weight_<name>` buffers) plus a context of Python values kept on the hook.
At forward the backend's own object is rebuilt from those tensors (a torchao tensor subclass through
`__tensor_unflatten__`, a bitsandbytes `QuantState` / `MatmulLtState`) and the backend computes. So
whatever moves a module's parameters and buffers (offloading) moves the quantized bytes, one copy.

Backends are imported on first use; a missing one raises `MissingDependencyError` naming the extra.
"""

from __future__ import annotations

import importlib
import io
import logging
import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, MissingDependencyError

EXTRA = {"torchao": "torchao", "bitsandbytes": "bnb"}
QUANT_HOOK = "hookwise.quantize"  # the hook of a quantized leaf: has `format`, `names`, `original_dtype`, `slots()`


def stored_slot(name: str, first: bool) -> str:
    """Where a format's stored tensor `name` lives on its module: the first is `weight`, the others `weight_<name>`."""
    return "weight" if first else f"weight_{name}"
_LOADED: dict[str, Any] = {}


def backend_module(name: str) -> Any:
    """Import a backend package (quietly: torchao logs each optional kernel library it cannot load)."""
    if name in _LOADED:
        return _LOADED[name]
    package = name.split(".")[0]
    log = logging.getLogger(package)
    level = log.level
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            log.setLevel(logging.ERROR)
            module = importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependencyError(
            f"quantization with the {package} backend needs the '{package}' package, which is not installed; install "
            f'it with: pip install "hookwise[{EXTRA[package]}]" (or "hookwise[quant]" for every backend)'
        ) from exc
    finally:
        log.setLevel(level)
    _LOADED[name] = module
    return module


@dataclass(frozen=True)
class Format:
    """One scheme's storage and compute; subclasses implement the three operations."""

    scheme: str
    backend: str
    group_size: int | None = None

    def check(self, device: torch.device) -> None:
        """Raise `ConfigError` if weights on `device` cannot be quantized or computed with this scheme."""

    def fits(self, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Why a weight of this shape / dtype cannot take this scheme, or None."""
        return None

    def quantize(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], ctx: Any, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], ctx: Any, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


def needs_cuda(scheme: str, device: torch.device, why: str) -> None:
    """Raise unless `device` is CUDA, or `meta` where CUDA is present (torchao asks the GPU even there)."""
    if device.type == "cuda" or (device.type == "meta" and torch.cuda.is_available()):
        return
    if device.type != "cuda":
        raise ConfigError(
            f"scheme {scheme!r} cannot run on {device}: {why}; move the model to such a GPU first, or use "
            f"'int8-weight', 'int8-dynamic', 'fp8-weight', 'nf4', 'fp4' or 'int8', which run on the CPU"
        )
