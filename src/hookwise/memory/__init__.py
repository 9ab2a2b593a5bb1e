"""Memory techniques: offloading (block / leaf groups, VRAM budget, streams, disk) and component offload."""

from .components import ComponentOffload, apply_component_offload, components_on_device, remove_component_offload
from .offload import Offload, OffloadReport, apply_offload, offload_report, remove_offload

__all__ = [
    "ComponentOffload",
    "Offload",
    "OffloadReport",
    "apply_component_offload",
    "apply_offload",
    "components_on_device",
    "offload_report",
    "remove_component_offload",
    "remove_offload",
]
