"""Real-size UNets and text encoders built on the meta device: module names and shapes without weights.

`fewstep lora info/convert` resolve a file's names against these when no model is given; tests check key coverage
against them. Configs are the published diffusers/transformers values (SD 1.5, SD 2.1, SDXL base).
"""

import json
from pathlib import Path

from ..errors import LoadError

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     hidden_act="gelu", projection_dim=1280)
SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
UNETS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8, **SD_BLOCKS),
    "sd2": dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                **SD_BLOCKS),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
TEXT = {"sd15": [CLIP_L], "sd2": [OPENCLIP_H], "sdxl": [CLIP_L, OPENCLIP_BIGG]}
ARCHS = tuple(UNETS)
CROSS_TO_ARCH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def meta_models(arch):
    """{component: module on the meta device} of a real-size sd15 / sd2 / sdxl model."""
    if arch not in UNETS:
        raise LoadError(f"unknown architecture {arch!r} (use {', '.join(ARCHS)}, or --model with a diffusers folder)")
    return _build(UNETS[arch], TEXT[arch])


def folder_models(folder):
    """{component: module on the meta device} from a diffusers folder's configs (any size, SSD-1B included)."""
    folder = Path(folder)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        texts = [json.loads((folder / sub / "config.json").read_text())
                 for sub in ("text_encoder", "text_encoder_2") if (folder / sub / "config.json").exists()]
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{folder} is not a diffusers model folder with readable configs: {e}") from None
    return _build({k: v for k, v in unet.items() if not k.startswith("_")}, texts)


def _build(unet_config, text_configs):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    models = {}
    with torch.device("meta"):
        models["unet"] = UNet2DConditionModel.from_config(unet_config)
        for i, cfg in enumerate(text_configs):
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}
            config = CLIPTextConfig(**cfg)
            cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel  # SDXL's second encoder projects
            models["text_encoder" if i == 0 else "text_encoder_2"] = cls(config)
    return models
