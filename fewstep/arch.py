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
    if c.get("addition_embed_type") == "text" and c.get("cross_attention_dim") == 64:
        return "shapes"  # the shapes teacher: pooled-text embedding, 64-wide text encoder
    if c.get("addition_embed_type") == "text_time":
        layers = c.get("transformer_layers_per_block")
        if tuple(c.get("block_out_channels", ())) == SDXL_BLOCKS and layers not in (None, [1, 2, 10], (1, 2, 10)):
            return "ssd1b"
        return "sdxl"
    if c.get("cross_attention_dim") == 1024 or c.get("use_linear_projection"):
        return "sd2"
    return "sd15"


# Real configurations (diffusers' published values) for random-weight benchmarks and structure tests.
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# SSD-1B: SDXL without the mid-block transformer and with lighter up blocks (depths as in its original layout).
SSD1B_UNET = dict(SDXL_UNET, mid_block_type="UNetMidBlock2D", transformer_layers_per_block=(1, 2, 4),
                  reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]])
SD_VAE = dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
VIT_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             hidden_act="quick_gelu", **CLIP_IDS)
VIT_H = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
             hidden_act="gelu", **CLIP_IDS)
BIG_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
             hidden_act="gelu", projection_dim=1280, **CLIP_IDS)
REAL = {"sd15": (SD15_UNET, SD_VAE, [VIT_L]), "sd2": (SD2_UNET, dict(SD_VAE, sample_size=768), [VIT_H]),
        "sdxl": (SDXL_UNET, SDXL_VAE, [VIT_L, BIG_G]), "ssd1b": (SSD1B_UNET, SDXL_VAE, [VIT_L, BIG_G])}


def random_components(name, seed=0):
    """Components of the real architecture `name` with random weights (fp32, CPU), as read_components returns."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizers import bundled_tokenizer

    unet_cfg, vae_cfg, text_cfgs = REAL[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    encoders = [CLIPTextModel(CLIPTextConfig(**text_cfgs[0]))]
    tokenizers = [bundled_tokenizer("openclip" if name == "sd2" else "clip")]
    if len(text_cfgs) > 1:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**text_cfgs[1])))
        tokenizers.append(bundled_tokenizer("openclip"))
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading",
                 prediction_type="v_prediction" if name == "sd2" else "epsilon")
    return dict(arch=name, unet=unet.eval(), vae=vae.eval(), text_encoders=[e.eval() for e in encoders],
                tokenizers=tokenizers, scheduler_config=sched, force_zeros_for_empty_prompt=PRESETS[name].xl)
