"""Tiny random SD-family models (diffusers/transformers classes, real CLIP tokenizer) for offline tests.

Shapes follow the rules real checkpoints follow, so single-file detection works on them too: attention heads are
8 per block for SD 1.x and channels // 64 (at least 1) for SD 2.x/SDXL; text encoder heads are hidden // 64.
"""

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fewstep.arch import SD_SCHEDULER
from fewstep.tokenizers import bundled_tokenizer

SCHEDULER = dict(SD_SCHEDULER, interpolation_type="linear", use_karras_sigmas=False)


def _clip_config(hidden=32, layers=3, act="quick_gelu", projection_dim=None):
    kw = dict(hidden_size=hidden, intermediate_size=37, num_attention_heads=max(1, hidden // 64),
              num_hidden_layers=layers, vocab_size=49408, max_position_embeddings=77, hidden_act=act,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    if projection_dim:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def tiny_vae():
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=64)


def tiny_sd(seed=0, *, v2=False, prediction_type=None, time_cond_proj_dim=None):
    """Components of a tiny SD 1.x-like (or, with v2, SD 2.x-like) model, ready for StableDiffusionPipeline."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(1, 1) if v2 else 8, use_linear_projection=v2,
        time_cond_proj_dim=time_cond_proj_dim)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(_clip_config(act="gelu" if v2 else "quick_gelu"))
    scheduler = EulerDiscreteScheduler(**SCHEDULER, prediction_type=prediction_type or ("v_prediction" if v2 else "epsilon"))
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                tokenizer=bundled_tokenizer("openclip" if v2 else "clip"), scheduler=scheduler)


def tiny_sdxl(seed=0, *, time_cond_proj_dim=None):
    """Components of a tiny SDXL-like model, ready for StableDiffusionXLPipeline."""
    torch.manual_seed(seed)
    time_embed_dim, projection_dim = 8, 32
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 1), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=time_embed_dim * 6 + projection_dim,
        time_cond_proj_dim=time_cond_proj_dim)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(act="gelu", projection_dim=projection_dim))
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                text_encoder_2=text_encoder_2.eval(), tokenizer=bundled_tokenizer("clip"),
                tokenizer_2=bundled_tokenizer("openclip"), scheduler=scheduler)


def save_sd(path, seed=0, **kw):
    """Write a tiny SD-like model as a diffusers folder; returns the components."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_sd(seed, **kw)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return parts


def save_sdxl(path, seed=0, **kw):
    """Write a tiny SDXL-like model as a diffusers folder; returns the components."""
    from diffusers import StableDiffusionXLPipeline

    parts = tiny_sdxl(seed, **kw)
    StableDiffusionXLPipeline(**parts).save_pretrained(path)
    return parts
