"""Memory techniques: offloading (block / leaf groups, VRAM budget, streams, disk) and component offload."""

from .offload import Offload, OffloadReport, apply_offload, offload_report, remove_offload

__all__ = [
    "Offload",
    "OffloadReport",
    "apply_offload",
    "offload_report",
    "remove_offload",
]
