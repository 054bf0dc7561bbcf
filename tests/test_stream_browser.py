"""The page's camera mode in a real browser: Debian's Chromium with a fake camera playing a clip rendered from the
shapes world (two scenes, alternating), driven by Playwright. Output frames arrive from /v1/stream beside the
camera, with fps and latency shown, they change when the camera's picture changes, and a prompt typed while the
camera runs goes to the stream's control channel (not to the HTTP API). The server has an API key: the page sends it
on the socket as a subprotocol."""

import json
from pathlib import Path

import numpy as np
import pytest

from fewstep.serve.config import ServeConfig
from tests.support.serve import LiveServer, default_engine

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
SCENES = ("a yellow square in the center on a blue background", "a black circle in the center on a white background")
FPS, SECONDS_PER_SCENE = 10, 2
EVERY, MAX_LAG = 100, 2.5  # ms between samples of the page; seconds of latency the check allows for

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements/test.txt)")
pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
              pytest.mark.usefixtures("one_thread")]


def write_y4m(path, images, fps):
    """A YUV4MPEG2 clip (the format Chromium's fake camera plays): a text header, then each frame's planes, I420
    (full-range BT.601, as PIL's YCbCr, chroma averaged over 2x2 pixels)."""
    w, h = images[0].size
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for im in images:
            y, cb, cr = im.convert("YCbCr").split()
            f.write(b"FRAME\n" + y.tobytes())
            for plane in (cb, cr):
                f.write(plane.reduce(2).tobytes())


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from fewstep.worlds.shapes.world import render

    frames = [render(s, size=64) for s in SCENES for _ in range(FPS * SECONDS_PER_SCENE)]
    path = tmp_path_factory.mktemp("camera") / "shapes.y4m"
    write_y4m(path, frames, FPS)
    return path


def test_camera_mode_streams_frames_that_follow_the_camera(clip, tmp_path):
    key = "camera-key-0123/+="  # characters a subprotocol cannot carry as they are: the page sends it base64url
    with LiveServer(default_engine(), ServeConfig(max_wait=0.0, api_key=key)) as server, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=FLAGS + [f"--use-file-for-fake-video-capture={clip}"])
        try:
            page = browser.new_page()
            controls, http = [], []
            page.on("websocket", lambda ws: ws.on("framesent", lambda payload: controls.append(payload)
                                                   if isinstance(payload, str) else None))
            page.on("request", lambda r: http.append(r.url) if "/v1/images" in r.url else None)
            page.goto(server.url + "/")
            page.wait_for_selector("#key-box:not([hidden])")
            page.fill("#api-key", key)
            page.click("#save-key")
            page.wait_for_function("document.querySelector('#model').textContent.length > 0")
            page.fill("#prompt", "a red circle")
            page.wait_for_timeout(400)  # the debounced HTTP generation of the typed prompt, before the camera
            page.click("#camera-box summary")
            page.fill("#camera-strength", "0.6")
            # a still scene repeats identical frames, which the similarity filter skips without moving the stream
            # batch on (the frames in flight wait for the next processed one): here every frame runs
            page.uncheck("#camera-skip")
            page.locator("#steps").fill("2")  # 2 img2img steps: one frame in flight besides the newest
            page.click("#camera-start")
            page.wait_for_function("Number(document.querySelector('#camera-output').dataset.frames) >= 3",
                                   timeout=60_000)
            http_before = len(http)
            first = json.loads(next(c for c in controls if c.startswith("{")))
            assert first["prompt"] == "a red circle" and first["strength"] == 0.6 and first["similarity"] == 1
            assert first["steps"] == 2

            samples = page.evaluate(SAMPLE, {"ms": 2 * SECONDS_PER_SCENE * 1000 + 1000 * MAX_LAG, "every": EVERY})
            assert page.inner_text("#camera-fps") not in ("", "–") and float(page.inner_text("#camera-fps")) > 0
            assert float(page.inner_text("#camera-latency")) > 0

            page.locator("#prompt").press_sequentially(" x", delay=30)
            page.wait_for_function("document.querySelector('#camera-output').dataset.frames > 0")
            page.wait_for_timeout(500)
            assert any(json.loads(c).get("prompt") == "a red circle x" for c in controls if c.startswith("{"))
            assert len(http) == http_before  # the typed prompt went to the stream only
            page.screenshot(path=str(tmp_path / "camera.png"))
            page.click("#camera-start")  # stop
            page.wait_for_selector("#camera-view", state="hidden")
        finally:
            browser.close()

    inputs = np.array([s["input"] for s in samples], np.float32)
    outputs = np.array([s["output"] for s in samples], np.float32)
    assert samples[-1]["frames"] - samples[0]["frames"] >= 5  # output frames kept arriving
    # the camera showed both scenes; each sample's input is the one of the two it is nearest to
    centres = np.stack([inputs[np.argmin(inputs.sum(1))], inputs[np.argmax(inputs.sum(1))]])
    scene = np.argmin(np.abs(inputs[:, None] - centres[None]).sum(-1), axis=1)
    assert {0, 1} <= set(scene.tolist()) and np.abs(centres[0] - centres[1]).sum() > 100
    # the output changed with it: its mean colour after the camera showed one scene differs from the other's, for
    # some latency up to MAX_LAG (medians, so the frames still in the pipeline at a switch do not decide it)
    def separation(lag):
        seen, shown = scene[:len(scene) - lag], outputs[lag:]
        if not {0, 1} <= set(seen.tolist()):
            return 0.0
        return float(np.abs(np.median(shown[seen == 0], 0) - np.median(shown[seen == 1], 0)).sum())

    lags = range(0, int(MAX_LAG * 1000 / EVERY) + 1, 2)
    assert max(separation(lag) for lag in lags) > 60


# the mean colour of the camera's picture and of the output shown, every `every` ms for `ms`
SAMPLE = """async ({ms, every}) => {
  const mean = (el) => {
    const c = document.createElement("canvas");
    c.width = c.height = 16;
    const ctx = c.getContext("2d");
    ctx.drawImage(el, 0, 0, 16, 16);
    const d = ctx.getImageData(0, 0, 16, 16).data;
    const m = [0, 0, 0];
    for (let i = 0; i < d.length; i += 4) for (let k = 0; k < 3; k++) m[k] += d[i + k] / 256;
    return m;
  };
  const out = [];
  const video = document.querySelector("#camera-input"), img = document.querySelector("#camera-output");
  for (let t = 0; t < ms; t += every) {
    out.push({input: mean(video), output: mean(img), frames: Number(img.dataset.frames)});
    await new Promise((r) => setTimeout(r, every));
  }
  return out;
}"""
