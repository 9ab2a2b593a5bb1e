"""Memory techniques: layerwise casting (fp8 weight storage), memory meters."""

from .casting import LayerwiseCasting, apply_casting, casting_summary, remove_casting
from .meters import SavedForBackward, parameter_bytes, saved_for_backward

__all__ = [
    "LayerwiseCasting",
    "SavedForBackward",
    "apply_casting",
    "casting_summary",
    "parameter_bytes",
    "remove_casting",
    "saved_for_backward",
]
