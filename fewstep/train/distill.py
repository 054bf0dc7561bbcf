"""Latent consistency distillation: an LCM-LoRA on the teacher itself, or a full LCM student with a guidance
embedding and an EMA target network (LCM, Luo et al. 2023, Algorithm 1; LCM-LoRA, Luo et al. 2023)."""

import copy
from contextlib import nullcontext

import torch

from ..denoiser import guidance_embedding
from . import consistency as cm
from .config import TrainError
from .method import Method, cat_added
from .models import adapters_disabled, lcm_student, lora_student, save_lora, save_pipeline, torch_dtype
from .toolbox import ema_update


class Distill(Method):
    """The consistency step shared by both variants; they differ in teacher, target and guidance input."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        super().__init__(cfg, models, device, weight_dtype, autocast)
        if models.full_lcm:
            raise TrainError(f"{models.source} is already a full LCM (its UNet takes a guidance embedding): distil "
                             "from the model it was made from")
        n_train = self.noise.num_train_timesteps
        if not 1 <= cfg.ddim_steps <= n_train:
            raise TrainError(f"--ddim-steps must be in 1..{n_train}, got {cfg.ddim_steps}")
        self.solver = cm.DDIMSolver.from_schedule(self.noise.alphas_cumprod, cfg.ddim_steps).to(device)
        self.scaling = cfg.timestep_scaling or self.noise.timestep_scaling
        self.ptype = self.noise.prediction_type

    def draw(self, gen, n):
        # fixed order: the draws of a step are a function of the generator state alone
        return dict(
            vae=self.latent_noise(gen, n),
            index=torch.randint(0, self.cfg.ddim_steps, (n,), generator=gen),
            noise=self.latent_noise(gen, n),
            w=torch.rand((n,), generator=gen) * (self.cfg.w_max - self.cfg.w_min) + self.cfg.w_min,
        )

    def teacher(self):
        """Context yielding the teacher UNet."""
        raise NotImplementedError

    def target(self):
        """Context yielding the target network (evaluated without gradient)."""
        raise NotImplementedError

    def guidance_input(self, w):
        return None

    def loss(self, student, batch, d):
        dev = self.device
        x0 = self.latents(batch.pixels, d["vae"])
        states, added = self.conditioning(batch)
        index = d["index"].to(dev)
        start, end = self.solver.endpoints(index)
        a_start, a_end = self.alphas[start], self.alphas[end]
        w = d["w"].to(dev)
        z = cm.add_noise(x0, d["noise"].to(dev), a_start)
        tcond = self.guidance_input(w)
        with torch.no_grad():
            # the guided teacher takes one DDIM step z_{t_{n+k}} -> x_{t_n}: uncond and cond in one batch
            u_states, u_added = self.unconditional(states, added)
            with self.teacher() as teacher:
                out = self.unet(teacher, torch.cat([z, z]), torch.cat([start, start]), torch.cat([u_states, states]),
                                cat_added(u_added, added))
            out_u, out_c = out.chunk(2)
            x_prev = cm.teacher_step(self.solver, index, z, out_c, out_u, w, a_start, self.ptype)
            # the target: the consistency function at the earlier point, without gradient
            with self.target() as target:
                target_out = self.unet(target, x_prev, end, states, added, tcond)
            y = cm.consistency_output(x_prev, target_out, end, a_end, self.ptype, self.scaling)
        pred = cm.consistency_output(z, self.unet(student, z, start, states, added, tcond), start, a_start,
                                     self.ptype, self.scaling)
        return cm.distance(pred, y, self.cfg.loss, self.cfg.huber_c)


class LcmLora(Distill):
    """LCM-LoRA: the student is the teacher plus a LoRA; the teacher is the same UNet with the adapter off (no
    second copy in memory); the target is the student itself without gradient (no EMA, as the LoRA recipe)."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        super().__init__(cfg, models, device, weight_dtype, autocast)
        self.student = lora_student(models.unet, cfg, device, weight_dtype)

    def teacher(self):
        return adapters_disabled(self.student)

    def target(self):
        return nullcontext(self.student)

    def export(self, out, metadata):
        return save_lora(self.student, out, dtype=torch_dtype(self.cfg.save_dtype), metadata=metadata)


class LcmFull(Distill):
    """Full LCM: every UNet weight trains, the student takes the guidance w as an embedding (so sampling needs no
    CFG pass), the target is an EMA of the student, the teacher a frozen copy of the original UNet."""

    def __init__(self, cfg, models, device, weight_dtype, autocast):
        super().__init__(cfg, models, device, weight_dtype, autocast)
        # the student copies the float32 weights before the teacher is cast to the compute dtype
        student = lcm_student(models.unet, cfg.time_cond_proj_dim).to(device=device, dtype=torch.float32)
        self.teacher_unet = models.unet.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
        self.ema = copy.deepcopy(student).requires_grad_(False)
        student.train()
        self.student = student

    def guidance_input(self, w):
        return guidance_embedding(w.cpu(), self.cfg.time_cond_proj_dim).to(self.device)

    def teacher(self):
        return nullcontext(self.teacher_unet)

    def target(self):
        return nullcontext(self.ema)

    def after_step(self):
        ema_update(self.ema, self.student, self.cfg.ema_decay)

    def extra_state(self):
        return {f"ema.{k}": v for k, v in self.ema.state_dict().items()}

    def load_extra_state(self, tensors):
        sd = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        self.ema.load_state_dict(sd)

    def validation_unet(self):
        return self.ema

    def export(self, out, metadata):
        return save_pipeline(self.models, self.ema, out, dtype=torch_dtype(self.cfg.save_dtype))
