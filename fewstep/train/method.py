"""What every training method shares: conditioning from captions, latents from pixels, the random draws of a step.

A method holds its networks and answers: the module to train (`student`, wrapped by accelerate for DDP), the random
numbers one global micro-batch needs (`draw`, from the run's one generator so that a resumed or split run draws the
same ones), the loss of this process's slice, what to update after an optimizer step, and what to save.
"""

import torch

from .. import text
from ..latents import to_unet
from ..schedules import noise_schedule


class Method:
    """Base of LcmLora, LcmFull and LoraFinetune."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        self.cfg, self.models, self.device, self.weight_dtype = cfg, models, device, weight_dtype
        self.autocast = autocast  # a context factory: mixed precision around UNet calls
        self.noise = noise_schedule(models.scheduler_config)
        self.alphas = self.noise.alphas_cumprod.to(device)
        self.latent_size = cfg.resolution // models.vae_factor
        self.latent_channels = models.vae.config.latent_channels
        self.uncond = None

    # ---- to override --------------------------------------------------------------------------------------
    student = None  # the module whose parameters train (unwrapped)

    def trainable(self):
        """{name: parameter} that the optimizer updates and checkpoints save."""
        return {n: p for n, p in self.student.named_parameters() if p.requires_grad}

    def draw(self, gen, n):
        raise NotImplementedError

    def loss(self, student, batch, draws):
        raise NotImplementedError

    def after_step(self):
        pass

    def extra_state(self):
        """Tensors besides the trainable parameters that a checkpoint must hold (e.g. an EMA network)."""
        return {}

    def load_extra_state(self, tensors):
        pass

    def validation_unet(self):
        return self.student

    def export(self, out, metadata):
        raise NotImplementedError

    # ---- shared pieces ------------------------------------------------------------------------------------
    def latent_noise(self, gen, n):
        return torch.randn((n, self.latent_channels, self.latent_size, self.latent_size), generator=gen)

    @torch.no_grad()
    def latents(self, pixels, noise):
        """Scaled VAE latents, sampled from the posterior with our own noise (the run's generator, not torch's)."""
        vae = self.models.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return to_unet(vae, dist.mean.float() + dist.std.float() * noise.to(self.device))

    @torch.no_grad()
    def conditioning(self, batch):
        """(text states, SDXL added conditions or None) for the batch's captions."""
        m = self.models
        states, pooled = text.encode(m.tokenizers, m.text_encoders, batch.captions, self.device)
        added = None
        if m.unet.config.get("addition_embed_type") == "text_time":  # SDXL's pooled text and size/crop ids
            added = {"text_embeds": pooled, "time_ids": batch.time_ids.to(self.device, pooled.dtype)}
        return states, added

    @torch.no_grad()
    def unconditional(self, states, added):
        """The teacher's unconditional input: zeros for SDXL-type models that zero empty prompts (as their
        pipelines and the reference script do), else the embedding of "" (computed once)."""
        m = self.models
        n = states.shape[0]
        if m.zeros_for_empty_prompt:
            u_added = None if added is None else {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                                  "time_ids": added["time_ids"]}
            return torch.zeros_like(states), u_added
        if self.uncond is None:
            self.uncond = text.encode(m.tokenizers, m.text_encoders, [""], self.device)
        u_states, u_pooled = self.uncond
        u_added = None
        if added is not None:
            u_added = {"text_embeds": u_pooled.expand(n, -1), "time_ids": added["time_ids"]}
        return u_states.expand(n, -1, -1), u_added

    def unet(self, model, x, t, states, added=None, tcond=None):
        with self.autocast():
            return model(x, t, encoder_hidden_states=states, timestep_cond=tcond, added_cond_kwargs=added,
                         return_dict=False)[0].float()


def cat_added(a, b):
    if a is None:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}
