"""Memory techniques: layerwise casting (fp8 weight storage), offloading (block / leaf groups, VRAM
budget, streams, disk), component offload for pipelines, memory meters.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `casting.py`: layerwise casting (`LayerwiseCasting`);
- `offload.py`: offloading of one model's weights to host memory or disk (`Offload`);
- `components.py`: component offloading for pipelines of several models (`ComponentOffload`).

Public tools: `meters.py` (weight bytes per device, bytes saved for backward).

Machinery, private to this folder:

- `_dequant.py`: the storage formats of casting (quantize, dequantize, fused kernels);
- `_fp8.py`: casting's fp8 compute path (dynamic activation quantization, `torch._scaled_mm`);
- `_cast_targets.py`: which leaves casting stores low, which it keeps and why, the compute dtype;
- `_cast_ops.py`: how a cast leaf computes (autograd functions, the mode for instance forwards);
- `_groups.py`: partitioning a model into offload groups laid out in flat buffers;
- `_budget.py`: parsing a VRAM budget and choosing the resident groups (`Residency`);
- `_schedule.py`: the offload scheduler (which group in which slot, prefetch order, backward);
- `_binding.py`: a streamed group's runtime state and the device slots it is bound into (`GroupState`);
- `_transfer.py`: the transfer engines (copy streams, pinned staging, synchronous copies);
- `_disk.py`: group files on disk, mapped with mmap;
- `_placement.py`: device helpers, pin allowance and hook names shared by both offloading techniques;
- `_guards.py`: what an offloaded model refuses or answers differently (copying, pickling, whole-model
  moves, `state_dict()` copies, a second offloading system);
- `_offload_hooks.py`: offloading's hooks (per streamed group, and on the model);
- `_report.py`: what offloading reports (`OffloadReport`, `ResidencySwitch`);
- `_cost.py`: the techniques' cost declarations for the planner, declared when this folder is imported.
"""

from ._disk import OffloadFileError, clean_offload_cache, offload_cache_files
from ._disk import default_dir as default_offload_dir
from .casting import LayerwiseCasting, apply_casting, casting_state_dict, casting_summary, remove_casting
from .components import ComponentOffload, apply_component_offload, components_on_device, remove_component_offload
from .meters import SavedForBackward, parameter_bytes, saved_for_backward
from .offload import Offload, OffloadReport, apply_offload, offload_report, remove_offload
from ._cost import declare_memory_costs

declare_memory_costs()

__all__ = [
    "ComponentOffload",
    "LayerwiseCasting",
    "Offload",
    "OffloadFileError",
    "OffloadReport",
    "SavedForBackward",
    "apply_casting",
    "apply_component_offload",
    "apply_offload",
    "casting_state_dict",
    "casting_summary",
    "clean_offload_cache",
    "components_on_device",
    "default_offload_dir",
    "offload_cache_files",
    "offload_report",
    "parameter_bytes",
    "remove_casting",
    "remove_component_offload",
    "remove_offload",
    "saved_for_backward",
]
