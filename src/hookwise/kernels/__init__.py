"""Speed techniques: fused DiT kernels, regional compile, attention backends."""

from .fused import Kernels, apply_kernels, kernels_summary, remove_kernels
