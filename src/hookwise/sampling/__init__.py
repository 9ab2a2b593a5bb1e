"""A flow-matching Euler sampler with classifier-free guidance, and float quality metrics.

The quality harness of the step caches (`hookwise bench cache`) lives in `hookwise.bench`, on top.
"""

from .flow import flow_timesteps, sample, sample_reference
from .metrics import psnr, psnr_per_sample, ssim

__all__ = ["flow_timesteps", "psnr", "psnr_per_sample", "sample", "sample_reference", "ssim"]
