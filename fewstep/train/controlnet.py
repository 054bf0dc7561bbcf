"""ControlNet training (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a copy of
the base UNet's encoder (diffusers' ControlNetModel.from_unet, its zero convolutions at zero) learns, with the
base model's own noise-prediction loss, to steer the frozen UNet through residuals from a conditioning image.

As diffusers' examples/controlnet/train_controlnet.py: the UNet, VAE and text encoder stay frozen; control images
are RGB in [0, 1]; the loss is MSE to the noise (or v, for v-prediction models). An LCM-LoRA is not involved: the
ControlNet learns the teacher's residuals, and plugs into the teacher with its LCM-LoRA at sampling time.
"""

import math
from pathlib import Path

import torch

from .config import TrainError
from .finetune import Denoising
from .models import torch_dtype

CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' default conditioning embedding: 4 levels, / 8 (SD's VAE)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def controlnet_from_unet(unet, vae_factor):
    """ControlNetModel.from_unet with the UNet's encoder weights, its conditioning embedding downsampling by the
    VAE's factor (the control image comes in pixels, the residuals are added in latent space)."""
    from diffusers import ControlNetModel

    levels = int(round(math.log2(vae_factor)))  # each level after the first halves the control image
    if 2 ** levels != vae_factor or not 1 <= levels < len(CONDITIONING_CHANNELS):
        raise TrainError(f"a ControlNet needs a VAE factor of 2, 4 or 8, not {vae_factor}")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:levels + 1])
    heads = unet.config.get("addition_embed_type_num_heads")
    if heads is not None and net.config.addition_embed_type_num_heads != heads:
        # from_unet (diffusers 0.3x-0.42) does not pass addition_embed_type_num_heads: with an added text
        # embedding (the shapes teacher's) its attention pooling would split into the default 64 heads, not the
        # UNet's. Same weights, the right config.
        config = {k: v for k, v in net.config.items() if not k.startswith("_")}  # _use_default_values would win
        fixed = ControlNetModel.from_config({**config, "addition_embed_type_num_heads": heads})
        fixed.load_state_dict(net.state_dict())
        net = fixed
    return net


def check_base(models):
    """Refuse base models a ControlNet cannot be made for, with what to do instead."""
    unet = getattr(models, "unet", None)
    if unet is None:
        raise TrainError(f"{models.source} has no UNet: a ControlNet is made from a base model's UNet (give the "
                         "model's folder, single-file checkpoint or hub id)")
    if models.full_lcm:
        raise TrainError(f"{models.source} is a full LCM (its UNet takes a guidance embedding): train the ControlNet "
                         "on the model it was distilled from; it then runs with that model's LCM-LoRA or LCM")
    if unet.config.in_channels != models.vae.config.latent_channels:
        raise TrainError(f"{models.source}'s UNet takes {unet.config.in_channels} input channels (an inpainting "
                         "UNet?): train the ControlNet on the base model; it then runs with its inpainting version")


class ControlNetTrain(Denoising):
    """A ControlNet on the frozen base UNet, trained to predict the noise (or v) the base predicts."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        check_base(models)
        super().__init__(cfg, models, device, weight_dtype, autocast)
        models.unet.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
        self.student = controlnet_from_unet(models.unet, models.vae_factor).to(device, torch.float32).train()

    def loss(self, student, batch, d):
        x0, x, t, noise, a, states, added = self.noised(batch, d)
        cond = batch.conditioning.to(self.device)
        with self.autocast():
            down, mid = student(x, t, encoder_hidden_states=states, controlnet_cond=cond, added_cond_kwargs=added,
                                return_dict=False)
            # accelerate's prepared model returns float32 under mixed precision; the frozen UNet adds the
            # residuals into its own dtype's activations, and its CPU group norms take no mixed inputs
            dt = self.weight_dtype
            down, mid = [r.to(dt) for r in down], mid.to(dt)
            out = self.models.unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added,
                                   down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                   return_dict=False)[0].float()
        return self.denoising_loss(out, x0, noise, a)

    def validation_unet(self):
        return self.models.unet

    def export(self, out, metadata):
        return save_controlnet(self.student, out, dtype=torch_dtype(self.cfg.save_dtype), metadata=metadata)


def save_controlnet(net, folder, *, dtype, metadata=None):
    """A diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors, what
    ControlNetModel.from_pretrained reads), cast on the way out so the live fp32 weights stay as they are; each
    file through a temporary name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.part"
    save_file(weights, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    tmp.replace(folder / WEIGHTS_FILE)
    config = folder / ".config.json.part"
    config.write_text(net.to_json_string())
    config.replace(folder / "config.json")
    return folder
