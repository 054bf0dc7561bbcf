"""Samplers: stateless functions over a denoiser and a precomputed Schedule.

`denoise(x, t, alpha) -> (x0, eps)` predicts the clean latent and the noise of the variance-preserving latent
x = sqrt(alpha) x0 + sqrt(1 - alpha) eps at UNet timestep t; `noise(like)` draws fresh unit noise in the request's
seeded order. Latents stay float32 here whatever dtype the UNet runs in.
"""


def lcm_boundary(t, timestep_scaling=10.0, sigma_data=0.5):
    """Consistency-model boundary scalings c_skip, c_out at timestep t (LCM, Luo et al. 2023, eq. 9 discretised)."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def sample_lcm(denoise, latents, schedule, *, noise, callback=None, timestep_scaling=10.0):
    """Multistep latent consistency sampling (LCM, Luo et al. 2023, Algorithm 3)."""
    x = latents
    n = len(schedule)
    for i in range(n):
        t = schedule.timesteps[i]
        x0, _ = denoise(x, t, schedule.alphas[i])
        c_skip, c_out = lcm_boundary(t, timestep_scaling)
        denoised = c_out * x0 + c_skip * x
        if i < n - 1:
            a_next = schedule.alphas_next[i]
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise(denoised)
        else:
            x = denoised
        if callback:
            callback(i, t, x)
    return x


def sample_tcd(denoise, latents, schedule, *, noise, callback=None):
    """Trajectory consistency distillation sampling with stochastic gamma (TCD, Zheng et al. 2024, Algorithm 4)."""
    x = latents
    n = len(schedule)
    for i in range(n):
        t = schedule.timesteps[i]
        x0, eps = denoise(x, t, schedule.alphas[i])
        a_s = schedule.alphas_s[i]
        x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if schedule.gamma > 0 and i < n - 1:
            ratio = schedule.alphas_next[i] / a_s
            x = ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise(x_s)
        else:
            x = x_s
        if callback:
            callback(i, t, x)
    return x


def sample_euler(denoise, latents, schedule, *, noise=None, callback=None):
    """Euler method on the probability-flow ODE in sigma space (Karras et al. 2022, Algorithm 1 without churn)."""
    x = latents  # sigma-space latent: x = x0 + sigma * eps
    for i in range(len(schedule)):
        t, sigma, a = schedule.timesteps[i], schedule.sigmas[i], schedule.alphas[i]
        x0, _ = denoise(x * a.sqrt(), t, a)  # the UNet sees the variance-preserving latent x / sqrt(sigma^2 + 1)
        x = x + (x - x0) / sigma * (schedule.sigmas[i + 1] - sigma)
        if callback:
            callback(i, t, x)
    return x


SAMPLERS = {"lcm": sample_lcm, "tcd": sample_tcd, "euler": sample_euler}


def add_noise(sampler, clean, unit_noise, schedule):
    """The starting latent of image-to-image: the clean latent noised to the schedule's first step."""
    if sampler == "euler":
        return clean + unit_noise * schedule.sigmas[0]
    a = schedule.alphas[0]
    return a.sqrt() * clean + (1 - a).sqrt() * unit_noise
