"""Generation requests: one frozen dataclass, validated in one place; CLI flags and HTTP fields map onto it."""

from dataclasses import dataclass, field, fields

from .errors import RequestError

SAMPLERS = ("lcm", "tcd", "euler")
MAX_IMAGES = 64


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate. None means "the engine's default for its mode" (LCM: lcm, 4 steps, guidance 1)."""

    prompt: tuple = ("",)
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    sampler: str | None = None
    timesteps: tuple | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: object = field(default=None, repr=False)  # PIL image or path
    strength: float | None = None
    gamma: float = 0.3  # TCD's stochasticity (diffusers' eta)
    original_steps: int | None = None  # LCM/TCD grid size (diffusers' original_inference_steps)
    seeds: tuple | None = None  # explicit per-image seeds (one per prompt x num_images), e.g. for batched requests

    def __post_init__(self):
        prompt = self.prompt
        if isinstance(prompt, str):
            prompt = (prompt,)
        if not prompt or not all(isinstance(p, str) for p in prompt):
            raise RequestError("prompt must be a string or a list of strings")
        object.__setattr__(self, "prompt", tuple(prompt))
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise RequestError(f"unknown sampler {self.sampler!r} (use {', '.join(SAMPLERS)})")
        if self.steps is not None and not (isinstance(self.steps, int) and self.steps >= 1):
            raise RequestError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.guidance is not None and self.guidance < 0:
            raise RequestError(f"guidance must be >= 0, got {self.guidance}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 8):
                raise RequestError(f"{name} must be a whole number of pixels >= 8, got {v!r}")
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= MAX_IMAGES:
            raise RequestError(f"num_images must be in 1..{MAX_IMAGES}, got {self.num_images!r}")
        if self.strength is not None:
            if self.init_image is None:
                raise RequestError("strength only applies to image-to-image: give an init image too")
            if not 0 < self.strength <= 1:
                raise RequestError(f"strength must be in (0, 1], got {self.strength}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise RequestError(f"seed must be a whole number in [0, 2^63), got {self.seed!r}")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            if len(self.seeds) != len(self.prompt) * self.num_images:
                raise RequestError(f"seeds: give one per image ({len(self.prompt) * self.num_images}), "
                                   f"got {len(self.seeds)}")
            if not all(isinstance(s, int) and 0 <= s < 2**63 for s in self.seeds):
                raise RequestError("seeds must be whole numbers in [0, 2^63)")
        if not 0 <= self.gamma <= 1:
            raise RequestError(f"gamma must be in [0, 1], got {self.gamma}")

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]
