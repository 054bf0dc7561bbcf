"""fewstep on Ray Serve: a local cluster on 127.0.0.1, the shapes model, two replicas (marked `ray`).

The contract: a request answered through the Ray app is the request answered by one `fewstep serve` (same image
within 1/255, same error body); requests over two LoRA sets re-fuse no more than the sets each replica sees; a
replica killed under load loses no request and comes back.
"""

import base64
import io
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from tests.support.images import max_diff  # noqa: E402

SHAPES = Path(__file__).resolve().parents[1] / "fewstep" / "data" / "shapes"
PROMPT = "a red circle in the top left on a blue background"
KEY = "ray-test-key-123"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    shutil.copy(SHAPES / "outline-lora.safetensors", d / "outline.safetensors")
    shutil.copy(SHAPES / "outline-lora.safetensors", d / "outline-b.safetensors")
    return d


@pytest.fixture(scope="module")
def cluster(lora_dir):
    from tests.support.ray import deploy

    config = {"lora_dir": str(lora_dir), "api_key": KEY, "max_wait": 0.0}
    url = deploy(config, replicas=2)
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client, config


@pytest.fixture(scope="module")
def single(cluster):
    """The same model and settings as one in-process server: the reference."""
    import fewstep
    from fewstep.serve.app import create_app
    from fewstep.serve.config import ServeConfig

    _, config = cluster
    engine = fewstep.load(None, device="cpu", dtype="fp32")
    with TestClient(create_app(engine, ServeConfig(**config)),
                    headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_the_routing_key_is_the_requests_adapter_set():
    from fewstep.serve.ray import NO_ADAPTERS, adapter_key

    body = b'{"prompt": "a cat <lora:ink:0.5> <lora:ink:0.25>", "loras": {"outline": 1, "zero": 0}}'
    assert adapter_key(body, "application/json") == "ink:0.75,outline:1"
    assert adapter_key(b'{"prompt": "a cat"}', "application/json") == NO_ADAPTERS
    assert adapter_key(b"not json", "application/json") == NO_ADAPTERS
    assert adapter_key(b"--form--", "multipart/form-data") == NO_ADAPTERS
    assert adapter_key(b"[1, 2]", "application/json") == NO_ADAPTERS


def test_application_arguments_are_checked_before_any_replica_starts():
    from fewstep.serve.config import ConfigError
    from fewstep.serve.ray import app, parse_autoscale

    assert parse_autoscale("0:4") == (0, 4)
    for bad in ("4:1", "0:0", "x", "1-4"):
        with pytest.raises(ConfigError, match="--autoscale"):
            parse_autoscale(bad)
    with pytest.raises(ConfigError, match="unknown argument 'lora_folder'"):
        app({"lora_folder": "/tmp"})
    with pytest.raises(ConfigError, match="--max-batch"):
        app({"max_batch": "0"})


def test_serve_ray_flags_refuse_bad_values_in_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "serve", "--ray", "--autoscale", "3:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--autoscale must be MIN:MAX" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "serve", "--ray", "--model", str(tmp_path), "--model",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--ray serves one --model" in r.stderr and "Traceback" not in r.stderr


def pixels(b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.mark.ray
def test_answers_equal_a_single_servers(cluster, single):
    client, _ = cluster
    body = {"prompt": PROMPT + " <lora:outline:0.8>", "seed": 3, "steps": 4, "batch_size": 2}
    got, want = client.post("/sdapi/v1/txt2img", json=body), single.post("/sdapi/v1/txt2img", json=body)
    assert got.status_code == want.status_code == 200
    for a, b in zip(got.json()["images"], want.json()["images"]):
        assert max_diff(pixels(a), pixels(b)) <= 1
    o = {"prompt": PROMPT, "seed": 5, "n": 1, "response_format": "b64_json"}
    got, want = client.post("/v1/images/generations", json=o), single.post("/v1/images/generations", json=o)
    assert got.status_code == want.status_code == 200
    assert max_diff(pixels(got.json()["data"][0]["b64_json"]), pixels(want.json()["data"][0]["b64_json"])) <= 1
    bad = {"prompt": PROMPT, "steps": 1000}
    got, want = client.post("/sdapi/v1/txt2img", json=bad), single.post("/sdapi/v1/txt2img", json=bad)
    assert got.status_code == want.status_code == 422 and got.json() == want.json()
    anon = httpx.post(str(client.base_url.join("/sdapi/v1/txt2img")), json={"prompt": PROMPT})
    assert anon.status_code == 401
    assert client.get("/health").status_code == 200


def switches(client):
    text = client.get("/ray/metrics").text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("fewstep_ray_adapter_switches{")}


@pytest.mark.ray
def test_requests_stick_to_the_replica_that_has_their_adapter_set(cluster):
    client, _ = cluster
    before = switches(client)
    sets = [" <lora:outline:0.8>", " <lora:outline-b:0.5>"]
    for i in range(12):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT + sets[i % 2], "seed": i, "steps": 1})
        assert r.status_code == 200
        time.sleep(0.5)  # sequential traffic: Ray learns which replica holds which set between requests
    after = switches(client)
    refused = sum(after.get(k, 0) - before.get(k, 0) for k in after)
    # round-robin over 2 replicas would re-fuse on (almost) every request: 12; sticky routing at most 2 per replica
    assert refused <= 2 * len(after), (before, after)


def replica_pids(client, n=8):
    pids = set()
    for i in range(n):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": i, "steps": 1})
        pids.add(r.headers["x-fewstep-replica"])
    return pids


@pytest.mark.ray
def test_a_replica_killed_under_load_loses_no_request_and_comes_back(cluster):
    client, _ = cluster
    pids = replica_pids(client)
    assert len(pids) >= 1
    victim = int(sorted(pids)[0])
    answers, lock = [], threading.Lock()

    def send(i):
        try:
            r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": 100 + i, "steps": 8,
                                                       "batch_size": 2})
            out = r.status_code
        except httpx.HTTPError as e:  # a hang or a dropped connection: lost
            out = type(e).__name__
        with lock:
            answers.append((i, out))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert sorted(i for i, _ in answers) == list(range(10))  # every request answered once
    assert all(code in (200, 503) for _, code in answers), answers
    assert sum(code == 200 for _, code in answers) >= 8, answers  # retried on the other replica
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray restarts the replica
        status = serve.status().applications["fewstep"].deployments["fewstep-replica"]
        running = status.replica_states.get("RUNNING", 0)
        if running == 2 and str(status.status).endswith("HEALTHY"):
            break
        time.sleep(1)
    assert running == 2, status
    assert victim not in {int(p) for p in replica_pids(client)}
