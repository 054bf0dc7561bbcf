"""The model-family registry (sd15, sd2, sdxl, ssd1b, shapes) and detection from a UNet config.

One Preset per family holds every fact fewstep keeps about it: sizes, VAE scaling, the noise schedule, tokenizers,
the sampling defaults with and without a few-step adapter, and the real-size configs. Light at import (no torch).
"""

from dataclasses import dataclass, field
from types import MappingProxyType

# ---- real configurations (diffusers' published values) for random-weight benchmarks and structure tests ----------
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
SD_SCALING, SDXL_SCALING = 0.18215, 0.13025  # latents = VAE mean * scaling (diffusers' AutoencoderKL default: SD's)
SD_VAE = dict(sample_size=512, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD2_VAE = dict(SD_VAE, sample_size=768)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=SDXL_SCALING, force_upcast=True)
CLIP_TOKEN_IDS = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77, **CLIP_TOKEN_IDS)
VIT_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             hidden_act="quick_gelu", **CLIP_IDS)
VIT_H = dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
             hidden_act="gelu", **CLIP_IDS)
BIG_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
             hidden_act="gelu", projection_dim=1280, **CLIP_IDS)

# The noise schedule SD 1.x/2.x, SDXL and SSD-1B were trained with; the prediction type is per family (or checkpoint).
SD_SCHEDULER = MappingProxyType(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                     beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"))
# Sampling without a few-step adapter (the SD families'; shapes keeps its teacher's evaluated guidance).
SD_STANDARD = MappingProxyType(dict(sampler="euler", steps=25, guidance=7.5))


@dataclass(frozen=True)
class Preset:
    """What fewstep knows about a model family. Mappings are read-only: copy them (dict(...)) to change a value."""

    name: str
    title: str
    lcm_lora: str | None  # hub id of the published LCM-LoRA for this family
    xl: bool  # two text encoders, pooled embeddings and size conditioning
    native_size: int  # image side in pixels it was trained at
    cross_attention_dim: int  # text embedding width the UNet attends to (what a LoRA's attn2.to_k shapes show)
    tokenizers: tuple  # bundled tokenizer kind per text encoder: "clip" (ViT-L) or "openclip"
    scaling_factor: float | None  # VAE latent scaling; None where each trained model measures its own (shapes)
    scheduler: MappingProxyType  # the training noise schedule, prediction_type included
    shift_factor: float | None = None  # VAE latent shift (SD3/Flux-style VAEs have one; SD families none)
    latent_factor: int = 8  # pixels per latent cell
    standard: MappingProxyType = field(default_factory=lambda: SD_STANDARD)  # sampler, steps, guidance, no adapter
    recipe: str = "lcm"  # the few-step recipe fewstep distils and loads for this family
    force_zeros_for_empty_prompt: bool = False  # an empty negative prompt means zero embeddings (SDXL)
    unet: dict | None = None  # real-size configs: UNet, VAE, one CLIPTextConfig per encoder
    vae: dict | None = None
    text: tuple = ()
    # hub id (or, for shapes, a package folder resolved when asked) of the ControlNet a built-in preprocessor's
    # output is made for: `--control canny:photo.png` loads it; see default_controlnet()
    controlnets: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    # What a single-file checkpoint's weights do not show, read off the real configs.
    @property
    def text_kind(self):
        """The (first) text encoder: "clip" (ViT-L, HF layout, quick_gelu) or "openclip" (gelu)."""
        return self.tokenizers[0]

    @property
    def heads_per_block(self):
        """Fixed attention head count per block, or None for one head per 64 channels."""
        heads = self.unet["attention_head_dim"]
        return heads if isinstance(heads, int) else None

    @property
    def unet_sample_size(self):
        return self.unet["sample_size"]

    @property
    def vae_sample_size(self):
        return self.vae["sample_size"]

    @property
    def upcast_attention(self):
        return self.unet.get("upcast_attention", False)


def _sd(prediction_type):
    return MappingProxyType(dict(SD_SCHEDULER, prediction_type=prediction_type))


_XL = dict(xl=True, native_size=1024, cross_attention_dim=2048, tokenizers=("clip", "openclip"),
           scaling_factor=SDXL_SCALING, scheduler=_sd("epsilon"), force_zeros_for_empty_prompt=True, vae=SDXL_VAE,
           text=(VIT_L, BIG_G), controlnets=MappingProxyType({"canny": "diffusers/controlnet-canny-sdxl-1.0"}))
PRESETS = {
    "sd15": Preset("sd15", "SD 1.x", "latent-consistency/lcm-lora-sdv1-5", False, 512, 768, ("clip",), SD_SCALING,
                   scheduler=_sd("epsilon"), unet=SD15_UNET, vae=SD_VAE, text=(VIT_L,),
                   controlnets=MappingProxyType({"canny": "lllyasviel/sd-controlnet-canny"})),
    # The 768-v models (2.0 / 2.1); 2.x-base (512 px, epsilon) shares everything else.
    "sd2": Preset("sd2", "SD 2.x", None, False, 768, 1024, ("openclip",), SD_SCALING,
                  scheduler=_sd("v_prediction"), unet=SD2_UNET, vae=SD2_VAE, text=(VIT_H,)),
    "sdxl": Preset("sdxl", "SDXL", "latent-consistency/lcm-lora-sdxl", unet=SDXL_UNET, **_XL),
    "ssd1b": Preset("ssd1b", "SSD-1B", "latent-consistency/lcm-lora-ssd-1b", unet=SSD1B_UNET, **_XL),
    # fewstep's own teacher (worlds/shapes/teacher.py builds it): VAE factor 4 at 64 px, trailing timesteps, and the
    # guidance it was evaluated with (all four attributes right on 200 captions, docs/shapes.md).
    "shapes": Preset("shapes", "shapes world", None, False, 64, 64, ("clip",), None, latent_factor=4,
                     scheduler=MappingProxyType(dict(SD_SCHEDULER, prediction_type="epsilon",
                                                     timestep_spacing="trailing", interpolation_type="linear",
                                                     use_karras_sigmas=False)),
                     standard=MappingProxyType(dict(SD_STANDARD, guidance=4.0)),
                     controlnets=MappingProxyType({"canny": "package:data/shapes/controlnet"})),
}
# The real-size architectures: random-weight components, single-file loading, benchmarks.
REAL = {name: (p.unet, p.vae, list(p.text)) for name, p in PRESETS.items() if p.unet is not None}
# The families a cross-attention width names (SSD-1B shares SDXL's; the shapes world is fewstep's own).
BY_CROSS_WIDTH = {PRESETS[name].cross_attention_dim: name for name in ("sd15", "sd2", "sdxl")}
SDXL_BLOCKS = SDXL_UNET["block_out_channels"]


def default_controlnet(family, kind):
    """Where the family's ControlNet for a built-in preprocessor's output lives (a hub id or a local folder), or
    None: no such ControlNet is known, or the shapes world's is not installed. Package folders are looked up now,
    not at import, since the shapes ControlNet may be trained after fewstep is installed."""
    src = PRESETS[family].controlnets.get(kind) if family in PRESETS else None
    if src is not None and src.startswith("package:"):
        from pathlib import Path

        path = Path(__file__).resolve().parent / src[len("package:"):]
        return str(path) if path.is_dir() and any(path.iterdir()) else None
    return src


def controlnet_name(src):
    """The name a ControlNet source is known by in requests: a file's stem, a folder's or hub repo's name."""
    from pathlib import Path

    path = Path(str(src).rstrip("/"))
    return (path.stem if path.is_file() else path.name) or "controlnet"


def detect(unet_config):
    """Preset name for a diffusers UNet config (real sizes or tiny models of the same layout)."""
    c = unet_config
    if c.get("addition_embed_type") == "text" and c.get("cross_attention_dim") == PRESETS["shapes"].cross_attention_dim:
        return "shapes"  # the shapes teacher: pooled-text embedding, 64-wide text encoder
    if c.get("addition_embed_type") == "text_time":
        layers, sdxl = c.get("transformer_layers_per_block"), SDXL_UNET["transformer_layers_per_block"]
        if tuple(c.get("block_out_channels", ())) == SDXL_BLOCKS and layers not in (None, list(sdxl), tuple(sdxl)):
            return "ssd1b"
        return "sdxl"
    if c.get("cross_attention_dim") == PRESETS["sd2"].cross_attention_dim or c.get("use_linear_projection"):
        return "sd2"
    return "sd15"


def random_components(name, seed=0):
    """Components of the real architecture `name` with random weights (fp32, CPU), as read_components returns."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizers import bundled_tokenizer

    p = PRESETS[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**p.unet)
    vae = AutoencoderKL(**p.vae)
    encoders = [CLIPTextModel(CLIPTextConfig(**p.text[0]))]
    if len(p.text) > 1:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**p.text[1])))
    return dict(arch=name, unet=unet.eval(), vae=vae.eval(), text_encoders=[e.eval() for e in encoders],
                tokenizers=[bundled_tokenizer(kind) for kind in p.tokenizers], scheduler_config=dict(p.scheduler),
                force_zeros_for_empty_prompt=p.force_zeros_for_empty_prompt)
