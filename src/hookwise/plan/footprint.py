"""Static measure: the exact weight bytes of a model, a pipeline or a dict of modules, on any device.

For each component: its bytes, each tower block's bytes, the largest leaf; for the whole: the
largest component; and the same after each technique that changes storage (fp8 casting at each
scaling), computed by the technique's own cost declaration from the model map, never by a rule of
thumb. Works on `meta` models: sizes come from shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..core.cost import CostContext, Footprint, LeafBytes, Placement
from ..core.hooks import unwrap
from ..core.techniques import technique_of, techniques
from ..errors import ConfigError
from ..introspect import ModelMap, describe

# The denoiser of a pipeline, by component name, in order of preference.
DENOISER_NAMES = ("transformer", "unet", "prior", "denoiser", "model")
# Linear layers that LoRA targets inside attention modules (diffusers and musubi names; peft's
# default for DiTs).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "q", "k", "v", "o", "qkv", "proj")  # fmt: skip


def _itemsize(dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name, None) if dtype_name else None
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 2


def footprint_from_map(model_map: ModelMap, name: str = "model") -> Footprint:
    """The `Footprint` a technique's cost declaration sees, from the model map."""
    block_index = {b.path: i for i, b in enumerate(model_map.blocks)}
    leaves = []
    compute: dict[int, int] = {}
    for leaf in model_map.leaves:
        size = _itemsize(leaf.dtype)
        leaves.append(
            LeafBytes(
                path=leaf.path,
                kind=leaf.kind,
                shape=tuple(leaf.shape),
                nbytes=leaf.param_bytes,
                itemsize=size,
                block=block_index.get(leaf.block) if leaf.block is not None else None,
                keep=leaf.keep,
            )
        )
        if leaf.keep is None:
            compute[size] = compute.get(size, 0) + leaf.param_bytes
    return Footprint(
        name=name,
        total_bytes=model_map.param_bytes + model_map.buffer_bytes,
        blocks=tuple(b.param_bytes + b.buffer_bytes for b in model_map.blocks),
        leaves=tuple(leaves),
        high_precision_bytes=sum(model_map.high_precision_bytes.values()),
        param_count=model_map.param_count,
        compute_itemsize=max(compute, key=compute.get) if compute else 2,
    )


@dataclass(frozen=True)
class Component:
    """One model of a target: its module, map and footprint."""

    name: str
    module: nn.Module
    model_map: ModelMap
    footprint: Footprint


@dataclass
class Target:
    """What a plan is for: one model, or a pipeline / dict of named models with one denoiser."""

    obj: Any
    components: dict[str, Component]
    main: str  # the denoiser's name
    pipeline: bool  # several components (component offloading applies)
    vae: nn.Module | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def denoiser(self) -> Component:
        return self.components[self.main]

    @property
    def others(self) -> list[Component]:
        return [c for n, c in self.components.items() if n != self.main]

    def others_footprint(self) -> Footprint:
        """The non-denoiser components as one footprint (what component offloading places)."""
        total = sum(c.footprint.total_bytes for c in self.others)
        count = sum(c.footprint.param_count for c in self.others)
        return Footprint("others", total, (), (), 0, count)


def modules_of(obj: Any) -> dict[str, nn.Module] | None:
    """The named modules of a diffusers pipeline or a dict, or None for a single module."""
    if isinstance(obj, nn.Module):
        return None
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(getattr(obj, "components", None), Mapping):
        items = obj.components.items()
    else:
        raise ConfigError(
            f"cannot plan for a {type(obj).__name__}: pass a torch.nn.Module, a diffusers pipeline, or a dict of "
            f"named modules"
        )
    modules = {str(k): v for k, v in items if isinstance(v, nn.Module)}
    if not modules:
        raise ConfigError(f"the {type(obj).__name__} given holds no torch.nn.Module to plan for")
    return modules


