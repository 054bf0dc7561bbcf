"""Inpainting in the one denoise loop: an init image and a mask (white = repaint), as diffusers'
StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline do it.

An inpainting UNet (9 input channels) sees the mask and the masked image's latents as extra input channels at every
step. An ordinary UNet (4) gets the kept region put back after every step instead: the init latents, noised to the
next step with the first noise, mixed in by the mask at latent size (clean after the last step). Generator draws
follow diffusers' order per image: the init image's latents (when used), the first noise, the masked image's
latents. The pixel and mask preprocessing, the crop region and the paste-back are diffusers' own VaeImageProcessor,
called rather than copied, so the same inputs give the same pixels.
"""

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from . import sampling
from .errors import RequestError


@dataclass
class Job:
    """What an inpainting request changes in the loop: the first latents, the extra UNet channels (9-channel UNets)
    or the per-step blend (4-channel UNets), and the paste-back after decoding (padding_mask_crop)."""

    latents: torch.Tensor
    concat: torch.Tensor | None = None
    blend: object = None  # blend(i, x) -> x after step i
    finish: object = list  # finish(images) -> images


def inpainting_unet(unet):
    """True for a UNet that takes the mask and the masked image's latents (in_channels = 2 x latent + 1)."""
    cin, cout = unet.config.in_channels, unet.config.out_channels
    if cin == cout:
        return False
    if cin == 2 * cout + 1:
        return True
    raise RequestError(f"this UNet takes {cin} input channels for {cout} latent channels: fewstep inpaints with "
                       f"ordinary ({cout}) and inpainting ({2 * cout + 1}) UNets only", field="mask")


def read_mask(mask):
    """The mask as a grayscale PIL image (white = repaint) from a PIL image or a path; RequestError when unreadable.

    A mask with transparency (a mask drawn on a transparent canvas) is its alpha channel, as A1111 reads it;
    any other is its luminance."""
    from PIL import Image

    from .images import open_image

    if isinstance(mask, (str, Path)):
        mask = open_image(mask, "the mask", field="mask")
    if not isinstance(mask, Image.Image):
        raise RequestError(f"mask: give a PIL image or an image file, not a {type(mask).__name__}", field="mask")
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def check_request(req, unet):
    """(the request with its mask read and fitted to the init image, warnings); Engine.resolve calls it.

    The documented behaviours: a mask of another size than the init image is resized to it (Lanczos, as diffusers
    resizes masks); an all-black mask (nothing marked to repaint) runs as diffusers runs it - an ordinary UNet gives
    the init image back through the VAE, an inpainting UNet its own redraw of it - and padding_mask_crop is then
    ignored (its crop region would be empty); an all-white mask repaints everything (at strength < 1 an ordinary
    UNet's result is then image-to-image's). Each says so in a warning. req.init_image must be a PIL image.
    """
    inpainting_unet(unet)  # refuses UNets with other extra inputs
    from PIL import Image

    warnings = []
    mask = read_mask(req.mask)
    size = req.init_image.size
    if mask.size != size:
        warnings.append(f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is {size[0]}x{size[1]}: the "
                        "mask is resized to the image")
        mask = mask.resize(size, resample=Image.Resampling.LANCZOS)
    lo, hi = mask.getextrema()
    if hi < 128:  # below diffusers' binarization threshold (0.5) everywhere
        what = ("padding_mask_crop is ignored and " if req.padding_mask_crop is not None else "")
        warnings.append(f"the mask is all black (white marks what to repaint): nothing is repainted; {what}the "
                        "result is the init image as the model redraws it")
    elif lo >= 128:
        warnings.append("the mask is all white: the whole image is repainted (the init image only guides it through "
                        "strength < 1 or, with an inpainting model, not at all)")
    return replace(req, mask=mask), warnings


