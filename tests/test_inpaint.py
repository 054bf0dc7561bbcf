"""Inpainting equals diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline (fp32, CPU) with
9-channel inpainting UNets and ordinary 4-channel ones; inpainting models load from folders and single files; bad
inputs are clear errors or documented behaviours."""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import fewstep
from fewstep.errors import LoadError, RequestError
from tests.support.images import assert_close_images, max_diff
from tests.support.loras import lora_targets, make_lora, random_factors
from tests.support.original_layout import UNET, to_original
from tests.support.tiny import tiny_sd, tiny_sdxl

PROMPT = "a red circle in the top left on a blue background"
PARITY_TOL = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def with_inpainting_unet(parts, seed):
    """The components with a 9-channel UNet of the same layout (latents + mask + masked-image latents)."""
    torch.manual_seed(seed + 100)
    config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    parts["unet"] = UNet2DConditionModel(**dict(config, in_channels=9)).eval()
    return parts


def init_image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_image(size=64, box=(13, 9, 37, 30)):
    """A rectangle and a disc, off the 8 px latent grid."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    draw.rectangle(box, fill=255)
    draw.ellipse((30, 34, 50, 52), fill=255)
    return im


def gens(seed, n=1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    sd9 = with_inpainting_unet(tiny_sd(0), 0)
    StableDiffusionInpaintPipeline(**sd9, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(root / "sd9")
    StableDiffusionXLInpaintPipeline(**with_inpainting_unet(tiny_sdxl(0), 1)).save_pretrained(root / "sdxl9")
    return {"sd9": root / "sd9", "sdxl9": root / "sdxl9", "sd4": models("sd"), "sdxl4": models("sdxl"),
            "sd9-parts": sd9}


@pytest.fixture(scope="module")
def setups(folders):
    """name -> (engine, diffusers pipeline, the pipeline's scheduler config), built on first use."""
    made = {}

    def get(name):
        if name not in made:
            path = folders[name]
            if name.startswith("sdxl"):
                pipe = StableDiffusionXLInpaintPipeline.from_pretrained(path)
            else:
                pipe = StableDiffusionInpaintPipeline.from_pretrained(path, safety_checker=None,
                                                                      requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            made[name] = fewstep.load(path, device="cpu", dtype="fp32", lcm=False), pipe, dict(pipe.scheduler.config)
        return made[name]

    return get


def scheduler(kind, config):
    if kind == "lcm":
        return LCMScheduler.from_config(config)
    if kind == "hyper-sd":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if kind == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    return EulerDiscreteScheduler.from_config(config)


LCM4 = (999, 759, 499, 259)  # diffusers' inpaint pipelines slice LCMScheduler's 4 steps by strength; so do these

# model, recipe or sampler, steps, strength, guidance, mask_blur, padding_mask_crop, images
CASES = [
    ("sd9", "lcm", 4, 1.0, 1.0, 0, None, 1),
    ("sd9", "lcm", 4, 0.75, 1.5, 0, None, 1),
    ("sd9", "euler", 4, 0.75, 3.0, 3, None, 1),
    ("sd9", "hyper-sd", 4, 1.0, 0.0, 0, 4, 1),
    ("sd4", "lcm", 4, 1.0, 1.0, 2, None, 2),
    ("sd4", "lcm", 4, 0.75, 1.0, 0, 2, 1),
    ("sd4", "hyper-sd", 4, 0.75, 0.0, 0, 4, 1),
    ("sd4", "euler_a", 4, 1.0, 2.0, 0, None, 1),
    ("sdxl9", "lcm", 4, 1.0, 1.0, 0, 2, 1),
    ("sdxl9", "euler", 4, 0.75, 3.0, 2, None, 1),
    ("sdxl4", "lcm", 4, 0.75, 1.0, 2, None, 1),
    ("sdxl4", "euler", 4, 1.0, 1.0, 0, 6, 1),
]


@pytest.mark.parametrize("model,kind,steps,strength,guidance,blur,crop,n", CASES)
def test_equals_diffusers(setups, model, kind, steps, strength, guidance, blur, crop, n):
    engine, pipe, config = setups(model)
    image, mask = init_image(1), mask_image()
    how = dict(recipe="hyper-sd") if kind == "hyper-sd" else dict(sampler=kind)
    if kind == "lcm":
        how["timesteps"] = LCM4
    else:
        how["steps"] = steps
    ours = engine.generate(PROMPT, init_image=image, mask=mask, strength=strength, guidance=guidance, mask_blur=blur,
                           padding_mask_crop=crop, num_images=n, seed=21, **how)
    pipe.scheduler = scheduler(kind, config)
    blurred = pipe.mask_processor.blur(mask, blur_factor=blur) if blur else mask
    # one init image and mask per image: diffusers then samples each image's latents from its own generator
    many = (lambda x: [x] * n) if n > 1 else (lambda x: x)
    ref = pipe(many(PROMPT), image=many(image), mask_image=many(blurred), strength=strength,
               num_inference_steps=steps, guidance_scale=guidance, generator=gens(21, n), height=64, width=64,
               padding_mask_crop=crop).images
    assert ours.steps_run == (steps if strength == 1.0 else int(steps * strength))
    assert len(ours.images) == n
    for a, b in zip(ours.images, ref, strict=True):
        assert_close_images(a, b, PARITY_TOL)
    if crop is not None and not blur:
        # pasted back: outside the mask, the init image itself
        kept = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(ours.images[0])[kept], np.asarray(image)[kept])


def test_lcm_lora_fuses_into_an_inpainting_unet(setups, tmp_path):
    """The LCM-LoRA's targets (no conv_in) have the same shapes in a 9-channel UNet: it fuses, equal to diffusers;
    a LoRA written for a 4-channel conv_in is refused and leaves the weights as they were."""
    engine, pipe, config = setups("sd9")
    unet = engine.c.unet
    lcm = tmp_path / "lcm.safetensors"
    save_file(make_lora({"unet": random_factors(unet, lora_targets(unet), rank=8, seed=1, scale=0.15)}, alpha=4),
              str(lcm))
    report = engine.load_lora(str(lcm), name="lcm", lcm=True)
    try:
        assert not report.unmatched
        ours = engine.generate(PROMPT, init_image=init_image(2), mask=mask_image(), strength=1.0, seed=3)
        assert ours.params["sampler"] == "lcm" and ours.steps_run == 4
    finally:
        engine.unload_loras()
    pipe.scheduler = LCMScheduler.from_config(config)
    pipe.load_lora_weights(str(lcm), adapter_name="lcm")
    try:
        ref = pipe(PROMPT, image=init_image(2), mask_image=mask_image(), strength=1.0, num_inference_steps=4,
                   guidance_scale=1.0, generator=gens(3), height=64, width=64).images
    finally:
        pipe.unload_lora_weights()
    assert_close_images(ours.images[0], ref[0], PARITY_TOL)

    four = setups("sd4")[0].c.unet
    bad = tmp_path / "conv-in.safetensors"
    save_file(make_lora({"unet": random_factors(four, ["conv_in", *lora_targets(four)], seed=2)}, alpha=4), str(bad))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(LoadError, match="conv_in|does not fit"):
        engine.load_lora(str(bad), name="bad")
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items()) and not engine.loras


