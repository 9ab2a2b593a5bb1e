"""The job a plan is for: shapes of one step, sampling or LoRA training. Plain data, validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError

CFG_MODES = ("batched", "separate", None)
DEFAULT_STEPS = 28  # FLUX.1-dev's sampling steps, and the step count the shipped cache rows were first measured at


@dataclass(frozen=True)
class Job:
    """One step of work: image / video shapes, batch, text length, CFG mode, sampling or training.

    - `height`, `width`: pixels; `frames`: video frames (1 = image); `batch`: samples per step.
    - `text_len`: text tokens.
    - `num_steps`: denoising steps of one sampling run (step caches are measured and scheduled for a
      run's length; FLUX.1-dev's default of 28); training ignores it.
    - `cfg`: "batched" (the batch doubled in one call), "separate" (two calls per step) or None.
    - `training`: forward + backward with LoRA (rank `lora_rank` on the attention projections)
      trainable and the rest frozen; `checkpointing`: gradient checkpointing (None: on when training).
    """

    height: int = 1024  # pixels
    width: int = 1024
    frames: int = 1  # video frames (1 = image)
    batch: int = 1
    text_len: int = 512  # text tokens
    cfg: str | None = None  # "batched" (batch doubled in one call) | "separate" (two calls) | None
    training: bool = False  # forward + backward with LoRA trainable
    checkpointing: bool | None = None  # gradient checkpointing (None: on when training)
    lora_rank: int = 16
    num_steps: int = DEFAULT_STEPS  # denoising steps of one sampling run

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "batch", "text_len", "lora_rank", "num_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Job({name}={value!r}): must be a whole number >= 1")
        if self.cfg not in CFG_MODES:
            raise ConfigError(f"Job(cfg={self.cfg!r}): use 'batched' (one call, batch doubled), 'separate' (two calls) or None")
        if not isinstance(self.training, bool):
            raise ConfigError(f"Job(training={self.training!r}): use True or False")
        if self.checkpointing not in (None, True, False):
            raise ConfigError(f"Job(checkpointing={self.checkpointing!r}): use True, False or None (on when training)")
        if self.checkpointing and not self.training:
            raise ConfigError("Job(checkpointing=True) needs training=True: sampling keeps no activations for backward")

    @property
    def uses_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on (None means: on when training)."""
        return self.training if self.checkpointing is None else self.checkpointing

    @property
    def calls_per_step(self) -> int:
        """Forward calls of the model per step (two with separate CFG)."""
        return 2 if self.cfg == "separate" else 1

    @property
    def effective_batch(self) -> int:
        """Samples in one call (doubled by batched CFG)."""
        return self.batch * (2 if self.cfg == "batched" else 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Job.from_dict: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def parse_resolution(text: str) -> tuple[int, int]:
    """"1024" -> (1024, 1024); "720x1280" -> (720, 1280) as height x width."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"resolution {text!r}: use one number (square) or HEIGHTxWIDTH, e.g. 1024 or 720x1280")
    return values[0], values[1]
