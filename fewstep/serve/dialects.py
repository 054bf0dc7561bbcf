"""The two HTTP dialects image clients speak (OpenAI images, A1111 sdapi): request bodies -> Spec, Result -> JSON."""

import base64
import binascii
import io
import json
import math
import re
import time
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import FewstepError, RequestError
from ..images import parameters_text
from ..lora.prompt import split_tags
from ..recipes import RECIPES, SAMPLERS, sampler_for_label
from ..request import GenerateRequest, classifier_free
from .batcher import Spec, random_seeds


class Invalid(FewstepError):
    """A request field with a value the server refuses (HTTP 422)."""

    def __init__(self, param, reason):
        super().__init__(f"{param}: {reason}" if param else reason)
        self.param = param
        self.reason = reason


# ---- request bodies ------------------------------------------------------------------------------------------------
class OpenAIImages(BaseModel):
    """POST /v1/images/generations; steps, guidance_scale, negative_prompt, seed, sampler, loras are extensions."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None  # accepted and ignored: the server holds one model
    n: int = 1
    size: str | None = None  # "WxH" or "auto"
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    sampler: str | None = None
    recipe: str | None = None
    loras: dict[str, float] | None = None


class A1111Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img: the subset LCM clients send; other A1111 fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str | None = ""
    seed: int = -1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    recipe: str | None = None  # fewstep's extension: a few-step recipe (see `fewstep recipes`)


class A1111Img2Img(A1111Txt2Img):
    """POST /sdapi/v1/img2img."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    mask: str | None = None


# ---- request -> Spec -----------------------------------------------------------------------------------------------
def build_spec(server, *, prompt, names, n=1, seed=None, steps=None, guidance=None, sampler=None, width=None,
               height=None, negative_prompt=None, loras=None, init_image=None, strength=None, recipe=None):
    """Check a request against the server's limits and the engine's rules; `names` maps engine field names onto
    the dialect's (so a 422 names the field the client sent)."""
    cfg = server.config

    def bad(field, reason):
        return Invalid(names.get(field, field), reason)

    if len(prompt) > cfg.max_prompt_chars:
        raise bad("prompt", f"at most {cfg.max_prompt_chars} characters, got {len(prompt)}")
    if negative_prompt is not None and len(negative_prompt) > cfg.max_prompt_chars:
        raise bad("negative_prompt", f"at most {cfg.max_prompt_chars} characters, got {len(negative_prompt)}")
    if not 1 <= n <= cfg.max_images:
        raise bad("n", f"must be in 1..{cfg.max_images}, got {n}")
    if steps is not None and not 1 <= steps <= cfg.max_steps:
        raise bad("steps", f"must be in 1..{cfg.max_steps}, got {steps}")
    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= cfg.max_guidance):
        raise bad("guidance", f"must be in 0..{cfg.max_guidance:g}, got {guidance}")
    if seed is not None and not 0 <= seed <= 2**63 - 1 - n:
        raise bad("seed", f"must be in 0..2^63-1-n, got {seed}")
    if sampler is not None and sampler not in SAMPLERS:
        raise bad("sampler", f"unknown sampler {sampler!r} (use {', '.join(SAMPLERS)})")
    if recipe is not None and recipe not in RECIPES:
        raise bad("recipe", f"unknown recipe {recipe!r} (use {', '.join(RECIPES)})")
    for field, v in (("width", width), ("height", height)):
        if v is not None and not 8 <= v <= cfg.max_size:
            raise bad(field, f"must be in 8..{cfg.max_size} pixels, got {v}")
    if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
        raise bad("strength", f"must be in (0, 1], got {strength}")
    try:
        prompt, tagged = split_tags(prompt)
        wanted = dict(tagged, **(loras or {}))
        adapter_set = server.adapters.check(wanted)
    except RequestError as e:
        raise bad("loras", str(e)) from None
    seeds = random_seeds(n, seed)
    try:
        req = GenerateRequest(prompt=prompt, negative_prompt=negative_prompt or None, steps=steps, guidance=guidance,
                              recipe=recipe, sampler=sampler, width=width, height=height, num_images=n, seeds=seeds,
                              init_image=init_image, strength=strength)
        req, _ = server.engine.resolve(req)  # engine defaults and model rules; reads no mutable engine state
        server.engine.schedule(req)
    except RequestError as e:
        raise bad(e.field, str(e)) from None
    for field in ("width", "height"):
        if getattr(req, field) > cfg.max_size:  # img2img takes its size from the init image
            raise bad(field, f"{getattr(req, field)} is more than {cfg.max_size} pixels: give a smaller size")
    # without CFG the negative prompt does nothing: leaving it out lets such requests share a batch
    negative = req.negative_prompt if classifier_free(req.guidance, server.engine.full_lcm) else None
    return Spec(replace(req, negative_prompt=negative, guidance=float(req.guidance)), loras=adapter_set)


