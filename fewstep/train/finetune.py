"""Text-to-image LoRA fine-tuning with the noise-prediction loss (DDPM, Ho et al. 2020): style LoRAs that combine
with an LCM-LoRA at sampling time (theta = base + l1 * tau_style + l2 * tau_LCM)."""

import torch

from . import consistency as cm
from .method import Method
from .models import lora_student, save_lora, torch_dtype
from .toolbox import min_snr_weight


def prediction_target(prediction_type, x0, noise, alpha):
    """What the UNet is trained to output: the noise, or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    if prediction_type == "v_prediction":
        a = cm.per_sample(alpha, x0.ndim)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    return noise


class Denoising(Method):
    """The plain diffusion loss the base model was trained with, for trainers that add something to a frozen base
    (a LoRA, a ControlNet): the draws, the noised batch and the (min-SNR weighted) loss, written once."""

    def draw(self, gen, n):
        return dict(
            vae=self.latent_noise(gen, n),
            t=torch.randint(0, self.noise.num_train_timesteps, (n,), generator=gen),
            noise=self.latent_noise(gen, n),
        )

    def noised(self, batch, d):
        """(x0, x_t, t, noise, alpha_bar, states, added) of a batch."""
        dev = self.device
        x0 = self.latents(batch.pixels, d["vae"])
        states, added = self.conditioning(batch)
        t, noise = d["t"].to(dev), d["noise"].to(dev)
        a = self.alphas[t]
        return x0, cm.add_noise(x0, noise, a), t, noise, a, states, added

    def denoising_loss(self, out, x0, noise, a):
        target = prediction_target(self.noise.prediction_type, x0, noise, a)
        err = ((out - target) ** 2).mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma:
            err = err * min_snr_weight(a, self.cfg.snr_gamma, self.noise.prediction_type)
        return err.mean()


class LoraFinetune(Denoising):
    """A LoRA on the base UNet trained to predict the noise (or v) the model was trained to predict."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        super().__init__(cfg, models, device, weight_dtype, autocast)
        self.student = lora_student(models.unet, cfg, device, weight_dtype)

    def loss(self, student, batch, d):
        x0, x, t, noise, a, states, added = self.noised(batch, d)
        return self.denoising_loss(self.unet(student, x, t, states, added), x0, noise, a)

    def export(self, out, metadata):
        return save_lora(self.student, out, dtype=torch_dtype(self.cfg.save_dtype), metadata=metadata)
