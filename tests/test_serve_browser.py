"""The page of fewstep serve in a real browser (Debian's Chromium, driven headless by Playwright): typing a prompt
makes an image appear, with its time and a download link; LoRA sliders and the API key prompt work."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep.serve.config import ServeConfig
from tests.support.serve import LiveServer, default_engine

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements/test.txt)")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora

    root = tmp_path_factory.mktemp("page-loras")
    save_file(random_lora(default_engine().c.unet, seed=5, scale=0.1), str(root / "watercolor.safetensors"))
    return root


def test_typing_a_prompt_makes_an_image_appear(browser, lora_dir, tmp_path):
    with LiveServer(default_engine(), ServeConfig(lora_dir=str(lora_dir), max_wait=0.0)) as server:
        page = browser.new_page()
        sent = []
        page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/images/generations")
                else None)
        page.goto(server.url + "/")
        page.wait_for_selector("#lora-list [data-lora='watercolor']")
        assert page.input_value("#steps") == "4" and "shapes-teacher-v1" in page.inner_text("#model")
        page.locator("#prompt").press_sequentially("a red circle", delay=20)
        image = page.wait_for_selector("#gallery figure img", timeout=30_000)
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 64
        assert re.fullmatch(r"\d+\.\d\d s", page.inner_text("#gallery .took"))
        assert re.fullmatch(r"fewstep-\d+\.png", page.get_attribute("#gallery a[download]", "download"))
        assert "s (compute" in page.inner_text("#current-caption")
        assert 1 <= len(sent) < len("a red circle")  # debounced, not one request per key
        assert sent[-1]["prompt"] == "a red circle" and "loras" not in sent[-1]

        with page.expect_request(lambda r: r.url.endswith("/v1/images/generations")) as req:
            page.locator("[data-lora='watercolor']").fill("0.5")
        assert req.value.post_data_json["loras"] == {"watercolor": 0.5}
        page.wait_for_function("document.querySelectorAll('#gallery figure').length >= 2", timeout=30_000)
        page.screenshot(path=str(tmp_path / "page.png"))


def test_the_page_asks_for_the_api_key(browser):
    key = "page-key-0123"
    with LiveServer(default_engine(), ServeConfig(api_key=key, max_wait=0.0)) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#key-box:not([hidden])")
        page.fill("#api-key", key)
        page.click("#save-key")
        page.wait_for_selector("#key-box", state="hidden")
        page.fill("#prompt", "a blue square")
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=30_000)


@pytest.fixture(scope="module")
def page_files(tmp_path_factory):
    from tests.support.control import edge_image

    root = tmp_path_factory.mktemp("page-images")
    edge_image().save(root / "edges.png")
    Image.new("RGB", (64, 64), (30, 60, 200)).save(root / "init.png")
    return root


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    from tests.support.control import shapes_controlnet

    engine = default_engine()
    engine.load_controlnet(shapes_controlnet(tmp_path_factory.mktemp("page-cn") / "shapes-edges"),
                           name="shapes-edges")
    try:
        with LiveServer(engine, ServeConfig(max_wait=0.0)) as server:
            yield server
    finally:
        engine.unload_controlnet("shapes-edges")


def test_control_image_with_canny_preview_and_a_drawn_mask(browser, controlled, page_files):
    import base64
    import io

    page = browser.new_page()
    page.goto(controlled.url + "/")
    page.wait_for_selector("#control-model option[value='shapes-edges']", state="attached")
    page.click("#control-box summary")
    with page.expect_response(lambda r: r.url.endswith("/api/preprocess")) as preview:
        page.set_input_files("#control-file", str(page_files / "edges.png"))
    assert preview.value.status == 200
    page.wait_for_function("document.querySelector('#control-preview').src.startsWith('blob:')")
    page.select_option("#control-model", "shapes-edges")

    page.click("#image-box summary")
    page.set_input_files("#init-file", str(page_files / "init.png"))
    page.wait_for_selector("#mask-canvas", state="visible")
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#prompt", "a red circle")
    with page.expect_request(lambda r: r.url.endswith("/sdapi/v1/img2img") and "mask" in (r.post_data or "")) as req:
        page.mouse.move(box["x"] + 5, box["y"] + 5)  # a stroke down the left side
        page.mouse.down()
        page.mouse.move(box["x"] + 8, box["y"] + box["height"] - 5, steps=8)
        page.mouse.up()
    body = req.value.post_data_json
    assert body["init_images"] and body["inpainting_fill"] == 1 and body["prompt"] == "a red circle"
    (unit,) = body["alwayson_scripts"]["controlnet"]["args"]
    assert unit["module"] == "canny" and unit["model"] == "shapes-edges"
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"]))).convert("L")
    assert mask.size == (64, 64)
    painted = np.asarray(mask)
    assert painted[:, :8].max() >= 128 and painted[:, 16:].max() == 0  # painted on the left, nothing elsewhere
    page.wait_for_selector("#gallery figure img", timeout=30_000)
    assert "ControlNet" not in page.inner_text("#status")  # no error shown
