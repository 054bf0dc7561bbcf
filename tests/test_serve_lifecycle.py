"""The server's life: /health says "loading" until the model is in (the port answers at once), A1111's progress,
interrupt and skip about the running job, and options / sd-models switching among the models it was started with."""

import json
import threading

import pytest

from fewstep.errors import LoadError
from fewstep.previews import preview_images
from fewstep.serve.app import create_app
from fewstep.serve.config import ServeConfig
from fewstep.serve.models import Models
from tests.support.images import assert_close_images
from tests.support.serve import LiveServer, decode_png, default_engine
from tests.test_serve_limits import wait_for

TXT2IMG = "/sdapi/v1/txt2img"
OPENAI = "/v1/images/generations"


class AppServer(LiveServer):
    """LiveServer over an app made here (create_app with models that load in the background)."""

    def __init__(self, app):
        self.app, self.state = app, app.state.server


class Hold:
    """Holds the engine inside a UNet pass (the pre-hook of its second down block) at the given passes, counted
    from now (one pass per step: CFG is off at the default guidance), until release()."""

    def __init__(self, engine, at):
        self.unet, self.at, self.passes = engine.c.unet, set(at), 0
        self.held = threading.Event()
        self.go = threading.Event()

        def pre(module, args):
            if self.passes in self.at:
                self.at.discard(self.passes)
                self.go.clear()
                self.held.set()
                assert self.go.wait(30)

        def done(module, args, out):
            self.passes += 1

        self.handles = [self.unet.down_blocks[1].register_forward_pre_hook(pre), self.unet.register_forward_hook(done)]

    def wait(self):
        assert self.held.wait(30), "the engine never got there"

    def release(self):
        self.held.clear()
        self.go.set()

    def close(self):
        self.go.set()
        for h in self.handles:
            h.remove()


def in_thread(fn, *args, **kw):
    out = {}

    def run():
        out["r"] = fn(*args, **kw)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def served():
    with LiveServer(default_engine(), ServeConfig(max_batch=1, max_wait=0.0)) as server:
        yield server


def prediction(seed, steps, at, decode=None):
    """The image the engine's prediction is after step index `at` of a run (what an interrupt answers), decoded by
    the engine's decoder (or `decode`: the progress preview's)."""
    engine = default_engine()
    kept = {}
    engine.generate("a red circle", seed=seed, steps=steps, width=64, height=64,
                    preview=lambda i, x0: kept.setdefault(i, x0))
    return (decode or engine.decode)(kept[at])[0]


