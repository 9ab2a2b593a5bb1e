"""Speed techniques: fused DiT kernels, regional compile, attention backends."""

from .compile import Compile, apply_compile, compiled_blocks, remove_compile
from .fused import Kernels, apply_kernels, kernels_summary, remove_kernels
