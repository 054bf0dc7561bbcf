"""Engine: holds loaded components and runs one denoise loop for text-to-image and image-to-image."""

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import sampling, schedules, text
from .denoiser import guidance_embedding, make_denoiser
from .errors import RequestError, ResourceError
from .request import GenerateRequest
from .speed import OnDevice, SpeedSettings, cudnn_benchmark

log = logging.getLogger("fewstep")

LCM_BURN_GUIDANCE = 2.0


@dataclass
class Generation:
    """The result of one request: images, the seed of each, the resolved parameters and per-stage timings."""

    images: list
    seeds: list
    params: dict
    timings: dict
    timesteps: list  # the timesteps actually run
    warnings: list = field(default_factory=list)

    @property
    def steps_run(self):
        return len(self.timesteps)


class Engine:
    """A loaded model ready to generate; see fewstep.load()."""

    def __init__(self, components, device, dtype):
        self.c = components
        self.device = device
        self.dtype = dtype
        self.noise_schedule = schedules.noise_schedule(components.scheduler_config)
        self.vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.lcm_lora = None  # name of the attached LCM-LoRA, if any
        self.loras = {}  # name -> LoraState (fewstep.lora)
        # What runs, as fewstep.speed sets it up: the decoder (full VAE or a tiny one) and the hot callables.
        self.speed = SpeedSettings()
        self.decoder = components.vae
        self.unet_fn, self.decode_fn = components.unet, components.vae.decode
        self._prompt_cache = OrderedDict()
        self.check_finite = True  # benchmarks on random weights turn the NaN check off

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def arch(self):
        return self.c.arch

    @property
    def full_lcm(self):
        return self.c.full_lcm

    @property
    def few_step(self):
        """True when the model samples in few steps: a full LCM or an attached LCM-LoRA."""
        return self.full_lcm or self.lcm_lora is not None

    @property
    def native_size(self):
        return self.c.unet.config.sample_size * self.vae_factor

    def defaults(self):
        """The sampler, steps and guidance this engine uses when a request leaves them out."""
        if self.full_lcm:
            return dict(sampler="lcm", steps=4, guidance=8.5)
        if self.few_step:
            return dict(sampler="lcm", steps=4, guidance=1.0)
        if self.c.arch == "shapes":
            from .default_model import TEACHER_DEFAULTS

            return dict(TEACHER_DEFAULTS)
        return dict(sampler="euler", steps=25, guidance=7.5)

    # ---- adapters ---------------------------------------------------------------------------------------------
    def load_lora(self, src, *, name=None, weight=1.0, allow_pickle=False, weight_name=None, lcm=False,
                  min_match=None):
        """Fuse a LoRA (file, folder or hub id) into the weights; returns its LoraReport.

        lcm=True marks it as the LCM-LoRA (few-step defaults); min_match: the fraction of its tensors that must match.
        """
        from .lora import load_lora

        return load_lora(self, src, name=name, weight=weight, allow_pickle=allow_pickle, weight_name=weight_name,
                         lcm=lcm, min_match=min_match)

    def set_lora_weights(self, weights):
        """{name: weight} for loaded LoRAs; only the tensors they touch are re-fused."""
        from .lora import set_lora_weights

        set_lora_weights(self, weights)

    def unload_lora(self, name):
        """Remove a LoRA and restore the weights it touched exactly."""
        from .lora import unload_lora

        unload_lora(self, name)

    def unload_loras(self):
        from .lora import unload_loras

        unload_loras(self)

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(self, prompt="", *, callback=None, **kw):
        """Generate images; keyword arguments are GenerateRequest fields. Returns a Generation.

        callback(step_index, total_steps) runs after each step; raising fewstep.errors.Cancelled in it stops the
        work at once (a server does this when its client has gone).
        """
        req = kw.pop("request", None) or GenerateRequest(prompt=prompt, **kw)
        return self.run(req, callback=callback)

    def resolve(self, req):
        """The request with engine defaults filled in and model-dependent checks done; plus warnings."""
        d = self.defaults()
        req = replace(req, sampler=req.sampler or d["sampler"], steps=req.steps or d["steps"],
                      guidance=d["guidance"] if req.guidance is None else req.guidance)
        if req.timesteps is not None:
            if req.sampler == "euler":
                raise RequestError("custom timesteps work with the lcm and tcd samplers, not euler")
            req = replace(req, steps=len(req.timesteps))
        width, height = req.width, req.height
        if req.init_image is not None and (width is None or height is None):
            w0, h0 = req.init_image.size
            width, height = width or w0 - w0 % self.vae_factor, height or h0 - h0 % self.vae_factor
        width, height = width or self.native_size, height or self.native_size
        for name, v in (("width", width), ("height", height)):
            if v % self.vae_factor or v < self.vae_factor:
                raise RequestError(f"{name} {v} is not a multiple of {self.vae_factor} (this model's latent factor): "
                                   f"try {max(self.vae_factor, v - v % self.vae_factor)}")
        req = replace(req, width=width, height=height)
        warnings = []
        if self.full_lcm:
            if req.negative_prompt:
                warnings.append("full LCM models take guidance as an embedding, not CFG: the negative prompt is "
                                "ignored")
        elif req.guidance <= 1 and req.negative_prompt:
            warnings.append(f"guidance {req.guidance} <= 1 turns classifier-free guidance off: the negative prompt is "
                            "ignored (use guidance 1.1-2 with LCM to apply it)")
        if not self.full_lcm and req.sampler in ("lcm", "tcd") and req.guidance > LCM_BURN_GUIDANCE:
            warnings.append(f"guidance {req.guidance} with the {req.sampler} sampler usually burns images "
                            f"(LCM-LoRAs want 1-{LCM_BURN_GUIDANCE:g})")
        if req.sampler in ("lcm", "tcd") and not self.few_step:
            warnings.append(f"the {req.sampler} sampler on a model with no LCM-LoRA attached gives poor images "
                            "(attach one with lcm=True, or use the euler sampler)")
        return req, warnings

    def schedule(self, req):
        """The Schedule the request runs (img2img strength applied)."""
        ns, strength = self.noise_schedule, req.strength if req.init_image is not None else 1.0
        strength = 1.0 if strength is None else strength
        if req.sampler == "lcm":
            return schedules.lcm_schedule(ns, req.steps, original_steps=req.original_steps, timesteps=req.timesteps,
                                          strength=strength)
        if req.sampler == "tcd":
            return schedules.tcd_schedule(ns, req.steps, gamma=req.gamma, original_steps=req.original_steps,
                                          timesteps=req.timesteps, strength=strength)
        return schedules.euler_schedule(ns, req.steps, strength=strength)

    @torch.no_grad()
    def run(self, req, *, callback=None):
        """Run a GenerateRequest."""
        with cudnn_benchmark(self.speed.cudnn_benchmark):
            return self._run(req, callback)

    def _run(self, req, callback):
        t_start = time.perf_counter()
        if req.init_image is not None and req.strength is None:
            req = replace(req, strength=0.6)
        req = replace(req, init_image=load_image(req.init_image)) if req.init_image is not None else req
        req, warnings = self.resolve(req)
        for w in warnings:
            log.warning(w)
        sched = self.schedule(req)  # validates steps against the sampler before any work
        prompts = [p for p in req.prompt for _ in range(req.num_images)]
        batch = len(prompts)
        self.check_memory(batch, req)
        if req.seeds is not None:
            seeds = list(req.seeds)
        else:
            base_seed = secrets.randbelow(2**31) if req.seed is None else req.seed
            seeds = [base_seed + i for i in range(batch)]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        dev = self.device

        def randn(shape):
            # one draw per image from its own CPU generator, in diffusers' order: reproducible on any device
            return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(dev)

        timings = {}
        t0 = time.perf_counter()
        denoise = self.denoiser(prompts, req)
        timings["text"] = time.perf_counter() - t0

        h, w = req.height // self.vae_factor, req.width // self.vae_factor
        shape = (batch, self.c.unet.config.in_channels, h, w)
        t0 = time.perf_counter()
        if req.init_image is None:
            latents = randn(shape) * sched.init_sigma
        else:
            clean = self.encode_image(req.init_image, req.width, req.height, gens)
            latents = sampling.add_noise(req.sampler, clean, randn(shape), sched)
        timings["encode_image"] = time.perf_counter() - t0 if req.init_image is not None else 0.0
        sched = sched.to(dev)

        step_times = []
        last = [time.perf_counter()]

        def on_step(i, t, x):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if callback:
                callback(i, len(sched))

        sampler = sampling.SAMPLERS[req.sampler]
        kw = {"timestep_scaling": self.noise_schedule.timestep_scaling} if req.sampler == "lcm" else {}
        # The fresh noise of every step, drawn now in the generators' order and moved in one copy: a copy from
        # host memory inside the loop would make the host wait for each step to finish on a GPU.
        bank = [randn(shape) for _ in range(len(sched) - 1)] if req.sampler != "euler" else []
        with OnDevice(self, self.c.unet):
            latents = sampler(denoise, latents, sched, noise=lambda like: bank.pop(0), callback=on_step, **kw)
        timings["steps"] = step_times
        t0 = time.perf_counter()
        images = self.decode(latents)
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        params = self.describe(req, sched)
        return Generation(images, seeds, params, timings, sched.timesteps.tolist(), warnings)

    def describe(self, req, sched):
        """The parameters that made an image, for metadata and reports."""
        return dict(prompt=list(req.prompt), negative_prompt=req.negative_prompt, sampler=req.sampler,
                    steps=len(sched), guidance=req.guidance, width=req.width, height=req.height,
                    strength=req.strength if req.init_image is not None else None,
                    gamma=req.gamma if req.sampler == "tcd" else None, model=self.c.name,
                    loras={n: s.weight for n, s in self.loras.items()})

    # ---- the parts ---------------------------------------------------------------------------------------------
    def denoiser(self, prompts, req):
        """denoise(x, t, alpha) for these prompts: text encoded once, CFG or guidance embedding decided here."""
        c, dev = self.c, self.device
        for p in text.truncated(c.tokenizers[0], sorted(set(prompts))):
            log.warning("prompt longer than 77 tokens is truncated: %r", p[:60] + "...")
        cond, pooled = self.encode_prompts(prompts)
        cfg = not self.full_lcm and req.guidance > 1
        uncond = pooled_u = None
        if cfg:
            if c.preset.xl and req.negative_prompt is None and c.force_zeros_for_empty_prompt:
                uncond, pooled_u = torch.zeros_like(cond), torch.zeros_like(pooled)
            else:
                uncond, pooled_u = self.encode_prompts([req.negative_prompt or ""] * len(prompts))
        added = added_u = None
        if c.preset.xl or c.unet.config.get("addition_embed_type") == "text_time":
            # SDXL micro-conditioning: original size, crop top-left, target size (all the output size here)
            ids = torch.tensor([[req.height, req.width, 0, 0, req.height, req.width]] * len(prompts), device=dev)
            added = {"text_embeds": pooled, "time_ids": ids}
            added_u = {"text_embeds": pooled_u, "time_ids": ids} if cfg else None
        tcond = None
        if self.full_lcm:
            w = torch.full((len(prompts),), req.guidance - 1.0)
            tcond = guidance_embedding(w, c.unet.config.time_cond_proj_dim).to(dev)
        return make_denoiser(self.unet_fn, cond, prediction_type=self.noise_schedule.prediction_type,
                             guidance=req.guidance, uncond=uncond, added=added, added_uncond=added_u,
                             timestep_cond=tcond, dtype=self.dtype)

    def encode_prompts(self, prompts):
        """Text embeddings, cached per prompt and adapter set (a text-encoder LoRA changes them)."""
        c = self.c
        from .lora import text_signature

        key = (tuple(prompts), text_signature(self))
        hit = self._prompt_cache.get(key)
        if hit is not None:
            self._prompt_cache.move_to_end(key)
            return hit
        with _on_devices(self, c.text_encoders):
            out = text.encode(c.tokenizers, c.text_encoders, prompts, self.device)
        if self.speed.prompt_cache:
            self._prompt_cache[key] = out
            while len(self._prompt_cache) > self.speed.prompt_cache:
                self._prompt_cache.popitem(last=False)
        return out

    def encode_image(self, image, width, height, gens):
        """VAE latents of the init image, sampled per image from its generator (diffusers' order), scaled."""
        vae = self.c.vae
        if image.size != (width, height):
            image = image.resize((width, height), resample=_lanczos())
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        with OnDevice(self, vae):
            dist = vae.encode(x.to(self.device, vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        samples = [mean + std * torch.randn(mean.shape, generator=g).to(self.device) for g in gens]
        return torch.cat(samples) * vae.config.scaling_factor

    def decode(self, latents):
        """PIL images from latents, one image at a time (the decoder's activations dominate memory)."""
        from PIL import Image

        dec = self.decoder
        images = []
        for i in range(len(latents)):
            with OnDevice(self, dec):
                x = self.decode_fn((latents[i:i + 1] / dec.config.scaling_factor).to(dec.dtype), return_dict=False)[0]
            x = x.float()
            if self.check_finite and not torch.isfinite(x).all():
                raise ResourceError(f"the decoded image has NaN/inf values (VAE overflow in {dec.dtype}): "
                                    "try --dtype fp32 or bf16")
            arr = ((x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            images.append(Image.fromarray(arr))
        return images

    def check_memory(self, batch, req):
        """Refuse work whose activations would not fit the free memory (a rough, conservative estimate)."""
        need = self.estimate_bytes(batch, req)
        free = free_memory(self.device)
        if free is not None and need > free:
            gib = 2**30
            raise ResourceError(f"{batch} image(s) of {req.width}x{req.height} need about {need / gib:.1f} GiB but "
                                f"{free / gib:.1f} GiB is free on {self.device}: lower the number of images or the "
                                "size")

    def estimate_bytes(self, batch, req):
        """Peak activation bytes: the UNet's first-level feature maps and attention, plus one image decode."""
        cfg = 2 if (not self.full_lcm and req.guidance > 1) else 1
        elem = torch.finfo(self.dtype).bits // 8
        area = (req.height // self.vae_factor) * (req.width // self.vae_factor)
        ch = self.c.unet.config.block_out_channels[0]
        unet = batch * cfg * area * ch * 40 * elem
        vae_ch = self.c.vae.config.block_out_channels[0]
        decode = req.height * req.width * vae_ch * 8 * 4
        return unet + decode


class _on_devices:
    """OnDevice for several modules at once."""

    def __init__(self, engine, modules):
        self.ctx = [OnDevice(engine, m) for m in modules]

    def __enter__(self):
        for c in self.ctx:
            c.__enter__()

    def __exit__(self, *exc):
        for c in self.ctx:
            c.__exit__(*exc)
        return False


def free_memory(device):
    """Free bytes on the device (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS


def load_image(image):
    """A PIL RGB image from a PIL image or a path; a clear error when unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise RequestError(f"cannot read init image {image}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