def test_progress_preview_and_interrupt_of_the_running_job(served):
    c = served.client
    hold = Hold(default_engine(), at=(2, 3))
    try:
        t, out = in_thread(c.post, TXT2IMG, json={"prompt": "a red circle", "steps": 8, "width": 64, "height": 64,
                                                  "seed": 1})
        hold.wait()  # inside step 3: two steps done
        p = c.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        assert p["state"]["job_count"] == 1 and p["state"]["sampling_steps"] == 8
        assert p["state"]["sampling_step"] == 2 and p["progress"] == pytest.approx(0.01 + 2 / 8)
        assert p["eta_relative"] >= 0 and p["current_image"] is None and not p["state"]["interrupted"]
        preview_t, preview = in_thread(c.get, "/sdapi/v1/progress")  # asks for the current image
        wait_for(lambda: served.state.batcher.progress._want.is_set())
        hold.release()  # step 3 finishes and decodes the preview; the engine is held again in step 4
        hold.wait()
        preview_t.join(30)
        image = decode_png(preview["r"].json()["current_image"])
        assert image.size == (64, 64)
        assert c.post("/sdapi/v1/interrupt").json() == {}
        hold.release()
        t.join(30)
    finally:
        hold.close()
    r = out["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert any("stopped by POST /sdapi/v1/interrupt after step 3 of 8" in w for w in info["warnings"]), info["warnings"]
    assert hold.passes == 3  # the 4th step stopped inside its UNet pass
    step3 = prediction(1, 8, 2)
    # the preview: the prediction after step 3, through the preview's tiny decoder (fewstep.previews)
    tiny = prediction(1, 8, 2, decode=lambda x0: preview_images(default_engine(), x0))
    assert_close_images(image.convert("RGB"), tiny)
    assert_close_images(decode_png(r.json()["images"][0]).convert("RGB"), step3)  # the answer: the same
    p = c.get("/sdapi/v1/progress").json()  # what webuiapi's util_wait_for_ready waits for
    assert p["progress"] == 0 and p["state"]["job_count"] == 0 and p["state"]["interrupted"] is True


def test_skip_stops_the_running_batch_and_interrupt_drops_the_rest(served):
    c = served.client
    body = {"prompt": "a red circle", "steps": 4, "width": 64, "height": 64, "seed": 7, "batch_size": 2}
    hold = Hold(default_engine(), at=(1,))  # in step 2 of the first image (max_batch 1: one image per batch)
    try:
        t, out = in_thread(c.post, TXT2IMG, json=body)
        hold.wait()
        assert c.post("/sdapi/v1/skip").json() == {}
        hold.release()
        t.join(60)
    finally:
        hold.close()
    images = out["r"].json()["images"]
    assert len(images) == 2  # the second image ran in full
    assert_close_images(decode_png(images[0]).convert("RGB"), prediction(7, 4, 0))
    full = default_engine().generate("a red circle", seed=8, steps=4, width=64, height=64).images[0]
    assert_close_images(decode_png(images[1]).convert("RGB"), full)
    hold = Hold(default_engine(), at=(1,))
    try:
        t, out = in_thread(c.post, TXT2IMG, json=body)
        hold.wait()
        c.post("/sdapi/v1/interrupt")
        hold.release()
        t.join(60)
    finally:
        hold.close()
    assert len(out["r"].json()["images"]) == 1  # the queued second image was dropped
    assert c.post("/sdapi/v1/interrupt").json() == {}  # nothing runs: nothing happens
    assert c.post(OPENAI, json={"prompt": "a", "size": "32x32", "steps": 2}).status_code == 200


def test_health_says_loading_until_the_model_is_ready():
    gate, heard = threading.Event(), []

    def load(source):
        assert gate.wait(30)
        return default_engine()

    app = create_app(None, ServeConfig(max_wait=0.0), models=Models([None], load),
                     announce=lambda kind, text: heard.append((kind, text)))
    with AppServer(app) as server:
        c = server.client
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.json()["stage"] == "loading model shapes-teacher-v1" and r.headers["retry-after"] == "2"
        assert c.head("/health").status_code == 503
        r = c.post(OPENAI, json={"prompt": "a"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        p = c.get("/sdapi/v1/progress").json()  # webuiapi's util_wait_for_ready waits while this is a job
        assert p["state"]["job_count"] == 1 and p["progress"] > 0 and p["textinfo"] == "loading model shapes-teacher-v1"
        gate.set()
        wait_for(lambda: c.get("/health").status_code == 200, timeout=60)
        assert c.get("/health").json() == {"status": "ok"} and c.head("/health").status_code == 200
        assert server.state.target.speed.batches == 1  # the warm-up taught admission control this engine's speed
        assert c.post(OPENAI, json={"prompt": "a", "size": "32x32", "steps": 2}).status_code == 200
    said = [(k, t) for k, t in heard if not t.startswith("still ")]  # the heartbeat says "still loading ..."
    assert said == [("stage", "loading model shapes-teacher-v1"), ("stage", "warming up shapes-teacher-v1"),
                    ("ready", "shapes-teacher-v1")]


def test_a_model_that_fails_to_load_is_reported_by_health():
    def load(source):
        raise LoadError("no model here")

    heard = []
    app = create_app(None, ServeConfig(), models=Models([None], load), announce=lambda k, t: heard.append((k, t)))
    with AppServer(app) as server:
        wait_for(lambda: server.client.get("/health").json()["status"] == "failed")
        assert server.client.get("/health").json()["error"] == "no model here"
    assert heard[-1] == ("failed", "no model here")


def test_options_switch_among_the_models_within_the_memory_budget(models):
    import fewstep

    sd = models("sd")
    loads = []

    def load(source):
        loads.append(source)
        return default_engine() if source is None else fewstep.load(sd, device="cpu", dtype="fp32", lcm=False)

    # a budget of one byte: only the model in use stays loaded
    app = create_app(None, ServeConfig(max_wait=0.0), models=Models([None, sd], load, budget=1), warmup=False)
    with AppServer(app) as server:
        c = server.client
        wait_for(lambda: c.get("/health").status_code == 200, timeout=60)
        assert [m["title"] for m in c.get("/sdapi/v1/sd-models").json()] == ["shapes-teacher-v1", "sd"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-teacher-v1"
        assert c.get("/api/info").json()["limits"]["max_size"] == 128
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "SD", "samples_format": "jpg"})
        assert r.status_code == 200 and r.json() is None
        options = c.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == "sd" and options["samples_format"] == "jpg"
        assert c.get("/api/info").json()["limits"]["max_size"] == 2 * server.state.engine.native_size
        r = c.post(TXT2IMG, json={"prompt": "a cat", "width": 32, "height": 32, "steps": 2, "seed": 1})
        assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "sd"
        assert list(server.state.models.loaded) == ["sd"]  # the other one was unloaded (budget)
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "sd_model_checkpoint"
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-teacher-v1"}).status_code == 200
        assert loads == [None, sd, None]
        assert c.post(OPENAI, json={"prompt": "a", "size": "32x32", "steps": 2}).status_code == 200
        assert c.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        mem = c.get("/sdapi/v1/memory").json()
        assert 0 < mem["ram"]["used"] < mem["ram"]["total"] and "cuda" in mem
