"""describe(model) -> ModelMap: towers, blocks, leaves, high-precision modules, known architectures, specs."""

from .architectures import ARCHITECTURES, Architecture, detect_architecture
from .model_map import BlockInfo, LeafInfo, ModelMap, ModuleRole, TowerInfo, describe
from .resolve import load_model
from .specs import SPECS, ModelSpec, build_spec, spec_names

__all__ = [
    "ARCHITECTURES",
    "SPECS",
    "Architecture",
    "BlockInfo",
    "LeafInfo",
    "ModelMap",
    "ModelSpec",
    "ModuleRole",
    "TowerInfo",
    "build_spec",
    "describe",
    "detect_architecture",
    "load_model",
    "spec_names",
]
