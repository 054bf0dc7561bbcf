"""/v1/stream, the camera socket: frames in -> frames out, the control channel and its errors, the API key, bad
frames, the stream limit and back-pressure (a client 10x faster than the engine: one frame held, the newest wins).

Most tests run the socket over a fake engine stream with the interface of Engine.stream (a stream batch of `depth`
frames whose output is the input's negative), so they can say exactly which frame came out; the last ones run the
real engine stream of the embedded default model."""

import base64
import io
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from fewstep.errors import RequestError
from fewstep.serve.app import create_app
from fewstep.serve.config import ServeConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # the real engine's 64 px frames: one thread is faster on a busy CPU


class FakeStream:
    """Engine.stream's interface: frame n's output (its negative) comes out with frame n + depth - 1."""

    def __init__(self, engine, prompt, *, strength=0.5, steps=None, seed=0, similarity=0.98, width=None,
                 height=None, negative_prompt=None, guidance=None, recipe=None, **_):
        self.engine = engine
        self.params = {}
        self.update(prompt=prompt, strength=strength, steps=steps, seed=seed, similarity=similarity,
                    negative_prompt=negative_prompt)
        self.size = (width or 32, height or 32)
        self.batch = []
        self.sched = object()
        self.stats = {"frames_in": 0, "frames_out": 0, "skipped": 0, "unet_calls": 0, "last_seconds": None}

    def update(self, **changes):
        self.engine.threads.add(threading.current_thread().name)
        if not 0 < (changes.get("strength") or 0.5) <= 1:
            raise RequestError("strength must be in (0, 1]", field="strength")
        if changes.get("prompt") == "explode":
            raise RuntimeError("a bug in the engine")
        if any(k in self.params and changes[k] != self.params[k] for k in ("strength", "steps", "seed")
               if k in changes):
            self.batch, self.sched = [], object()  # as Stream: a new schedule or noise drops the frames in flight
        self.params.update(changes)
        self.engine.prompts.append(self.params["prompt"])

    def fit(self, frame):
        from PIL import ImageOps

        return ImageOps.fit(frame.convert("RGB"), self.size)

    def process(self, frame):
        self.engine.threads.add(threading.current_thread().name)
        assert frame.size == self.size and frame.mode == "RGB"
        self.engine.held.append(self.engine.app.state.streams.held_bytes())
        t0 = time.perf_counter()
        time.sleep(self.engine.seconds)
        self.engine.inputs.append(int(np.asarray(frame).mean().round()))
        self.batch.append(Image.fromarray(255 - np.asarray(frame)))
        self.stats.update(frames_in=self.stats["frames_in"] + 1, unet_calls=self.stats["unet_calls"] + 1,
                          last_seconds=time.perf_counter() - t0)
        if len(self.batch) < self.engine.depth:
            return None
        self.stats["frames_out"] += 1
        return self.batch.pop(0)

    def flush(self):
        rest, self.batch = self.batch, []
        self.stats["frames_out"] += len(rest)
        return rest


class FakeEngine:
    """What the server reads of an engine, plus a fake `stream` that records what reaches it and on which thread."""

    c = SimpleNamespace(name="fake-stream", notes=())
    arch = "fake"
    native_size = 32

    def __init__(self, seconds=0.0, depth=2):
        self.seconds, self.depth = seconds, depth
        self.controlnets, self.loras = {}, {}
        self.threads, self.prompts, self.inputs, self.held = set(), [], [], []
        self.app = None

    def stream(self, prompt, **kw):
        if kw.get("recipe") not in (None, "lcm", "turbo"):
            raise RequestError(f"unknown recipe {kw['recipe']!r}", field="recipe")
        return FakeStream(self, prompt, **kw)


def jpeg(level, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, (level,) * 3).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def level(data):
    return int(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean().round())


def client_for(engine, **config):
    app = create_app(engine, ServeConfig(max_wait=0.0, **config))
    engine.app = app
    return TestClient(app)


def messages(ws, until):
    """Messages (json dicts and bytes) until one satisfies `until`."""
    out = []
    while True:
        m = ws.receive()
        out.append(m["bytes"] if m.get("bytes") is not None else json.loads(m["text"]))
        if until(out[-1]):
            return out


def is_type(kind):
    return lambda m: isinstance(m, dict) and m.get("type") == kind