def openai_spec(server, body):
    names = {"guidance": "guidance_scale", "width": "size", "height": "size"}
    width = height = None
    if body.size not in (None, "auto"):
        m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", body.size)
        if not m:
            raise Invalid("size", f"must look like 512x512 (WIDTHxHEIGHT) or auto, got {body.size!r}")
        width, height = int(m.group(1)), int(m.group(2))
    sampler = body.sampler.lower() if body.sampler else None
    return build_spec(server, prompt=body.prompt, names=names, n=body.n, seed=body.seed, steps=body.steps,
                      guidance=body.guidance_scale, sampler=sampler, width=width, height=height,
                      negative_prompt=body.negative_prompt, loras=body.loras, recipe=body.recipe)


def a1111_spec(server, body, init_image=None):
    names = {"guidance": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "loras": "prompt",
             "strength": "denoising_strength"}
    if body.seed < -1:
        raise Invalid("seed", f"must be -1 (random) or >= 0, got {body.seed}")
    if body.n_iter < 1 or body.batch_size < 1:
        raise Invalid("batch_size" if body.batch_size < 1 else "n_iter", "must be >= 1")
    sampler = None
    name = body.sampler_name or body.sampler_index
    if name:
        sampler = sampler_for_label(name)
        if sampler is None:
            labels = ", ".join(s.label for s in SAMPLERS.values())
            raise Invalid("sampler_name", f"unknown sampler {name!r} (this server has {labels})")
    strength = body.denoising_strength if init_image is not None else None
    return build_spec(server, prompt=body.prompt, names=names, n=body.batch_size * body.n_iter,
                      seed=None if body.seed == -1 else body.seed, steps=body.steps, guidance=body.cfg_scale,
                      sampler=sampler, width=body.width, height=body.height, negative_prompt=body.negative_prompt,
                      init_image=init_image, strength=strength, recipe=body.recipe)


def decode_image(data, *, max_pixels, param="init_images"):
    """A PIL RGB image from base64 (optionally a data: URL); its size is checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if data.lstrip().startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(param, "not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Invalid(param, f"the image is {w}x{h}, more than {max_pixels} pixels")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise Invalid(param, "not a readable image (PNG, JPEG or WebP)") from None


# ---- Result -> response --------------------------------------------------------------------------------------------
def png_bytes(image, params, seed):
    """PNG with the A1111 "parameters" text chunk other tools read back."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(dict(params, version=__version__), seed))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_all(result):
    return [png_bytes(im, result.params, s) for im, s in zip(result.images, result.seeds)]


def timings(result):
    return {"queue_s": round(result.queue_seconds, 4), "compute_s": round(result.compute_seconds, 4),
            "total_s": round(result.total_seconds, 4), "batch_images": result.batch_images}


def openai_response(spec, result, pngs, urls=None):
    data = []
    for i, (png, seed) in enumerate(zip(pngs, result.seeds)):
        item = {"url": urls[i]} if urls else {"b64_json": base64.b64encode(png).decode()}
        data.append(dict(item, revised_prompt=spec.prompt, seed=seed))
    out = {"created": int(time.time()), "data": data, "timings": timings(result)}
    if result.warnings:
        out["warnings"] = result.warnings
    return out


def a1111_response(body, spec, result, pngs, model):
    p = result.params
    texts = [parameters_text(dict(p, version=__version__), s) for s in result.seeds]
    info = dict(prompt=body.prompt, all_prompts=[body.prompt] * spec.n, negative_prompt=body.negative_prompt or "",
                all_negative_prompts=[body.negative_prompt or ""] * spec.n, seed=result.seeds[0],
                all_seeds=result.seeds, subseed=-1, all_subseeds=[-1] * spec.n, subseed_strength=0,
                steps=p["steps"], cfg_scale=p["guidance"], width=spec.width, height=spec.height,
                sampler_name=SAMPLERS[spec.sampler].label, batch_size=body.batch_size,
                n_iter=body.n_iter, denoising_strength=spec.strength, sd_model_name=model, sd_model_hash=None,
                clip_skip=1, restore_faces=False, seed_resize_from_w=-1, seed_resize_from_h=-1,
                extra_generation_params={"LoRAs": dict(spec.loras)} if spec.loras else {},
                index_of_first_image=0, infotexts=texts, styles=[], job_timestamp=time.strftime("%Y%m%d%H%M%S"),
                version=f"fewstep {__version__}", timings=timings(result), warnings=result.warnings)
    params = body.model_dump(exclude={"init_images", "mask"})
    return {"images": [base64.b64encode(png).decode() for png in pngs], "parameters": params,
            "info": json.dumps(info)}
