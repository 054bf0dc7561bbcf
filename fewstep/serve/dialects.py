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
from ..errors import FewstepError, LoadError, RequestError
from ..images import control_text, lora_hashes_text, parameters_text
from ..lora.prompt import split_tags
from ..recipes import RECIPES, SAMPLERS
from ..request import GenerateRequest, check_text, classifier_free
from .a1111 import a1111_sampler
from .batcher import Spec, random_seeds


class Invalid(FewstepError):
    """A request field with a value the server refuses (HTTP 422)."""

    def __init__(self, param, reason):
        super().__init__(f"{param}: {reason}" if param else reason)
        self.param = param
        self.reason = reason


# ---- request bodies ------------------------------------------------------------------------------------------------
VARIATION_STRENGTH = 0.6  # /v1/images/variations: the layout and colours stay, the details change
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images


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
    stream: bool = False  # Server-Sent Events: partial images while the steps run, then the images
    partial_images: int | None = None  # partial images to stream (OpenAI's 0-3)


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
    scheduler: str | None = None  # A1111 1.9+'s schedule type: fewstep's samplers walk their recipe's own
    recipe: str | None = None  # fewstep's extension: a few-step recipe (see `fewstep recipes`)
    alwayson_scripts: dict | None = None  # the ControlNet extension's {"controlnet": {"args": [unit, ...]}}


