"""Architecture presets and their detection from a UNet config."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """What fewstep needs to know about a model family."""

    name: str
    title: str
    lcm_lora: str | None  # hub id of the published LCM-LoRA for this family
    xl: bool  # two text encoders, pooled embeddings and size conditioning


PRESETS = {
    "sd15": Preset("sd15", "SD 1.x", "latent-consistency/lcm-lora-sdv1-5", False),
    "sd2": Preset("sd2", "SD 2.x", None, False),
    "sdxl": Preset("sdxl", "SDXL", "latent-consistency/lcm-lora-sdxl", True),
    "ssd1b": Preset("ssd1b", "SSD-1B", "latent-consistency/lcm-lora-ssd-1b", True),
    "shapes": Preset("shapes", "shapes world", None, False),
}

SDXL_BLOCKS = (320, 640, 1280)


def detect(unet_config):
    """Preset name for a diffusers UNet config (real sizes or tiny models of the same layout)."""
    c = unet_config
    if c.get("addition_embed_type") == "text_time":
        layers = c.get("transformer_layers_per_block")
        if tuple(c.get("block_out_channels", ())) == SDXL_BLOCKS and layers not in (None, [1, 2, 10], (1, 2, 10)):
            return "ssd1b"
        return "sdxl"
    if c.get("cross_attention_dim") == 1024 or c.get("use_linear_projection"):
        return "sd2"
    return "sd15"
