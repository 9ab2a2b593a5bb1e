"""Speed techniques: attention backend dispatch, fused DiT kernels and their injection, regional compile.

Techniques (each a config, its hooks and its `apply_` / `remove_` functions):

- `attention.py`: attention backends per attention module (`Attention`, `attention_summary`).
- `fused.py`: fused norm / modulation / gate / rope / activation kernels injected through hooks (`Kernels`).
- `compile.py`: regional compile, one compiled function per block class (`Compile`).

Machinery, private to this folder:

- `_attn_backends.py`: the attention backend registry: each backend's call and declared constraints,
  and the numerics check against the math reference.
- `_patterns.py`: where the fused kernels apply (per architecture, and structural matching).
- `_inline.py`: the FLUX / Wan / HunyuanVideo / LTX-Video block forwards and attention processors
  rewritten with the fused ops, for the gate, rope and modulation those models write inline.
- `_structural.py`: the structural route for the blocks no `_inline.py` entry knows: the gate, modulation
  and rope patterns found in a torch.fx trace of the block's own forward and rewritten into the fused
  ops (the tracing and the hook); `_rewrite.py`: its pattern matching and the functions the rewritten
  graph calls.
- `_check.py`: the numerics check of a fused forward against the module's own (outputs and gradients).
- `_triton_dit.py`: the Triton kernels (forward and backward).
"""

from ._attn_backends import available_backends as attention_backends
from .attention import Attention, apply_attention, attention_summary, remove_attention
from .compile import Compile, apply_compile, compiled_blocks, remove_compile
from .fused import Kernels, apply_kernels, kernels_summary, remove_kernels

__all__ = [
    "Attention",
    "Compile",
    "Kernels",
    "apply_attention",
    "apply_compile",
    "apply_kernels",
    "attention_backends",
    "attention_summary",
    "compiled_blocks",
    "kernels_summary",
    "remove_attention",
    "remove_compile",
    "remove_kernels",
]
