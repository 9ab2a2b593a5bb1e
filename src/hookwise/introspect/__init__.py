"""describe(model) -> ModelMap: towers, blocks, leaves, high-precision modules, known architectures, specs.

Traced call structure (`CallRecorder`, `trace_calls`, `check_against_trace`) confirms the map against what a forward ran.
Machinery: `_cache.py` (`describe_cache()`: within it, an unchanged model is described once; the planner opens one per plan);
`_roles.py` (the map's static rules: leaf kinds, attention and feed-forward modules).
"""

from ._cache import describe_cache
from .architectures import ARCHITECTURES, Architecture, detect_architecture
from .model_map import BlockInfo, LeafInfo, ModelMap, ModuleRole, TowerInfo, describe
from .resolve import load_model
from .specs import SPECS, ModelSpec, build_spec, example_inputs, spec_names
from .trace import CallRecorder, CallTrace, MapMismatchError, ModuleCall, check_against_trace, trace_calls

__all__ = [
    "ARCHITECTURES",
    "SPECS",
    "Architecture",
    "BlockInfo",
    "CallRecorder",
    "CallTrace",
    "LeafInfo",
    "MapMismatchError",
    "ModelMap",
    "ModelSpec",
    "ModuleCall",
    "ModuleRole",
    "TowerInfo",
    "build_spec",
    "check_against_trace",
    "describe",
    "describe_cache",
    "detect_architecture",
    "example_inputs",
    "load_model",
    "spec_names",
    "trace_calls",
]
