"""The samplers and the few-step recipes, one registry each: name -> schedule, step function, A1111 label, defaults.

A recipe is what a few-step method's model card tells diffusers users to run (scheduler class and its settings,
steps, guidance); fewstep's image for a recipe equals diffusers' with those settings (tests/test_recipes.py). Pure
data at import time (no torch): the CLI's choices and the request checks read it.
"""

import re
from dataclasses import dataclass, field

from .errors import RequestError


@dataclass(frozen=True)
class Sampler:
    """One stateless sampler of fewstep.sampling and the schedule it walks."""

    name: str
    label: str  # A1111's sampler name (PNG metadata, /sdapi/v1/samplers)
    paper: str
    consistency: bool = False  # LCM/TCD: a grid of original_steps points, custom timesteps allowed
    sigma_space: bool = False  # Euler family: x = x0 + sigma * eps
    aliases: tuple = ()  # other A1111 names that mean this sampler


SAMPLERS = {s.name: s for s in (
    Sampler("lcm", "LCM", "Luo et al. 2023, latent consistency models", consistency=True),
    Sampler("tcd", "TCD", "Zheng et al. 2024, trajectory consistency distillation", consistency=True),
    Sampler("euler", "Euler", "Karras et al. 2022, Euler on the probability-flow ODE", sigma_space=True),
    Sampler("euler_a", "Euler a", "Euler ancestral (k-diffusion)", sigma_space=True, aliases=("Euler Ancestral",)),
    Sampler("ddim", "DDIM", "Song et al. 2020, DDIM with eta 0"),
)}
LABELS = {s.label: s.name for s in SAMPLERS.values()} | {a: s.name for s in SAMPLERS.values() for a in s.aliases}


@dataclass(frozen=True)
class Recipe:
    """A few-step method's inference settings, as its model card gives them to diffusers users."""

    name: str
    title: str
    sampler: str
    steps: int
    guidance: float
    spacing: str | None = None  # timestep spacing forced on the model's scheduler config ("trailing"); None: keep
    timesteps: dict = field(default_factory=dict)  # steps -> the fixed timesteps the method was trained on
    gamma: float | None = None  # TCD's eta
    config: dict = field(default_factory=dict)  # scheduler config keys the card sets (PCM: clip_sample False...)
    guidance_range: tuple = (0.0, 2.0)  # what the method is made for; outside it a request is warned
    steps_range: tuple = (1, 8)
    files: str = ""  # a regex over file names (lower case) of the adapters / UNets that need this recipe
    note: str = ""
    # what a diffusers user runs (fewstep bench's diffusers rows): scheduler class, from_config overrides, call kwargs
    diffusers: tuple = ("LCMScheduler", {}, {})

    def diffusers_scheduler(self, config):
        """The diffusers scheduler the model card prescribes, built from a model's scheduler config."""
        import diffusers

        cls, overrides, _ = self.diffusers
        return getattr(diffusers, cls).from_config(config, **overrides)


TRAILING = dict(timestep_spacing="trailing")
PCM_DDIM = dict(TRAILING, clip_sample=False, set_alpha_to_one=False)


