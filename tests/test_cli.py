"""fewstep generate: every flag, and every user mistake as one line and a non-zero exit."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fewstep.cli import main, parse_lora
from fewstep.images import read_parameters
from fewstep.lora.apply import lora_hash
from tests.support.loras import random_lora
from tests.support.tiny import tiny_sd


def run(capsys, *argv):
    code = main(["generate", *map(str, argv), "-q"])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out), err


def test_default_model_generates_with_metadata(capsys, tmp_path):
    from fewstep.worlds import shapes

    caption = "a red circle in the top left on a blue background"
    data, err = run_json(capsys, caption, "--out", tmp_path, "--seed", 7, "--dtype", "fp32")
    (image,) = data["images"]
    assert data["model"] == "shapes-teacher-v1" and data["arch"] == "shapes"
    assert image["seed"] == 7 and image["steps"] == data["timings"][0]["steps_run"]
    assert set(data["timings"][0]) >= {"text", "steps", "decode", "total"}
    png = Image.open(image["path"])
    params = read_parameters(png.text["parameters"])
    assert params["prompt"] == caption and params["Seed"] == "7" and params["Steps"] == str(image["steps"])
    assert params["Size"] == "64x64" and params["Model"] == "shapes-teacher-v1"
    assert shapes.detect(png) == shapes.parse_caption(caption)  # the shipped model draws what it is asked


def test_same_seed_same_image_and_random_seed_is_reported(capsys, tmp_path):
    a, _ = run_json(capsys, "a cat", "--out", tmp_path / "a.png", "--seed", 5, "--dtype", "fp32")
    b, _ = run_json(capsys, "a cat", "--out", tmp_path / "b.png", "--seed", 5, "--dtype", "fp32")
    assert np.array_equal(np.asarray(Image.open(a["images"][0]["path"])), np.asarray(Image.open(b["images"][0]["path"])))
    c, _ = run_json(capsys, "a cat", "--out", tmp_path, "--dtype", "fp32")
    seed = c["images"][0]["seed"]
    assert isinstance(seed, int) and read_parameters(Image.open(c["images"][0]["path"]).text["parameters"])["Seed"] == str(seed)


def test_steps_range_makes_one_image_per_count_and_a_grid(capsys, tmp_path):
    data, _ = run_json(capsys, "a cat", "--steps", "1-3", "--out", tmp_path, "--seed", 1)
    assert [i["steps"] for i in data["images"]] == [1, 2, 3]
    assert Image.open(data["grid"]).size == (3 * 64, 64 + 14)


def test_num_images_seeds_size_sampler_timesteps(capsys, tmp_path):
    data, _ = run_json(capsys, "a cat", "--num-images", 2, "--seed", 10, "--width", 32, "--height", 48,
                       "--sampler", "tcd", "--gamma", 0.5, "--timesteps", "999,499", "--out", tmp_path)
    assert [i["seed"] for i in data["images"]] == [10, 11]
    assert all(i["timesteps"] == [999, 499] for i in data["images"])
    assert Image.open(data["images"][0]["path"]).size == (32, 48)
    params = read_parameters(Image.open(data["images"][1]["path"]).text["parameters"])
    assert params["Sampler"] == "TCD" and params["Seed"] == "11" and params["Timesteps"] == "999,499"


def test_img2img_reports_the_steps_run(capsys, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(tmp_path / "in.png")
    data, _ = run_json(capsys, "a cat", "--init-image", tmp_path / "in.png", "--strength", 0.5, "--steps", 4,
                       "--sampler", "lcm", "--out", tmp_path)
    assert data["images"][0]["timesteps"] == [499, 379, 259, 139]
    params = read_parameters(Image.open(data["images"][0]["path"]).text["parameters"])
    assert params["Denoising strength"] == "0.5"


def test_guidance_warnings(capsys, tmp_path):
    _, err = run_json(capsys, "a cat", "--negative", "blurry", "--guidance", 1, "--out", tmp_path, "--steps", 2)
    assert "negative prompt is ignored" in err
    _, err = run_json(capsys, "a cat", "--sampler", "lcm", "--guidance", 3, "--out", tmp_path)
    assert "burns" in err


def test_model_flag_no_lcm_and_lora_flags(capsys, tmp_path, models):
    data, _ = run_json(capsys, "a cat", "--model", models("sd"), "--no-lcm", "--steps", 3, "--out", tmp_path)
    assert data["sampler"] == "euler" and data["guidance"] == 7.5 and data["arch"] == "sd15"
    lora = tmp_path / "style.safetensors"
    save_file(random_lora(tiny_sd()["unet"]), str(lora))
    code, out, err = run(capsys, "a cat", "--model", models("sd"), "--lcm", lora, "--lora", f"{lora}:0.7", "-v",
                         "--out", tmp_path / "x.png", "--seed", 2)
    assert code == 0, err
    assert "tensors applied" in err and "seed 2" in out
    params = read_parameters(Image.open(tmp_path / "x.png").text["parameters"])
    # A1111's way: the LoRA as a tag in the prompt (the --lcm adapter is the recipe's, not named) and its hash
    assert params["prompt"] == "a cat <lora:style:0.7>"
    assert params["Lora hashes"] == f"style: {lora_hash(lora)}" and len(lora_hash(lora)) == 12


def test_parse_lora_keeps_paths_with_colons():
    assert parse_lora("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert parse_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


ERRORS = [
    (["--model", "/no/such/model"], "not found"),
    (["--width", 66], "not a multiple of 4"),
    (["--steps", 51, "--sampler", "lcm"], "more than"),
    (["--steps", "x-y"], "--steps takes"),
    (["--strength", 0.5], "only applies with --init-image"),
    (["--guidance", -1], "guidance must be >= 0"),
    (["--init-image", "/no/such.png"], "cannot read init image"),
    (["--init-image", "{png}", "--strength", 1.5], "strength must be in"),
    (["--timesteps", "999,abc"], "--timesteps takes"),
    (["--timesteps", "999,499", "--steps", 2], "not both"),
    (["--model", "{ckpt}"], "allow-pickle"),
    (["--model", "nobody-xyz/not-cached"], "not in the local Hugging Face cache"),
    (["--model", "{junk}"], "not a Stable Diffusion"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nope"], "device"),
    (["--lora", "/no/such/lora.safetensors"], "not found"),
]


@pytest.mark.parametrize("argv,message", ERRORS)
def test_user_errors_are_one_line(capsys, tmp_path, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "x.ckpt").write_bytes(b"not really a pickle")
    save_file({"a": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    files = {"{ckpt}": tmp_path / "x.ckpt", "{junk}": tmp_path / "junk.safetensors", "{png}": tmp_path / "in.png"}
    argv = [files.get(a, a) for a in argv]
    code, out, err = run(capsys, "a cat", *argv, "--out", tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("fewstep: error:")]
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not list(tmp_path.glob("fewstep-*.png"))  # nothing written


def test_too_many_images_for_memory(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("fewstep.engine.free_memory", lambda device: 2**20)
    code, _, err = run(capsys, "a cat", "--num-images", 8, "--out", tmp_path)
    assert code == 3 and "GiB is free" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fewstep.cli", "generate", "a cat", "--width", "65"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().endswith("try 64")
