"""Memory techniques: layerwise casting (fp8 weight storage), offloading (block / leaf groups, VRAM
budget, streams, disk), component offload for pipelines, memory meters.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `casting.py`: layerwise casting (`LayerwiseCasting`);
- `offload.py`: offloading of one model's weights to host memory or disk (`Offload`);
- `components.py`: component offloading for pipelines of several models (`ComponentOffload`).

Public tools: `meters.py` (weight bytes per device, bytes saved for backward).

Machinery, private to this folder:

- `dequant.py`: the storage formats of casting (quantize, dequantize, fused kernels);
- `groups.py`: partitioning a model into offload groups laid out in flat buffers;
- `budget.py`: parsing a VRAM budget and choosing the resident groups (`Residency`);
- `schedule.py`: the offload scheduler (slots, prefetch order, binding, backward);
- `transfer.py`: the transfer engines (copy streams, pinned staging, synchronous copies);
- `disk.py`: group files on disk, mapped with mmap;
- `_placement.py`: device helpers, pin allowance and hook names shared by both offloading techniques.
"""

from .casting import LayerwiseCasting, apply_casting, casting_state_dict, casting_summary, remove_casting
from .components import ComponentOffload, apply_component_offload, components_on_device, remove_component_offload
from .meters import SavedForBackward, parameter_bytes, saved_for_backward
from .disk import OffloadFileError
from .offload import Offload, OffloadReport, apply_offload, offload_report, remove_offload

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
    "components_on_device",
    "offload_report",
    "parameter_bytes",
    "remove_casting",
    "remove_component_offload",
    "remove_offload",
    "saved_for_backward",
]
