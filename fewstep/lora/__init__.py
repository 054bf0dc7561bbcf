"""LoRA adapters fused into the weights, with a report and an exact restore."""

from .apply import LoraReport, LoraState, load_lora, read_lora, set_lora_weights, unload_lora, unload_loras

__all__ = ["LoraReport", "LoraState", "load_lora", "read_lora", "set_lora_weights", "unload_lora", "unload_loras"]
