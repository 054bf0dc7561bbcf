"""Server settings: one frozen dataclass, checked once; `fewstep serve` flags map onto its fields."""

import math
import re
from dataclasses import dataclass

from ..errors import FewstepError


class ConfigError(FewstepError):
    """A server setting that cannot work (the message names the flag)."""


@dataclass(frozen=True)
class ServeConfig:
    """Batching, refusal limits and access for one server."""

    lora_dir: str | None = None  # LoRA names in requests resolve only inside this folder
    api_key: str | None = None  # Bearer token required on every route but /health and the page's static files
    max_batch: int = 8  # images per UNet batch
    max_wait: float = 0.02  # seconds the oldest request waits for company before its batch starts
    queue_size: int = 64  # images waiting; a request that would overflow gets 429
    timeout: float = 120.0  # seconds from arrival to response; past it: 504 and the work is dropped
    max_size: int | None = None  # pixels, width and height; None: twice the model's native size (per model)
    max_images: int = 8  # per request (OpenAI n, A1111 batch_size x n_iter)
    max_steps: int = 50
    max_guidance: float = 30.0
    max_prompt_chars: int = 4000
    max_body_bytes: int = 16 * 2**20
    # an uploaded image (init image, mask, control image, frame), checked from its header before it is decoded;
    # None: (2 x max_size)^2 (a photo twice the largest size, resized down), at most 4096 x 4096
    max_image_pixels: int | None = None
    max_lora_weight: float = 5.0  # |weight| of a style LoRA
    max_loras: int = 4  # adapters per request
    loaded_loras: int = 8  # adapters kept fused-ready in memory (least recently used are unloaded)
    keep_images: int = 256  # PNGs kept for response_format "url"
    allow_pickle: bool = False  # ControlNets loaded on first use may be pickles (`fewstep serve --allow-pickle`)
    cors_origins: tuple = ()  # browser origins on other hosts/ports allowed to call the API (CORS); "*": any
    max_streams: int = 2  # open /v1/stream connections; more are refused (close code 1013, try again later)
    max_frame_bytes: int = 4 * 2**20  # one stream frame (JPEG/WebP); larger ones get an error message

    def __post_init__(self):
        if self.max_image_pixels is None and isinstance(self.max_size, int):
            object.__setattr__(self, "max_image_pixels", min(4096 * 4096, (2 * self.max_size) ** 2))
        def need(ok, flag, what):
            if not ok:
                raise ConfigError(f"{flag} must be {what}")

        for name, flag in (("max_batch", "--max-batch"), ("queue_size", "--queue-size"), ("max_size", "--max-size"),
                           ("max_images", "--max-images"), ("max_steps", "--max-steps"),
                           ("max_body_bytes", "--max-body-mb"), ("max_image_pixels", "--max-image-pixels"),
                           ("max_prompt_chars", "--max-prompt-chars"), ("max_loras", "--max-loras"),
                           ("loaded_loras", "--loaded-loras"), ("keep_images", "--keep-images"),
                           ("max_streams", "--max-streams"), ("max_frame_bytes", "--max-frame-kb")):
            v = getattr(self, name)
            if v is None and name in ("max_size", "max_image_pixels") and self.max_size is None:
                continue  # derived from the model's native size when it is loaded (fewstep.serve.lifecycle)
            need(isinstance(v, int) and v >= 1, flag, f"a whole number >= 1, got {v!r}")
        need(math.isfinite(self.max_wait) and 0 <= self.max_wait <= 10, "--max-wait-ms", "in 0..10000")
        need(math.isfinite(self.timeout) and self.timeout > 0, "--timeout", "a number of seconds > 0")
        need(self.queue_size >= self.max_images, "--queue-size",
             f">= --max-images ({self.max_images}) so that one full request fits")
        need(self.loaded_loras >= self.max_loras, "--loaded-loras", f">= --max-loras ({self.max_loras})")
        for origin in self.cors_origins:  # what a browser sends in Origin: scheme://host[:port], no path
            need(origin == "*" or re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", origin), "--cors-origin",
                 f"an origin like http://localhost:3000 (scheme, host, optional port, no path) or *, got {origin!r}")
        if self.api_key is not None:
            need(len(self.api_key) >= 8 and self.api_key.isprintable() and " " not in self.api_key, "--api-key",
                 "at least 8 printable characters without spaces")
