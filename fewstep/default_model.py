"""The embedded default model: a small SD-architecture model built locally from a fixed seed.

Its weights are untrained until the shapes world ships a trained teacher; every output says so.
"""

import os
import tempfile
from pathlib import Path

NAME = "shapes-untrained-v1"
UNTRAINED_NOTE = ("the default model's weights are untrained (random, seed 0): images are noise until the shapes "
                  "world's trained model ships; pass --model for a real one")


def cache_dir():
    root = os.environ.get("FEWSTEP_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fewstep")
    return Path(root)


def default_model_path():
    """Folder of the default model, built on first use (a few seconds) and reused after."""
    path = cache_dir() / NAME
    if not (path / "model_index.json").exists():
        build(path)
    return path


def build(path, seed=0):
    """Write the default model as a diffusers folder, atomically (a half-written folder is never used)."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizers import bundled_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=128, intermediate_size=512, num_attention_heads=2,
                                                num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=bundled_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{NAME}-"))
    pipe.save_pretrained(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
