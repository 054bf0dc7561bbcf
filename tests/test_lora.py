"""The LCM-LoRA attach path: kohya and peft files fused, equal to diffusers' load_lora_weights, exactly undone."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

import fewstep
from fewstep.errors import LoadError
from tests.support.loras import random_lora
from tests.support.tiny import tiny_sd, tiny_sdxl


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("loras")
    unet = tiny_sd()["unet"]  # same seed and config as the saved "sd" model
    files = {}
    for layout in ("kohya", "peft"):
        files[layout] = root / f"{layout}.safetensors"
        save_file(random_lora(unet, layout=layout, scale=0.2), str(files[layout]))
    files["sdxl"] = root / "sdxl.safetensors"
    save_file(random_lora(tiny_sdxl()["unet"], scale=0.2), str(files["sdxl"]))
    return files


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lcm_lora_matches_diffusers_load_lora_weights(models, lora_files, layout):
    path = models("sd")
    engine = fewstep.load(path, device="cpu", dtype="fp32", lcm=str(lora_files[layout]))
    report = engine.loras["lcm"].report
    assert report.modules == len(engine.loras["lcm"].deltas) > 100 and not report.unmatched
    assert engine.defaults() == dict(sampler="lcm", steps=4, guidance=1.0)
    ours = engine.generate("a cat", seed=1).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
                height=64, width=64).images[0]
    pipe.load_lora_weights(str(lora_files[layout]))
    ref = pipe("a cat", num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
               height=64, width=64).images[0]
    assert np.abs(pixels(ref) - pixels(base)).max() > 20  # the LoRA really changes the image
    assert np.abs(pixels(ours) - pixels(ref)).max() <= 2


def test_unload_restores_the_base_weights_bit_exactly(models, lora_files):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    before = {k: v.clone() for k, v in engine.c.unet.state_dict().items()}
    engine.load_lora(str(lora_files["kohya"]), name="a", weight=1.0)
    engine.load_lora(str(lora_files["peft"]), name="b", weight=0.5)
    changed = [k for k, v in engine.c.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 100
    engine.set_lora_weights({"a": 0.3})
    engine.unload_lora("a")
    engine.unload_lora("b")
    after = engine.c.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_wrong_architecture_is_refused_and_leaves_the_model_untouched(models, lora_files):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    before = {k: v.clone() for k, v in engine.c.unet.state_dict().items()}
    with pytest.raises(LoadError, match="another architecture"):
        engine.load_lora(str(lora_files["sdxl"]))
    assert not engine.loras
    after = engine.c.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_unrelated_file_and_pickles_are_refused(models, tmp_path):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoadError, match="matches none"):
        engine.load_lora(str(tmp_path / "x.safetensors"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(LoadError, match="allow-pickle"):
        engine.load_lora(str(tmp_path / "x.ckpt"))
    with pytest.raises(LoadError, match="not found"):
        engine.load_lora(str(tmp_path / "missing.safetensors"))


def test_missing_published_lcm_lora_offline_is_a_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LoadError, match="latent-consistency/lcm-lora-sdv1-5 is not in the local Hugging Face cache"):
        fewstep.load(models("sd"), device="cpu", dtype="fp32")  # lcm=True: the published LoRA for sd15
