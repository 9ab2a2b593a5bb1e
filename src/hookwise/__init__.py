"""hookwise: composable hooks that make diffusion transformers fit and run fast, for training and sampling.

Public API: `apply`, `remove`, `describe`, `optimize` (with `Job` and `Plan`), `branch`, the config
classes, and per-technique `apply_<name>` / `remove_<name>`. Everything else is private or lives in a subpackage.
"""

from .core import (
    HookRegistry,
    Layer,
    ModelHook,
    RunState,
    TechniqueConfig,
    add_hook,
    branch,
    get_hook,
    get_run_state,
    list_hooks,
    new_run,
    register_technique,
    remove_hook,
    reset_stateful_hooks,
)
from .cache import (
    DualBlockCache,
    FasterCache,
    FirstBlockCache,
    LayerSkip,
    MagCache,
    PyramidAttentionBroadcast,
    TaylorSeer,
    TeaCache,
    calibrate_magcache,
    calibrate_teacache,
)
from .errors import (
    CompatibilityError,
    ConfigError,
    HookError,
    HookwiseError,
    MissingDependencyError,
    ModelResolveError,
    NoTargetError,
    OffloadFileError,
)
from .kernels import Attention, apply_attention, attention_summary, remove_attention
from .introspect import MapMismatchError, ModelMap, describe, load_model, spec_names
from .memory import (
    ComponentOffload,
    LayerwiseCasting,
    Offload,
    apply_casting,
    apply_component_offload,
    apply_offload,
    casting_summary,
    offload_report,
    remove_casting,
    remove_component_offload,
    remove_offload,
)
from .stack import Stack, applied, apply, remove
from .pipeline import pop_component, set_component
from .memory.components import component_offload_report
from .plan import Job, Plan, optimize
from .train import Checkpointing, checkpointing_report
from .train import train_lora
from .train import validation

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "apply_attention",
    "attention_summary",
    "remove_attention",
    "Checkpointing",
    "CompatibilityError",
    "ComponentOffload",
    "ConfigError",
    "DualBlockCache",
    "FasterCache",
    "FirstBlockCache",
    "LayerSkip",
    "MagCache",
    "MapMismatchError",
    "PyramidAttentionBroadcast",
    "TaylorSeer",
    "TeaCache",
    "calibrate_magcache",
    "calibrate_teacache",
    "HookError",
    "HookRegistry",
    "HookwiseError",
    "Job",
    "Layer",
    "LayerwiseCasting",
    "MissingDependencyError",
    "ModelHook",
    "ModelMap",
    "ModelResolveError",
    "NoTargetError",
    "OffloadFileError",
    "Offload",
    "Plan",
    "RunState",
    "Stack",
    "TechniqueConfig",
    "__version__",
    "add_hook",
    "applied",
    "apply",
    "apply_casting",
    "apply_component_offload",
    "apply_offload",
    "branch",
    "casting_summary",
    "checkpointing_report",
    "component_offload_report",
    "describe",
    "get_hook",
    "get_run_state",
    "list_hooks",
    "load_model",
    "new_run",
    "offload_report",
    "optimize",
    "pop_component",
    "register_technique",
    "remove",
    "remove_casting",
    "remove_component_offload",
    "remove_hook",
    "remove_offload",
    "reset_stateful_hooks",
    "set_component",
    "spec_names",
    "train_lora",
    "validation",
]
