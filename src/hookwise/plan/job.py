"""The job a plan is for: what one step of the model computes (shapes, CFG, training)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    height: int = 1024          # pixels
    width: int = 1024
    frames: int = 1             # video frames (1 = image)
    batch: int = 1
    text_len: int = 512         # text tokens
    cfg: str | None = None      # "batched" (batch doubled in one call) | "separate" (two calls) | None
    training: bool = False      # forward + backward with LoRA trainable
    checkpointing: bool | None = None   # gradient checkpointing (None: on when training)
    lora_rank: int = 16
