"""Memory techniques: layerwise casting (fp8 weight storage), offloading (block / leaf groups, VRAM
budget, streams, disk), component offload for pipelines, memory meters."""

from .casting import LayerwiseCasting, apply_casting, casting_summary, remove_casting
from .components import ComponentOffload, apply_component_offload, components_on_device, remove_component_offload
from .meters import SavedForBackward, parameter_bytes, saved_for_backward
from .offload import Offload, OffloadReport, apply_offload, offload_report, remove_offload

__all__ = [
    "ComponentOffload",
    "LayerwiseCasting",
    "Offload",
    "OffloadReport",
    "SavedForBackward",
    "apply_casting",
    "apply_component_offload",
    "apply_offload",
    "casting_summary",
    "components_on_device",
    "offload_report",
    "parameter_bytes",
    "remove_casting",
    "remove_component_offload",
    "remove_offload",
    "saved_for_backward",
]
