"""fewstep's images equal diffusers' pipelines' images for the same tiny model, seed and parameters (fp32, CPU)."""

import numpy as np
import pytest
import torch
from diffusers import (EulerDiscreteScheduler, LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline,
                       LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, TCDScheduler)
from PIL import Image

import fewstep

PROMPT = "a red circle in the top left on a blue background"


def assert_same(ours, theirs, tol=2):
    for a, b in zip(ours, theirs, strict=True):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol, f"max pixel difference {np.abs(a - b).max()} > {tol}"


def gens(seed, n=1):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def sd(models):
    path = models("sd")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return fewstep.load(path, device="cpu", dtype="fp32", lcm=False), pipe


@pytest.fixture(scope="module")
def sdxl(models):
    path = models("sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return fewstep.load(path, device="cpu", dtype="fp32", lcm=False), pipe


def lcm(pipe):
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (1.5, "blurry"), (1.5, None)])
def test_sd_lcm(sd, guidance, negative):
    engine, pipe = sd
    ours = engine.generate(PROMPT, sampler="lcm", steps=4, guidance=guidance, negative_prompt=negative, seed=11)
    ref = lcm(pipe)(PROMPT, num_inference_steps=4, guidance_scale=guidance, negative_prompt=negative,
                    generator=gens(11), height=64, width=64).images
    assert ours.timesteps == [999, 759, 499, 259]
    assert_same(ours.images, ref)


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (1.5, "blurry"), (1.5, None)])
def test_sdxl_lcm(sdxl, guidance, negative):
    engine, pipe = sdxl
    ours = engine.generate(PROMPT, sampler="lcm", steps=4, guidance=guidance, negative_prompt=negative, seed=5)
    ref = lcm(pipe)(PROMPT, num_inference_steps=4, guidance_scale=guidance, negative_prompt=negative,
                    generator=gens(5), height=64, width=64).images
    assert_same(ours.images, ref)


def test_sd_euler_25_steps(sd):
    engine, pipe = sd
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ours = engine.generate(PROMPT, sampler="euler", steps=25, guidance=7.5, seed=3)
    ref = pipe(PROMPT, num_inference_steps=25, guidance_scale=7.5, generator=gens(3), height=64, width=64).images
    assert ours.steps_run == 25
    assert_same(ours.images, ref)


def test_sdxl_euler_is_the_default_without_lcm(sdxl):
    engine, pipe = sdxl
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ours = engine.generate(PROMPT, seed=8, num_images=1, steps=10)
    assert ours.params["sampler"] == "euler" and ours.params["guidance"] == 7.5
    ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=7.5, generator=gens(8), height=64, width=64).images
    assert_same(ours.images, ref)


def test_sd_tcd(sd):
    engine, pipe = sd
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ours = engine.generate(PROMPT, sampler="tcd", steps=4, guidance=1.0, gamma=0.3, seed=2)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, eta=0.3, generator=gens(2), height=64,
               width=64).images
    assert_same(ours.images, ref)


def test_several_prompts_and_images_each_with_its_own_seed(sd):
    engine, pipe = sd
    prompts = [PROMPT, "a green square"]
    ours = engine.generate(prompts, sampler="lcm", steps=2, guidance=1.0, num_images=2, seed=100)
    assert ours.seeds == [100, 101, 102, 103]
    ref = lcm(pipe)(prompts, num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=2,
                    generator=gens(100, 4), height=64, width=64).images
    assert_same(ours.images, ref)
    # each image depends only on its own prompt and seed: the third image alone is the same
    alone = engine.generate("a green square", sampler="lcm", steps=2, guidance=1.0, seed=102)
    assert_same(alone.images, ours.images[2:3])


def test_v_prediction(models):
    path = models("sd2")
    engine = fewstep.load(path, device="cpu", dtype="fp32", lcm=False)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert engine.noise_schedule.prediction_type == "v_prediction"
    ours = engine.generate(PROMPT, sampler="euler", steps=8, guidance=3.0, seed=1)
    ref = pipe(PROMPT, num_inference_steps=8, guidance_scale=3.0, generator=gens(1), height=64, width=64).images
    assert_same(ours.images, ref)
    ours = engine.generate(PROMPT, sampler="lcm", steps=4, guidance=1.0, seed=1)
    ref = lcm(pipe)(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=gens(1), height=64, width=64).images
    assert_same(ours.images, ref)


def _lcm_pipe(cls, path):
    sd = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe = cls(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
               scheduler=LCMScheduler.from_config(sd.scheduler.config), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_full_lcm_uses_the_guidance_embedding(models):
    path = models("sd-lcm")
    engine = fewstep.load(path, device="cpu", dtype="fp32")  # lcm=True: a full LCM needs no LoRA
    assert engine.full_lcm and not engine.loras
    ours = engine.generate(PROMPT, seed=4)
    assert ours.params["guidance"] == 8.5 and ours.steps_run == 4
    ref = _lcm_pipe(LatentConsistencyModelPipeline, path)(PROMPT, num_inference_steps=4, guidance_scale=8.5,
                                                          generator=gens(4), height=64, width=64).images
    assert_same(ours.images, ref)


def init_image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_img2img_lcm_runs_every_requested_step(models):
    path = models("sd-lcm")
    engine = fewstep.load(path, device="cpu", dtype="fp32")
    ours = engine.generate(PROMPT, init_image=init_image(), strength=0.5, steps=4, seed=6)
    assert ours.timesteps == [499, 379, 259, 139]
    ref = _lcm_pipe(LatentConsistencyModelImg2ImgPipeline, path)(
        PROMPT, image=init_image(), strength=0.5, num_inference_steps=4, guidance_scale=8.5, generator=gens(6)).images
    assert_same(ours.images, ref)


def test_img2img_euler_slices_the_schedule(sd, models):
    engine, _ = sd
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(models("sd"), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = engine.generate(PROMPT, init_image=init_image(1), strength=0.6, sampler="euler", steps=10, guidance=7.5,
                           seed=9)
    assert ours.steps_run == 6
    ref = pipe(PROMPT, image=init_image(1), strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               generator=gens(9)).images
    assert_same(ours.images, ref)


def test_sdxl_img2img_euler(sdxl, models):
    engine, _ = sdxl
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(models("sdxl"))
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ours = engine.generate(PROMPT, init_image=init_image(2), strength=0.5, sampler="euler", steps=8, guidance=1.0,
                           seed=12)
    ref = pipe(PROMPT, image=init_image(2), strength=0.5, num_inference_steps=8, guidance_scale=1.0,
               generator=gens(12)).images
    assert_same(ours.images, ref)


def test_explicit_seeds_give_the_images_of_separate_requests(sd):
    engine, _ = sd
    batch = engine.generate(["a cat", "a dog"], seeds=[7, 3], sampler="lcm", steps=2, guidance=1.0)
    assert batch.seeds == [7, 3]
    dog = engine.generate("a dog", seed=3, sampler="lcm", steps=2, guidance=1.0)
    assert_same(batch.images[1:], dog.images, tol=1)


def test_a_callback_can_cancel(sd):
    from fewstep.errors import Cancelled

    engine, _ = sd
    calls = []

    def stop(i, n):
        calls.append(i)
        raise Cancelled("client gone")

    with pytest.raises(Cancelled):
        engine.generate("a cat", sampler="lcm", steps=4, guidance=1.0, seed=0, callback=stop)
    assert calls == [0]
