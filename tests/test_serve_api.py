"""fewstep serve's HTTP contract: the OpenAI images API, the A1111 txt2img/img2img subset, and the routes clients
query first (health, metrics, models, samplers, LoRAs), on the embedded default model."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from fewstep.images import read_parameters
from fewstep.lora.apply import lora_hash
from fewstep.serve.config import ServeConfig
from tests.support.images import assert_close_images
from tests.support.serve import LiveServer, decode_png, default_engine

SMALL = 32  # pixels: a multiple of the default model's latent factor (4), and quick


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.support.loras import random_lora

    engine = default_engine()
    root = tmp_path_factory.mktemp("api-loras")
    save_file(random_lora(engine.c.unet, seed=3, scale=0.1), str(root / "style.safetensors"))
    with LiveServer(engine, ServeConfig(lora_dir=str(root), max_wait=0.0)) as server:
        yield server


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def png_b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_openai_generations_default_b64_json_with_metadata(served):
    r = served.client.post("/v1/images/generations", json={"prompt": "a red circle", "model": "dall-e-3", "n": 2,
                                                           "size": f"{SMALL}x{SMALL}", "seed": 11, "user": "u1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    assert [d["seed"] for d in body["data"]] == [11, 12]
    assert set(body["timings"]) == {"queue_s", "compute_s", "total_s", "batch_images"}
    for d, seed in zip(body["data"], (11, 12)):
        assert d["revised_prompt"] == "a red circle" and "url" not in d
        image = decode_png(d["b64_json"])
        assert image.size == (SMALL, SMALL) and image.format == "PNG"
        params = read_parameters(image.text["parameters"])
        assert params["prompt"] == "a red circle" and params["Seed"] == str(seed) and params["Steps"] == "4"
        assert params["Sampler"] == "LCM" and params["Size"] == f"{SMALL}x{SMALL}"


def test_openai_image_equals_the_engines_and_extension_fields_apply(served):
    req = {"prompt": "a blue square", "size": f"{SMALL}x{SMALL}", "seed": 5, "steps": 2, "guidance_scale": 1.5,
           "negative_prompt": "green", "sampler": "tcd"}
    r = served.client.post("/v1/images/generations", json=req)
    assert r.status_code == 200, r.text
    ours = decode_png(r.json()["data"][0]["b64_json"])
    params = read_parameters(ours.text["parameters"])
    assert params["Steps"] == "2" and params["Sampler"] == "TCD" and params["CFG scale"] == "1.5"
    assert params["negative_prompt"] == "green"
    ref = default_engine().generate("a blue square", seed=5, steps=2, guidance=1.5, negative_prompt="green",
                                    sampler="tcd", width=SMALL, height=SMALL).images[0]
    assert_close_images(ours, ref)  # the server's path (batcher, its own request) vs the engine's: within 1/255


def test_openai_loras_field_and_prompt_tags_pick_adapters(served):
    base = {"prompt": "a red circle", "size": f"{SMALL}x{SMALL}", "seed": 2, "steps": 2}
    plain = served.client.post("/v1/images/generations", json=base).json()["data"][0]
    styled = served.client.post("/v1/images/generations", json=dict(base, loras={"style": 1.0})).json()["data"][0]
    tagged = served.client.post("/v1/images/generations",
                                json=dict(base, prompt="a red circle <lora:style:1>")).json()["data"][0]
    a, b, c = (decode_png(d["b64_json"]) for d in (plain, styled, tagged))
    assert np.abs(pixels(a) - pixels(b)).max() > 5
    assert np.array_equal(pixels(b), pixels(c)) and tagged["revised_prompt"] == "a red circle"
    assert read_parameters(b.text["parameters"])["prompt"] == "a red circle <lora:style:1>"  # A1111's way


def test_openai_url_response_format(served):
    r = served.client.post("/v1/images/generations", json={"prompt": "a star", "size": f"{SMALL}x{SMALL}",
                                                           "response_format": "url", "seed": 1})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert "b64_json" not in item and item["url"].startswith(served.url + "/v1/images/files/")
    image = served.client.get(item["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (SMALL, SMALL)
    assert served.client.get("/v1/images/files/nothing.png").status_code == 404


def test_a1111_txt2img(served):
    req = {"prompt": "a red circle <lora:style:0.5>", "negative_prompt": "", "steps": 3, "cfg_scale": 1,
           "width": SMALL, "height": 48, "seed": 7, "batch_size": 2, "n_iter": 1, "sampler_name": "LCM",
           "restore_faces": False, "enable_hr": False, "override_settings": {}}
    r = served.client.post("/sdapi/v1/txt2img", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["parameters"]["prompt"] == req["prompt"]
    info = json.loads(body["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and info["steps"] == 3
    assert info["sampler_name"] == "LCM" and (info["width"], info["height"]) == (SMALL, 48)
    style_hash = lora_hash(served.state.adapters.lora_dir + "/style.safetensors")
    assert info["extra_generation_params"] == {"Lora hashes": f"style: {style_hash}"} and len(info["infotexts"]) == 2
    image = decode_png(body["images"][1])
    assert image.size == (SMALL, 48)
    params = read_parameters(image.text["parameters"])
    assert params["Seed"] == "8" and params["prompt"] == "a red circle <lora:style:0.5>"
    assert params["Lora hashes"] == f"style: {style_hash}"


def test_a1111_random_seed_and_defaults(served):
    r = served.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1, "width": SMALL, "height": SMALL})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert isinstance(info["seed"], int) and info["seed"] >= 0 and info["steps"] == 4 and info["cfg_scale"] == 1.0


def test_a1111_img2img(served):
    init = Image.new("RGB", (40, 36), (200, 30, 30))
    for data in (png_b64(init), "data:image/png;base64," + png_b64(init)):
        r = served.client.post("/sdapi/v1/img2img", json={"prompt": "a red square", "init_images": [data],
                                                          "denoising_strength": 0.5, "steps": 4, "seed": 3})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["denoising_strength"] == 0.5 and (info["width"], info["height"]) == (40, 36)
        image = decode_png(r.json()["images"][0])
        assert image.size == (40, 36)
        assert read_parameters(image.text["parameters"])["Denoising strength"] == "0.5"
    ref = default_engine().generate("a red square", init_image=init, strength=0.5, steps=4, seed=3).images[0]
    assert_close_images(image, ref)


def test_what_clients_ask_first(served):
    c = served.client
    assert c.get("/health").json() == {"status": "ok"}
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "shapes-teacher-v1"
    assert [s["name"] for s in c.get("/sdapi/v1/samplers").json()] == ["LCM", "TCD", "Euler", "Euler a", "DDIM"]
    assert c.get("/sdapi/v1/loras").json() == [{"name": "style", "alias": "style"}]
    assert c.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "shapes-teacher-v1"
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-teacher-v1"
    info = c.get("/api/info").json()
    assert info["native_size"] == 64 and info["size_step"] == 4 and info["loras"] == ["style"]
    assert info["defaults"] == {"sampler": "lcm", "steps": 4, "guidance": 1.0}
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="prompt"' in page.text
    assert c.get("/static/app.js").status_code == 200


def test_metrics_report_queue_batches_latency_and_images(served):
    served.client.post("/v1/images/generations", json={"prompt": "m", "size": f"{SMALL}x{SMALL}"})
    r = served.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("fewstep_queue_requests", "fewstep_queue_images", "fewstep_batch_images_bucket",
                 'fewstep_request_seconds_bucket{api="openai"', "fewstep_images_total",
                 'fewstep_http_requests_total{code="200",route="/v1/images/generations"}',
                 "fewstep_queue_wait_seconds_count", "fewstep_unet_steps_total"):
        assert name in text, name
    assert served.metric("fewstep_images_total") >= 1
