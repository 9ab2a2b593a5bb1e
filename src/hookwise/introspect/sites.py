"""Where a model computes attention: the modules an attention technique hooks, read from the model map.

One search serves every technique that acts on attention calls (attention backends in `kernels/`,
context parallelism in `parallel/`), so they hook the same modules: the map's attention modules that
run a forward of their own (a holder of projections that its block calls is not one), and each tower
block that holds none of them but computes attention inline (a fused-qkv block).
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from ..core.hooks import unwrap
from .model_map import ModelMap, describe


def runs_itself(module: nn.Module) -> bool:
    """Whether the module has a forward of its own (a holder of projections that its block calls does not)."""
    return "forward" in module.__dict__ or type(module).forward is not nn.Module.forward


def computes_attention_inline(block: nn.Module) -> bool:
    """Whether a block's own forward reads as computing attention (its source names attention or softmax)."""
    try:
        source = inspect.getsource(type(block).forward)
    except (OSError, TypeError):
        return True  # no source to read: hook it; a hook on a block with no attention call costs nothing
    return bool(re.search(r"attention|attn|attend|softmax", source))


def attention_sites(model: nn.Module, model_map: ModelMap | None = None) -> dict[str, str | None]:
    """{path: tower name or None} of the modules in which `model` computes attention, from the map.

    The map's attention modules that have a forward of their own, and each tower block that holds
    none of them but computes attention inline (a fused-qkv block).
    """
    model = unwrap(model)
    model_map = model_map or describe(model)
    modules = dict(model.named_modules())
    tower_of = {b.path: t.name for t in model_map.towers for b in t.blocks}
    sites: dict[str, str | None] = {}
    for role in model_map.attention:
        if runs_itself(modules[role.path]):
            sites[role.path] = tower_of.get(role.block) if role.block else None
    for tower in model_map.towers:
        for block in tower.blocks:
            inside = any(p == block.path or p.startswith(block.path + ".") for p in sites)
            if not inside and computes_attention_inline(modules[block.path]):
                sites[block.path] = tower.name
    return sites
