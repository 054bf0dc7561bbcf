"""The shipped default model (the shapes teacher): loads in fewstep and diffusers alike, and draws its world."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

import fewstep
from fewstep.default_model import default_model_path
from fewstep.worlds import shapes


def test_default_model_matches_diffusers():
    engine = fewstep.load(device="cpu", dtype="fp32", lcm=False)  # the teacher alone, as diffusers loads it
    assert engine.arch == "shapes"
    caption = "a green triangle in the center on a white background"
    ours = engine.generate(caption, sampler="euler", steps=10, guidance=4.0, seed=3).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(caption, num_inference_steps=10, guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
               height=64, width=64).images[0]
    assert np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 2


def test_default_model_draws_a_fixed_prompt_set_mostly_right_in_4_steps():
    # a regression guard on the shipped weights (teacher + its LCM-LoRA), not the quality claim
    engine = fewstep.load(device="cpu")
    assert engine.lcm_lora == "lcm" and engine.defaults() == dict(sampler="lcm", steps=4, guidance=1.0)
    attrs = shapes.sample_attributes(11, 8)
    result = engine.generate([a.caption for a in attrs], seeds=list(range(8)))
    assert result.steps_run == 4
    right = sum(shapes.detect(im) == a for im, a in zip(result.images, attrs))
    assert right >= 7, f"{right}/8 images have all four attributes right"


def test_shipped_outline_lora_over_the_default_engine():
    # the default engine (teacher + LCM-LoRA fused at load) plus the outline LoRA (1.0: outlined in 98% of the table)
    from fewstep.default_model import default_outline_lora

    engine = fewstep.load(device="cpu")
    engine.load_lora(default_outline_lora(), name="outline", weight=1.0)
    attrs = shapes.sample_attributes(12, 6, outline=True)
    result = engine.generate([a.caption for a in attrs], seeds=list(range(6)))
    found = [shapes.detect(im) for im in result.images]
    assert sum(f.content() == a.content() for f, a in zip(found, attrs)) >= 5
    assert sum(f.outline for f in found) >= 5
