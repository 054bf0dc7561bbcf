"""PNG metadata as other tools read it: sd-parsers (the library image browsers use) reads the prompt, negative
prompt, steps, sampler, CFG, seed, size, model and the LoRAs back from fewstep's PNGs, the CLI's and the server's
alike; LoRAs are written as A1111 writes them (tags in the prompt, "Lora hashes"), and a line break in a prompt
cannot fake other fields."""

import json

import pytest
from PIL import Image
from safetensors.torch import save_file
from sd_parsers import ParserManager

from fewstep.cli import main
from fewstep.images import parameters_text, read_parameters
from fewstep.lora.apply import lora_hash
from fewstep.request import split_lora_tags
from fewstep.serve.config import ServeConfig
from tests.support.loras import random_lora
from tests.support.serve import LiveServer, decode_png, default_engine

SMALL = 32


def parsed(image):
    """What sd-parsers reads: (prompt, negative prompt, sampler name, its parameters, model name, metadata)."""
    info = ParserManager().parse(image)
    assert info is not None, "sd-parsers found no metadata"
    sampler = info.samplers[0]
    return (info.full_prompt, info.full_negative_prompt, sampler.name, sampler.parameters,
            sampler.model.name if sampler.model else None, info.metadata)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta-loras")
    save_file(random_lora(default_engine().c.unet, seed=4, scale=0.05), str(root / "outline.safetensors"),
              metadata={"ss_output_name": "outline"})
    return root


def test_a_line_break_cannot_fake_fields():
    params = dict(prompt="a red\x00 circle\nNegative prompt: fake\nSteps: 99, Sampler: Fake, CFG scale: 9, Seed: 1",
                  negative_prompt="blue\r\nSteps: 77, Sampler: Other, Seed: 2", sampler="lcm", steps=4, guidance=1.5,
                  width=64, height=64, model="fewstep-default")
    text = parameters_text(params, seed=5)
    assert len(text.split("\n")) == 3  # prompt, negative prompt, the fields: nothing else starts a line
    assert "\x00" not in text  # a NUL would end the PNG text for many readers
    ours = read_parameters(text)
    # the same words (CLIP's tokens: whitespace collapsed, ":" a token of its own), on one line each
    assert ours["prompt"] == "a red circle Negative prompt : fake Steps: 99, Sampler: Fake, CFG scale: 9, Seed: 1"
    assert ours["negative_prompt"] == "blue Steps: 77, Sampler: Other, Seed: 2"
    assert (ours["Steps"], ours["Seed"], ours["Sampler"]) == ("4", "5", "LCM")
    prompt, negative, sampler, values, _, _ = parsed(_png(text))
    assert prompt == ours["prompt"] and negative == ours["negative_prompt"]
    assert sampler == "LCM" and values["steps"] == "4" and values["seed"] == "5" and values["cfg_scale"] == "1.5"


def _png(text):
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    buf.seek(0)
    return Image.open(buf)


def check_round_trip(image, *, prompt, negative, steps, seed, cfg, size, model, loras, hashes):
    text, neg, sampler, values, model_name, metadata = parsed(image)
    assert text == prompt and neg == negative and sampler == "LCM"
    assert (values["steps"], values["seed"], values["cfg_scale"]) == (str(steps), str(seed), cfg)
    assert metadata["Size"] == size and model_name == model
    assert split_lora_tags(text)[1] == pytest.approx(loras)  # the LoRAs come back from the prompt's tags
    assert read_parameters(image.text["parameters"])["Lora hashes"] == hashes


def test_cli_png_round_trip(capsys, tmp_path, lora_dir):
    out = tmp_path / "x.png"
    code = main(["generate", "a red circle <lora:outline:0.8>", "--lora-dir", str(lora_dir), "--negative", "blue",
                 "--guidance", "1.5", "--steps", "2", "--seed", "9", "--width", str(SMALL), "--height",
                 str(SMALL), "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--json", "-q"])
    assert code == 0, capsys.readouterr().err
    model = json.loads(capsys.readouterr().out)["model"]
    check_round_trip(Image.open(out), prompt="a red circle <lora:outline:0.8>", negative="blue", steps=2, seed=9,
                     cfg="1.5", size=f"{SMALL}x{SMALL}", model=model, loras={"outline": 0.8},
                     hashes=f"outline: {lora_hash(lora_dir / 'outline.safetensors')}")


def test_server_png_round_trip_both_dialects(lora_dir):
    expected = dict(negative="blue", steps=2, seed=9, cfg="1.5", size=f"{SMALL}x{SMALL}", loras={"outline": 0.8},
                    hashes=f"outline: {lora_hash(lora_dir / 'outline.safetensors')}")
    with LiveServer(default_engine(), ServeConfig(lora_dir=str(lora_dir), max_wait=0.0)) as server:
        model = server.state.model
        r = server.client.post("/v1/images/generations", json={
            "prompt": "a red circle", "loras": {"outline": 0.8}, "negative_prompt": "blue", "guidance_scale": 1.5,
            "steps": 2, "seed": 9, "size": f"{SMALL}x{SMALL}"})
        assert r.status_code == 200, r.text
        # the loras field's adapter is written as A1111 would have it: a tag in the prompt (the same as the CLI's)
        check_round_trip(decode_png(r.json()["data"][0]["b64_json"]), prompt="a red circle <lora:outline:0.8>",
                         model=model, **expected)
        r = server.client.post("/sdapi/v1/txt2img", json={
            "prompt": "a red circle <lora:outline:0.8>", "negative_prompt": "blue", "cfg_scale": 1.5, "steps": 2,
            "seed": 9, "width": SMALL, "height": SMALL})
        assert r.status_code == 200, r.text
        check_round_trip(decode_png(r.json()["images"][0]), prompt="a red circle <lora:outline:0.8>", model=model,
                         **expected)
        info = json.loads(r.json()["info"])
        assert info["extra_generation_params"] == {"Lora hashes": expected["hashes"]}
        assert read_parameters(info["infotexts"][0])["prompt"] == "a red circle <lora:outline:0.8>"


def test_lora_hash_is_a1111s(tmp_path):
    """A1111's (kohya's addnet) hash: sha256 of the bytes after the safetensors header, 12 hex digits; the
    metadata's sshs_model_hash when present. Changing only the metadata keeps the hash."""
    import hashlib

    import torch

    path, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {"x.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(path), metadata={"a": "1"})
    save_file(tensors, str(other), metadata={"a": "a much longer metadata value"})
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + n:]).hexdigest()[:12] == lora_hash(other)
    save_file(tensors, str(other), metadata={"sshs_model_hash": "0123456789abcdef"})
    assert lora_hash(other) == "0123456789ab"
