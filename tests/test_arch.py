"""The model-family registry (fewstep.arch) agrees with itself, with the real configs it holds, and with every module
that reads it: single-file configs, LoRA width labels, the shapes teacher and its shipped files."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from fewstep import arch, default_model, singlefile
from fewstep.arch import PRESETS, REAL
from fewstep.lora import formats, reference
from fewstep.worlds.shapes import teacher
from tests.support.original_layout import unet_to_ldm, vae_to_ldm

SHIPPED = default_model.SHIPPED


@pytest.mark.parametrize("name", list(REAL))
def test_real_family_is_consistent(name):
    p = PRESETS[name]
    assert p.native_size == p.unet["sample_size"] * p.latent_factor == p.vae["sample_size"]
    assert p.cross_attention_dim == p.unet["cross_attention_dim"]
    assert len(p.tokenizers) == len(p.text) == (2 if p.xl else 1)
    assert p.force_zeros_for_empty_prompt == p.xl
    assert (p.unet.get("addition_embed_type") == "text_time") == p.xl
    assert p.text[0]["hidden_act"] == {"clip": "quick_gelu", "openclip": "gelu"}[p.text_kind]
    assert p.shift_factor is None
    if p.heads_per_block is None:  # one head per 64 channels, as singlefile infers it
        assert tuple(p.unet["attention_head_dim"]) == tuple(c // 64 for c in p.unet["block_out_channels"])
    with torch.device("meta"):
        vae = AutoencoderKL(**p.vae)
    assert vae.config.scaling_factor == p.scaling_factor
    assert 2 ** (len(vae.config.block_out_channels) - 1) == p.latent_factor


@pytest.mark.parametrize("name", list(REAL))
def test_detection_maps_real_configs_back(name):
    assert arch.detect(PRESETS[name].unet) == name
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PRESETS[name].unet)
    assert arch.detect(unet.config) == name  # with every default diffusers fills in


def test_shapes_family_matches_the_teacher_and_its_shipped_files():
    p, cfg = PRESETS["shapes"], teacher.TeacherConfig()
    assert p.native_size == cfg.size and p.native_size // p.latent_factor == cfg.latent_size
    assert p.cross_attention_dim == cfg.text_hidden
    unet_config = json.loads((SHIPPED / "unet" / "config.json").read_text())
    assert arch.detect(unet_config) == "shapes"
    assert unet_config["sample_size"] * p.latent_factor == p.native_size
    shipped = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    assert {k: shipped[k] for k in p.scheduler} == dict(p.scheduler)
    assert teacher.SCHEDULER == dict(p.scheduler)
    assert p.standard["guidance"] == default_model.TEACHER_DEFAULTS["guidance"] == 4.0


def test_schedulers_and_defaults():
    for name, p in PRESETS.items():
        # one noise schedule; only the shapes teacher spaces its timesteps otherwise
        assert {k: p.scheduler[k] for k in arch.SD_SCHEDULER if k != "timestep_spacing"} == {
            k: v for k, v in arch.SD_SCHEDULER.items() if k != "timestep_spacing"}, name
        assert p.scheduler["timestep_spacing"] == ("trailing" if name == "shapes" else "leading")
        assert p.scheduler["prediction_type"] == ("v_prediction" if name == "sd2" else "epsilon")
        EulerDiscreteScheduler(**p.scheduler)
        assert p.recipe == "lcm"
        if name != "shapes":
            assert dict(p.standard) == dict(sampler="euler", steps=25, guidance=7.5)
    with pytest.raises(TypeError):
        PRESETS["sd15"].scheduler["prediction_type"] = "v_prediction"  # shared: read-only


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_singlefile_infers_the_registry_values(name):
    p = PRESETS[name]
    with torch.device("meta"):
        state_dict = unet_to_ldm(UNet2DConditionModel(**p.unet).state_dict())
        state_dict |= vae_to_ldm(AutoencoderKL(**p.vae).state_dict())
    assert singlefile.detect_arch(state_dict) == name
    unet = singlefile.unet_config_from_state_dict(state_dict, name, pooled_dim=1280 if p.xl else None)
    vae = singlefile.vae_config_from_state_dict(state_dict, name)
    assert unet["sample_size"] * p.latent_factor == p.native_size
    assert unet["cross_attention_dim"] == p.cross_attention_dim
    assert unet["attention_head_dim"] == (p.heads_per_block or [c // 64 for c in p.unet["block_out_channels"]])
    assert (vae["sample_size"], vae["scaling_factor"]) == (p.native_size, p.scaling_factor)


def test_cross_attention_widths_name_the_families():
    for name, p in PRESETS.items():
        if name == "shapes":
            assert p.cross_attention_dim not in formats.CROSS_WIDTHS  # labels stay "SD 1.x/2.x-layout ..."
            continue
        title = "SDXL" if name == "ssd1b" else p.title
        assert formats.CROSS_WIDTHS[p.cross_attention_dim] == title
        assert formats.ArchGuess("xl" if p.xl else "sd", p.cross_attention_dim).label == title
        assert reference.CROSS_TO_ARCH[p.cross_attention_dim] == ("sdxl" if name == "ssd1b" else name)
    assert formats.CROSS_WIDTHS[1280] == "the SDXL refiner"
    assert set(reference.UNETS) == set(reference.TEXT) == set(reference.ARCHS) == {"sd15", "sd2", "sdxl"}


def test_random_lora_layout():
    from tests.support.tiny import tiny_sd

    unet = tiny_sd(0)["unet"]
    sd = reference.random_lora(unet, ("to_q", "to_k"), rank=4, seed=1)
    names = reference.target_modules(unet, ("to_q", "to_k"))
    assert names and len(sd) == 3 * len(names)
    key = "lora_unet_" + names[0].replace(".", "_")
    assert sd[f"{key}.lora_down.weight"].shape == (4, unet.get_submodule(names[0]).weight.shape[1])
    assert sd[f"{key}.alpha"].item() == 4.0 and all(t.dtype == torch.float16 for t in sd.values())
    again = reference.random_lora(unet, ("to_q", "to_k"), rank=4, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_arch_imports_no_torch():
    code = "import sys, fewstep.arch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
