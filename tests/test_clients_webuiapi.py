"""webuiapi (the A1111 API's Python client) against a live `fewstep serve` on loopback, with two models (the
embedded default and a tiny SD 1.x): start-up calls and listings, txt2img and img2img with webuiapi's own defaults
(sampler "Euler a", 20 steps, CFG 7), A1111 sampler names fewstep does not have, progress, interrupt and model
switching. Images are checked against the engine's own for the same request."""

import threading
import time

import httpx
import pytest
from PIL import Image
from safetensors.torch import save_file

from fewstep.serve.config import ServeConfig
from tests.support.images import assert_close_images
from tests.support.serve import LiveServer, default_engine

webuiapi = pytest.importorskip("webuiapi")

KEY = "test-key-0123456789"
NATIVE = 64  # the default model's size: webuiapi's default 512 is more than this model is served at


@pytest.fixture(scope="module")
def served(tmp_path_factory, models):
    import fewstep
    from fewstep.serve.app import create_app
    from fewstep.serve.models import Models
    from tests.support.loras import random_lora

    tiny = models("sd")

    def load(source):
        if source is None:
            return default_engine()
        return fewstep.load(str(source), device="cpu", dtype="fp32", lcm=False)

    root = tmp_path_factory.mktemp("webuiapi-loras")
    save_file(random_lora(default_engine().c.unet, seed=3, scale=0.1), str(root / "style.safetensors"))
    config = ServeConfig(lora_dir=str(root), max_wait=0.0, api_key=KEY)
    app = create_app(None, config, models=Models([None, tiny], load), warmup=False)  # loads in the background
    with LiveServer(None, app=app) as server:
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.1)
        yield server


@pytest.fixture(scope="module")
def api(served):
    port = int(served.url.rsplit(":", 1)[1])
    # A1111 clients send --api-auth as HTTP Basic: fewstep takes the password as the key
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, username="user", password=KEY)


def test_start_up_calls_and_listings(api, served):
    api.util_wait_for_ready(check_interval=0.1)  # returns once nothing runs or waits
    assert api.util_get_sampler_names() == sorted(["LCM", "TCD", "Euler", "Euler a", "DDIM"])
    euler_a = next(s for s in api.get_samplers() if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"]
    assert api.util_get_scheduler_names() == ["automatic"]
    assert api.util_get_model_names() == sorted(["shapes-teacher-v1", "sd"])
    assert api.util_get_current_model() == "shapes-teacher-v1"
    assert [x["name"] for x in api.get_loras()] == ["style"]
    for empty in (api.get_upscalers, api.get_sd_vae, api.get_hypernetworks, api.get_face_restorers,
                  api.get_realesrgan_models, api.get_prompt_styles, api.get_latent_upscale_modes):
        assert empty() == [], empty.__name__
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["use_cpu"] == ["all"] and KEY not in str(flags)
    assert flags["port"] == int(served.url.rsplit(":", 1)[1])
    assert httpx.get(served.url + "/sdapi/v1/samplers").status_code == 401  # the listings need the key too


def test_txt2img_with_webuiapis_defaults(api):
    r = api.txt2img(prompt="a red circle", width=NATIVE, height=NATIVE, seed=5)  # Euler a, 20 steps, CFG 7
    assert r.info["sampler_name"] == "Euler a" and r.info["steps"] == 20 and r.info["cfg_scale"] == 7.0
    assert r.image.size == (NATIVE, NATIVE) and r.info["seed"] == 5
    ref = default_engine().generate("a red circle", sampler="euler_a", steps=20, guidance=7.0, seed=5,
                                    width=NATIVE, height=NATIVE).images[0]
    assert_close_images(r.image, ref)


def test_other_a1111_samplers_run_as_the_models_few_step_sampler(api):
    r = api.txt2img(prompt="a blue square", width=NATIVE, height=NATIVE, seed=2, steps=4, cfg_scale=1.0,
                    sampler_name="DPM++ 2M Karras", scheduler="karras")
    assert r.info["sampler_name"] == "LCM"  # the default model's LCM-LoRA: its recipe's sampler
    said = " ".join(r.info["warnings"])
    assert "'DPM++ 2M Karras'" in said and "ran as LCM" in said and "'Karras' is not used" in said
    ref = default_engine().generate("a blue square", sampler="lcm", steps=4, guidance=1.0, seed=2,
                                    width=NATIVE, height=NATIVE).images[0]
    assert_close_images(r.image, ref)
    assert api.txt2img(prompt="x", width=NATIVE, height=NATIVE, steps=2, sampler_name="k_euler").info[
        "sampler_name"] == "Euler"
    plms = api.txt2img(prompt="x", width=NATIVE, height=NATIVE, steps=2, sampler_name="PLMS").info
    assert plms["sampler_name"] == "LCM" and "'PLMS' is not one fewstep runs" in " ".join(plms["warnings"])
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=NATIVE, height=NATIVE, sampler_name="Not A Sampler")
    assert e.value.args[0] == 422 and "sampler_name" in e.value.args[1]


def test_img2img_with_webuiapis_defaults(api):
    init = Image.new("RGB", (NATIVE, NATIVE), (30, 40, 200))
    init.paste((220, 30, 30), (16, 16, 48, 48))
    r = api.img2img(images=[init], prompt="a red square", width=NATIVE, height=NATIVE, seed=3)  # strength 0.75
    assert r.info["denoising_strength"] == 0.75 and r.image.size == init.size
    ref = default_engine().generate("a red square", init_image=init, strength=0.75, sampler="euler_a", steps=20,
                                    guidance=7.0, seed=3).images[0]
    assert_close_images(r.image, ref)


def test_progress_while_running_then_interrupt(api, served):
    before = served.metric("fewstep_unet_steps_total")
    outcome = {}

    def long_request():
        try:
            outcome["result"] = api.txt2img(prompt="a star", width=NATIVE, height=NATIVE, steps=50, batch_size=8,
                                            sampler_name="LCM", cfg_scale=1.0)
        except RuntimeError as e:
            outcome["error"] = e

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 30
    while True:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 1:
            break
        assert time.monotonic() < deadline and worker.is_alive(), "the request never reported a step"
        time.sleep(0.02)
    assert 0 < p["progress"] < 1 and p["state"]["job_count"] >= 1 and p["state"]["sampling_steps"] == 50
    assert api.interrupt() == {}
    worker.join(30)
    assert not worker.is_alive()
    assert served.metric("fewstep_unet_steps_total") - before < 50  # it stopped before its 50 steps
    assert "result" in outcome or outcome["error"].args[0] == 409
    api.util_wait_for_ready(check_interval=0.1)
    assert api.get_progress()["state"]["job_count"] == 0


def test_set_model_switches_among_the_servers_models(api):
    api.util_set_model("sd")  # webuiapi picks the closest title, then POSTs sd_model_checkpoint
    try:
        assert api.util_get_current_model() == "sd"
        r = api.txt2img(prompt="a photo", width=32, height=32, steps=2, cfg_scale=1.0, sampler_name="Euler")
        assert r.info["sd_model_name"] == "sd" and r.image.size == (32, 32)
    finally:
        api.util_set_model("shapes-teacher-v1")
    assert api.util_get_current_model() == "shapes-teacher-v1"
