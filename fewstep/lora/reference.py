"""Real-size UNets and text encoders built on the meta device: module names and shapes without weights.

`fewstep lora info/convert` resolve a file's names against these when no model is given; tests check key coverage
against them. Configs are fewstep.arch's published values (SD 1.5, SD 2.1, SDXL base). Also: random LoRAs in the
published LCM-LoRAs' layout, for benchmarks at real size.
"""

import json
from pathlib import Path

from ..arch import BY_CROSS_WIDTH, PRESETS
from ..errors import LoadError

ARCHS = tuple(BY_CROSS_WIDTH.values())  # sd15, sd2, sdxl: one per cross-attention width (SSD-1B is SDXL's)
UNETS = {arch: PRESETS[arch].unet for arch in ARCHS}
TEXT = {arch: list(PRESETS[arch].text) for arch in ARCHS}
CROSS_TO_ARCH = BY_CROSS_WIDTH


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


def target_modules(unet, ends):
    """Names of unet's Linear and Conv2d modules whose names end with one of `ends` (a LoRA recipe's targets)."""
    import torch

    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return [name for name, module in unet.named_modules() if isinstance(module, layers) and name.endswith(ends)]


def random_lora(unet, ends, *, rank=64, seed=0, scale=0.01, dtype=None):
    """A random LoRA on `ends`' modules in the published LCM-LoRAs' layout: kohya keys with diffusers block names,
    `dtype` (default fp16) factors of N(0, scale^2), alpha = rank."""
    import torch

    dtype = dtype or torch.float16
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in target_modules(unet, tuple(ends)):
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = (torch.randn((rank, *w.shape[1:]), generator=gen) * scale).to(dtype)
        up = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        sd[f"{key}.lora_up.weight"] = (torch.randn(up, generator=gen) * scale).to(dtype)
        sd[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return sd