def test_frames_in_frames_out_in_order_through_the_engine_thread():
    engine = FakeEngine(depth=2)
    with client_for(engine) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"prompt": "a red circle", "strength": 0.6, "format": "webp"}))
        ready = messages(ws, is_type("ready"))[-1]
        assert (ready["width"], ready["height"]) == (32, 32) and ready["params"]["prompt"] == "a red circle"
        got = []
        for i, lv in enumerate((40, 120, 200)):
            ws.send_bytes(jpeg(lv))
            batch = messages(ws, is_type("frame"))
            stats = batch[-1]
            assert stats["output"] is (i > 0) and stats["processed"] == i + 1  # the batch's first frame is late
            got += [b for b in batch if isinstance(b, bytes)]
        ws.send_text(json.dumps({"flush": True}))
        got += [b for b in messages(ws, is_type("frame")) if isinstance(b, bytes)]
    assert [Image.open(io.BytesIO(b)).format for b in got] == ["WEBP"] * 3
    assert [level(b) for b in got] == pytest.approx([215, 135, 55], abs=3)  # each frame's negative, in order
    assert stats["latency_ms"] >= 0 and stats["dropped"] == 0
    assert engine.threads == {"fewstep-engine"}  # the stream is touched only by the batcher's worker


def test_prompt_changes_mid_stream_and_errors_name_the_field():
    engine = FakeEngine(depth=1)
    with client_for(engine, max_steps=8) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(jpeg(90))
        assert isinstance(messages(ws, is_type("frame"))[-2], bytes)
        ws.send_text(json.dumps({"prompt": "a blue square", "seed": 3}))
        assert messages(ws, is_type("updated"))[-1]["params"] == {"prompt": "a blue square", "seed": 3}
        assert engine.prompts[-1] == "a blue square"
        for bad, field in (({"strength": 1.5}, "strength"), ({"steps": 9}, "steps"), ({"steps": "4"}, "steps"),
                           ({"seed": -1}, "seed"), ({"colour": "red"}, "colour"), ({"prompt": None}, "prompt"),
                           ({"prompt": "x" * 5000}, "prompt"), ({"recipe": "nope"}, "recipe"),
                           ({"width": 4096}, "width"), ({"loras": {"nope": 0.5}}, "loras"),
                           ({"format": "gif"}, "format")):
            ws.send_text(json.dumps(bad))
            err = messages(ws, lambda m: isinstance(m, dict) and m.get("type") in ("error", "updated", "ready"))[-1]
            assert err["type"] == "error" and err["field"] == field, (bad, err)
            assert field in err["message"]
        ws.send_text("not json")
        err = messages(ws, is_type("error"))[-1]
        assert err["field"] is None and "JSON object" in err["message"]
        ws.send_bytes(jpeg(90))  # the stream still runs, with the last good parameters
        assert isinstance(messages(ws, is_type("frame"))[-2], bytes)
    assert engine.prompts[-1] == "a blue square"


