"""Noise and timestep schedules as pure functions returning tensors (diffusers' scheduler configs as input)."""

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .arch import SD_SCHEDULER
from .errors import RequestError

# The keys of a diffusers scheduler config that change the arithmetic (missing ones take SD's values); everything
# else is ignored.
DEFAULTS = dict(SD_SCHEDULER, prediction_type="epsilon", original_inference_steps=50, timestep_scaling=10.0,
                rescale_betas_zero_snr=False, interpolation_type="linear", use_karras_sigmas=False, clip_sample=False,
                clip_sample_range=1.0, set_alpha_to_one=False)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model, read from its scheduler config."""

    alphas_cumprod: torch.Tensor  # float32, one per training timestep
    prediction_type: str = "epsilon"
    timestep_scaling: float = 10.0
    original_inference_steps: int = 50
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    interpolation_type: str = "linear"
    clip_sample: bool = False  # DDIM: clamp the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False  # DDIM: alpha_bar past the first timestep is 1.0, else alphas_cumprod[0]

    @property
    def num_train_timesteps(self):
        return len(self.alphas_cumprod)


def noise_schedule(config=None):
    """NoiseSchedule from a diffusers scheduler config dict (missing keys take SD's values)."""
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in (config or {}).items() if k in DEFAULTS and v is not None})
    n = cfg["num_train_timesteps"]
    if config and config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float32)
    else:
        raise RequestError(f"unsupported beta_schedule {cfg['beta_schedule']!r} in the model's scheduler config")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if cfg["rescale_betas_zero_snr"]:
        alphas_cumprod = _zero_terminal_snr(alphas_cumprod)
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise RequestError(f"unsupported prediction_type {cfg['prediction_type']!r} "
                           f"({', '.join(PREDICTION_TYPES)} are)")
    return NoiseSchedule(alphas_cumprod, cfg["prediction_type"], float(cfg["timestep_scaling"]),
                         int(cfg["original_inference_steps"]), cfg["timestep_spacing"], int(cfg["steps_offset"]),
                         cfg["interpolation_type"], bool(cfg["clip_sample"]), float(cfg["clip_sample_range"]),
                         bool(cfg["set_alpha_to_one"]))


def _zero_terminal_snr(alphas_cumprod):
    """Rescale so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas_cumprod[-1] = 2**-24  # as diffusers: keep the last step finite
    return alphas_cumprod


@dataclass(frozen=True)
class Schedule:
    """Per-step tensors a sampler walks; `timesteps` condition the UNet, the rest is sampler arithmetic."""

    timesteps: torch.Tensor  # UNet timesteps, one per step
    alphas: torch.Tensor  # alpha_bar at each step's timestep
    alphas_next: torch.Tensor  # alpha_bar of the point each step moves to (LCM/TCD)
    alphas_s: torch.Tensor | None = None  # TCD: alpha_bar at s = floor((1 - gamma) * t_next)
    sigmas: torch.Tensor | None = None  # Euler: n + 1 sigmas ending in 0
    gamma: float = 0.0
    init_sigma: float = 1.0  # scale of the unit noise that starts text-to-image
    clip_range: float | None = None  # DDIM: clamp x0 to +-clip_range (the config's clip_sample); None: no clamp

    def __len__(self):
        return len(self.timesteps)

    def to(self, device):
        # every tensor field moves, so a field added later cannot be left behind on the CPU
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


def consistency_timesteps(ns, steps=None, *, original_steps=None, timesteps=None, strength=1.0):
    """LCM/TCD timesteps as diffusers' LCMScheduler.set_timesteps picks them (strength shrinks the grid for img2img)."""
    original_steps = original_steps or ns.original_inference_steps
    n_train = ns.num_train_timesteps
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if not ts:
            raise RequestError("timesteps: give at least one timestep", field="timesteps")
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise RequestError(f"timesteps must be strictly descending, got {ts}", field="timesteps")
        if ts[0] >= n_train or ts[-1] < 0:
            raise RequestError(f"timesteps must lie in [0, {n_train - 1}], got {ts}", field="timesteps")
        if strength < 1.0:
            # as diffusers: img2img with custom timesteps skips the first ones
            keep = min(int(len(ts) * strength), len(ts))
            ts = ts[len(ts) - keep:]
            if not ts:
                raise RequestError(f"strength {strength} leaves no step of the {len(timesteps)} timesteps given",
                                   field="timesteps")
        return ts
    if not 1 <= original_steps <= n_train:
        raise RequestError(f"original_inference_steps must be in 1..{n_train}, got {original_steps}",
                           field="original_steps")
    k = n_train // original_steps
    grid = [(i + 1) * k - 1 for i in range(int(original_steps * strength))][::-1]
    if steps is None or steps < 1:
        raise RequestError(f"steps must be at least 1, got {steps}", field="steps")
    if steps > original_steps:
        raise RequestError(f"steps {steps} is more than this sampler's {original_steps}-point grid allows "
                           f"(use 1-{original_steps}, or raise original_inference_steps)", field="steps")
    if steps > len(grid):
        raise RequestError(f"strength {strength} leaves {len(grid)} of the {original_steps} grid points, fewer than "
                           f"steps {steps}: raise strength or lower steps", field="strength")
    # numpy's float linspace, not exact integer division: diffusers floors these floats, and they differ at some sizes
    idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return [grid[i] for i in idx]


