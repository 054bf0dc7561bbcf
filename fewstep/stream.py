"""Image-to-image on a stream of frames, StreamDiffusion-style (Kodaira et al. 2023): with k denoising steps the
k frames in flight are denoised together in one UNet batch, each at its own step ("stream batch"), so a frame costs
one UNet pass per frame and comes out k - 1 frames later.

Everything a frame goes through is the engine's: its resolved request, schedule, denoiser (prompt cache), VAE
encode and decode, and the samplers' own per-step updates (fewstep.sampling.UPDATES). What the stream adds is the
bookkeeping of the frames in flight, a fixed noise per stream (temporal stability: the noise a sequential img2img
with the same seed would draw, the same for every frame), StreamDiffusion's stochastic similarity filter and an
optional tiny autoencoder (diffusers' AutoencoderTiny) for both ends.

Guidance: the recipe's default (<= 1 for few-step recipes) runs no classifier-free guidance, one UNet pass per frame.
guidance > 1 runs full CFG with the negative prompt, as the engine does (two passes per frame); StreamDiffusion's
residual CFG is not implemented.
"""

import logging
import random
import secrets
import time
from pathlib import Path

import numpy as np
import torch

from . import latents, sampling
from .errors import FewstepError, LoadError, RequestError
from .request import ControlUnit, GenerateRequest
from .speed import OnDevice, cudnn_benchmark

log = logging.getLogger("fewstep")

MAX_SKIPS = 10  # StreamDiffusion's max_skip_frame: after this many skips since the last forced frame, one runs
SHAPES_TINY_VAE = Path(__file__).resolve().parent / "data" / "shapes" / "tiny-vae"


class SimilarityFilter:
    """StreamDiffusion's stochastic similarity filter (its SimilarImageFilter): a frame whose cosine similarity to
    the last processed input is s > threshold is skipped with probability 1 - (1 - s) / (1 - threshold); after more
    than max_skips skips since the last forced frame, the next similar frame runs anyway (the count is cumulative
    across processed frames, as theirs). Seeded, so a stream replays the same decisions."""

    def __init__(self, threshold, *, max_skips=MAX_SKIPS, seed=0):
        self.threshold = threshold
        self.max_skips = max_skips
        self.rng = random.Random(seed)
        self.prev = None
        self.count = 0

    @property
    def on(self):
        return self.threshold is not None and self.threshold < 1

    def skip(self, x):
        """True when the frame x (a pixel tensor) should be skipped; otherwise it becomes the reference."""
        if not self.on or self.prev is None:
            self.prev = x
            return False
        s = torch.nn.functional.cosine_similarity(self.prev.reshape(-1), x.reshape(-1), dim=0, eps=1e-6).item()
        p_skip = max(0.0, 1 - (1 - s) / (1 - self.threshold))
        if p_skip < self.rng.random():
            self.prev = x
            return False
        if self.count > self.max_skips:
            self.count = 0
            self.prev = x
            return False
        self.count += 1
        return True


