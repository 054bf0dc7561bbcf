"""Cancellation within a step: the engine stops before the next UNet block once its work is unwanted (Engine.run's
`cancel`, used by the server's batcher when every client of a batch has gone), and gives the right image after."""

import threading

import pytest

from fewstep.errors import Cancelled
from fewstep.serve.config import ServeConfig
from tests.support.images import assert_close_images
from tests.support.serve import LiveServer, decode_png, default_engine
from tests.test_serve_limits import raw_request, wait_for

OPENAI = "/v1/images/generations"


def blocks_of(unet):
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


class Counter:
    """Counts finished UNet passes (steps, CFG off) and finished blocks; `trigger(step)` runs in the pre-hook of
    the UNet's second down block during that step (0-based), before the engine's own stop hooks."""

    def __init__(self, engine, step, trigger):
        self.unet = engine.c.unet
        self.steps = self.blocks = 0
        self.blocks_at_drop = self.steps_at_drop = None
        self.step, self.trigger = step, trigger

        def pre(module, args):
            if self.steps == self.step and self.blocks_at_drop is None:
                self.blocks_at_drop, self.steps_at_drop = self.blocks, self.steps
                self.trigger()

        def done_block(module, args, out):
            self.blocks += 1

        def done_step(module, args, out):
            self.steps += 1

        self.handles = [self.unet.down_blocks[1].register_forward_pre_hook(pre),
                        self.unet.register_forward_hook(done_step),
                        *[b.register_forward_hook(done_block) for b in blocks_of(self.unet)]]

    def close(self):
        for h in self.handles:
            h.remove()

    @property
    def blocks_after_drop(self):
        return self.blocks - self.blocks_at_drop


def test_a_cancel_set_mid_step_stops_before_the_next_block_and_the_engine_stays_usable():
    engine = default_engine()
    ref = engine.generate("a red circle", seed=3, steps=4).images[0]
    stop = threading.Event()
    count = Counter(engine, step=1, trigger=stop.set)
    try:
        with pytest.raises(Cancelled):
            engine.generate("a red circle", seed=3, steps=4, cancel=stop)
    finally:
        count.close()
    assert count.steps_at_drop == 1 and count.steps == 1  # the second step never finished
    assert count.blocks_after_drop == 0  # the block about to run when the cancel came did not run
    assert not any(b._forward_pre_hooks for b in blocks_of(engine.c.unet))  # the stop hooks are gone
    assert_close_images(engine.generate("a red circle", seed=3, steps=4).images[0], ref)


def test_a_callable_cancel_works_and_an_unset_one_changes_nothing():
    engine = default_engine()
    ref = engine.generate("a blue square", seed=5, steps=2).images[0]
    out = engine.generate("a blue square", seed=5, steps=2, cancel=lambda: False).images[0]
    assert_close_images(out, ref)
    with pytest.raises(Cancelled):
        engine.generate("a blue square", seed=5, steps=2, cancel=lambda: True)


def test_a_request_dropped_mid_step_stops_the_engine_within_that_step():
    """The client leaves during step 2 of 8; the engine is held inside that step until the server has noticed
    (as a slow 1024 px step would be), and then runs no further UNet block."""
    engine = default_engine()
    body = {"prompt": "a red circle", "size": "64x64", "steps": 8, "seed": 4}
    with LiveServer(engine, ServeConfig(max_batch=1, max_wait=0.0)) as server:
        ref = server.client.post(OPENAI, json=body).json()["data"][0]["b64_json"]
        sock = [None]

        def drop():
            sock[0].close()
            wait_for(lambda: server.metric("fewstep_refused_requests_total", reason="disconnected") == 1)

        count = Counter(engine, step=1, trigger=drop)
        try:
            sock[0] = raw_request(server.url, body)
            wait_for(lambda: server.metric("fewstep_cancelled_batches_total") == 1, timeout=30)
        finally:
            count.close()
        assert count.steps_at_drop == 1 and count.steps == 1, "work went on after the client left"
        assert count.blocks_after_drop == 0
        again = server.client.post(OPENAI, json=body)
        assert again.status_code == 200
        assert_close_images(decode_png(again.json()["data"][0]["b64_json"]).convert("RGB"),
                            decode_png(ref).convert("RGB"))


def test_a_compiled_unet_runs_no_hooks_and_stops_at_the_end_of_the_step(monkeypatch):
    """A compiled or CUDA-graph UNet (here: any callable that is not the module itself) runs no Python between
    its kernels: the engine registers no hooks there and checks between steps instead."""
    engine = default_engine()
    unet = engine.c.unet
    monkeypatch.setattr(engine.fast, "unet_fn", lambda *a, **kw: unet(*a, **kw))
    stop = threading.Event()
    count = Counter(engine, step=1, trigger=stop.set)
    try:
        with pytest.raises(Cancelled):
            engine.generate("a red circle", seed=3, steps=4, cancel=stop)
    finally:
        count.close()
    assert count.steps == 2  # the step during which it was cancelled finished; the next did not start
