"""Engine: holds loaded components and runs one denoise loop for text-to-image and image-to-image."""

import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import latents, sampling, schedules, text
from .denoiser import guidance_embedding, make_denoiser
from .errors import Cancelled, RequestError, ResourceError
from .recipes import SAMPLERS, get_recipe
from .request import GenerateRequest, classifier_free
from .speed import OnDevice, cudnn_benchmark
from .speed import build as build_fast_path

log = logging.getLogger("fewstep")

LCM_BURN_GUIDANCE = 2.0
FULL_LCM_GUIDANCE = 8.5
DEFAULT_GAMMA = 0.3  # TCD's eta where the recipe names none (the TCD paper's suggestion)
# DDIMScheduler's own defaults, which diffusers' DDIMScheduler.from_config(model config) keeps where an SDXL-style
# (Euler) config does not name them; SD 1.x/2.x configs set both to False
DDIM_CONFIG = dict(clip_sample=True, set_alpha_to_one=True)


@dataclass
class Generation:
    """The result of one request: images, the seed of each, the resolved parameters and per-stage timings.

    timings["steps"] are host-side seconds per step: on CUDA they are not synchronized (the loop never waits for
    the GPU), so they show launch time; "total" includes the decode, which waits. `fewstep bench` synchronizes.
    """

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
    """A loaded model ready to generate; see fewstep.load().

    It owns its state: the components, the adapter set fused into their weights (self.adapters), the fast path
    that runs them (self.fast) and the prompt cache. Nothing outside fewstep.engine and fewstep.lora writes to it.
    recipe: the few-step recipe the model itself needs (a distilled UNet file: Lightning, DMD2, Hyper-SD...);
    prediction_type overrides the scheduler config's (SDXL-Lightning's 1-step x0 UNet predicts the sample).
    """

    def __init__(self, components, device, dtype, *, speed=None, tiny_decoder=None, check_finite=True, recipe=None,
                 prediction_type=None):
        from .lora.adapters import AdapterSet

        self.c = components
        self.device = device
        self.dtype = dtype
        if recipe is not None:
            get_recipe(recipe)
        self.recipe = recipe
        self.prediction_type = prediction_type
        self.noise_schedule = self._noise_schedule({})
        self.vae_factor = components.vae_factor
        # the fast path first: it sets the modules' memory layout, which adapters then fuse into
        self.fast = build_fast_path(components, device, dtype, speed, tiny_decoder=tiny_decoder)
        self.adapters = AdapterSet(components)
        self.controlnets = {}  # name -> ControlNetModel (fewstep.control), placed like the UNet
        self.check_finite = check_finite  # benchmarks on random weights turn the NaN check off
        self._prompt_cache = OrderedDict()
        self._schedules = {}  # (recipe config, sampler) -> NoiseSchedule

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def arch(self):
        return self.c.arch

    @property
    def full_lcm(self):
        return self.c.full_lcm

    @property
    def speed(self):
        return self.fast.settings

    @property
    def speed_report(self):
        return self.fast.report

    @property
    def decoder(self):
        return self.fast.decoder

    @property
    def unet_fn(self):
        return self.fast.unet_fn

    @property
    def decode_fn(self):
        return self.fast.decode_fn

    @property
    def loras(self):
        """{name: LoraState} of the loaded adapters (read it; change adapters with the methods below)."""
        return self.adapters.states

    @property
    def lcm_lora(self):
        """Name of the active adapter that makes this model few-step (an LCM-LoRA or another recipe's), or None."""
        s = self.adapters.recipe_adapter
        return None if s is None else s.name

    @property
    def few_step(self):
        """True when the model samples in few steps: a full LCM, a distilled UNet or an active few-step adapter."""
        return self.default_recipe() != "standard"

    @property
    def native_size(self):
        return self.c.native_size

    def default_recipe(self):
        """The recipe a request without one runs: the model's own, its active few-step adapter's, or standard."""
        if self.recipe is not None:
            return self.recipe
        s = self.adapters.recipe_adapter
        if s is not None:
            return s.recipe
        return "lcm" if self.full_lcm else "standard"

    def recipe_defaults(self, name):
        """dict(sampler, steps, guidance) of a recipe on this model (the family sets the standard one)."""
        r = get_recipe(name)
        if name == "standard":
            return dict(self.c.preset.standard)
        d = dict(sampler=r.sampler, steps=r.steps, guidance=r.guidance)
        if self.full_lcm and name == "lcm":
            d["guidance"] = FULL_LCM_GUIDANCE  # an embedding, not CFG (LCM, Luo et al. 2023, sec. 4.2)
        return d

    def defaults(self):
        """The sampler, steps and guidance this engine uses when a request leaves them out."""
        return self.recipe_defaults(self.default_recipe())

    # ---- adapters ---------------------------------------------------------------------------------------------
    def load_lora(self, src, *, name=None, weight=1.0, allow_pickle=False, weight_name=None, lcm=False,
                  recipe=None, min_match=None):
        """Fuse a LoRA (file, folder or hub id) into the weights; returns its LoraReport.

        recipe: the few-step recipe it makes (its defaults apply while it is active); lcm=True is recipe="lcm".
        min_match: the fraction of its tensors that must match.
        """
        return self.adapters.load(src, name=name, weight=weight, allow_pickle=allow_pickle, weight_name=weight_name,
                                  lcm=lcm, recipe=recipe, min_match=min_match)

    def set_lora_weights(self, weights):
        """{name: weight} for loaded LoRAs; only the tensors they touch are re-fused."""
        self.adapters.set_weights(weights)

    def unload_lora(self, name):
        """Remove a LoRA and restore the weights it touched exactly."""
        self.adapters.unload(name)

    def unload_loras(self):
        self.adapters.unload_all()

    # ---- ControlNets ------------------------------------------------------------------------------------------
    def load_controlnet(self, src, *, name=None, allow_pickle=False):
        """Load a ControlNet (folder, hub id or single file) for this model's architecture under a name; requests
        name it in their ControlUnits. Checked before anything changes: a failure leaves the engine as it was."""
        from .control import load_controlnet

        name, model = load_controlnet(self, src, name=name, allow_pickle=allow_pickle)
        self.controlnets[name] = model
        return name

    def unload_controlnet(self, name):
        if name not in self.controlnets:
            raise RequestError(f"no ControlNet named {name!r} is loaded (loaded: "
                               f"{', '.join(self.controlnets) or 'none'})", field="control")
        del self.controlnets[name]

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(self, prompt="", *, callback=None, cancel=None, preview=None, **kw):
        """Generate images; keyword arguments are GenerateRequest fields. Returns a Generation.

        callback(step_index, total_steps) runs after each step; raising fewstep.errors.Cancelled in it stops the
        work at once. cancel (a threading.Event or a callable returning True) stops it within a fraction of a step:
        it is checked before every UNet and ControlNet block (see StopHooks) and between steps. preview(i, x0) gets
        each step's predicted clean latents (a server's progress preview).
        """
        req = kw.pop("request", None) or GenerateRequest(prompt=prompt, **kw)
        return self.run(req, callback=callback, cancel=cancel, preview=preview)

    def stream(self, prompt="", **kw):
        """A fewstep.stream.Stream over this engine: image-to-image on a sequence of frames, the frames in flight
        denoised together (stream batch); keyword arguments as Stream's."""
        from .stream import Stream

        return Stream(self, prompt, **kw)

    def resolve(self, req):
        """(the request with this model's defaults filled in and its rules checked, warnings); reads no mutable
        state but the adapter set, so a server may call it off the engine's thread. Does no expensive work.

        With a mask (inpainting) it reads the mask and fits it to the init image: see fewstep.inpaint.check_request
        for what it does with a mask of another size, an all-black and an all-white one. An inpainting UNet
        (9 input channels) refuses a request without a mask."""
        mask_warnings = []
        if req.mask is not None:
            from .inpaint import check_request

            req, mask_warnings = check_request(replace(req, init_image=load_image(req.init_image)), self.c.unet)
        elif self.c.unet.config.in_channels != self.c.unet.config.out_channels:
            raise RequestError(f"this is an inpainting model (its UNet takes {self.c.unet.config.in_channels} input "
                               "channels: latents, mask and masked image): give an init image and a mask (white = "
                               "repaint)", field="mask")
        name = req.recipe or self.default_recipe()
        r = get_recipe(name)
        d = self.recipe_defaults(name)
        sampler = req.sampler or d["sampler"]
        timesteps = req.timesteps
        steps = len(timesteps) if timesteps is not None else (req.steps or d["steps"])
        if timesteps is None and sampler == r.sampler and steps in r.timesteps:
            timesteps = r.timesteps[steps]  # the timesteps the method was trained on (DMD2, Hyper-SD's UNet)
        if timesteps is not None and not SAMPLERS[sampler].consistency:
            raise RequestError(f"custom timesteps work with the lcm and tcd samplers, not {sampler}",
                               field="timesteps")
        if req.timesteps is not None and req.steps is not None and req.steps != len(req.timesteps):
            raise RequestError(f"steps {req.steps} and {len(req.timesteps)} timesteps disagree: give one of them",
                               field="steps")
        gamma = req.gamma if req.gamma is not None else (r.gamma if r.gamma is not None else DEFAULT_GAMMA)
        guidance = d["guidance"] if req.guidance is None else req.guidance
        width, height = req.width, req.height
        if req.init_image is not None and (width is None or height is None):
            w0, h0 = req.init_image.size
            width, height = width or w0 - w0 % self.vae_factor, height or h0 - h0 % self.vae_factor
        width, height = width or self.native_size, height or self.native_size
        for field_name, v in (("width", width), ("height", height)):
            if v % self.vae_factor or v < self.vae_factor:
                raise RequestError(f"{field_name} {v} is not a multiple of {self.vae_factor} (this model's latent "
                                   f"factor): try {max(self.vae_factor, v - v % self.vae_factor)}", field=field_name)
        if req.control:  # the units name loaded ControlNets, known preprocessors and readable files
            from .control import check as check_control

            check_control(self, req)
        req = replace(req, recipe=name, sampler=sampler, steps=steps, timesteps=timesteps, gamma=gamma,
                      guidance=guidance, width=width, height=height)
        return req, mask_warnings + self._warnings(req, r)

    def _warnings(self, req, r):
        warnings, (lo, hi) = [], r.guidance_range
        if self.full_lcm:
            if req.negative_prompt:
                warnings.append("full LCM models take guidance as an embedding, not CFG: the negative prompt is "
                                "ignored")
        elif not classifier_free(req.guidance) and req.negative_prompt:
            warnings.append(f"guidance {req.guidance} <= 1 turns classifier-free guidance off: the negative prompt is "
                            "ignored (use guidance 1.1-2 with LCM to apply it)")
        if not self.full_lcm and req.sampler in ("lcm", "tcd") and req.guidance > LCM_BURN_GUIDANCE:
            warnings.append(f"guidance {req.guidance} with the {req.sampler} sampler usually burns images "
                            f"(LCM-LoRAs want 1-{LCM_BURN_GUIDANCE:g})")
        elif r.name != "standard" and not self.full_lcm and not lo <= req.guidance <= hi:
            warnings.append(f"guidance {req.guidance:g} is outside what the {r.name} recipe is made for "
                            f"({lo:g}-{hi:g})")
        mine = self.default_recipe()
        if req.sampler in ("lcm", "tcd") and mine == "standard" and r.name in ("lcm", "tcd", "standard"):
            warnings.append(f"the {req.sampler} sampler on a model with no LCM-LoRA attached gives poor images "
                            "(attach one with lcm=True, or use the euler sampler)")
        elif r.name != "standard" and mine == "standard" and r.name not in ("lcm", "tcd"):
            warnings.append(f"the {r.name} recipe on a model with no {r.title} adapter or UNet gives poor images "
                            f"(attach one, e.g. load_lora(..., recipe={r.name!r}))")
        elif mine not in ("standard", r.name) and r.name != "standard" and {mine, r.name} != {"lcm", "tcd"}:
            warnings.append(f"the {r.name} recipe does not fit this model's few-step adapter or UNet, which is made "
                            f"for the {mine} recipe")
        return warnings

    def noise_schedule_for(self, req):
        """The NoiseSchedule a resolved request runs: the model's config with its sampler's scheduler defaults
        where the config is silent (as diffusers' Scheduler.from_config) and the recipe's settings on top."""
        r = get_recipe(req.recipe)
        extra = dict(DDIM_CONFIG) if req.sampler == "ddim" else {}
        key = (req.sampler == "ddim", tuple(sorted(r.config.items())))
        if key not in self._schedules:
            self._schedules[key] = self._noise_schedule(extra, r.config)
        return self._schedules[key]

    def _noise_schedule(self, defaults, overrides=None):
        cfg = dict(defaults, **{k: v for k, v in self.c.scheduler_config.items() if v is not None})
        cfg.update(overrides or {})
        if self.prediction_type is not None:
            cfg["prediction_type"] = self.prediction_type
        return schedules.noise_schedule(cfg)

    def schedule(self, req):
        """The Schedule a resolved request runs (img2img strength applied)."""
        r = get_recipe(req.recipe)
        ns = self.noise_schedule_for(req)
        strength = req.strength if req.init_image is not None else 1.0
        strength = 1.0 if strength is None else strength
        if req.sampler == "lcm":
            return schedules.lcm_schedule(ns, req.steps, original_steps=req.original_steps, timesteps=req.timesteps,
                                          strength=strength)
        if req.sampler == "tcd":
            return schedules.tcd_schedule(ns, req.steps, gamma=req.gamma, original_steps=req.original_steps,
                                          timesteps=req.timesteps, strength=strength)
        if req.sampler == "ddim":
            return schedules.ddim_schedule(ns, req.steps, spacing=r.spacing, strength=strength)
        return schedules.euler_schedule(ns, req.steps, strength=strength, spacing=r.spacing)

    @torch.no_grad()
    def run(self, req, *, callback=None, cancel=None, preview=None):
        """Run a GenerateRequest (callback, cancel and preview: see generate)."""
        stop = StopHooks(self, cancel)
        with cudnn_benchmark(self.speed.cudnn_benchmark), stop:
            return self._run(req, stop.wrap(callback), preview)

    def _run(self, req, callback, preview=None):
        t_start = time.perf_counter()
        if req.init_image is not None and req.strength is None:
            # img2img keeps most of the image; inpainting repaints the masked region from noise (diffusers' 1.0)
            req = replace(req, strength=1.0 if req.mask is not None else 0.6)
        req = replace(req, init_image=load_image(req.init_image)) if req.init_image is not None else req
        req, warnings = self.resolve(req)
        for w in warnings:
            log.warning(w)
        sched = self.schedule(req)  # validates steps against the sampler before any work
        prompts = [p for p in req.prompt for _ in range(req.num_images)]
        batch = len(prompts)
        self.check_memory(batch, req)
        self.fast.prepare(self, req)  # a backend's per-request work (the OpenVINO int8 UNet's calibration set)
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
        # The modes differ only here: their first latents, the extra UNet inputs and a per-step blend.
        h, w = req.height // self.vae_factor, req.width // self.vae_factor
        shape = (batch, self.c.unet.config.out_channels, h, w)
        t0 = time.perf_counter()
        inpaint = concat = blend = None
        if req.mask is not None:  # inpainting (fewstep.inpaint): first latents, mask channels or a blend
            from .inpaint import prepare as prepare_inpaint

            inpaint = prepare_inpaint(self, req, sched, gens, randn, shape)
            latents, concat, blend = inpaint.latents, inpaint.concat, inpaint.blend
        elif req.init_image is None:
            latents = randn(shape) * sched.init_sigma
        else:
            clean = self.encode_image(req.init_image, req.width, req.height, gens)
            latents = sampling.add_noise(req.sampler, clean, randn(shape), sched)
        timings["encode_image"] = time.perf_counter() - t0 if req.init_image is not None else 0.0
        control = None
        if req.control:  # ControlNets (fewstep.control): residuals added to the UNet's blocks
            from .control import prepare as prepare_control

            control = prepare_control(self, req, sched, batch)
        t0 = time.perf_counter()
        denoise = self.denoiser(prompts, req, concat=concat, control=control)
        timings["text"] = time.perf_counter() - t0
        x0 = [None]
        if preview is not None:
            inner = denoise

            def denoise(x, t, alpha):  # the same denoiser, its x0 kept for the preview
                out = inner(x, t, alpha)
                x0[0] = out[0]
                return out
        sched = sched.to(dev)

        step_times = []
        last = [time.perf_counter()]

        def on_step(i, t, x):
            # host-side times: on CUDA the loop does not wait for the GPU (no sync inside it), so a step's time is
            # when its kernels were queued; the decode waits, so "total" is true (benchmarks synchronize per stage)
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if preview is not None:
                preview(i, x0[0])
            if callback:
                callback(i, len(sched))

        sample = sampling.SAMPLERS[req.sampler]
        kw = {"timestep_scaling": self.noise_schedule.timestep_scaling} if req.sampler == "lcm" else {}
        # Every step's fresh noise is drawn now, in the generators' order, and moved to the device before the loop
        # (one copy per step's noise): a copy from host memory inside the loop would make the host wait for each
        # step to finish on a GPU.
        bank = [randn(shape) for _ in range(sampling.noise_draws(req.sampler, len(sched), req.gamma))]
        bank.reverse()
        with OnDevice(self, self.c.unet):
            latents = sample(denoise, latents, sched, noise=lambda like: bank.pop(), callback=on_step, blend=blend,
                             **kw)
        timings["steps"] = step_times
        t0 = time.perf_counter()
        images = self.decode(latents)
        if inpaint is not None:
            images = inpaint.finish(images)  # padding_mask_crop: the inpainted box pasted back
        timings["decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        params = self.describe(req, sched)
        return Generation(images, seeds, params, timings, sched.timesteps.tolist(), warnings)

    def describe(self, req, sched):
        """The parameters that made an image, for metadata and reports."""
        r = get_recipe(req.recipe)
        return dict(prompt=list(req.prompt), negative_prompt=req.negative_prompt, sampler=req.sampler,
                    recipe=req.recipe, spacing=r.spacing if SAMPLERS[req.sampler].consistency is False else None,
                    steps=len(sched), guidance=req.guidance, width=req.width, height=req.height,
                    strength=req.strength if req.init_image is not None else None,
                    gamma=req.gamma if req.sampler == "tcd" else None, model=self.c.name,
                    loras={n: s.weight for n, s in self.adapters.states.items()},
                    control=[dict(model=u.model, preprocess=u.preprocess, scale=u.scale, start=u.start, end=u.end)
                             for u in req.control],
                    mask_blur=req.mask_blur if req.mask is not None else None,
                    padding_mask_crop=req.padding_mask_crop if req.mask is not None else None)

    # ---- the parts ---------------------------------------------------------------------------------------------
    def denoiser(self, prompts, req, *, concat=None, control=None):
        """denoise(x, t, alpha) for these prompts: text encoded once, CFG or guidance embedding decided here;
        concat and control are the extra UNet inputs of inpainting and ControlNet (fewstep.denoiser)."""
        c, dev = self.c, self.device
        for p in text.truncated(c.tokenizers[0], sorted(set(prompts))):
            log.warning("prompt longer than 77 tokens is truncated: %r", p[:60] + "...")
        cond, pooled = self.encode_prompts(prompts)
        cfg = classifier_free(req.guidance, self.full_lcm)
        uncond = pooled_u = None
        if cfg:
            if c.zeros_for_empty_prompt and req.negative_prompt is None:
                uncond, pooled_u = torch.zeros_like(cond), torch.zeros_like(pooled)
            else:
                uncond, pooled_u = self.encode_prompts([req.negative_prompt or ""] * len(prompts))
        added = added_u = None
        if c.preset.xl or c.added_conditions:
            # SDXL micro-conditioning: original size, crop top-left, target size (all the output size here)
            ids = torch.tensor([[req.height, req.width, 0, 0, req.height, req.width]] * len(prompts), device=dev)
            added = {"text_embeds": pooled, "time_ids": ids}
            added_u = {"text_embeds": pooled_u, "time_ids": ids} if cfg else None
        tcond = None
        if self.full_lcm:
            w = torch.full((len(prompts),), req.guidance - 1.0)
            tcond = guidance_embedding(w, c.unet.config.time_cond_proj_dim).to(dev)
        return make_denoiser(self.unet_fn, cond, prediction_type=self.noise_schedule_for(req).prediction_type,
                             guidance=req.guidance, uncond=uncond, added=added, added_uncond=added_u,
                             timestep_cond=tcond, dtype=self.dtype, concat=concat, control=control)

    def encode_prompts(self, prompts):
        """Text embeddings, cached per prompt and adapter set (a text-encoder LoRA changes them)."""
        c = self.c
        key = (tuple(prompts), self.adapters.text_signature())
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
        if image.size != (width, height):
            image = image.resize((width, height), resample=_lanczos())
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        return self.encode_pixels(x, gens)

    def encode_pixels(self, x, gens):
        """Scaled VAE latents of one image x (1, 3, H, W) in [-1, 1], sampled once per generator: diffusers'
        retrieve_latents(vae.encode(x), generator) for each image (img2img and inpainting share it)."""
        vae = self.c.vae
        with OnDevice(self, vae):
            x = x.to(self.device, vae.dtype)
            dist = self.fast.encode_fn(x) if self.fast.encode_fn else vae.encode(x).latent_dist  # (a backend's)
        mean, std = dist.mean.float(), dist.std.float()
        samples = [mean + std * torch.randn(mean.shape, generator=g).to(self.device) for g in gens]
        return latents.to_unet(vae, torch.cat(samples))

    def decode(self, x, decoder=None):
        """PIL images from latents, one image at a time (the decoder's activations dominate memory); decoder: another
        than the fast path's (a stream's tiny autoencoder)."""
        dec = decoder or self.decoder
        decode_fn = self.decode_fn if decoder is None else decoder.decode
        images = []
        for i in range(len(x)):
            with OnDevice(self, dec):
                out = decode_fn(latents.to_vae(dec, x[i:i + 1]).to(dec.dtype), return_dict=False)[0]
            images += self.pixels_to_images(out, dec.dtype)
        return images

    def pixels_to_images(self, out, dtype):
        """PIL images from decoded pixels (n, 3, H, W) in [-1, 1]; a non-finite value raises the error of the active
        LoRAs (named) or of dtype, the one the pixels were computed in."""
        from PIL import Image

        out = out.float()
        if self.check_finite and not torch.isfinite(out).all():
            raise self.adapters.nonfinite_error(dtype)
        arr = ((out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

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
        cfg = 2 if classifier_free(req.guidance, self.full_lcm) else 1
        elem = torch.finfo(self.dtype).bits // 8
        area = (req.height // self.vae_factor) * (req.width // self.vae_factor)
        ch = self.c.unet.config.block_out_channels[0]
        unet = batch * cfg * area * ch * 40 * elem
        vae_ch = self.c.vae.config.block_out_channels[0]
        decode = req.height * req.width * vae_ch * 8 * 4
        return unet + decode


class StopHooks:
    """Cancellation within a step: forward pre-hooks on the UNet's down, mid and up blocks and on the loaded
    ControlNets raise Cancelled once `cancel` is set, so a dropped request stops after the block that is running,
    not after the whole step (a 1024 px step on a CPU takes a minute). Compiled and CUDA-graph UNets run no Python
    between their kernels: there (and for other backends' callables) only the per-step check runs."""

    def __init__(self, engine, cancel):
        self.engine = engine
        self.is_set = None if cancel is None else getattr(cancel, "is_set", cancel)
        self.handles = []
        self.blocks = 0  # blocks started while hooked (tests and reports)

    def check(self, *_):
        if self.is_set is not None and self.is_set():
            raise Cancelled("the work was cancelled")

    def hook(self, *_):
        self.check()
        self.blocks += 1

    def wrap(self, callback):
        """callback, preceded by the per-step check."""
        if self.is_set is None:
            return callback

        def checked(i, n):
            self.check()
            if callback:
                callback(i, n)

        return checked

    def modules(self):
        e = self.engine
        eager = e.unet_fn is e.c.unet or getattr(e.unet_fn, "runs_eager_blocks", False)  # (a feature cache)
        if not eager:  # compiled, graphed or another backend: hooks would not run (or recompile)
            return []
        unet = e.c.unet
        out = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        for net in e.controlnets.values():
            out += [net, *net.down_blocks, net.mid_block]
        return [m for m in out if m is not None]

    def __enter__(self):
        if self.is_set is not None:
            self.check()
            self.handles = [m.register_forward_pre_hook(self.hook) for m in self.modules()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


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
    from PIL import Image

    from .images import open_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return open_image(image, "init image", then=lambda im: im.convert("RGB"))


def load(source=None, *, device="auto", dtype="auto", lcm=True, allow_pickle=False, unet=None, recipe=None,
         prediction_type=None, check_finite=True, **speed):
    """fewstep.load: read and place the components, set up the fast path, attach the LCM-LoRA the request asks for.

    unet: a UNet-only file or folder replacing the model's (a distilled Lightning / DMD2 / Hyper-SD UNet).
    recipe: the engine's default recipe (see fewstep.recipes; for a UNet file, guessed from its name when left out).
    lcm: True attaches the family's published LCM-LoRA where it fits (no other recipe asked for, not a full LCM), a
    path or hub id attaches that file; False never. check_finite False lets NaN images through (benchmarks on
    random weights, evaluations that score poor rows).
    """
    from . import loading
    from . import speed as speed_mod
    from .errors import LoadError
    from .recipes import detect

    dev = loading.resolve_device(device)
    dt = loading.resolve_dtype(dtype, dev)
    settings = speed_mod.auto_settings(dev, **speed)
    if dev.type == "cpu" and dt == torch.float16:
        raise LoadError("fp16 on the CPU is very slow and unsupported by many kernels: use bf16 or fp32")
    if recipe is not None:
        get_recipe(recipe)
    if prediction_type is not None and prediction_type not in schedules.PREDICTION_TYPES:
        raise LoadError(f"unknown prediction type {prediction_type!r} (use {', '.join(schedules.PREDICTION_TYPES)})")
    if source is None:
        from .default_model import NAME, default_model_path

        path, name = default_model_path(), NAME
        parts = loading.read_shipped(path, dtype=dt)
    else:
        path, name = source, Path(str(source)).name if Path(str(source)).exists() else str(source)
        parts = loading.read_components(path, allow_pickle=allow_pickle, dtype=dt)
    if unet is not None:
        parts["unet"] = loading.read_unet(unet, parts["unet"], allow_pickle=allow_pickle, dtype=dt)
        guessed, _ = detect(Path(str(unet)).name)
        recipe = recipe or guessed
        if prediction_type is None and recipe == "lightning" and re.search(r"x0", Path(str(unet)).name.lower()):
            prediction_type = "sample"  # SDXL-Lightning's 1-step UNet predicts x0 (its card: prediction_type sample)
        name = f"{name} + {Path(str(unet)).name}"
    comps = loading.place(parts, path, name, torch.device("cpu") if settings.offload else dev, dt)
    # the LCM-LoRA joins a model that has no few-step recipe of its own (the TCD sampler runs on it too)
    wants_lcm = lcm is not False and not comps.full_lcm and recipe in (None, "lcm", "tcd")
    engine = Engine(comps, dev, dt, speed=settings, recipe=None if wants_lcm and recipe == "lcm" else recipe,
                    prediction_type=prediction_type, check_finite=check_finite)
    if wants_lcm:
        src = engine.c.preset.lcm_lora if lcm is True else lcm
        if src is None and engine.arch == "shapes":
            from .default_model import default_lcm_lora

            src = default_lcm_lora()
            if src is None:
                comps.notes.append("the shapes model's LCM-LoRA is not installed: using the teacher's own "
                                   "sampler (Euler, 25 steps, guidance 4)")
        elif src is None:
            raise LoadError(f"there is no published LCM-LoRA for {engine.c.preset.title} models: pass a local one "
                            "with --lcm PATH, or --no-lcm for the standard pipeline")
        if src is not None:
            engine.load_lora(src, name="lcm", weight=1.0, allow_pickle=allow_pickle, lcm=True)
    return engine