def test_a_recipe_change_starts_a_new_stream_and_a_failing_engine_ends_only_this_stream():
    engine = FakeEngine(depth=1)
    with client_for(engine) as client:
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_text(json.dumps({"prompt": "a", "width": 24, "height": 16}))
            assert messages(ws, is_type("ready"))[-1]["width"] == 24
            ws.send_text(json.dumps({"recipe": "turbo"}))
            ready = messages(ws, is_type("ready"))[-1]
            assert ready["params"]["recipe"] == "turbo" and (ready["width"], ready["height"]) == (24, 16)
            ws.send_text(json.dumps({"prompt": "explode"}))
            err = messages(ws, is_type("error"))[-1]
            assert "the stream failed: RuntimeError" in err["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1011
        with client.websocket_connect("/v1/stream") as ws:  # the server goes on
            ws.send_bytes(jpeg(10))
            assert isinstance(messages(ws, is_type("frame"))[-2], bytes)
        assert client.get("/health").status_code == 200


def test_a_model_switch_starts_the_stream_again_on_the_new_model():
    engine, other = FakeEngine(depth=1), FakeEngine(depth=1)
    with client_for(engine) as client, client.websocket_connect("/v1/stream") as ws:
        other.app = engine.app
        ws.send_text(json.dumps({"prompt": "kept"}))
        ws.send_bytes(jpeg(10))
        messages(ws, is_type("frame"))
        server = engine.app.state.server
        server.ready(server.build("other", other))  # what a client picking another model does
        ws.send_bytes(jpeg(20))
        got = messages(ws, is_type("frame"))
    assert [m["params"]["prompt"] for m in got if isinstance(m, dict) and m["type"] == "ready"] == ["kept"]
    assert level(got[-2]) == pytest.approx(235, abs=3) and len(engine.inputs) == len(other.inputs) == 1


def test_bad_frames_get_an_error_and_the_stream_goes_on():
    engine = FakeEngine(depth=1)
    with client_for(engine, max_frame_bytes=20_000, max_image_pixels=200 * 200) as client, \
            client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(b"\xff\xd8 not really a jpeg")
        err = messages(ws, is_type("error"))[-1]
        assert err["field"] == "frame" and "not a readable image" in err["message"]
        ws.send_bytes(b"x" * 20_001)
        err = messages(ws, is_type("error"))[-1]
        assert err["field"] == "frame" and "20001 bytes, more than 20000" in err["message"]
        ws.send_bytes(jpeg(0, size=(300, 300)))  # small file, too many pixels: refused before decoding
        err = messages(ws, is_type("error"))[-1]
        assert err["field"] == "frame" and "300x300" in err["message"]
        ws.send_bytes(jpeg(60))
        out = messages(ws, is_type("frame"))
        assert level(out[-2]) == pytest.approx(195, abs=3)


def test_the_api_key_is_required_as_header_subprotocol_or_query():
    key = "stream-key-0123"
    token = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    engine = FakeEngine(depth=1)
    with client_for(engine, api_key=key) as client:
        for kwargs in ({}, {"subprotocols": ["fewstep", "fewstep.key.d3Jvbmc"]}, {"headers": {"Authorization":
                                                                                              "Bearer wrong-key"}}):
            with pytest.raises(Exception) as refused, client.websocket_connect("/v1/stream", **kwargs):
                pass
            assert getattr(refused.value, "status_code", None) == 401, refused.value
            assert b"API key" in refused.value.content
        for path, kwargs in (("/v1/stream", {"headers": {"Authorization": f"Bearer {key}"}}),
                             ("/v1/stream", {"subprotocols": ["fewstep", f"fewstep.key.{token}"]}),
                             (f"/v1/stream?key={key}", {})):
            with client.websocket_connect(path, **kwargs) as ws:
                if "subprotocols" in kwargs:
                    assert ws.accepted_subprotocol == "fewstep"  # never the key back
                ws.send_bytes(jpeg(30))
                assert isinstance(messages(ws, is_type("frame"))[-2], bytes)


def test_uvicorn_serves_the_socket_with_the_pinned_websockets():
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from tests.support.serve import LiveServer

    key = "stream-key-0123"
    engine = FakeEngine(depth=1)
    with LiveServer(engine, ServeConfig(max_wait=0.0, api_key=key)) as server:
        engine.app = server.app
        url = server.url.replace("http://", "ws://") + "/v1/stream"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, open_timeout=10).close()
        assert refused.value.response.status_code == 401 and b"API key" in refused.value.response.body
        token = base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
        with connect(url, subprotocols=["fewstep", f"fewstep.key.{token}"], open_timeout=10) as ws:
            assert ws.subprotocol == "fewstep"
            ws.send(jpeg(100))
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"
            out = ws.recv(timeout=10)
            assert level(out) == pytest.approx(155, abs=3)
            assert json.loads(ws.recv(timeout=10))["type"] == "frame"


def test_streams_beyond_the_limit_are_refused_with_a_reason():
    engine = FakeEngine(depth=1)
    with client_for(engine, max_streams=1) as client, client.websocket_connect("/v1/stream") as first:
        first.send_bytes(jpeg(30))
        messages(first, is_type("frame"))
        with client.websocket_connect("/v1/stream") as second:
            err = json.loads(second.receive_text())
            assert err["type"] == "error" and "at most 1 streams" in err["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                second.receive_text()
            assert closed.value.code == 1013
        first.send_bytes(jpeg(30))  # the first stream is unaffected
        assert isinstance(messages(first, is_type("frame"))[-2], bytes)


def test_an_idle_stream_is_closed_and_frees_its_place(monkeypatch):
    monkeypatch.setattr("fewstep.serve.stream.IDLE_SECONDS", 0.3)
    engine = FakeEngine(depth=1)
    with client_for(engine, max_streams=1) as client:
        with client.websocket_connect("/v1/stream") as idle:
            err = json.loads(idle.receive_text())
            assert err["type"] == "error" and "nothing received for 0.3 s" in err["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                idle.receive_text()
            assert closed.value.code == 1000
        with client.websocket_connect("/v1/stream") as ws:
            ws.send_bytes(jpeg(30))
            assert isinstance(messages(ws, is_type("frame"))[-2], bytes)


def test_a_client_ten_times_faster_than_the_engine_holds_one_frame_and_the_latest_wins():
    engine = FakeEngine(seconds=0.05, depth=1)
    sent = 120
    with client_for(engine) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"prompt": "fast"}))
        messages(ws, is_type("ready"))
        for i in range(sent):  # one frame every 5 ms against 50 ms per engine call
            ws.send_bytes(jpeg(i * 2))
            time.sleep(0.005)
        ws.send_bytes(jpeg(250))  # the last frame sent: it must come out
        outputs = []
        while True:
            m = messages(ws, is_type("frame"))
            outputs += [level(b) for b in m if isinstance(b, bytes)]
            if m[-1]["processed"] + m[-1]["dropped"] == sent + 1:
                break
        stats = m[-1]
    assert stats["received"] == sent + 1
    assert stats["processed"] <= sent // 4  # most frames were dropped, not queued
    assert outputs[-1] == pytest.approx(255 - 250, abs=3)  # the newest frame won
    assert engine.inputs == sorted(engine.inputs)  # frames are taken newest-first, never an older one after
    frame_bytes = max(len(jpeg(i * 2)) for i in range(sent))
    assert max(engine.held) <= frame_bytes  # at most one frame waited while the engine worked


