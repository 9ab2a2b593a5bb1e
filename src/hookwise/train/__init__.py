"""Training integration: training-safe stacks, validation-mode switching, LoRA helpers.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `checkpointing.py`: activation checkpointing per tower block (`Checkpointing`).

Switching: `validation.py` switches a model from its training stack to an inference stack for
validation samples and back exactly (`with hookwise.validation(model, stack=...)`).

Helpers: `lora_io.py` saves and loads LoRA files in the formats people exchange (diffusers, PEFT,
kohya, BFL).

The reference trainer: `trainer.py` (`train_lora`, `hookwise train-lora`), with its data in
`_lora_tasks.py` (`save_latents` caches latents for any diffusers transformer).
"""

from .checkpointing import Checkpointing, apply_checkpointing, checkpointing_report, remove_checkpointing
from .lora_io import FORMATS, LoraWeights, hotswap_lora, load_lora, lora_state_dict, read_lora, save_lora
from ._lora_tasks import save_latents
from .trainer import LoraTrainingResult, StepInfo, train_lora
from .validation import Validation, ValidationReport, validation

__all__ = [
    "Checkpointing",
    "FORMATS",
    "LoraWeights",
    "LoraTrainingResult",
    "StepInfo",
    "apply_checkpointing",
    "checkpointing_report",
    "hotswap_lora",
    "load_lora",
    "lora_state_dict",
    "read_lora",
    "remove_checkpointing",
    "save_latents",
    "save_lora",
    "train_lora",
    "Validation",
    "ValidationReport",
    "validation",
]
