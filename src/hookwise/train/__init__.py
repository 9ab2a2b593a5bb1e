"""Training integration.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `checkpointing.py`: activation checkpointing per tower block (`Checkpointing`).
"""

from .checkpointing import Checkpointing, apply_checkpointing, checkpointing_report, remove_checkpointing

__all__ = ["Checkpointing", "apply_checkpointing", "checkpointing_report", "remove_checkpointing"]
