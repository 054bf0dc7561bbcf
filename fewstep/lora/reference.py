"""Real-size UNets and text encoders built on the meta device: module names and shapes without weights.

`fewstep lora info/convert` resolve a file's names against these when no model is given; tests check key coverage
against them. Configs are fewstep.arch's published values (SD 1.5, SD 2.1, SDXL base).
"""

import json
from pathlib import Path

from ..arch import BIG_G, SD2_UNET, SD15_UNET, SDXL_UNET, VIT_H, VIT_L
from ..errors import LoadError

UNETS = {"sd15": SD15_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}
TEXT = {"sd15": [VIT_L], "sd2": [VIT_H], "sdxl": [VIT_L, BIG_G]}
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