RECIPES = {r.name: r for r in (
    Recipe("lcm", "LCM-LoRA / LCM", "lcm", 4, 1.0, guidance_range=(0.0, 2.0), files=r"(^|[^a-z])lcm",
           note="LCMScheduler (original_inference_steps 50); guidance 1-2 (a negative prompt needs > 1)",
           diffusers=("LCMScheduler", {}, {})),
    Recipe("tcd", "TCD", "tcd", 4, 1.0, gamma=0.3, files=r"(^|[^a-z])tcd",
           note="TCDScheduler, eta (gamma) 0.3; lower gamma = more detail",
           diffusers=("TCDScheduler", {}, {"eta": 0.3})),
    Recipe("lightning", "SDXL-Lightning", "euler", 4, 0.0, spacing="trailing", guidance_range=(0.0, 1.0),
           files=r"lightning",
           note="EulerDiscreteScheduler, trailing; the 1-step x0 UNet needs prediction_type sample (--prediction "
                "sample)", diffusers=("EulerDiscreteScheduler", TRAILING, {})),
    Recipe("hyper-sd", "Hyper-SD (N-step LoRAs)", "ddim", 4, 0.0, spacing="trailing", guidance_range=(0.0, 1.0),
           files=r"hyper-?sd(?!.*(cfg|1step))",
           note="DDIMScheduler, trailing, as many steps as the LoRA's name says",
           diffusers=("DDIMScheduler", TRAILING, {})),
    Recipe("hyper-sd-tcd", "Hyper-SD 1-step unified LoRA", "tcd", 1, 0.0, gamma=1.0, guidance_range=(0.0, 1.0),
           files=r"hyper-?sd.*1step.*lora",
           note="TCDScheduler with eta 1.0 (lower eta: more detail), 1-8 steps",
           diffusers=("TCDScheduler", {}, {"eta": 1.0})),
    Recipe("hyper-sd-unet", "Hyper-SD SDXL 1-step UNet", "lcm", 1, 0.0, timesteps={1: (800,)},
           guidance_range=(0.0, 1.0), steps_range=(1, 1), files=r"hyper-?sd.*1step.*unet",
           note="LCMScheduler with timesteps [800]", diffusers=("LCMScheduler", {}, {"timesteps": [800]})),
    Recipe("hyper-sd-cfg", "Hyper-SD CFG-preserving LoRAs", "ddim", 8, 5.0, spacing="trailing",
           guidance_range=(5.0, 8.0), steps_range=(8, 12), files=r"hyper-?sd.*cfg",
           note="DDIMScheduler, trailing, 8 or 12 steps, guidance 5-8 with a negative prompt",
           diffusers=("DDIMScheduler", TRAILING, {})),
    Recipe("dmd2", "DMD2", "lcm", 4, 0.0, timesteps={4: (999, 749, 499, 249), 1: (399,)},
           guidance_range=(0.0, 1.0), steps_range=(1, 4), files=r"dmd2?",
           note="LCMScheduler with the timesteps it was trained on: [999, 749, 499, 249] (1 step: [399])",
           diffusers=("LCMScheduler", {}, {"timesteps": [999, 749, 499, 249]})),
    Recipe("pcm", "PCM (small-CFG LoRAs)", "ddim", 4, 1.0, spacing="trailing",
           config=dict(clip_sample=False, set_alpha_to_one=False), guidance_range=(0.0, 2.0), steps_range=(1, 16),
           files=r"pcm(?!.*normal)",
           note="DDIMScheduler trailing, clip_sample False, set_alpha_to_one False; guidance 1-2",
           diffusers=("DDIMScheduler", PCM_DDIM, {})),
    Recipe("pcm-cfg", "PCM (normal-CFG LoRAs)", "ddim", 4, 3.0, spacing="trailing",
           config=dict(clip_sample=False, set_alpha_to_one=False), guidance_range=(2.0, 9.0), steps_range=(1, 16),
           files=r"pcm.*normal",
           note="DDIMScheduler trailing, clip_sample False, set_alpha_to_one False; guidance 2-9 (2.5-3.5 at 4 "
                "steps) with a negative prompt", diffusers=("DDIMScheduler", PCM_DDIM, {})),
    Recipe("turbo", "SD-Turbo / SDXL-Turbo", "euler_a", 1, 0.0, spacing="trailing", guidance_range=(0.0, 1.0),
           steps_range=(1, 4), files=r"turbo",
           note="EulerAncestralDiscreteScheduler, trailing, 1 step at 512 px, guidance 0; img2img needs steps x "
                "strength >= 1", diffusers=("EulerAncestralDiscreteScheduler", TRAILING, {})),
    Recipe("standard", "standard (no few-step adapter)", "euler", 25, 7.5, guidance_range=(1.0, 20.0),
           steps_range=(10, 1000), note="the model's own scheduler settings, Euler; the model family sets the "
                                        "steps and guidance",
           diffusers=("EulerDiscreteScheduler", {}, {})),
)}


def get_recipe(name):
    """The Recipe called name; a RequestError naming the field otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise RequestError(f"unknown recipe {name!r} (use {', '.join(RECIPES)})", field="recipe") from None


def sampler_for_label(label):
    """fewstep's sampler name for an A1111 label ("Euler a") or a fewstep name, or None."""
    if label in LABELS:
        return LABELS[label]
    low = label.lower().replace(" ", "_")
    return low if low in SAMPLERS else None


def detect(name, metadata=None):
    """(recipe name, steps or None) that a LoRA or UNet file's name or metadata suggests, or (None, None)."""
    text = " ".join([str(name)] + [str(v) for v in (metadata or {}).values() if isinstance(v, str)][:20]).lower()
    for recipe in RECIPES.values():
        if recipe.files and re.search(recipe.files, text):
            m = re.search(r"(\d+)[-_ ]?steps?", text)
            return recipe.name, int(m.group(1)) if m else None
    return None, None