def test_a_stream_does_not_starve_http_requests():
    from tests.support.serve import default_engine

    real = default_engine()

    class Both(FakeEngine):  # the real engine for HTTP, a busy fake stream on the same worker thread
        def __getattr__(self, name):
            return getattr(real, name)

    engine = Both(seconds=0.03, depth=1)
    engine.c, engine.arch, engine.controlnets, engine.loras = real.c, real.arch, real.controlnets, real.loras
    with client_for(engine) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_bytes(jpeg(50))
        messages(ws, is_type("frame"))  # the stream runs
        done = threading.Event()

        def blast():  # for at most 20 s: a starved request shows as a slow one, not as a hang
            end = time.monotonic() + 20
            while not done.is_set() and time.monotonic() < end:
                ws.send_bytes(jpeg(50))
                time.sleep(0.003)

        sender = threading.Thread(target=blast, daemon=True)
        sender.start()
        try:
            time.sleep(0.2)
            before = len(engine.inputs)
            t0 = time.monotonic()
            r = client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 2, "seed": 1})
            took = time.monotonic() - t0
            during = len(engine.inputs) - before
        finally:
            done.set()
            sender.join(5)
        assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
        assert took < 20  # it ran between frames while the stream went on sending, not after the stream ended
        assert during >= 1  # and the stream's frames went on around it (they take turns)


# ---- the real engine stream of the embedded default model --------------------------------------------------------
CAPTIONS = ("a red circle in the center on a blue background", "a yellow square in the top left on a green background",
            "a white triangle in the bottom right on a black background")


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_socket_runs_the_engine_stream_as_the_library_does():
    from fewstep.worlds.shapes.world import render
    from tests.support.images import assert_close_images
    from tests.support.serve import default_engine

    engine = default_engine()
    frames = [render(c) for c in CAPTIONS]
    settings = {"prompt": "a red circle", "strength": 0.5, "steps": 2, "seed": 3, "similarity": 1.0}
    direct = engine.stream(**settings)
    expected = [out for f in frames if (out := direct.process(f)) is not None] + direct.flush()
    with client_for(engine) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps(dict(settings, format="png")))
        ready = messages(ws, is_type("ready"))[-1]
        assert (ready["width"], ready["height"]) == (64, 64)
        got = []
        for f in frames:
            ws.send_bytes(png(f))
            got += [b for b in messages(ws, is_type("frame")) if isinstance(b, bytes)]
        ws.send_text(json.dumps({"flush": True}))
        batch = messages(ws, is_type("frame"))
        got += [b for b in batch if isinstance(b, bytes)]
        stats = batch[-1]
    assert len(got) == len(frames) == len(expected)
    assert stats["unet_calls"] == direct.stats["unet_calls"] and stats["skipped"] == 0
    for a, b in zip(got, expected):
        assert_close_images(Image.open(io.BytesIO(a)).convert("RGB"), b)
    assert max(float(np.abs(np.asarray(Image.open(io.BytesIO(a)), np.float32) - np.asarray(Image.open(
        io.BytesIO(b)), np.float32)).mean()) for a, b in zip(got[:2], got[1:3])) > 5  # outputs follow the input


def test_identical_frames_are_skipped_by_the_filter_and_the_last_output_resent():
    from fewstep.worlds.shapes.world import render
    from tests.support.serve import default_engine

    first, frame = png(render(CAPTIONS[0])), png(render(CAPTIONS[2]))
    with client_for(default_engine()) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_text(json.dumps({"prompt": "a red circle", "steps": 2, "similarity": 0.9, "format": "png"}))
        messages(ws, is_type("ready"))
        outs = []
        for f in [first] + [frame] * 6:
            ws.send_bytes(f)
            batch = messages(ws, is_type("frame"))
            outs += [b for b in batch if isinstance(b, bytes)]
        stats = batch[-1]
    assert stats["skipped"] >= 3 and stats["unet_calls"] == stats["processed"] - stats["skipped"]
    assert len(outs) >= 5 and len(set(outs[1:])) == 1  # the last output is sent again for each skipped frame
    assert stats["resent"]  # the last frame, a repeat, was answered with the last output
