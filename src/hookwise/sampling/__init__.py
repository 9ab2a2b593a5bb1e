"""A flow-matching Euler sampler with classifier-free guidance, and float quality metrics.

The quality harness of the caches (`cache_bench`, behind `hookwise bench cache`) is imported on
demand: it sits on top of `cache/` and the stack.
"""

from .flow import flow_timesteps, sample, sample_reference
from .metrics import psnr, psnr_per_sample, ssim

__all__ = ["flow_timesteps", "psnr", "psnr_per_sample", "sample", "sample_reference", "ssim"]
