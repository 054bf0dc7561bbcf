"""The page of fewstep serve in a real browser (Debian's Chromium, driven headless by Playwright): typing a prompt
makes an image appear, with its time and a download link; LoRA sliders and the API key prompt work."""

import re
from pathlib import Path

import pytest

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
