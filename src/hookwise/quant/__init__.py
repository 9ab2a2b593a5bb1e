"""Quantization: unified configs and backends (torchao, bitsandbytes, GGUF files)."""
from .gguf import GGUFFile, GGUFLoadError, apply_gguf, gguf_summary, load_gguf, remove_gguf
