"""What a denoiser returned: its prediction, out of a tensor, a tuple or a diffusers output object."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


def sample_of(output: Any, who: str) -> torch.Tensor:
    """The predicted sample in `output`; `who` (what is asking) starts the error message otherwise."""
    if isinstance(output, torch.Tensor):
        return output
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(
        f"{who}: the model returned a {type(output).__name__}; expected a tensor, a tuple starting with one, "
        f"or an object with a .sample tensor"
    )
