"""What an offloaded model does where plain-model code would break it: copying, pickling and saving
it whole are refused (its weights live in shared host buffers, device slots and mapped files),
`state_dict()` gives streamed tensors as plain copies, whole-model moves and casts are ignored with
a warning, and a second offloading system on the same model is refused."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from ..core import HookRegistry
from ..errors import CompatibilityError
from ._binding import GroupState
from ._placement import COMPONENT_HOOK


def not_copyable() -> CompatibilityError:
    return CompatibilityError(
        "a model with hookwise offloading cannot be pickled, saved whole (torch.save(model)) or deep-copied: its "
        "weights live in shared host buffers, device slots or mapped files. Save model.state_dict() instead "
        "(plain tensors that load into the plain model), or remove offloading first (hookwise.remove(model)), "
        "copy or save, then apply it again"
    )


def refuse_pickle(module: nn.Module) -> Any:
    _drop_file_being_saved()
    raise not_copyable()


def _drop_file_being_saved() -> None:
    """Inside `torch.save(model, path)`: delete the file it opened, so the refusal leaves no unreadable file.

    torch.save creates the file before it pickles anything, and on the way out of the error it still
    writes the archive's end: without this a ~600-byte file that `torch.load` cannot read would stay
    (and an older file of that name is gone already: torch truncated it). Unlinking an open file is
    safe on POSIX (the writer finishes on the orphaned inode); on Windows the file stays.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "save" and code.co_filename == torch.serialization.__file__:
            target = frame.f_locals.get("f")
            if isinstance(target, (str, os.PathLike)):
                with contextlib.suppress(OSError):
                    os.unlink(target)
            return
        frame = frame.f_back


class StateDictCopies:
    """A state_dict post-hook on a module that owns streamed tensors: their entries become plain copies.

    Without it an entry is a view into the group's flat buffer (saving it writes the whole buffer;
    views of one buffer in several dtypes cannot be saved at all), a device slot, or a mapped file.
    Entries asked for with `keep_vars=True` are the tensors themselves and stay so.
    """

    def __init__(self, offloader: Any, names: dict[str, tuple[GroupState, int]]) -> None:  # offload._Offloader
        self.offloader = offloader
        self.names = names

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for name, (state, i) in self.names.items():
            key = prefix + name
            value = state_dict.get(key)
            if value is None or value is state.group.tensors[i].tensor:
                continue
            state_dict[key] = self.offloader.plain_copy(state, i, value)


def ignore_apply(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    warnings.warn(
        "hookwise: this model has offloading applied, so .to() / .cuda() / .cpu() / .half() and other "
        "whole-model moves or casts are ignored (offloading decides where each weight lives). To move or "
        "cast it, remove offloading first (hookwise.remove(model) or remove_offload(model)), then apply it again",
        stacklevel=3,
    )
    return module


def check_other_offloading(model: nn.Module) -> None:
    """Raise `CompatibilityError` if accelerate, diffusers or `ComponentOffload` already offloads `model`."""
    for path, module in model.named_modules():
        where = path or "the model"
        hf = module.__dict__.get("_hf_hook")
        if hf is not None:
            inner = getattr(hf, "hooks", [hf])
            names = [type(h).__name__ for h in inner]
            if any(n in ("AlignDevicesHook", "CpuOffload", "UserCpuOffloadHook") for n in names):
                raise CompatibilityError(
                    f"{where} already has accelerate offloading hooks ({', '.join(names)}), from device_map, "
                    f"enable_model_cpu_offload or enable_sequential_cpu_offload; remove them first "
                    f"(accelerate.hooks.remove_hook_from_module(model, recurse=True)) or load the model without them"
                )
        registry = module.__dict__.get("_diffusers_hook")
        hooks = getattr(registry, "hooks", {}) if registry is not None else {}
        found = [n for n in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker") if n in hooks]
        if found:
            raise CompatibilityError(
                f"{where} already has diffusers group offloading ({', '.join(found)}); use one offloading system: "
                f"load the model again without enable_group_offloading / apply_group_offloading"
            )
        registry = HookRegistry.of(module)
        if registry is not None and COMPONENT_HOOK in registry:
            raise CompatibilityError(
                f"{where} is a component managed by ComponentOffload; remove_component_offload first, or leave "
                f"this component out of it"
            )