class A1111Img2Img(A1111Txt2Img):
    """POST /sdapi/v1/img2img; with a mask it inpaints. The inpainting fields' defaults are A1111's API's."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "only masked": the mask's box at full resolution, pasted back
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0


class OpenAIEdits(OpenAIImages):
    """POST /v1/images/edits (multipart form): the generations fields plus `strength` (fewstep's extension); the
    image and mask come as files."""

    strength: float | None = None


class OpenAIVariations(OpenAIEdits):
    """POST /v1/images/variations (multipart form): image-to-image of the uploaded image; OpenAI sends no prompt, a
    fewstep client may send one to steer the variation."""

    prompt: str = ""
    strength: float | None = VARIATION_STRENGTH


# ---- request -> Spec -----------------------------------------------------------------------------------------------
MAX_CONTROL_UNITS = 4  # ControlNet units per request (each is a second network run per step)
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def build_spec(server, *, prompt, names, n=1, seed=None, steps=None, guidance=None, sampler=None, width=None,
               height=None, negative_prompt=None, loras=None, init_image=None, strength=None, recipe=None,
               mask=None, mask_blur=0, padding_mask_crop=None, control=(), notes=()):
    """Check a request against the server's limits and the engine's rules; `names` maps engine field names onto
    the dialect's (so a 422 names the field the client sent)."""
    cfg = server.config

    def bad(field, reason):
        return Invalid(names.get(field, field), reason)

    try:  # first: a lone surrogate can be neither tokenized nor written into an error body or PNG metadata
        check_text(prompt, "prompt")
        if negative_prompt is not None:
            check_text(negative_prompt, "negative_prompt")
    except RequestError as e:
        raise bad(e.field, str(e)) from None
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
        both = sorted(set(tagged) & set(loras or {}))
        if both:  # which weight was meant cannot be known: refused, never one silently winning
            raise RequestError(f"LoRA {both[0]!r} is given twice, in the loras field ({loras[both[0]]:g}) and as a "
                               f"<lora:{both[0]}:{tagged[both[0]]:g}> tag in the prompt: give it once")
        wanted = dict(tagged, **(loras or {}))
        adapter_set = server.adapters.check(wanted)
    except (RequestError, LoadError) as e:
        raise bad("loras", str(e)) from None
    seeds = random_seeds(n, seed)
    try:
        req = GenerateRequest(prompt=prompt, negative_prompt=negative_prompt or None, steps=steps, guidance=guidance,
                              recipe=recipe, sampler=sampler, width=width, height=height, num_images=n, seeds=seeds,
                              init_image=init_image, strength=strength, mask=mask, mask_blur=mask_blur,
                              padding_mask_crop=padding_mask_crop, control=tuple(control))
        # engine defaults and model rules; reads no mutable engine state. ControlNets loaded on first use are not
        # loaded yet: their units were checked when they were parsed, and are left out of this check.
        loaded = tuple(u for u in req.control if u.model in server.engine.controlnets)
        # what resolve says about the request (a mask fitted to the image) is said once more when it runs
        resolved, said = server.engine.resolve(replace(req, control=loaded))
        req = replace(resolved, control=req.control, init_image=req.init_image)  # uploads keep their identity
        server.engine.schedule(req)
    except RequestError as e:
        raise bad(e.field, str(e)) from None
    for field in ("width", "height"):
        if getattr(req, field) > cfg.max_size:  # img2img takes its size from the init image
            raise bad(field, f"{getattr(req, field)} is more than {cfg.max_size} pixels: give a smaller size")
    # without CFG the negative prompt does nothing: leaving it out lets such requests share a batch
    negative = req.negative_prompt if classifier_free(req.guidance, server.engine.full_lcm) else None
    pending = server.controlnets.pending(u.model for u in req.control)
    return Spec(replace(req, negative_prompt=negative, guidance=float(req.guidance)), loras=adapter_set,
                controlnets=pending, notes=tuple(notes) + tuple(said))


def openai_spec(server, body):
    check_partial_images(body)
    names = {"guidance": "guidance_scale", "width": "size", "height": "size"}
    width, height = openai_size(body.size)
    sampler = body.sampler.lower() if body.sampler else None
    return build_spec(server, prompt=body.prompt, names=names, n=body.n, seed=body.seed, steps=body.steps,
                      guidance=body.guidance_scale, sampler=sampler, width=width, height=height,
                      negative_prompt=body.negative_prompt, loras=body.loras, recipe=body.recipe)


def a1111_spec(server, body, init_image=None, mask=None):
    """txt2img, or img2img with its init image (and its mask, decoded) given."""
    names = {"guidance": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "loras": "prompt",
             "strength": "denoising_strength", "padding_mask_crop": "inpaint_full_res_padding",
             "control": "alwayson_scripts.controlnet"}
    if body.seed < -1:
        raise Invalid("seed", f"must be -1 (random) or >= 0, got {body.seed}")
    if body.n_iter < 1 or body.batch_size < 1:
        raise Invalid("batch_size" if body.batch_size < 1 else "n_iter", "must be >= 1")
    sampler, sampler_notes = None, ()
    name = body.sampler_name or body.sampler_index
    if name:  # A1111's other samplers run as this model's own (fewstep.serve.a1111.a1111_sampler says why)
        sampler, sampler_notes = a1111_sampler(name, server.engine, body.scheduler)
        if sampler is None:
            labels = ", ".join(s.label for s in SAMPLERS.values())
            raise Invalid("sampler_name", f"unknown sampler {name!r}: neither fewstep ({labels}) nor A1111 has it")
    strength = body.denoising_strength if init_image is not None else None
    control = a1111_control(server, body.alwayson_scripts, init_image)
    inpaint, notes = {}, []
    if mask is not None:
        inpaint, strength, init_image, notes = a1111_inpaint(body, init_image, mask, strength)
    notes = [*sampler_notes, *notes]
    return build_spec(server, prompt=body.prompt, names=names, n=body.batch_size * body.n_iter,
                      seed=None if body.seed == -1 else body.seed, steps=body.steps, guidance=body.cfg_scale,
                      sampler=sampler, width=body.width, height=body.height, negative_prompt=body.negative_prompt,
                      init_image=init_image, strength=strength, recipe=body.recipe, control=control, notes=notes,
                      **inpaint)


def a1111_inpaint(body, image, mask, strength):
    """A1111's inpainting fields -> (mask fields of the request, strength, init image, notes)."""
    from ..images import fill_masked, fit_mask

    fill = body.inpainting_fill
    if fill not in INPAINTING_FILL:
        raise Invalid("inpainting_fill", f"must be 0 (fill), 1 (original), 2 (latent noise) or 3, got {fill}")
    if fill == 3:
        raise Invalid("inpainting_fill", "3 (latent nothing) is not supported: use 0 (fill), 1 (original) or 2 "
                                         "(latent noise)")
    if body.inpainting_mask_invert not in (0, 1):
        raise Invalid("inpainting_mask_invert", f"must be 0 or 1, got {body.inpainting_mask_invert}")
    if not 0 <= body.mask_blur <= 256:
        raise Invalid("mask_blur", f"must be in 0..256 pixels, got {body.mask_blur}")
    if body.inpaint_full_res and body.inpaint_full_res_padding < 0:
        raise Invalid("inpaint_full_res_padding", f"must be >= 0 pixels, got {body.inpaint_full_res_padding}")
    mask = a1111_mask(mask)
    if body.inpainting_mask_invert:
        from PIL import ImageOps

        mask = ImageOps.invert(mask)
    mask, resized = fit_mask(mask, image.size)
    notes = [resized] if resized else []
    if fill == 0:
        image = fill_masked(image, mask)  # the area to repaint starts from the colours around it
    elif fill == 2:
        strength = 1.0  # the area to repaint starts from noise
        notes.append("inpainting_fill 2 (latent noise) runs at denoising strength 1: the masked area starts from "
                     "noise")
    crop = body.inpaint_full_res_padding if body.inpaint_full_res else None
    return dict(mask=mask, mask_blur=body.mask_blur, padding_mask_crop=crop), strength, image, notes


def a1111_mask(image):
    """An A1111 mask as one channel, white = repaint: a mask with transparency is its alpha (opaque = repaint, as
    A1111 reads it), any other is its grey level; values are made hard at 128, as A1111 does."""
    if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema()[0] < 255:
        image = image.getchannel("A")
    return image.convert("L").point(lambda v: 255 if v >= 128 else 0)


def a1111_control(server, scripts, init_image=None):
    """The ControlNet extension's units (alwayson_scripts.controlnet.args) -> ControlUnits, checked."""
    from ..request import ControlUnit

    if not scripts:
        return ()
    if not isinstance(scripts, dict):
        raise Invalid("alwayson_scripts", "must be an object of {script name: {\"args\": [...]}}")
    key = next((k for k in scripts if k.lower() == "controlnet"), None)
    if key is None:
        return ()  # other scripts are accepted and ignored, like other unknown fields
    base = f"alwayson_scripts.{key}.args"
    args = scripts[key].get("args") if isinstance(scripts[key], dict) else None
    if not isinstance(args, list):
        raise Invalid(base, "must be a list of ControlNet units")
    units = []
    for i, arg in enumerate(args):
        param = f"{base}.{i}"
        if not isinstance(arg, dict):
            raise Invalid(param, "each unit must be an object with image, module, model, weight...")
        if arg.get("enabled", True) is False:
            continue
        image = arg.get("image") or arg.get("input_image")
        if isinstance(image, dict):  # the extension's older {"image": ..., "mask": ...}
            image = image.get("image")
        if image is None and init_image is None:
            raise Invalid(f"{param}.image", "give the control image (base64)")
        if image is not None and not isinstance(image, str):
            raise Invalid(f"{param}.image", "must be a base64 image")
        picture = init_image if image is None else server.decode(image, f"{param}.image")
        try:
            name, preprocess = server.controlnets.resolve(arg.get("model"), arg.get("module"), param)
        except RequestError as e:
            raise Invalid(e.field, str(e)) from None
        numbers = {}
        for field, default in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0)):
            v = arg.get(field, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise Invalid(f"{param}.{field}", f"must be a number, got {v!r}")
            numbers[field] = float(v)
        if not 0 <= numbers["weight"] <= 10:
            raise Invalid(f"{param}.weight", f"must be in 0..10, got {numbers['weight']:g}")
        start, end = numbers["guidance_start"], numbers["guidance_end"]
        if not 0 <= start < end <= 1:
            raise Invalid(f"{param}.guidance_start" if not 0 <= start < 1 or start >= end else f"{param}.guidance_end",
                          f"guidance_start and guidance_end are fractions of the steps with 0 <= start < end <= 1, "
                          f"got {start:g} and {end:g}")
        units.append(ControlUnit(model=name, image=picture, scale=numbers["weight"], start=start, end=end,
                                 preprocess=preprocess))
    if len(units) > MAX_CONTROL_UNITS:
        raise Invalid(base, f"at most {MAX_CONTROL_UNITS} enabled ControlNet units, got {len(units)}")
    return tuple(units)


def openai_edit_spec(server, body, image, mask=None):
    """/v1/images/edits: with a mask (transparent = edit, OpenAI's rule), or an image with transparent pixels and
    no mask (DALL-E 2's rule), inpaint; otherwise image-to-image. Images are decoded RGBA."""
    from ..images import alpha_mask, fit_mask

    check_partial_images(body)
    notes, strength = [], body.strength
    if mask is not None:  # transparent = edit; a mask without an alpha channel is read as fewstep's white = repaint
        edit = alpha_mask(mask, transparent_only=False)
        if edit is None:
            edit = mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
    else:
        edit = alpha_mask(image)
    if edit is not None:
        edit, resized = fit_mask(edit, image.size)
        notes += [resized] if resized else []
        strength = 1.0 if strength is None else strength
    names = {"guidance": "guidance_scale", "width": "size", "height": "size", "mask_blur": "mask"}
    width, height = openai_size(body.size)
    sampler = body.sampler.lower() if body.sampler else None
    return build_spec(server, prompt=body.prompt, names=names, n=body.n, seed=body.seed, steps=body.steps,
                      guidance=body.guidance_scale, sampler=sampler, width=width, height=height,
                      negative_prompt=body.negative_prompt, loras=body.loras, recipe=body.recipe,
                      init_image=_flatten(image), strength=strength, mask=edit, notes=notes)


def openai_variation_spec(server, body, image):
    """/v1/images/variations: image-to-image of the upload; its transparency is not an area to edit here."""
    return openai_edit_spec(server, body, _flatten(image))


def check_partial_images(body):
    p = body.partial_images
    if p is not None and not 0 <= p <= MAX_PARTIAL_IMAGES:
        raise Invalid("partial_images", f"must be in 0..{MAX_PARTIAL_IMAGES}, got {p}")
    if p and not body.stream:
        raise Invalid("partial_images", "partial images are sent only when streaming: add stream=true")


def _flatten(image):
    """RGB of an RGBA upload: transparent pixels (the area to edit) become black, as OpenAI treats them."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    from PIL import Image

    out = Image.new("RGB", image.size, (0, 0, 0))
    out.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return out


def openai_size(size):
    if size in (None, "auto"):
        return None, None
    # ASCII digits only: \d also matches other scripts' digits ("５１２"), which int() reads but no client sends
    m = re.fullmatch(r"\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*", size)
    if not m:
        raise Invalid("size", f"must look like 512x512 (WIDTHxHEIGHT) or auto, got {size!r}")
    return int(m.group(1)), int(m.group(2))


def decode_image(data, *, max_pixels, param="init_images", mode="RGB"):
    """A PIL image from base64 (optionally a data: URL); its size is checked before its pixels are decoded."""
    if data.lstrip().startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(param, "not valid base64") from None
    return decode_bytes(raw, max_pixels=max_pixels, param=param, mode=mode)


def decode_bytes(raw, *, max_pixels, param, mode="RGB"):
    """A PIL image from a file's bytes, in `mode` (None: as stored, for masks and their transparency). Image.open
    reads the header only: the size is checked against max_pixels (the server's --max-image-pixels, which follows
    --max-size) before any pixel is decoded, so a large upload costs no memory."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    def too_large(size):
        side = math.isqrt(max_pixels)
        return Invalid(param, f"the image is {size}, more than this server's limit of {max_pixels} pixels (about "
                              f"{side}x{side}): send a smaller image")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own limit, far above ours
        raise too_large("a decompression bomb (more pixels than PIL will open)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise Invalid(param, "not a readable image (PNG, JPEG or WebP)") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise too_large(f"{w}x{h}")
        try:
            return im.convert(mode) if mode else _as_stored(im)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise Invalid(param, "not a readable image (PNG, JPEG or WebP): its data is damaged or truncated") from None


def _as_stored(im):
    """The decoded image in its own mode, palette transparency as an alpha channel."""
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA")
    im.load()
    return im.copy()


# ---- Result -> response --------------------------------------------------------------------------------------------
def png_bytes(image, params, seed):
    """PNG with the A1111 "parameters" text chunk other tools read back."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(dict(params, version=__version__), seed))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_all(result, adapters=None):
    """The result's PNGs (encode_pngs); the A1111 answer's infotexts are written from the same params after."""
    return encode_pngs(result.images, result.seeds, result.params, adapters)


def encode_pngs(images, seeds, params, adapters=None):
    """PNGs with their metadata. With the server's Adapters, the LoRAs' A1111 hashes join params first (in place:
    the caller's infotexts then carry them too)."""
    if adapters is not None and params.get("loras"):
        params["lora_hashes"] = adapters.hashes(params["loras"])
    return [png_bytes(im, params, s) for im, s in zip(images, seeds)]


def timings(result):
    return {"queue_s": round(result.queue_seconds, 4), "compute_s": round(result.compute_seconds, 4),
            "total_s": round(result.total_seconds, 4), "batch_images": result.batch_images}


def openai_response(spec, result, pngs, urls=None):
    data = []
    for i, (png, seed) in enumerate(zip(pngs, result.seeds)):
        item = {"url": urls[i]} if urls else {"b64_json": base64.b64encode(png).decode()}
        data.append(dict(item, revised_prompt=spec.prompt, seed=seed))
    out = {"created": int(time.time()), "data": data, "timings": timings(result)}
    warnings = list(dict.fromkeys([*spec.notes, *result.warnings]))
    if warnings:
        out["warnings"] = warnings
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
                extra_generation_params={"Lora hashes": lora_hashes_text(p["lora_hashes"])}
                if p.get("lora_hashes") else {},
                index_of_first_image=0, infotexts=texts, styles=[], job_timestamp=time.strftime("%Y%m%d%H%M%S"),
                version=f"fewstep {__version__}", timings=timings(result),
                warnings=list(dict.fromkeys([*spec.notes, *result.warnings])))
    if spec.control:
        info["extra_generation_params"].update({f"ControlNet {i}": control_text(dict(
            model=u.model, preprocess=u.preprocess, scale=u.scale, start=u.start, end=u.end)).strip('"')
            for i, u in enumerate(spec.control)})
    if spec.mask is not None:
        info["extra_generation_params"]["Mask blur"] = spec.mask_blur
    params = body.model_dump(exclude={"init_images", "mask", "alwayson_scripts"})
    return {"images": [base64.b64encode(png).decode() for png in pngs], "parameters": params,
            "info": json.dumps(info)}
