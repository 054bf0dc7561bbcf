"""Generation requests: one frozen dataclass, validated in one place; CLI flags and HTTP fields map onto it.

What can be checked without a model is checked here, when the request is made; what depends on the model (sizes,
steps of a schedule, the recipe's defaults) is checked once more by Engine.resolve, before any work.
"""

import re
from dataclasses import dataclass, field

from .errors import RequestError
from .recipes import RECIPES, SAMPLERS

MAX_IMAGES = 64
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")  # A1111's <lora:NAME:WEIGHT> prompt syntax


def split_lora_tags(prompt):
    """(prompt without <lora:NAME:WEIGHT> tags, {name: weight}); a tag without a weight means 1.0, repeated names
    add up. The tags resolve to files in fewstep.lora.prompt."""
    loras = {}
    for name, weight in LORA_TAG.findall(prompt):
        try:
            w = 1.0 if weight in ("", None) else float(weight)
        except ValueError:
            raise RequestError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        loras[name.strip()] = loras.get(name.strip(), 0.0) + w
    cleaned = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt))).strip(" ,")
    return cleaned, loras


def check_text(value, field):
    """A prompt must be encodable text: a lone surrogate (JSON's "\\ud800", or argv bytes that are not UTF-8, which
    Python keeps as surrogates) cannot reach the tokenizer or the PNG metadata. The message leaves the text out (it
    cannot be printed either)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{field} is not valid Unicode text (a lone surrogate or bytes that are not UTF-8 at "
                           f"character {e.start})", field=field) from None


def classifier_free(guidance, full_lcm=False):
    """Whether a request runs classifier-free guidance (two UNet passes): guidance above 1, except on full LCMs,
    which take guidance as an embedding. The one place this rule is written."""
    return not full_lcm and guidance is not None and guidance > 1


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet applied to a request: which (a loaded ControlNet's name), its control image, how strongly and
    over which fraction of the steps (diffusers' controlnet_conditioning_scale, control_guidance_start/end).
    preprocess: a built-in preprocessor run on the image first ("canny"), or None for a prepared image."""

    model: str
    image: object = field(repr=False)  # PIL image or path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise RequestError("control: each unit names a ControlNet", field="control")
        if self.image is None:
            raise RequestError(f"control {self.model}: give a control image", field="control")
        if not (isinstance(self.scale, (int, float)) and 0 <= self.scale <= 10):
            raise RequestError(f"control {self.model}: scale must be in 0..10, got {self.scale!r}", field="control")
        if not (isinstance(self.start, (int, float)) and isinstance(self.end, (int, float))
                and 0 <= self.start < self.end <= 1):
            raise RequestError(f"control {self.model}: start and end are fractions of the steps with 0 <= start < "
                               f"end <= 1, got {self.start!r}, {self.end!r}", field="control")


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate. None means "the engine's default": the recipe of its few-step adapter (LCM: lcm sampler,
    4 steps, guidance 1), or the model's standard settings without one."""

    prompt: tuple = ("",)
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    recipe: str | None = None  # a fewstep.recipes name: sampler, spacing, timesteps and defaults of a method
    sampler: str | None = None  # overrides the recipe's sampler
    timesteps: tuple | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: object = field(default=None, repr=False)  # PIL image or path
    strength: float | None = None
    gamma: float | None = None  # TCD's stochasticity (diffusers' eta); None: the recipe's (0.3)
    original_steps: int | None = None  # LCM/TCD grid size (diffusers' original_inference_steps)
    seeds: tuple | None = None  # explicit per-image seeds (one per prompt x num_images), e.g. for batched requests
    mask: object = field(default=None, repr=False)  # inpainting: PIL image or path, white = repaint
    mask_blur: int = 0  # pixels of Gaussian blur on the mask's edge (A1111's mask_blur)
    padding_mask_crop: int | None = None  # inpaint only the mask's box plus this margin, at full size, paste back
    control: tuple = ()  # ControlUnit, one per ControlNet

    def __post_init__(self):
        prompt = self.prompt
        if isinstance(prompt, str):
            prompt = (prompt,)
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise RequestError("prompt must be a string or a list of strings", field="prompt")
        object.__setattr__(self, "prompt", tuple(prompt))
        for p in self.prompt:
            check_text(p, "prompt")
        if self.negative_prompt is not None:
            if not isinstance(self.negative_prompt, str):
                raise RequestError("negative_prompt must be a string", field="negative_prompt")
            check_text(self.negative_prompt, "negative_prompt")
        if self.timesteps is not None:
            try:
                object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
            except (TypeError, ValueError):
                raise RequestError("timesteps must be whole numbers", field="timesteps") from None
        if self.recipe is not None and self.recipe not in RECIPES:
            raise RequestError(f"unknown recipe {self.recipe!r} (use {', '.join(RECIPES)})", field="recipe")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise RequestError(f"unknown sampler {self.sampler!r} (use {', '.join(SAMPLERS)})", field="sampler")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise RequestError(f"steps must be a whole number >= 1, got {self.steps!r}", field="steps")
        if self.guidance is not None and not self.guidance >= 0:
            raise RequestError(f"guidance must be >= 0, got {self.guidance}", field="guidance")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8):
                raise RequestError(f"{name} must be a whole number of pixels >= 8, got {v!r}", field=name)
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= MAX_IMAGES:
            raise RequestError(f"num_images must be in 1..{MAX_IMAGES}, got {self.num_images!r}", field="num_images")
        if self.strength is not None:
            if self.init_image is None:
                raise RequestError("strength only applies to image-to-image: give an init image too",
                                   field="strength")
            if not 0 < self.strength <= 1:
                raise RequestError(f"strength must be in (0, 1], got {self.strength}", field="strength")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}", field="seed")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            if len(self.seeds) != len(self.prompt) * self.num_images:
                raise RequestError(f"seeds: give one per image ({len(self.prompt) * self.num_images}), "
                                   f"got {len(self.seeds)}", field="seeds")
            if not all(isinstance(s, int) and 0 <= s < 2**63 for s in self.seeds):
                raise RequestError("seeds must be whole numbers in [0, 2^63)", field="seeds")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise RequestError(f"gamma must be in [0, 1], got {self.gamma}", field="gamma")
        if self.mask is not None and self.init_image is None:
            raise RequestError("mask: inpainting needs the image to paint into: give an init image too", field="mask")
        if not (isinstance(self.mask_blur, int) and 0 <= self.mask_blur <= 256):
            raise RequestError(f"mask_blur must be a whole number of pixels in 0..256, got {self.mask_blur!r}",
                               field="mask_blur")
        if self.padding_mask_crop is not None:
            if self.mask is None:
                raise RequestError("padding_mask_crop only applies to inpainting: give a mask too",
                                   field="padding_mask_crop")
            if not (isinstance(self.padding_mask_crop, int) and self.padding_mask_crop >= 0):
                raise RequestError(f"padding_mask_crop must be a whole number of pixels >= 0, got "
                                   f"{self.padding_mask_crop!r}", field="padding_mask_crop")
        units = (self.control,) if isinstance(self.control, ControlUnit) else tuple(self.control or ())
        if not all(isinstance(u, ControlUnit) for u in units):
            raise RequestError("control: give ControlUnit(model, image, scale, start, end) values", field="control")
        object.__setattr__(self, "control", units)
        if self.original_steps is not None and not (isinstance(self.original_steps, int) and self.original_steps >= 1):
            raise RequestError(f"original_steps must be a whole number >= 1, got {self.original_steps!r}",
                               field="original_steps")
