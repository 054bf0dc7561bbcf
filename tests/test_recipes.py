"""Every recipe equals what diffusers produces with the recipe's documented scheduler and settings, on SD1.5- and
SDXL-like tiny models, for the same seed (within 2/255, fp32 CPU); the recipe registry, its detection from file names,
and the warnings a recipe that does not fit gets."""

import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       TCDScheduler)

import fewstep
from fewstep.errors import RequestError
from fewstep.recipes import RECIPES, detect, get_recipe
from tests.support.images import assert_close_images, max_diff
from tests.test_parity import init_image

PROMPT = "a red circle in the top left on a blue background"
TOL = 2  # of 255: two implementations of the same sums in fp32


def reference(name, config):
    """(scheduler, pipeline call kwargs) a diffusers user runs for the recipe, from its model card."""
    trailing = dict(timestep_spacing="trailing")
    return {
        "lcm": (LCMScheduler.from_config(config), dict(num_inference_steps=4, guidance_scale=1.0)),
        "tcd": (TCDScheduler.from_config(config), dict(num_inference_steps=4, guidance_scale=1.0, eta=0.3)),
        "lightning": (EulerDiscreteScheduler.from_config(config, **trailing),
                      dict(num_inference_steps=4, guidance_scale=0.0)),
        "hyper-sd": (DDIMScheduler.from_config(config, **trailing), dict(num_inference_steps=4, guidance_scale=0.0)),
        "hyper-sd-tcd": (TCDScheduler.from_config(config), dict(num_inference_steps=1, guidance_scale=0.0, eta=1.0)),
        "hyper-sd-unet": (LCMScheduler.from_config(config), dict(timesteps=[800], guidance_scale=0.0)),
        "hyper-sd-cfg": (DDIMScheduler.from_config(config, **trailing),
                         dict(num_inference_steps=8, guidance_scale=5.0, negative_prompt="blurry")),
        "dmd2": (LCMScheduler.from_config(config), dict(timesteps=[999, 749, 499, 249], guidance_scale=0.0)),
        "pcm": (DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, **trailing),
                dict(num_inference_steps=4, guidance_scale=1.0)),
        "pcm-cfg": (DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False, **trailing),
                    dict(num_inference_steps=4, guidance_scale=3.0, negative_prompt="blurry")),
        "turbo": (EulerAncestralDiscreteScheduler.from_config(config, **trailing),
                  dict(num_inference_steps=1, guidance_scale=0.0)),
    }[name]


@pytest.fixture(scope="module")
def tiny(models):
    made = {}

    def get(kind):
        if kind not in made:
            path = models(kind)
            cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
            extra = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
            pipe = cls.from_pretrained(path, **extra)
            pipe.set_progress_bar_config(disable=True)
            made[kind] = fewstep.load(path, device="cpu", dtype="fp32", lcm=False), pipe
        return made[kind]

    return get


FEW_STEP = [n for n in RECIPES if n != "standard"]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("name", FEW_STEP)
def test_recipe_equals_diffusers(tiny, kind, name):
    engine, pipe = tiny(kind)
    scheduler, kw = reference(name, engine.c.scheduler_config)
    pipe.scheduler = scheduler
    # the recipe's defaults alone: sampler, spacing, steps, timesteps, guidance, eta
    ours = engine.generate(PROMPT, recipe=name, seed=4, negative_prompt=kw.get("negative_prompt"))
    ref = pipe(PROMPT, generator=torch.Generator().manual_seed(4), height=64, width=64, **kw).images[0]
    assert ours.timesteps == [int(t) for t in pipe.scheduler.timesteps]
    assert ours.params["recipe"] == name and ours.params["sampler"] == get_recipe(name).sampler
    assert_close_images(ours.images[0], ref, TOL)


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_lightning_and_hyper_step_counts(tiny, steps):
    engine, pipe = tiny("sdxl")
    for name in ("lightning", "hyper-sd"):
        scheduler, kw = reference(name, engine.c.scheduler_config)
        pipe.scheduler = scheduler
        ours = engine.generate(PROMPT, recipe=name, steps=steps, seed=2)
        ref = pipe(PROMPT, generator=torch.Generator().manual_seed(2), height=64, width=64,
                   **dict(kw, num_inference_steps=steps)).images[0]
        assert_close_images(ours.images[0], ref, TOL)


def test_lightning_one_step_x0_unet_predicts_the_sample(models):
    path = models("sdxl")
    engine = fewstep.load(path, device="cpu", dtype="fp32", lcm=False, prediction_type="sample")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                        prediction_type="sample")
    ours = engine.generate(PROMPT, recipe="lightning", steps=1, seed=6)
    ref = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(6),
               height=64, width=64).images[0]
    assert_close_images(ours.images[0], ref, TOL)
    plain = fewstep.load(path, device="cpu", dtype="fp32", lcm=False)
    other = plain.generate(PROMPT, recipe="lightning", steps=1, seed=6).images[0]
    assert max_diff(other, ref) > TOL  # the override is what made them equal


