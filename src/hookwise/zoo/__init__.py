"""Reference models: small class-conditional flow-matching DiTs (FLUX and Wan architectures), trained
by `python -m hookwise.zoo.train` on procedurally generated data, shipped with the package.

    from hookwise.zoo import load_reference
    ref = load_reference("flux-shapes")          # or "wan-moving"
    pixels = hookwise.sampling.sample_reference(ref, labels=[0, 4, 8])
"""

from .data import IMAGE_CLASSES, VIDEO_CLASSES, make_images, make_videos
from .schedules import shipped_forecast, shipped_forecasts
from .reference import ReferenceModel, ReferenceSpec, get_reference_spec, load_reference, reference_names, reference_path

__all__ = [
    "IMAGE_CLASSES",
    "VIDEO_CLASSES",
    "ReferenceModel",
    "ReferenceSpec",
    "get_reference_spec",
    "load_reference",
    "make_images",
    "make_videos",
    "reference_names",
    "reference_path",
    "shipped_forecast",
    "shipped_forecasts",
]
