"""Quantization: weights stored in 8 or 4 bits, computed through the library made for each format.

Techniques: `quantize.py` (`Quantize`: torchao and bitsandbytes schemes on a loaded model),
`save.py` (`save_quantized` / `load_quantized`: a quantized model and its stack on disk;
`load_and_quantize`: a full-precision checkpoint quantized tensor by tensor as it loads),
`gguf.py` (`GGUFFile` / `load_gguf`: a .gguf file's quantized weights, dequantized per layer at forward;
`save_gguf`: a model written as a .gguf file).
Machinery (private): `_targets.py` (which leaves, which scheme), `_inner.py` (a quantized leaf's
computation when an observer hook or an instance forward sits inside its hook), `_formats.py` (the
storage-format contract, optional imports), `_torchao.py`, `_bnb.py` (one backend each),
`_gguf_file.py` (reading a GGUF file, matching it to a model's keys), `_gguf_dequant.py` /
`_gguf_triton.py` (GGUF dequantization in torch ops / Triton), `_gguf_write.py` (quantizing to GGUF
blocks, K-quants included, and writing a file).
"""

from .quantize import SCHEMES, Quantize, apply_quantize, quantize_summary, quantized_leaves, remove_quantize
from .gguf import GGUFFile, GGUFLoadError, apply_gguf, gguf_summary, load_gguf, remove_gguf, save_gguf
from .save import load_and_quantize, load_quantized, save_quantized

__all__ = [
    "GGUFFile",
    "GGUFLoadError",
    "apply_gguf",
    "gguf_summary",
    "load_gguf",
    "load_and_quantize",
    "remove_gguf",
    "save_gguf",
    "SCHEMES",
    "Quantize",
    "apply_quantize",
    "load_quantized",
    "quantize_summary",
    "quantized_leaves",
    "remove_quantize",
    "save_quantized",
]
