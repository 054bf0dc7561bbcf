"""fewstep serve refuses what would hurt it: every limit answers with its status, field and reason, and work for
clients that left or ran out of time stops costing compute."""

import base64
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from fewstep.serve.config import ConfigError, ServeConfig
from tests.support.serve import Gated, LiveServer, default_engine

OPENAI, TXT2IMG, IMG2IMG = "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"


def png_b64(size, color=(0, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("limit-loras")
    (root / "style.safetensors").write_bytes(b"")  # refused before it would be read
    (tmp_path_factory.getbasetemp() / "outside.safetensors").write_bytes(b"")
    config = ServeConfig(lora_dir=str(root), max_size=128, max_images=4, max_steps=8, max_prompt_chars=100,
                         max_body_bytes=64 * 1024, max_image_pixels=256 * 256, max_loras=1)
    with LiveServer(default_engine(), config) as server:
        yield server


REFUSED = [  # route, body, field named in the 422
    (OPENAI, {"prompt": "x", "size": "big"}, "size"),
    (OPENAI, {"prompt": "x", "size": "256x64"}, "size"),
    (OPENAI, {"prompt": "x", "size": "62x64"}, "size"),  # not a multiple of the latent factor
    (OPENAI, {"prompt": "x", "size": "\uff16\uff14x\uff16\uff14"}, "size"),  # full-width digits: not a size
    (OPENAI, {"prompt": "x", "n": 5}, "n"),
    (OPENAI, {"prompt": "x", "n": 0}, "n"),
    (OPENAI, {"prompt": "x", "steps": 9}, "steps"),
    (OPENAI, {"prompt": "x", "steps": 0}, "steps"),
    (OPENAI, {"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    (OPENAI, {"prompt": "x", "seed": -3}, "seed"),
    (OPENAI, {"prompt": "x", "sampler": "dpm"}, "sampler"),
    (OPENAI, {"prompt": "x", "recipe": "warp"}, "recipe"),
    (OPENAI, {"prompt": "x" * 101}, "prompt"),
    (OPENAI, {"prompt": "x", "negative_prompt": "y" * 101}, "negative_prompt"),
    (OPENAI, {"prompt": 3}, "prompt"),
    (OPENAI, {}, "prompt"),
    (OPENAI, {"prompt": "x", "n": "two"}, "n"),
    (OPENAI, {"prompt": "x", "response_format": "jpeg"}, "response_format"),
    (OPENAI, {"prompt": "x", "loras": {"../outside": 1.0}}, "loras"),
    (OPENAI, {"prompt": "x", "loras": {"/etc/passwd": 1.0}}, "loras"),
    (OPENAI, {"prompt": "x", "loras": {"missing": 1.0}}, "loras"),
    (OPENAI, {"prompt": "x", "loras": {"style": 99}}, "loras"),
    (OPENAI, {"prompt": "x <lora:style:1> <lora:other:1>"}, "loras"),
    (OPENAI, {"prompt": "x <lora:..%2F..%2Fetc:1>"}, "loras"),
    (TXT2IMG, {"prompt": "x", "width": 512}, "width"),
    (TXT2IMG, {"prompt": "x", "height": 4}, "height"),
    (TXT2IMG, {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size"),
    (TXT2IMG, {"prompt": "x", "cfg_scale": 31}, "cfg_scale"),
    (TXT2IMG, {"prompt": "x", "steps": 100}, "steps"),
    (TXT2IMG, {"prompt": "x", "seed": -2}, "seed"),
    (TXT2IMG, {"prompt": "x", "sampler_name": "DPM++ 9M"}, "sampler_name"),
    (TXT2IMG, {"prompt": "x <lora:../../outside:1>"}, "prompt"),
    (TXT2IMG, {"prompt": "x <lora:style:abc>"}, "prompt"),
    (IMG2IMG, {"prompt": "x", "init_images": []}, "init_images"),
    (IMG2IMG, {"prompt": "x", "init_images": ["not base64!"]}, "init_images"),
    (IMG2IMG, {"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
    (IMG2IMG, {"prompt": "x", "init_images": [png_b64((300, 300))]}, "init_images"),  # too many pixels
    (IMG2IMG, {"prompt": "x", "init_images": [png_b64((200, 64))]}, "width"),  # its size is over --max-size
    (IMG2IMG, {"prompt": "x", "init_images": [png_b64((64, 64))], "denoising_strength": 0}, "denoising_strength"),
    (IMG2IMG, {"prompt": "x", "init_images": [png_b64((64, 64))], "mask": "not base64!"}, "mask"),
]


@pytest.mark.parametrize("route,body,field", REFUSED, ids=[f"{r.split('/')[-1]}-{f}-{i}" for i, (r, _, f) in
                                                           enumerate(REFUSED)])
def test_invalid_requests_get_422_with_the_field_and_reason(served, route, body, field):
    steps = served.metric("fewstep_unet_steps_total")
    r = served.client.post(route, json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error"]["param"] == field and err["error"]["type"] == "invalid_request_error"
    assert err["detail"][0]["loc"] == ["body", field] and err["detail"][0]["msg"]
    assert served.metric("fewstep_unet_steps_total") == steps  # refused before any work


def test_malformed_json_is_422(served):
    r = served.client.post(OPENAI, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_bodies_over_the_limit_get_413_with_or_without_a_length(served):
    big = {"prompt": "x", "init_images": ["A" * 70_000]}
    assert served.client.post(IMG2IMG, json=big).status_code == 413

    def chunks():
        yield b'{"prompt": "x", "init_images": ["'
        for _ in range(20):
            yield b"A" * 4096
        yield b'"]}'

    r = served.client.post(IMG2IMG, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert served.metric("fewstep_refused_requests_total", reason="too_large") == 2


def test_config_rejects_settings_that_cannot_work():
    for kw in (dict(max_batch=0), dict(queue_size=2, max_images=4), dict(max_wait=-1), dict(timeout=0),
               dict(api_key="short")):
        with pytest.raises(ConfigError):
            ServeConfig(**kw)


# ---- queue, timeouts, disconnects: an engine that waits on a gate makes them deterministic ------------------------
def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def post_in_thread(server, body, out, key):
    def go():
        out[key] = server.client.post(OPENAI, json=body)

    t = threading.Thread(target=go)
    t.start()
    return t


SMALL = {"size": "32x32", "steps": 2}


def test_a_full_queue_answers_429_with_retry_after():
    gated = Gated(default_engine())
    config = ServeConfig(max_batch=1, max_wait=0.0, queue_size=2, max_images=2)
    with LiveServer(gated, config) as server:
        out = {}
        first = post_in_thread(server, dict(SMALL, prompt="one"), out, 1)
        assert gated.entered.wait(10)  # running, not queued
        second = post_in_thread(server, dict(SMALL, prompt="two", n=2), out, 2)
        wait_for(lambda: server.metric("fewstep_queue_images") == 2)
        r = server.client.post(OPENAI, json=dict(SMALL, prompt="three"))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        gated.gate.set()
        first.join(30), second.join(30)
        assert out[1].status_code == 200 and out[2].status_code == 200
        assert server.client.post(OPENAI, json=dict(SMALL, prompt="four")).status_code == 200


def test_a_request_past_its_timeout_gets_504_and_its_work_stops():
    gated = Gated(default_engine())
    with LiveServer(gated, ServeConfig(timeout=1.0, max_wait=0.0)) as server:
        t0 = time.monotonic()
        r = server.client.post(OPENAI, json=dict(SMALL, prompt="slow", steps=8))
        assert r.status_code == 504 and 0.9 < time.monotonic() - t0 < 5
        gated.gate.set()
        wait_for(lambda: server.metric("fewstep_cancelled_batches_total") == 1)
        assert gated.steps == 0  # stopped before its first step finished (the engine checks between UNet blocks)
        assert server.metric("fewstep_refused_requests_total", reason="timeout") == 1


def raw_request(url, body):
    """Send a request on a bare socket and return the socket (closing it is the client leaving)."""
    import json

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST " + OPENAI.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_a_client_that_disconnects_stops_costing_compute():
    gated = Gated(default_engine())
    with LiveServer(gated, ServeConfig(max_batch=1, max_wait=0.0)) as server:
        running = raw_request(server.url, dict(SMALL, prompt="running", steps=8))
        assert gated.entered.wait(10)
        queued = raw_request(server.url, dict(SMALL, prompt="queued", steps=8))
        wait_for(lambda: server.metric("fewstep_queue_requests") == 1)
        running.close()
        queued.close()
        wait_for(lambda: server.metric("fewstep_refused_requests_total", reason="disconnected") == 2)
        assert server.metric("fewstep_queue_requests") == 0  # the queued request is gone without running
        gated.gate.set()
        wait_for(lambda: server.metric("fewstep_cancelled_batches_total") == 1)
        assert gated.steps == 0  # stopped before its first step finished
        r = server.client.post(OPENAI, json=dict(SMALL, prompt="after"))
        assert r.status_code == 200 and gated.steps == 2


def test_api_key_guards_every_route_but_health_and_the_page():
    key = "s3cret-key-123"
    with LiveServer(default_engine(), ServeConfig(api_key=key)) as server:
        c = server.client
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200  # no data, no compute
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/api/info"),
                             ("GET", "/sdapi/v1/loras"), ("GET", "/v1/images/files/x.png"), ("POST", OPENAI),
                             ("POST", TXT2IMG), ("POST", IMG2IMG)):
            for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": key}):
                r = c.request(method, path, json={"prompt": "x"}, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert server.metric("fewstep_unet_steps_total") == 0
        good = {"Authorization": f"Bearer {key}"}
        assert c.get("/v1/models", headers=good).status_code == 200
        basic = base64.b64encode(f"webui:{key}".encode()).decode()
        assert c.get("/sdapi/v1/loras", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        r = c.post(OPENAI, json=dict(SMALL, prompt="x", response_format="url"), headers=good)
        assert r.status_code == 200
        url = r.json()["data"][0]["url"]
        assert c.get(url).status_code == 401 and c.get(url, headers=good).status_code == 200


def test_the_server_binds_to_loopback_by_default():
    import argparse

    from fewstep.serve.cli import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["serve"].parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860
    with pytest.raises(httpx.ConnectError):  # and nothing is served before it is asked to be
        httpx.get("http://127.0.0.1:1/health")
