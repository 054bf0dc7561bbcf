"""`fewstep lora info/convert`, and LoRAs on `fewstep generate`: --lora, <lora:NAME:WEIGHT> tags and --lora-dir."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fewstep
from fewstep.cli import main
from fewstep.errors import RequestError
from fewstep.images import read_parameters
from fewstep.lora.apply import lora_hash
from fewstep.lora.prompt import adapters_for, split_tags
from tests.support.loras import ATTENTION, lora_targets, make_lora, random_factors, text_targets


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def sdxl(models):
    return models("sdxl"), fewstep.load(models("sdxl"), device="cpu", dtype="fp32", lcm=False)


@pytest.fixture(scope="module")
def style_file(sdxl, tmp_path_factory):
    """A kohya SDXL LoRA: LoCon on every recipe target, both text encoders, alphas."""
    _, engine = sdxl
    unet, (te1, te2) = engine.c.unet, engine.c.text_encoders
    parts = {"unet": random_factors(unet, lora_targets(unet), rank=4, scale=0.2, dtype=torch.float16),
             "text_encoder": random_factors(te1, text_targets(te1), rank=4, seed=1, scale=0.2, dtype=torch.float16),
             "text_encoder_2": random_factors(te2, text_targets(te2), rank=4, seed=2, scale=0.2, dtype=torch.float16)}
    path = tmp_path_factory.mktemp("cli-loras") / "style.safetensors"
    save_file(make_lora(parts, layout="kohya", alpha=2, xl=True), str(path), metadata={"ss_network_dim": "4"})
    return path


def lora(capsys, *argv):
    code = main(["lora", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def fused_weights(engine, path, name):
    engine.load_lora(str(path), name=name)
    comps = {"unet": engine.c.unet, "text_encoder": engine.c.text_encoders[0],
             "text_encoder_2": engine.c.text_encoders[1]}
    out = {t: comps[t[0]].get_submodule(t[1]).weight.detach().clone() for t in engine.loras[name].factors}
    engine.unload_lora(name)
    return out


def test_info_describes_a_file(capsys, sdxl, style_file):
    folder, engine = sdxl
    code, out, err = lora(capsys, "info", style_file, "--model", folder)
    assert code == 0, err
    assert "kohya (diffusers block names), LoCon on" in out and "rank          4" in out and "alpha         2" in out
    assert "in text_encoder_2" in out and "ss_network_dim=4" in out and "(F16)" in out
    modules = len(lora_targets(engine.c.unet)) + sum(len(text_targets(e)) for e in engine.c.text_encoders)
    assert f"tensors resolve to {modules} modules" in out
    code, out, _ = lora(capsys, "info", style_file, "--json")  # no --model: the guess, no coverage for a tiny model
    info = json.loads(out)
    assert info["architecture"] == "an SDXL-layout model with 64-wide cross-attention" and "coverage" not in info
    assert info["targets"]["attention q/k/v/out"] > 0 and info["locon_modules"] > 0


@pytest.mark.parametrize("to", ["peft", "kohya-ldm", "kohya"])
def test_convert_round_trips_to_the_same_fused_weights(capsys, sdxl, style_file, tmp_path, to):
    folder, engine = sdxl
    out_file = tmp_path / f"{to}.safetensors"
    code, out, err = lora(capsys, "convert", style_file, "--to", to, out_file, "--model", folder)
    assert code == 0, err
    assert f"{to}," in out
    code, out, _ = lora(capsys, "info", out_file, "--model", folder)
    names = {"peft": "diffusers/peft", "kohya-ldm": "kohya (original block names)", "kohya": "kohya (diffusers"}
    assert names[to] in out
    ref, ours = fused_weights(engine, style_file, "ref"), fused_weights(engine, out_file, "converted")
    assert ref.keys() == ours.keys()
    for key in ref:  # peft folds alpha / rank into fp16 lora_B: one fp16 rounding
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-5)


def test_convert_and_info_errors_are_one_line(capsys, sdxl, style_file, tmp_path):
    folder, _ = sdxl
    code, _, err = lora(capsys, "convert", style_file, "--to", "peft", tmp_path / "x.safetensors", "--arch", "sd15")
    assert code == 2 and err.count("\n") == 1 and "do not resolve in a sd15 model" in err
    code, _, err = lora(capsys, "convert", style_file, "--to", "peft", style_file, "--model", folder)
    assert code == 2 and "exists: pass --force" in err
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 2), "lora_unet_a.hada_w1_b": torch.zeros(2, 2)}, str(loha))
    code, out, _ = lora(capsys, "info", loha)
    assert code == 0 and "LyCORIS LoHa (not supported by fewstep)" in out
    code, _, err = lora(capsys, "convert", loha, "--to", "kohya", tmp_path / "y.safetensors", "--arch", "sdxl")
    assert code == 2 and "LyCORIS LoHa" in err
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"lora_unet_a.lora_down.weight": torch.zeros(2, 3, dtype=torch.float16)}}, ckpt)
    code, _, err = lora(capsys, "info", ckpt)
    assert code == 2 and "--allow-pickle" in err
    code, out, _ = lora(capsys, "info", ckpt, "--allow-pickle")
    assert code == 0 and "tensors       1 (F16)" in out and "rank          2" in out


def test_generate_with_lora_flag_and_prompt_tag(capsys, models, tmp_path):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    folder = tmp_path / "loras"
    folder.mkdir()
    unet = engine.c.unet
    save_file(make_lora({"unet": random_factors(unet, lora_targets(unet, ATTENTION))}, alpha=4),
              str(folder / "toy_face.safetensors"))
    save_file(make_lora({"unet": random_factors(unet, lora_targets(unet), seed=5)}, layout="peft"),
              str(tmp_path / "lcm.safetensors"))
    argv = ["generate", "a <lora:toy_face:0.8> man", "--model", str(models("sd")), "--lcm",
            str(tmp_path / "lcm.safetensors"), "--lora", f"{folder / 'toy_face.safetensors'}:0.1", "--lora-dir",
            str(folder), "--steps", "1", "--seed", "3", "--out", str(tmp_path / "x.png"), "--json", "-v", "-q"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["loras"] == {"lcm": 1.0, "toy_face": pytest.approx(0.9)}
    assert "LoRA toy_face: kohya (diffusers block names)" in err and "LoRA lcm: diffusers/peft" in err
    params = read_parameters(Image.open(tmp_path / "x.png").text["parameters"])
    # the tag stays where it was typed (A1111's way); the --lora weight joins it as a tag of its own (they add up)
    assert params["prompt"] == "a <lora:toy_face:0.8> man <lora:toy_face:0.1>"
    assert params["Lora hashes"] == f"toy_face: {lora_hash(folder / 'toy_face.safetensors')}"
    code = main(["generate", "a <lora:nope:1> man", "--lora-dir", str(folder), "-q"])
    assert code == 2 and "no LoRA named 'nope'" in capsys.readouterr().err


def test_prompt_tags():
    assert split_tags("a <lora:x:0.5>, photo <lora:y> <lora:x:0.25>") == ("a, photo", {"x": 0.75, "y": 1.0})
    with pytest.raises(RequestError, match="needs a LoRA folder"):
        adapters_for("<lora:x:1>", [])
    with pytest.raises(RequestError, match="not a plain name"):
        adapters_for("<lora:../x:1>", [], "/tmp")
    assert adapters_for("a cat", [("a/b.safetensors", 0.5), ("a/b.safetensors", 0.25)]) == (
        "a cat", [("a/b.safetensors", 0.75, "b")])
    with pytest.raises(RequestError, match="two different LoRAs are named 'b'"):
        adapters_for("a cat", [("a/b.safetensors", 0.5), ("c/b.safetensors", 0.25)])
