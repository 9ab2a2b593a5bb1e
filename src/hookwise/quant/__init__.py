"""Quantization: unified configs and backends (torchao, bitsandbytes, GGUF files)."""
