"""The shapes teacher's architecture: SD's classes (AutoencoderKL, CLIPTextModel, UNet2DConditionModel) at a small size.

Choices made for fast conditioning (issue 5 measured it as the slow part):
- latents of 16x16x4 (VAE factor 4 at 64 px), so a training step costs little and batches can be large;
- cross-attention at 16x16 and 8x8 and in the 4x4 middle block: position needs spatial queries, colour needs them
  where the shape is;
- the UNet also adds an attention-pooled text embedding to its time embedding (addition_embed_type "text", a stock
  UNet2DConditionModel option, fed from encoder_hidden_states alone), so every ResNet block sees the caption's
  global attributes (background, colour, shape) from the first step, as SDXL's pooled text embedding does;
- a narrow CLIP text encoder (hidden 64) with the full CLIP vocabulary: the embedding table is most of its size.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...arch import PRESETS

MODEL_NAME = "shapes-teacher-v1"
SCHEDULER = dict(PRESETS["shapes"].scheduler)  # the registry's; the shipped scheduler_config.json is its copy


@dataclass(frozen=True)
class TeacherConfig:
    """Sizes of the three networks; the defaults are the shipped teacher's."""

    size: int = 64  # image side in pixels
    vae_channels: tuple = (32, 64, 64)  # three levels: latent factor 4
    vae_groups: int = 8  # GroupNorm groups: several channels per group keep flat colours distinguishable
    unet_channels: tuple = (64, 128, 128)
    unet_groups: int = 16
    unet_heads: int = 4
    pooled_text: bool = True  # attention-pooled caption added to the time embedding
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256

    @property
    def latent_size(self):
        return self.size // 2 ** (len(self.vae_channels) - 1)


def build_vae(cfg):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg.vae_channels,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=cfg.vae_groups,
                         sample_size=cfg.size)


def build_text_encoder(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate, num_attention_heads=cfg.text_heads,
        num_hidden_layers=cfg.text_layers, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def build_unet(cfg):
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text", addition_embed_type_num_heads=cfg.unet_heads) if cfg.pooled_text else {}
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=4, out_channels=4, block_out_channels=cfg.unet_channels,
        layers_per_block=1, norm_num_groups=cfg.unet_groups, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **extra)


def build(cfg, seed=0):
    """(vae, text_encoder, unet) at random init from a seed."""
    torch.manual_seed(seed)
    return build_vae(cfg), build_text_encoder(cfg), build_unet(cfg)


def scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULER)


def save_pipeline(path, vae, text_encoder, unet, *, dtype=torch.float16, info=None):
    """Write a StableDiffusionPipeline folder (safetensors in `dtype`); copies, so the modules are left as they are."""
    import copy

    from diffusers import StableDiffusionPipeline

    from ...tokenizers import bundled_tokenizer

    parts = {k: copy.deepcopy(m).to("cpu", dtype) for k, m in
             (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    pipe = StableDiffusionPipeline(**parts, tokenizer=bundled_tokenizer("clip"), scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    if dtype != torch.float32:
        # transformers loads a model in its config's dtype by default while diffusers upcasts to float32, so a plain
        # StableDiffusionPipeline.from_pretrained(path) would mix fp16 text states with an fp32 UNet; the weights stay
        # fp16 on disk (half the size) and every library loads them as float32 unless told otherwise.
        cfg_path = path / "text_encoder" / "config.json"
        text_cfg = json.loads(cfg_path.read_text())
        text_cfg["dtype"] = "float32"
        cfg_path.write_text(json.dumps(text_cfg, indent=2, sort_keys=True) + "\n")
    if info is not None:
        (path / "shapes_teacher.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return path

