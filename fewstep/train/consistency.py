"""Latent consistency distillation arithmetic (LCM, Luo et al. 2023, Algorithm 1 with the DDIM solver), as pure
functions over tensors. The boundary scalings and the x0/eps conversions are the sampler's own (fewstep.sampling,
fewstep.denoiser), so what is trained is exactly what is sampled."""

from dataclasses import dataclass

import torch

from ..denoiser import to_x0_eps
from ..sampling import lcm_boundary


@dataclass(frozen=True)
class DDIMSolver:
    """The DDIM solver on the grid [k - 1, 2k - 1, ..., 999] (k = 1000 // steps), as in LCM's Algorithm 1."""

    timesteps: torch.Tensor  # (steps,) long, ascending
    alphas: torch.Tensor  # alpha_bar at each grid point
    alphas_prev: torch.Tensor  # alpha_bar of the grid point below (alpha_bar[0] below the first)
    skip: int  # k: the solver moves from t to t - k

    @classmethod
    def from_schedule(cls, alphas_cumprod, steps=50):
        n = len(alphas_cumprod)
        k = n // steps
        ts = torch.arange(1, steps + 1, dtype=torch.long) * k - 1
        ac = alphas_cumprod.float()
        prev = torch.cat([ac[:1], ac[ts[:-1]]])
        return cls(ts, ac[ts], prev, k)

    def to(self, device):
        return DDIMSolver(self.timesteps.to(device), self.alphas.to(device), self.alphas_prev.to(device), self.skip)

    def step(self, x0, eps, index):
        """One DDIM step from grid point `index` to the point below: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
        a_prev = self.alphas_prev[index].view(-1, *([1] * (x0.ndim - 1)))
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    def endpoints(self, index):
        """(start timestep t_{n+k}, end timestep t_n = max(t_{n+k} - k, 0)) for solver indices."""
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)


def per_sample(x, ndim=4):
    return x.view(-1, *([1] * (ndim - 1)))


def add_noise(x0, noise, alpha):
    """The forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, alpha per sample."""
    a = per_sample(alpha, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def consistency_output(x, model_out, t, alpha, prediction_type, timestep_scaling):
    """f(x, t) = c_skip(t) x + c_out(t) x0(model output): the parameterisation the LCM sampler evaluates."""
    x0, _ = to_x0_eps(model_out.float(), x, per_sample(alpha, x.ndim), prediction_type)
    c_skip, c_out = lcm_boundary(t, timestep_scaling)
    return per_sample(c_skip, x.ndim) * x + per_sample(c_out, x.ndim) * x0


def lcm_cfg(cond, uncond, w):
    """Classifier-free guidance in the LCM form: cond + w (cond - uncond), i.e. Imagen's scale w + 1."""
    return cond + per_sample(w, cond.ndim) * (cond - uncond)


def teacher_step(solver, index, x, out_cond, out_uncond, w, alpha, prediction_type):
    """x_prev: one DDIM step of the guided teacher from x at grid point `index` (x0 and eps both guided)."""
    a = per_sample(alpha, x.ndim)
    x0_c, eps_c = to_x0_eps(out_cond.float(), x, a, prediction_type)
    x0_u, eps_u = to_x0_eps(out_uncond.float(), x, a, prediction_type)
    return solver.step(lcm_cfg(x0_c, x0_u, w), lcm_cfg(eps_c, eps_u, w), index)


def huber(pred, target, c=0.001):
    """Pseudo-Huber loss sqrt((p - y)^2 + c^2) - c, averaged (Song & Dhariwal 2023, as the LCM-LoRA READMEs)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c * c) - c).mean()


def distance(pred, target, kind="huber", c=0.001):
    if kind == "huber":
        return huber(pred, target, c)
    return torch.nn.functional.mse_loss(pred.float(), target.float())
