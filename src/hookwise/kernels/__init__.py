"""Speed techniques: attention backend dispatch, fused DiT kernels and their injection.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `attention.py`: attention backends per attention module (`Attention`, `attention_summary`).

Machinery, private to this folder:

- `_attn_backends.py`: the attention backend registry: each backend's call and declared constraints,
  and the numerics check against the math reference.
"""

from ._attn_backends import available_backends as attention_backends
from .attention import Attention, apply_attention, attention_summary, remove_attention

__all__ = [
    "Attention",
    "apply_attention",
    "attention_backends",
    "attention_summary",
    "remove_attention",
]