@lru_cache(maxsize=8)
def processors(vae_factor):
    """diffusers' inpainting pipelines' image and mask processors (Lanczos resize; the mask grayscale, binarized)."""
    from diffusers.image_processor import VaeImageProcessor

    return (VaeImageProcessor(vae_scale_factor=vae_factor),
            VaeImageProcessor(vae_scale_factor=vae_factor, do_normalize=False, do_binarize=True,
                              do_convert_grayscale=True))


def blur(mask, radius):
    """The mask's edge softened as diffusers' mask_processor.blur (a Gaussian of this radius; A1111's mask_blur)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.blur(mask, radius) if radius > 0 else mask


def crop_region(mask, width, height, pad):
    """(x1, y1, x2, y2): the mask's bounding box plus pad, widened to width:height (diffusers' get_crop_region);
    None for an empty mask, whose region diffusers cannot compute."""
    from diffusers.image_processor import VaeImageProcessor

    if mask.getbbox() is None:
        return None
    return VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)


def prepare(engine, req, sched, gens, randn, shape):
    """The Job of a resolved inpainting request (check_request has run): first latents, extra channels or blend.

    randn(shape) draws one unit-noise tensor per image from its generator; gens are those generators (VAE latent
    sampling). Every image takes its own draws from its own generator, so an image depends only on its own seed
    (diffusers does the same when given one init image and mask per image).
    """
    images, masks = processors(engine.vae_factor)
    mask = blur(req.mask, req.mask_blur)
    crop = None if req.padding_mask_crop is None else crop_region(mask, req.width, req.height, req.padding_mask_crop)
    mode = "default" if crop is None else "fill"
    pixels = images.preprocess(req.init_image, height=req.height, width=req.width, crops_coords=crop,
                               resize_mode=mode).float()
    mask_px = masks.preprocess(mask, height=req.height, width=req.width, crops_coords=crop, resize_mode=mode)
    nine = inpainting_unet(engine.c.unet)
    strength = 1.0 if req.strength is None else req.strength
    from_noise = strength == 1.0  # diffusers' is_strength_max: pure noise, even where the init latents are known

    clean = engine.encode_pixels(pixels, gens) if not nine or not from_noise else None
    noise = randn(shape)
    latents = noise * sched.init_sigma if from_noise else sampling.add_noise(req.sampler, clean, noise, sched)
    batch, _, h, w = shape
    # nearest, as diffusers' prepare_mask_latents (torch's default mode)
    small = torch.nn.functional.interpolate(mask_px, size=(h, w)).to(engine.device).repeat(batch, 1, 1, 1)
    masked = pixels * (mask_px < 0.5)
    finish = list if crop is None else _paste_back(images, mask, req.init_image, crop)
    if nine:
        concat = torch.cat([small, engine.encode_pixels(masked, gens)], dim=1)
        return Job(latents, concat=concat, finish=finish)
    # diffusers encodes the masked image for a 4-channel UNet too and never uses it: its draws are taken (without
    # the encode) so that the sampler's later noise is the same
    draw = (1, engine.c.vae.config.latent_channels, h, w)
    for g in gens:
        torch.randn(draw, generator=g)
    return Job(latents, blend=_blend(req.sampler, clean, noise, small, sched.to(engine.device)), finish=finish)


def _blend(sampler, clean, noise, mask, sched):
    """blend(i, x): the kept region is the init latents noised to step i + 1 with the first noise (clean after the
    last step), the repainted region the sampler's x; diffusers' arithmetic, in the sampler's latent space."""
    last = len(sched) - 1
    keep = 1 - mask

    def blend(i, x):
        kept = sampling.add_noise(sampler, clean, noise, sched, index=i + 1) if i < last else clean
        return keep * kept + mask * x

    return blend


def _paste_back(images, mask, original, crop):
    """finish(images): each generated crop resized into its box of the original image, the original kept where
    the mask is black (diffusers' apply_overlay); the result has the init image's size."""

    def finish(generated):
        return [images.apply_overlay(mask, original, im, crop) for im in generated]

    return finish