class Stream:
    """img2img over a stream of frames; build it with engine.stream(prompt, ...).

    steps: the schedule's steps (as engine img2img: LCM/TCD run them all on a grid shrunk by strength, Euler and
    DDIM run the last int(steps * strength)); k = the steps run is the depth of the pipeline. similarity: the
    filter's threshold (None or >= 1: off). tiny_vae: "auto" (the family's AutoencoderTiny where one is on this
    machine: the engine's own tiny decoder, the hub cache's TAESD/TAESDXL, the shapes world's; else the full VAE),
    "full", "tiny" (the family's, required), or a folder / hub id of an AutoencoderTiny. control: None or "canny"
    (the canny edges of each frame through a loaded ControlNet, else the family's default one, at scale 1).

    process() may run on another thread than the one that built the stream, as long as calls do not overlap.
    """

    def __init__(self, engine, prompt="", *, negative_prompt=None, strength=0.5, steps=None, guidance=None, seed=0,
                 width=None, height=None, recipe=None, similarity=0.98, tiny_vae="auto", control=None):
        self.engine = engine
        self.stats = dict(frames_in=0, frames_out=0, skipped=0, unet_calls=0, last_seconds=0.0)
        _check_similarity(similarity)
        self._options = dict(prompt=prompt, negative_prompt=negative_prompt, strength=strength, steps=steps,
                             guidance=guidance, seed=seed, width=width, height=height, recipe=recipe)
        self._set(self._resolve(self._options))
        self.vae = self._tiny_vae(tiny_vae)
        self.control = self._controlnet(control)
        self.filter = SimilarityFilter(similarity, seed=self.seed)
        self._last = None

    # ---- settings ----------------------------------------------------------------------------------------------
    @property
    def size(self):
        return self.req.width, self.req.height

    @property
    def depth(self):
        """k: the steps each frame runs, and so the frames in flight (the first k - 1 frames return None)."""
        return len(self.sched)

    def _resolve(self, o):
        e = self.engine
        seed = secrets.randbelow(2**31) if o["seed"] is None else o["seed"]
        if not isinstance(o["prompt"], str):
            raise RequestError(f"prompt must be a string, got {type(o['prompt']).__name__}", field="prompt")
        if not isinstance(o["strength"], (int, float)) or isinstance(o["strength"], bool):
            raise RequestError(f"strength must be a number in (0, 1], got {o['strength']!r}", field="strength")
        width, height = o["width"] or e.native_size, o["height"] or e.native_size
        for name, v in (("width", width), ("height", height)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 8:
                raise RequestError(f"{name} must be a whole number of pixels >= 8, got {v!r}", field=name)
        blank = _blank(width, height)
        req = GenerateRequest(prompt=o["prompt"], negative_prompt=o["negative_prompt"], steps=o["steps"],
                              guidance=o["guidance"], seed=seed, recipe=o["recipe"], width=width, height=height,
                              init_image=blank, strength=o["strength"])
        req, warnings = e.resolve(req)
        for w in warnings:
            log.warning(w)
        sched = e.schedule(req)  # validates steps and strength against the sampler
        return req, sched

    def _set(self, resolved):
        """The resolved request, its schedule and its fixed noise; an empty pipeline."""
        e = self.engine
        self.req, sched = resolved
        self.seed = self.req.seed
        self.sched = sched.to(e.device)
        # The noise a sequential img2img with this seed draws from its generator, in its order (Engine._run): the
        # VAE sample's (drawn again for each frame by Engine.encode_pixels from a fresh generator), the first
        # latent's, then one per noise() call of the sampler, which takes them in step order.
        g = torch.Generator("cpu").manual_seed(self.seed)
        shape = (1, e.c.unet.config.out_channels, self.req.height // e.vae_factor, self.req.width // e.vae_factor)
        torch.randn(shape, generator=g)
        self._init_noise = torch.randn(shape, generator=g).to(e.device)
        draws = sampling.noise_draws(self.req.sampler, len(sched), self.req.gamma)
        self._noise = [torch.randn(shape, generator=g).to(e.device) for _ in range(draws)]
        self._update = sampling.UPDATES[self.req.sampler]
        self._kw = {"timestep_scaling": e.noise_schedule.timestep_scaling} if self.req.sampler == "lcm" else {}
        self._flight = []  # [latent, next step index, control image] of the frames in flight, newest first
        self._denoisers = {}

    def update(self, **changes):
        """Change prompt, negative_prompt, strength, steps, guidance, seed or similarity for the next process().
        A prompt or guidance change keeps the frames in flight (they finish under the new one); strength, steps and
        seed change the schedule or the noise, so the frames in flight are dropped and the pipeline refills."""
        allowed = {"prompt", "negative_prompt", "strength", "steps", "guidance", "seed", "similarity"}
        unknown = set(changes) - allowed
        if unknown:
            name = min(unknown)
            raise RequestError(f"a stream cannot change {name} (it can change {', '.join(sorted(allowed))})",
                               field=name)
        similarity = changes.pop("similarity", self.filter.threshold)
        _check_similarity(similarity)
        options = dict(self._options, **changes)
        resolved = self._resolve(options)  # everything is checked before anything changes
        reset = any(options[k] != self._options[k] for k in ("strength", "steps", "seed"))
        self._options = options
        self.filter.threshold = similarity
        if reset:
            self._set(resolved)
            self._last = None
        else:
            self.req = resolved[0]
            self._denoisers = {}

    # ---- parts -------------------------------------------------------------------------------------------------
    def _tiny_vae(self, spec):
        """The AutoencoderTiny that encodes and decodes, or None for the engine's VAE and decoder."""
        from .speed import TINY_DECODERS, load_tiny_decoder

        e = self.engine
        if spec == "full":
            return None
        if not isinstance(spec, str) or not spec:
            raise RequestError(f"tiny_vae takes auto, full, tiny or an AutoencoderTiny folder / hub id, got {spec!r}",
                               field="tiny_vae")
        if spec in ("auto", "tiny"):
            if _is_tiny(e.decoder):
                return e.decoder  # the engine's fast path already runs one (it has its encoder too)
            if e.arch == "shapes":
                src = SHAPES_TINY_VAE if (SHAPES_TINY_VAE / "config.json").exists() else None
            else:
                src = _cached(TINY_DECODERS[e.c.preset.xl])
            if src is None:
                if spec == "tiny":
                    raise RequestError(f"no tiny autoencoder for {e.c.preset.title} models on this machine: give "
                                       "a folder or hub id, or use full", field="tiny_vae")
                return None
            spec = str(src)
        try:
            vae = load_tiny_decoder(spec, e.c.preset.xl, e.device, e.dtype)
        except LoadError as err:
            raise RequestError(f"tiny_vae: {err}", field="tiny_vae") from None
        cfg = vae.config
        factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)  # one downsampling per block after the first
        if factor != e.vae_factor or cfg.latent_channels != e.c.unet.config.out_channels:
            raise RequestError(f"tiny_vae {spec}: its latents ({cfg.latent_channels} channels, 1/{factor} of the "
                               f"size) do not fit this model's ({e.c.unet.config.out_channels}, 1/{e.vae_factor})",
                               field="tiny_vae")
        return vae

    def _controlnet(self, kind):
        """The name of the ControlNet that reads each frame's canny edges, or None."""
        if kind is None:
            return None
        if kind != "canny":
            raise RequestError(f"control takes canny (or none), got {kind!r}", field="control")
        from .arch import controlnet_name, default_controlnet

        e = self.engine
        if e.controlnets:
            return next(iter(e.controlnets))
        src = default_controlnet(e.arch, kind)
        if src is None:
            raise RequestError(f"no ControlNet is loaded and fewstep knows no canny ControlNet for "
                               f"{e.c.preset.title} models: load one first", field="control")
        try:
            return e.load_controlnet(src, name=controlnet_name(src))
        except FewstepError as err:
            raise RequestError(f"control: {err}", field="control") from None

    def _denoiser(self, edges):
        """The engine's denoiser for a batch of len(edges) frames (cached per batch size without ControlNet)."""
        e, n = self.engine, len(edges)
        if self.control is None:
            if n not in self._denoisers:
                self._denoisers[n] = e.denoiser([self.req.prompt[0]] * n, self.req)
            return self._denoisers[n]
        from dataclasses import replace

        from .control import prepare

        unit = ControlUnit(model=self.control, image=tuple(edges))  # scale 1 on every step (see control.prepare)
        control = prepare(e, replace(self.req, control=(unit,)), self.sched, n)
        return e.denoiser([self.req.prompt[0]] * n, self.req, control=control)

    # ---- frames ------------------------------------------------------------------------------------------------
    def fit(self, frame):
        """The frame as an RGB image of the stream's size: centre-cropped to its aspect, then resized (Lanczos)."""
        from PIL import Image, ImageOps

        if not isinstance(frame, Image.Image):
            raise RequestError(f"a frame must be a PIL image, got {type(frame).__name__}", field="frame")
        frame = frame.convert("RGB")
        if frame.size == self.size:
            return frame
        return ImageOps.fit(frame, self.size, method=Image.Resampling.LANCZOS)

    def _encode(self, pixels):
        e = self.engine
        if self.vae is None:
            return e.encode_pixels(pixels, [torch.Generator("cpu").manual_seed(self.seed)])
        with OnDevice(e, self.vae):
            z = self.vae.encode(pixels.to(e.device, self.vae.dtype)).latents.float()
        return latents.to_unet(self.vae, z)

    @torch.no_grad()
    def process(self, frame):
        """The output of one frame in (PIL): the output of the frame k - 1 frames back, None while filling, or
        the last output again when the filter skips this frame."""
        t0 = time.perf_counter()
        self.stats["frames_in"] += 1
        image = self.fit(frame)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        if self.filter.skip(pixels):
            self.stats["skipped"] += 1
            self.stats["last_seconds"] = time.perf_counter() - t0
            return self._last
        with cudnn_benchmark(self.engine.speed.cudnn_benchmark):
            x = sampling.add_noise(self.req.sampler, self._encode(pixels), self._init_noise, self.sched)
            edges = None
            if self.control is not None:
                from .control import canny

                edges = canny(image)
            self._flight.insert(0, [x, 0, edges])
            done = self._advance()
        if done is not None:
            self._last = done
        self.stats["last_seconds"] = time.perf_counter() - t0
        return done

    @torch.no_grad()
    def flush(self):
        """The outputs of the frames still in flight, oldest first; the pipeline is empty after."""
        out = []
        with cudnn_benchmark(self.engine.speed.cudnn_benchmark):
            while self._flight:
                done = self._advance()
                if done is not None:
                    out.append(done)
        if out:
            self._last = out[-1]
        return out

    def _advance(self):
        """One UNet call over every frame in flight, each at its own step; the decoded oldest frame if it finished."""
        e, s, flight = self.engine, self.sched, self._flight
        steps = [i for _, i, _ in flight]
        x = torch.cat([sampling.unet_latent(f[0], s, f[1]) for f in flight])
        idx = torch.tensor(steps, device=s.timesteps.device)
        denoise = self._denoiser([f[2] for f in flight])
        with OnDevice(e, e.c.unet):
            x0, eps = denoise(x, s.timesteps[idx], s.alphas[idx].view(-1, 1, 1, 1))
        self.stats["unet_calls"] += 1
        for j, f in enumerate(flight):
            i = f[1]
            f[0] = self._update(f[0], x0[j:j + 1], eps[j:j + 1], s, i, noise=lambda like, i=i: self._noise[i],
                                **self._kw)
            f[1] = i + 1
        if flight[-1][1] < len(s):
            return None
        latent = flight.pop()[0]
        self.stats["frames_out"] += 1
        return e.decode(latent, decoder=self.vae)[0]


def _check_similarity(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
        raise RequestError(f"similarity must be a number >= 0 (None or >= 1 turns the filter off), got {value!r}",
                           field="similarity")


def _blank(width, height):
    from PIL import Image

    return Image.new("RGB", (width, height))


def _is_tiny(module):
    from diffusers import AutoencoderTiny

    return isinstance(module, AutoencoderTiny)


def _cached(repo_id):
    """The hub cache's snapshot folder of repo_id, or None (never the network: "auto" means on this machine)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an unreadable cache is an empty one here
        return None
    return Path(hit).parent if isinstance(hit, str) else None
