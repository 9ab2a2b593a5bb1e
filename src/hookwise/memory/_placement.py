"""Where weights and inputs live: the device helpers and hook names both offloading techniques share.

`offload.py` (per-group streaming) and `components.py` (whole models of a pipeline) parse devices,
move call arguments, find a model's home device and size their pinned host memory the same way, and
each must recognize the other on a module; that contract lives here, not in a cross-import.
"""

from __future__ import annotations

import math
from typing import Any

import psutil
import torch
from torch import nn

from ..core import HookRegistry
from ..errors import ConfigError

OFFLOAD_ROOT_HOOK = "hookwise.offload.root"  # on a model that `Offload` manages
COMPONENT_HOOK = "hookwise.component_offload"  # on each component that `ComponentOffload` manages
PIN_SHARE = 0.5  # pin="auto": pinned host memory stays under this share of (free RAM + the model's host bytes)


def parse_device(value: Any, field: str) -> torch.device:
    """`value` as a device that can hold weights; `field` names the setting in the error."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{field}={value!r} is not a device; use e.g. 'cuda', 'cuda:1' or 'cpu'") from exc
    if device.type == "meta":
        raise ConfigError(f"{field}='meta' cannot hold weights; use 'cuda' or 'cpu'")
    return device


def home_device(module: nn.Module) -> torch.device:
    """The one device all of `module`'s tensors are on; the CPU when they are spread or there are none."""
    devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (through tuples, lists and dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def pin_allowance(pin: str, host_bytes: int) -> float:
    """How many bytes of host copies may be pinned under `pin` ("auto" / "all" / "none").

    `host_bytes` are the bytes of the weights on the host now, which the copies replace.
    """
    if pin == "none":
        return 0
    if pin == "all":
        return math.inf
    return int(PIN_SHARE * (psutil.virtual_memory().available + host_bytes))


def offload_applied(module: nn.Module) -> bool:
    """Whether `Offload` manages `module`'s weights."""
    registry = HookRegistry.of(module)
    return registry is not None and OFFLOAD_ROOT_HOOK in registry
