"""Admission control: the server learns this engine's speed at warm-up and from every batch, refuses a request it
could not finish before --timeout up front (422 with the estimate and what would fit), and limits sizes per model."""

import pytest

from fewstep.serve import admission, lifecycle
from fewstep.serve.config import ServeConfig
from tests.support.serve import LiveServer, default_engine

OPENAI = "/v1/images/generations"
TXT2IMG = "/sdapi/v1/txt2img"


@pytest.fixture(scope="module")
def served():
    with LiveServer(default_engine(), ServeConfig(max_wait=0.0, timeout=10.0, max_steps=50)) as server:
        yield server


def pin(speed, per_step, per_image):
    """A known speed, so the estimates below do not depend on this (shared, noisy) machine."""
    speed.per_step, speed.per_image = per_step, per_image


def test_the_speed_is_learnt_at_warm_up_and_follows_each_batch(served):
    target = served.state.target
    target.speed = admission.Speed()
    lifecycle.warm_up(target)
    assert target.speed.known and target.speed.per_step > 0 and target.speed.batches == 1
    pin(target.speed, 1e-12, 0.0)  # far from the truth: the next batch must pull it towards the measured speed
    r = served.client.post(OPENAI, json={"prompt": "a red circle", "size": "64x64", "steps": 2})
    assert r.status_code == 200
    assert target.speed.batches == 2 and target.speed.per_step > 1e-9


def test_an_over_budget_request_is_refused_before_it_queues_with_the_numbers(served):
    target = served.state.target
    pin(target.speed, 1e-4, 1e-5)  # a 64x64 image-step: 0.41 s, the rest of an image: 0.04 s
    images = served.metric("fewstep_images_total")
    body = {"prompt": "a red circle", "size": "128x128", "n": 4, "steps": 40}
    r = served.client.post(OPENAI, json=body)
    assert r.status_code == 422, r.text
    e = r.json()["error"]
    estimate = 4 * 128 * 128 * (40 * 1e-4 + 1e-5)  # 263 s; CFG is off at the LCM default guidance
    assert e["estimate_seconds"] == pytest.approx(estimate, rel=1e-3) and e["limit_seconds"] == 10.0
    per_image = 128 * 128 * (40 * 1e-4 + 1e-5)
    assert e["fits"]["n"] == int(10 // per_image) == 0  # not even one image of this size and steps
    assert e["fits"]["steps"] == int((10 / (4 * 128 * 128) - 1e-5) // 1e-4) == 1
    assert e["fits"]["size"] == 24  # sqrt(10 / (4 x (40e-4 + 1e-5))) = 24.97, down to the latent factor 4
    assert "about 263 s" in e["message"] and "--timeout" in e["message"] and "at most 1 steps" in e["message"]
    assert served.metric("fewstep_refused_requests_total", reason="over_budget") == 1
    assert served.metric("fewstep_queue_requests") == 0
    assert served.metric("fewstep_images_total") == images  # the engine never ran it
    for smaller in ({"steps": e["fits"]["steps"]}, {"size": "24x24"}):  # each suggestion is accepted
        pin(target.speed, 1e-4, 1e-5)  # (each batch run moves the estimate)
        assert served.client.post(OPENAI, json=dict(body, **smaller)).status_code == 200
    pin(target.speed, 1e-4, 1e-5)
    r = served.client.post(TXT2IMG, json={"prompt": "x", "width": 128, "height": 128, "batch_size": 4, "steps": 40})
    assert r.status_code == 422 and r.json()["error"]["fits"]["steps"] == 1  # the A1111 dialect too


def test_limits_follow_the_model_and_the_page_is_offered_only_what_fits(served):
    target = served.state.target
    info = served.client.get("/api/info").json()
    assert info["limits"]["max_size"] == 128  # twice the shapes model's native 64 px (no --max-size given)
    r = served.client.post(OPENAI, json={"prompt": "a red circle", "size": "1024x1024"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "size" and "128" in r.json()["error"]["message"]
    pin(target.speed, 1e-6, 0.0)  # 4 steps of 128x128: 0.07 s, well within 10 s
    assert served.client.get("/api/info").json()["sizes"] == [32, 64, 96, 128]
    pin(target.speed, 1e-4, 0.0)  # one image at 4 steps: 64 px 1.6 s, 96 px 3.7 s, 128 px 6.6 s
    assert served.client.get("/api/info").json()["sizes"] == [32, 64, 96, 128]
    pin(target.speed, 2e-4, 0.0)  # 64 px 3.3 s, 96 px 7.4 s, 128 px 13 s: 128 goes
    assert served.client.get("/api/info").json()["sizes"] == [32, 64, 96]


def test_an_explicit_max_size_is_kept():
    config = lifecycle.model_config(ServeConfig(max_size=96), default_engine())
    assert config.max_size == 96
    assert lifecycle.model_config(ServeConfig(), default_engine()).max_size == 128


def test_a_request_that_would_time_out_behind_the_queue_gets_429_with_when_to_retry():
    from tests.support.serve import Gated
    from tests.test_serve_limits import post_in_thread, wait_for

    gated = Gated(default_engine())
    with LiveServer(gated, ServeConfig(max_wait=0.0, max_batch=1, timeout=10.0)) as server:
        pin(server.state.target.speed, 1e-4, 0.0)  # a 64x64 image at 10 steps: 4.1 s, at 2 steps: 0.8 s
        body = {"prompt": "a red circle", "size": "64x64", "steps": 10}
        out = {}
        first = post_in_thread(server, body, out, 1)
        assert gated.entered.wait(10)  # it runs (held by the gate): up to 4.1 s ahead
        second = post_in_thread(server, body, out, 2)
        wait_for(lambda: server.metric("fewstep_queue_requests") == 1)  # up to 8.2 s ahead now
        r = server.client.post(OPENAI, json=body)  # 8.2 + 4.1 > 10: it would time out in the queue
        assert r.status_code == 429 and "of work is ahead of this request" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 3  # ceil(12.3 - 10), less the time the first has run
        assert server.metric("fewstep_queue_requests") == 1  # it never queued
        third = post_in_thread(server, dict(body, steps=2), out, 3)  # 8.2 + 0.8 fits: queued
        wait_for(lambda: server.metric("fewstep_queue_requests") == 2)
        gated.gate.set()
        first.join(30), second.join(30), third.join(30)
        assert [out[k].status_code for k in (1, 2, 3)] == [200, 200, 200]