def test_single_file_inpainting_checkpoint_equals_the_folder(setups, folders, tmp_path):
    from fewstep import singlefile

    path = tmp_path / "sd15-inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(folders["sd9-parts"], "sd15").items()}, str(path))
    one = fewstep.load(path, device="cpu", dtype="fp32", lcm=False)
    assert one.arch == "sd15" and one.c.unet.config.in_channels == 9
    kw = dict(init_image=init_image(3), mask=mask_image(), strength=0.75, sampler="euler", steps=4, guidance=2.0,
              seed=5)
    assert_close_images(one.generate(PROMPT, **kw).images[0], setups("sd9")[0].generate(PROMPT, **kw).images[0])
    # SD 2 inpainting predicts epsilon, unlike the SD 2.x 768-v checkpoints without a marker
    conv_in = {UNET + "input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}
    assert singlefile._prediction_type("sd2", conv_in, {}) == "epsilon"


def test_bad_inputs(setups, tmp_path):
    engine = setups("sd4")[0]
    with pytest.raises(RequestError) as e:
        fewstep.GenerateRequest(prompt=PROMPT, mask=mask_image())
    assert e.value.field == "mask"
    text = tmp_path / "mask.png"
    text.write_text("not an image")
    for bad in (text, tmp_path / "absent.png", 42):
        with pytest.raises(RequestError, match="mask") as e:
            engine.generate(PROMPT, init_image=init_image(), mask=bad, sampler="lcm", steps=1)
        assert e.value.field == "mask"
    with pytest.raises(RequestError, match="inpainting model.*mask") as e:
        setups("sd9")[0].generate(PROMPT, sampler="lcm", steps=1)
    assert e.value.field == "mask"


def test_documented_behaviours(setups):
    engine = setups("sd4")[0]
    kw = dict(init_image=init_image(4), strength=1.0, sampler="lcm", steps=2, guidance=1.0, seed=8)
    small = mask_image(32, box=(6, 4, 18, 15))
    resized = engine.generate(PROMPT, mask=small, **kw)
    assert any("mask is 32x32" in w and "resized" in w for w in resized.warnings)
    same = engine.generate(PROMPT, mask=small.resize((64, 64), Image.Resampling.LANCZOS), **kw)
    assert not any("resized" in w for w in same.warnings)
    assert max_diff(resized.images[0], same.images[0]) == 0

    black = engine.generate(PROMPT, mask=Image.new("L", (64, 64), 0), padding_mask_crop=4, **kw)
    assert any("all black" in w and "padding_mask_crop is ignored" in w for w in black.warnings)
    # a 4-channel UNet puts the init latents back everywhere: the init image through the VAE
    through_vae = engine.decode(engine.encode_image(init_image(4), 64, 64, gens(8)))[0]
    assert max_diff(black.images[0], through_vae) <= 1
    white = engine.generate(PROMPT, mask=Image.new("RGBA", (64, 64), (255, 255, 255, 255)), **kw)
    assert any("all white" in w for w in white.warnings)
    # a mask drawn on a transparent canvas is its alpha channel (A1111's reading)
    drawn = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    drawn.putalpha(mask_image())
    assert_close_images(engine.generate(PROMPT, mask=drawn, **kw).images[0],
                        engine.generate(PROMPT, mask=mask_image(), **kw).images[0], 0)