def lcm_schedule(ns, steps=None, *, original_steps=None, timesteps=None, strength=1.0):
    """Schedule for sample_lcm: alpha_bar at t and at the next timestep (the last step moves to t itself)."""
    ts = consistency_timesteps(ns, steps, original_steps=original_steps, timesteps=timesteps, strength=strength)
    ac = ns.alphas_cumprod
    nxt = ts[1:] + ts[-1:]
    return Schedule(torch.tensor(ts, dtype=torch.long), ac[ts], ac[nxt])


def tcd_schedule(ns, steps=None, *, gamma=0.3, original_steps=None, timesteps=None, strength=1.0):
    """Schedule for sample_tcd: alpha_bar at t, at the next timestep (0 after the last) and at s."""
    if not 0.0 <= gamma <= 1.0:
        raise RequestError(f"gamma (TCD eta) must be in [0, 1], got {gamma}", field="gamma")
    ts = consistency_timesteps(ns, steps, original_steps=original_steps, timesteps=timesteps, strength=strength)
    ac = ns.alphas_cumprod
    nxt = ts[1:] + [0]
    # diffusers computes floor((1 - eta) * t) in float32; match it where float64 would round differently
    s = torch.floor((1 - torch.tensor(gamma, dtype=torch.float32)) * torch.tensor(nxt, dtype=torch.long)).long()
    return Schedule(torch.tensor(ts, dtype=torch.long), ac[ts], ac[nxt], alphas_s=ac[s], gamma=float(gamma))


def spaced_timesteps(ns, steps, spacing=None, *, integer):
    """Inference timesteps as diffusers' set_timesteps picks them: DDIMScheduler (integer) or EulerDiscreteScheduler."""
    spacing = spacing or ns.timestep_spacing
    n_train = ns.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise RequestError(f"steps must be in 1..{n_train}, got {steps}", field="steps")
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, steps)[::-1]
        ts = ts.round() if integer else ts  # DDIM rounds to integers; Euler keeps the fractions and interpolates
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1] + ns.steps_offset
    elif spacing == "trailing":
        # float step and arange as diffusers: a step count that does not divide n_train rounds exactly as theirs
        ts = np.round(np.arange(n_train, 0, -n_train / steps)) - 1
    else:
        raise RequestError(f"unsupported timestep_spacing {spacing!r} ({', '.join(SPACINGS)} are)")
    return ts.astype(np.int64 if integer else np.float32)


def img2img_start(steps, strength, sampler):
    """Index of the first step img2img runs, as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps."""
    keep = min(int(steps * strength), steps)
    if keep < 1:
        raise RequestError(f"strength {strength} with {steps} {sampler} steps runs no step: steps x strength must "
                           f"be at least 1 (raise strength or steps)", field="strength")
    return steps - keep


def euler_schedule(ns, steps, *, strength=1.0, spacing=None):
    """Schedule for sample_euler / sample_euler_ancestral, as diffusers' EulerDiscreteScheduler (img2img slices it).

    spacing overrides the config's timestep_spacing (SDXL-Lightning and SD-Turbo need "trailing").
    """
    spacing = spacing or ns.timestep_spacing
    n_train = ns.num_train_timesteps
    ts = spaced_timesteps(ns, steps, spacing, integer=False)
    all_sigmas = (((1 - ns.alphas_cumprod) / ns.alphas_cumprod) ** 0.5).numpy()
    if ns.interpolation_type == "log_linear":
        sig = np.exp(np.interp(ts, np.arange(n_train), np.log(all_sigmas)))
    else:
        sig = np.interp(ts, np.arange(n_train), all_sigmas)
    sigmas = torch.cat([torch.from_numpy(np.asarray(sig)).float(), torch.zeros(1)])
    sigma_max = float(sigmas.max())
    init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    timesteps = torch.from_numpy(ts.copy()).float()
    start = img2img_start(steps, strength, "Euler")
    alphas = 1.0 / (1.0 + sigmas[:-1] ** 2)
    return Schedule(timesteps[start:], alphas[start:], alphas[start:], sigmas=sigmas[start:], init_sigma=init)


def ddim_schedule(ns, steps, *, spacing=None, strength=1.0):
    """Schedule for sample_ddim, as diffusers' DDIMScheduler: alpha_bar at t and at t - n_train // steps."""
    n_train = ns.num_train_timesteps
    ts = spaced_timesteps(ns, steps, spacing, integer=True)
    if ts[0] >= n_train:
        raise RequestError(f"{steps} leading steps with steps_offset {ns.steps_offset} reach timestep {ts[0]}, past "
                           f"the model's last ({n_train - 1}): use fewer steps", field="steps")
    ac = ns.alphas_cumprod
    # as diffusers: the previous timestep is t - n_train // steps, which for trailing and linspace spacing is not
    # always the next timestep in the list; before timestep 0 it is the "final" alpha_bar
    prev = torch.from_numpy(ts - n_train // steps)
    final = torch.tensor(1.0) if ns.set_alpha_to_one else ac[0]
    alphas_next = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    start = img2img_start(steps, strength, "DDIM")
    timesteps = torch.from_numpy(ts.copy())
    return Schedule(timesteps[start:], ac[timesteps][start:], alphas_next[start:],
                    clip_range=ns.clip_sample_range if ns.clip_sample else None)
