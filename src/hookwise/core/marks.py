"""Marks a technique leaves on a tensor for other techniques to read.

A storage technique (casting's fp8, quantization, GGUF blocks) replaces a weight by one that cannot be
trained, so it freezes it. That freezing is the technique's, not the user's: offloading keeps the
parameters a user left trainable resident when the user froze others (LoRA training), and must not
read a technique's freezing as a user's. So a technique that freezes a weight records the flag the
weight had before with `mark_frozen`, and `user_trainable` reads the user's flag back. The contract
lives here because the techniques that set it (`memory/casting.py`, `quant/`) and the one that reads
it (`memory/offload.py`) must not import each other.
"""

from __future__ import annotations

import torch

WAS_TRAINABLE = "_hookwise_was_trainable"  # attribute on a parameter a technique froze: its flag before


def mark_frozen(param: torch.Tensor, was_trainable: bool) -> torch.Tensor:
    """Record on `param` (which a technique froze) the `requires_grad` the weight it replaces had; returns it."""
    setattr(param, WAS_TRAINABLE, bool(was_trainable))
    return param


def user_trainable(param: torch.Tensor) -> bool:
    """Whether `param` requires grad as the user set it: a weight a technique froze counts with its flag before."""
    was = getattr(param, WAS_TRAINABLE, None)
    return param.requires_grad if was is None else bool(was)