def measure(obj: Any, *, example_inputs: Any = None) -> Target:
    """Map every component of `obj` (a module, a diffusers pipeline or a dict of modules)."""
    modules = modules_of(obj)
    if modules is None:
        model = unwrap(obj)
        model_map = describe(model, example_inputs)
        comp = Component("model", model, model_map, footprint_from_map(model_map, "model"))
        return Target(obj, {"model": comp}, "model", pipeline=False)
    components = {}
    for name, module in modules.items():
        model_map = describe(unwrap(module), example_inputs if name in DENOISER_NAMES else None)
        components[name] = Component(name, unwrap(module), model_map, footprint_from_map(model_map, name))
    main = next((n for n in DENOISER_NAMES if n in components), None)
    if main is None:  # the component with towers and the most bytes
        main = max(components, key=lambda n: (components[n].model_map.has_towers, components[n].footprint.total_bytes))
    vae = modules.get("vae")
    return Target(obj, components, main, pipeline=len(components) > 1, vae=vae)


def lora_params(model_map: ModelMap, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the attention projections' Linears (as peft puts them)."""
    attention = [a.path for a in model_map.attention]
    total = 0
    for leaf in model_map.leaves:
        if leaf.kind != "linear" or len(leaf.shape) != 2 or leaf.keep == "adapter":
            continue
        for a in attention:
            if leaf.path.startswith(a + ".") and leaf.path[len(a) + 1 :] in LORA_TARGETS:
                out, inp = leaf.shape
                total += rank * (inp + out)
                break
    return total


def hidden_size(model_map: ModelMap) -> int:
    """The width of the residual stream: the input width of the first attention projection."""
    attention = {a.path for a in model_map.attention}
    for leaf in model_map.leaves:
        if leaf.kind == "linear" and len(leaf.shape) == 2 and any(leaf.path.startswith(a + ".") for a in attention):
            return int(leaf.shape[1])
    linear = [leaf for leaf in model_map.leaves if leaf.kind == "linear" and len(leaf.shape) == 2 and leaf.block]
    return int(linear[0].shape[1]) if linear else 0


def storage_table(target: Target) -> list[dict[str, Any]]:
    """Each component's bytes, blocks and largest leaf, plain and after each storage-changing option.

    A storage-changing option is one whose cost declaration changes the footprint's bytes (casting
    at each scaling); applied alone to the plain component, as its cost declaration says.
    """
    ctx = CostContext(hardware=None, job=None, device_room=0, ram_room=0)
    rows = []
    for comp in target.components.values():
        fp = comp.footprint
        variants = [("plain", fp)]
        for tech in techniques():
            cost = tech.cost
            if cost is None or cost.scope != "model":
                continue
            plain = Placement.resident(fp)
            try:
                options = cost.options(plain, ctx)
            except (AttributeError, TypeError):
                # Options that read the machine (offloading's budget) place weights, they do not
                # change how they are stored: not a storage variant.
                continue
            for config in options:
                after = cost.effect(plain, config, ctx).footprint
                if after.total_bytes != fp.total_bytes:
                    variants.append((label(config), after))
        for name, f in variants:
            rows.append(
                {
                    "component": comp.name,
                    "storage": name,
                    "bytes": f.total_bytes,
                    "blocks": len(f.blocks),
                    "largest_block": f.largest_block,
                    "largest_leaf": f.largest_leaf,
                    "outside_blocks": f.outside_bytes,
                    "high_precision": f.high_precision_bytes,
                }
            )
    return rows


def largest_component(target: Target) -> str:
    return max(target.components, key=lambda n: target.components[n].footprint.total_bytes)


def label(config: Any) -> str:
    """A short name for a config: its technique and the fields that differ from the defaults."""
    tech = technique_of(config)
    defaults = type(config)() if _constructible(type(config)) else None
    parts = []
    for key, value in config.to_dict().items():
        if key == "technique":
            continue
        if defaults is not None and getattr(defaults, key, object()) == getattr(config, key):
            continue
        parts.append(f"{key}={_short(value)}")
    return tech.name + (f"({', '.join(parts)})" if parts else "")


def _constructible(cls: type) -> bool:
    try:
        cls()
        return True
    except Exception:  # a config without defaults for every field
        return False


def _short(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2**20:
        return f"{value / 2**30:.2f}GiB"
    return str(value)

