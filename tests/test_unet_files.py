"""UNet-only files (--unet: a Lightning / DMD2 / Hyper-SD distilled UNet) in every layout they ship in, replacing the
base model's UNet with the architecture checked; the recipe their name says; the same image as diffusers with that
UNet and the recipe's scheduler."""

import json

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

import fewstep
from fewstep.cli import main
from fewstep.errors import LoadError
from tests.support.images import assert_close_images, max_diff
from tests.support.original_layout import unet_to_ldm
from tests.support.tiny import tiny_sd, tiny_sdxl

PROMPT = "a red circle in the top left on a blue background"


@pytest.fixture(scope="module")
def distilled():
    """A UNet of the tiny SDXL architecture with other weights: what a distilled UNet file holds."""
    return tiny_sdxl(seed=5)["unet"]


def test_unet_file_replaces_the_models_unet_and_equals_diffusers(models, distilled, tmp_path):
    path = models("sdxl")
    file = tmp_path / "sdxl_lightning_4step_unet.safetensors"
    save_file(distilled.state_dict(), str(file))
    engine = fewstep.load(path, device="cpu", dtype="fp32", unet=file)
    assert engine.recipe == "lightning" and not engine.loras  # the recipe its name says; no LCM-LoRA joins it
    ours = engine.generate(PROMPT, seed=3)
    assert (ours.params["recipe"], ours.steps_run, ours.params["guidance"]) == ("lightning", 4, 0.0)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, unet=distilled)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(3),
               height=64, width=64).images[0]
    assert_close_images(ours.images[0], ref, 2)
    base = fewstep.load(path, device="cpu", dtype="fp32", lcm=False).generate(PROMPT, seed=3, recipe="lightning")
    assert max_diff(base.images[0], ref) > 2  # the UNet really was replaced


@pytest.mark.parametrize("layout", ["diffusers", "ldm-prefixed", "ldm-bare", "folder", "pickle"])
def test_every_layout_loads_the_same_weights(models, distilled, tmp_path, layout):
    want = distilled.state_dict()
    if layout == "folder":
        src = tmp_path / "unet"
        distilled.save_pretrained(src)
    elif layout == "pickle":
        src = tmp_path / "dmd2_unet.bin"
        torch.save(want, src)
        with pytest.raises(LoadError, match="allow-pickle"):
            fewstep.load(models("sdxl"), device="cpu", dtype="fp32", unet=src)
    else:
        sd = want if layout == "diffusers" else unet_to_ldm(want)
        if layout == "ldm-bare":
            sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
        src = tmp_path / f"unet-{layout}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    engine = fewstep.load(models("sdxl"), device="cpu", dtype="fp32", lcm=False, unet=src,
                          allow_pickle=layout == "pickle")
    got = engine.c.unet.state_dict()
    assert got.keys() == want.keys()
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst == 0.0  # a copy of the file's values (converting layouts moves tensors, it does not compute)
    assert engine.recipe == ("dmd2" if layout == "pickle" else None)


def test_a_unet_for_another_architecture_is_refused_before_anything_runs(models, tmp_path):
    file = tmp_path / "sd15_unet.safetensors"
    save_file(tiny_sd()["unet"].state_dict(), str(file))
    with pytest.raises(LoadError, match="does not fit this SDXL model's UNet"):
        fewstep.load(models("sdxl"), device="cpu", dtype="fp32", unet=file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="config.json"):
        fewstep.load(models("sdxl"), device="cpu", dtype="fp32", unet=tmp_path / "empty")
    with pytest.raises(LoadError, match="not found"):
        fewstep.load(models("sdxl"), device="cpu", dtype="fp32", unet=tmp_path / "nothing.safetensors")


def test_cli_unet_and_lora_info_name_the_recipe(capsys, models, distilled, tmp_path):
    from tests.support.loras import random_lora

    file = tmp_path / "Hyper-SDXL-2steps-unet.safetensors"
    save_file(distilled.state_dict(), str(file))
    code = main(["generate", PROMPT, "--model", str(models("sdxl")), "--unet", str(file), "--out", str(tmp_path),
                 "--seed", "1", "--dtype", "fp32", "--json", "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["recipe"] == "hyper-sd" and data["images"][0]["steps"] == 2 and data["sampler"] == "ddim"
    lora_file = tmp_path / "sdxl_lightning_2step_lora.safetensors"
    save_file(random_lora(distilled), str(lora_file))
    assert main(["lora", "info", str(lora_file)]) == 0
    text = capsys.readouterr().out
    assert "looks like lightning" in text and "2 steps" in text and "--recipe lightning" in text
    # a few-step LoRA replaces the LCM-LoRA and sets the recipe and steps its name says
    code = main(["generate", PROMPT, "--model", str(models("sdxl")), "--lora", str(lora_file), "--out",
                 str(tmp_path), "--seed", "1", "--dtype", "fp32", "--json", "-q"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["recipe"] == "lightning" and data["images"][0]["steps"] == 2 and "lcm" not in data["loras"]
