"""Samplers: stateless functions over a denoiser and a precomputed Schedule.

`denoise(x, t, alpha) -> (x0, eps)` predicts the clean latent and the noise of the variance-preserving latent
x = sqrt(alpha) x0 + sqrt(1 - alpha) eps at UNet timestep t; `noise(like)` draws fresh unit noise in the request's
seeded order; `blend(i, x) -> x`, when given, runs after step i on the sampler's own latent (sigma space for the
Euler family) - inpainting with an ordinary UNet puts the kept region back there. Latents stay float32 here
whatever dtype the UNet runs in.

Each sampler is one loop over its update `update_x(x, x0, eps, schedule, i, noise=...) -> x` (step i's arithmetic
after the UNet call); the stream (fewstep.stream) runs the same updates on frames that are each at their own step.
"""


def lcm_boundary(t, timestep_scaling=10.0, sigma_data=0.5):
    """Consistency-model boundary scalings c_skip, c_out at timestep t (LCM, Luo et al. 2023, eq. 9 discretised)."""
    s = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def unet_latent(x, schedule, i):
    """What the denoiser sees at step i: the variance-preserving latent (sigma-space samplers scale theirs by
    1 / sqrt(sigma^2 + 1) = sqrt(alpha))."""
    return x * schedule.alphas[i].sqrt() if schedule.sigmas is not None else x


def _loop(update, denoise, latents, schedule, noise, callback, blend, **kw):
    x = latents
    for i in range(len(schedule)):
        t = schedule.timesteps[i]
        x0, eps = denoise(unet_latent(x, schedule, i), t, schedule.alphas[i])
        x = update(x, x0, eps, schedule, i, noise=noise, **kw)
        if blend is not None:
            x = blend(i, x)
        if callback:
            callback(i, t, x)
    return x


def update_lcm(x, x0, eps, schedule, i, *, noise, timestep_scaling=10.0):
    c_skip, c_out = lcm_boundary(schedule.timesteps[i], timestep_scaling)
    denoised = c_out * x0 + c_skip * x
    if i == len(schedule) - 1:
        return denoised
    a_next = schedule.alphas_next[i]
    return a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise(denoised)


def sample_lcm(denoise, latents, schedule, *, noise, callback=None, blend=None, timestep_scaling=10.0):
    """Multistep latent consistency sampling (LCM, Luo et al. 2023, Algorithm 3); n steps call noise() n - 1 times."""
    return _loop(update_lcm, denoise, latents, schedule, noise, callback, blend, timestep_scaling=timestep_scaling)


def update_tcd(x, x0, eps, schedule, i, *, noise):
    a_s = schedule.alphas_s[i]
    x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    if schedule.gamma > 0 and i < len(schedule) - 1:
        ratio = schedule.alphas_next[i] / a_s
        return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise(x_s)
    return x_s


def sample_tcd(denoise, latents, schedule, *, noise, callback=None, blend=None):
    """Trajectory consistency sampling (TCD, Zheng et al. 2024, Alg. 4); n steps: n - 1 noise() calls if gamma > 0."""
    return _loop(update_tcd, denoise, latents, schedule, noise, callback, blend)


def update_euler(x, x0, eps, schedule, i, *, noise=None):
    sigma = schedule.sigmas[i]  # sigma-space latent: x = x0 + sigma * eps
    return x + (x - x0) / sigma * (schedule.sigmas[i + 1] - sigma)


def sample_euler(denoise, latents, schedule, *, noise=None, callback=None, blend=None):
    """Euler on the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1, no churn); 0 noise() calls."""
    return _loop(update_euler, denoise, latents, schedule, noise, callback, blend)


def update_euler_ancestral(x, x0, eps, schedule, i, *, noise):
    sigma, sigma_to = schedule.sigmas[i], schedule.sigmas[i + 1]
    # split the step to sigma_to into a deterministic part down to sigma_down and fresh noise of std sigma_up,
    # in diffusers' EulerAncestralDiscreteScheduler's order of operations
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    # drawn on the last step too, where sigma_up is 0: diffusers draws there, so the seeded order stays the same
    return x + noise(x) * sigma_up


def sample_euler_ancestral(denoise, latents, schedule, *, noise, callback=None, blend=None):
    """Euler ancestral in sigma space (k-diffusion's sample_euler_ancestral, eta 1); n steps: n noise() calls."""
    return _loop(update_euler_ancestral, denoise, latents, schedule, noise, callback, blend)


def update_ddim(x, x0, eps, schedule, i, *, noise=None):
    if schedule.clip_range is not None:
        # as diffusers (use_clipped_model_output False): only x0 is clamped, eps stays the model's
        x0 = x0.clamp(-schedule.clip_range, schedule.clip_range)
    a_next = schedule.alphas_next[i]
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def sample_ddim(denoise, latents, schedule, *, noise=None, callback=None, blend=None):
    """Deterministic DDIM sampling, eta = 0 (Song et al. 2020, eq. 12); calls noise() 0 times."""
    return _loop(update_ddim, denoise, latents, schedule, noise, callback, blend)


SAMPLERS = {"lcm": sample_lcm, "tcd": sample_tcd, "euler": sample_euler, "euler_a": sample_euler_ancestral,
            "ddim": sample_ddim}
UPDATES = {"lcm": update_lcm, "tcd": update_tcd, "euler": update_euler, "euler_a": update_euler_ancestral,
           "ddim": update_ddim}


def noise_draws(sampler_name, steps, gamma=0.0):
    """How many times SAMPLERS[sampler_name] calls noise() over `steps` run steps (len(schedule) after img2img)."""
    if sampler_name not in SAMPLERS:
        raise KeyError(sampler_name)
    if sampler_name == "euler_a":
        return steps
    if sampler_name == "lcm" or (sampler_name == "tcd" and gamma > 0):
        return max(steps - 1, 0)
    return 0


def add_noise(sampler, clean, unit_noise, schedule, index=0):
    """The clean latent noised to step `index` of the schedule, in the sampler's own latent space: index 0 is
    image-to-image's first latent; inpainting re-noises the kept region to the next step's with the same noise."""
    # by the schedule, not the sampler's name: every sigma-space sampler (euler, euler_a) has sigmas
    if schedule.sigmas is not None:
        return clean + unit_noise * schedule.sigmas[index]
    a = schedule.alphas[index]
    return a.sqrt() * clean + (1 - a).sqrt() * unit_noise
