"""Training integration: training-safe stacks, validation-mode switching, LoRA helpers.

`lora_io` saves and loads LoRA files in the formats people exchange (diffusers, PEFT, kohya, BFL).
"""

from .lora_io import FORMATS, LoraWeights, hotswap_lora, load_lora, lora_state_dict, read_lora, save_lora

__all__ = ["FORMATS", "LoraWeights", "hotswap_lora", "load_lora", "lora_state_dict", "read_lora", "save_lora"]
