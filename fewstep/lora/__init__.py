"""LoRA adapters fused into the weights, with a report and an exact restore.

Names load lazily: `fewstep.lora.cli` and `fewstep.lora.prompt` must stay importable without torch.
"""

__all__ = ["AdapterSet", "LoraReport", "LoraState", "load_lora", "open_lora", "read_lora", "release_buffers",
           "set_lora_weights", "unload_lora", "unload_loras"]


def __getattr__(name):
    if name == "AdapterSet":
        from .adapters import AdapterSet

        return AdapterSet
    if name in __all__:
        from . import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'fewstep.lora' has no attribute {name!r}")