@pytest.mark.parametrize("name,steps,strength,runs", [("turbo", 2, 0.5, 1), ("hyper-sd", 4, 0.5, 2),
                                                      ("lightning", 4, 0.75, 3)])
def test_img2img_recipes(tiny, models, name, steps, strength, runs):
    engine, _ = tiny("sd")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(models("sd"), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler, kw = reference(name, engine.c.scheduler_config)
    ours = engine.generate(PROMPT, recipe=name, steps=steps, init_image=init_image(3), strength=strength, seed=1)
    ref = pipe(PROMPT, image=init_image(3), strength=strength, generator=torch.Generator().manual_seed(1),
               **dict(kw, num_inference_steps=steps)).images[0]
    assert ours.steps_run == runs
    assert_close_images(ours.images[0], ref, TOL)


def test_turbo_img2img_needs_steps_times_strength_of_one(tiny):
    engine, _ = tiny("sd")
    with pytest.raises(RequestError, match="steps x strength must be at least 1") as e:
        engine.generate(PROMPT, recipe="turbo", init_image=init_image(0), strength=0.5)
    assert e.value.field == "strength"


def test_defaults_follow_the_active_adapter_recipe(models, tmp_path):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora
    from tests.support.tiny import tiny_sd

    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    assert engine.default_recipe() == "standard" and engine.lcm_lora is None
    save_file(random_lora(tiny_sd()["unet"]), str(tmp_path / "l.safetensors"))
    engine.load_lora(str(tmp_path / "l.safetensors"), name="fast", recipe="lightning")
    out = engine.generate(PROMPT, seed=0)
    assert (out.params["recipe"], out.params["sampler"], out.steps_run, out.params["guidance"]) == \
        ("lightning", "euler", 4, 0.0)
    assert engine.lcm_lora == "fast"
    # the recipe is a property of the adapter: at weight 0 the model's standard defaults come back
    engine.set_lora_weights({"fast": 0})
    assert engine.default_recipe() == "standard" and engine.defaults()["steps"] == 25
    engine.set_lora_weights({"fast": 1})
    mismatch = engine.generate(PROMPT, seed=0, recipe="dmd2")
    assert any("does not fit" in w and "lightning" in w for w in mismatch.warnings)
    bare = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False).generate(PROMPT, seed=0, recipe="pcm")
    assert any("no PCM" in w for w in bare.warnings)
    with pytest.raises(RequestError, match="unknown recipe") as e:
        engine.load_lora(str(tmp_path / "l.safetensors"), name="x", recipe="nope")
    assert e.value.field == "recipe" and set(engine.loras) == {"fast"}


def test_request_errors_name_their_field(tiny):
    engine, _ = tiny("sd")
    for kw, field in [(dict(recipe="warp"), "recipe"), (dict(sampler="dpm"), "sampler"), (dict(width=63), "width"),
                      (dict(steps=51, sampler="lcm"), "steps"), (dict(timesteps=(999, 999)), "timesteps"),
                      (dict(recipe="lightning", timesteps=(999, 500)), "timesteps"), (dict(gamma=2.0), "gamma")]:
        with pytest.raises(RequestError) as e:
            engine.generate(PROMPT, **kw)
        assert e.value.field == field, (kw, str(e.value))


@pytest.mark.parametrize("file,recipe,steps", [
    ("sdxl_lightning_4step_lora.safetensors", "lightning", 4),
    ("sdxl_lightning_1step_unet_x0.safetensors", "lightning", 1),
    ("Hyper-SDXL-8steps-lora.safetensors", "hyper-sd", 8),
    ("Hyper-SD15-1step-lora.safetensors", "hyper-sd-tcd", 1),
    ("Hyper-SDXL-1step-Unet.safetensors", "hyper-sd-unet", 1),
    ("Hyper-SDXL-12steps-CFG-lora.safetensors", "hyper-sd-cfg", 12),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", "dmd2", 4),
    ("pcm_sdxl_smallcfg_4step_converted.safetensors", "pcm", 4),
    ("pcm_sd15_normalcfg_8step_converted.safetensors", "pcm-cfg", 8),
    ("sd_xl_turbo_1.0_fp16.safetensors", "turbo", None),
    ("lcm-lora-sdv1-5.safetensors", "lcm", None),
    ("TCD-SDXL-LoRA.safetensors", "tcd", None),
    ("toy_face_sdxl.safetensors", None, None),
])
def test_file_names_suggest_their_recipe(file, recipe, steps):
    assert detect(file) == (recipe, steps)
