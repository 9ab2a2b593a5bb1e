"""hookwise: composable hooks that make diffusion transformers fit and run fast, for training and sampling.

Public API: `apply`, `remove`, `describe`, `branch`, the config classes, and per-technique
`apply_<name>` / `remove_<name>`. Everything else is private or lives in a subpackage.
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
from .errors import (
    CompatibilityError,
    ConfigError,
    HookError,
    HookwiseError,
    MissingDependencyError,
    ModelResolveError,
    NoTargetError,
)
from .introspect import ModelMap, describe, load_model, spec_names
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

__version__ = "0.1.0"

__all__ = [
    "CompatibilityError",
    "ComponentOffload",
    "ConfigError",
    "HookError",
    "HookRegistry",
    "HookwiseError",
    "Layer",
    "LayerwiseCasting",
    "MissingDependencyError",
    "ModelHook",
    "ModelMap",
    "ModelResolveError",
    "NoTargetError",
    "Offload",
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
    "describe",
    "get_hook",
    "get_run_state",
    "list_hooks",
    "load_model",
    "new_run",
    "offload_report",
    "register_technique",
    "remove",
    "remove_casting",
    "remove_component_offload",
    "remove_hook",
    "remove_offload",
    "reset_stateful_hooks",
    "spec_names",
]
