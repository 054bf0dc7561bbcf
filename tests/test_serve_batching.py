"""fewstep serve's batcher: compatible requests share one engine call, adapter sets never mix, work is dropped
for clients that left; and on the real default model, concurrent requests with different LoRA weights each get
the image they get alone."""

import concurrent.futures
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fewstep.errors import Cancelled, RequestError
from fewstep.serve.adapters import PREFIX, Adapters
from fewstep.serve.batcher import Batcher, Spec, TimedOut


class FakeEngine:
    """Records each run: its prompts, seeds and the adapter weights fused while it ran."""

    def __init__(self, fail_on=None, delay=0.0):
        self.loras = {}
        self.calls = []
        self.fail_on = fail_on
        self.delay = delay
        self.steps = 0

    def load_lora(self, src, *, name, weight):
        self.loras[name] = SimpleNamespace(weight=weight)

    def set_lora_weights(self, weights):
        for name, w in weights.items():
            self.loras[name].weight = w

    def unload_lora(self, name):
        del self.loras[name]

    full_lcm, vae_factor = False, 8  # what admission control reads

    def run(self, req, *, callback=None, cancel=None, preview=None):
        fused = {n[len(PREFIX):]: s.weight for n, s in self.loras.items() if s.weight}
        self.calls.append(dict(prompts=list(req.prompt), seeds=list(req.seeds), loras=fused, steps=req.steps))
        if self.fail_on and self.fail_on in req.prompt:
            raise RequestError("this prompt fails")
        for i in range(req.steps):
            time.sleep(self.delay)
            self.steps += 1
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            if callback:
                callback(i, req.steps)
        images = [(p, s, tuple(sorted(fused.items()))) for p, s in zip(req.prompt, req.seeds)]
        return SimpleNamespace(images=images, params={"model": "fake"}, warnings=[], timings={})


@pytest.fixture
def lora_dir(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name in ("a", "b", "c"):  # the fake engine never fuses them; the adapter set reads their headers
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)},
                  str(tmp_path / f"{name}.safetensors"))
    return tmp_path


def spec(prompt="p", seeds=(0,), steps=2, loras=(), **kw):
    from fewstep.request import GenerateRequest

    seeds = tuple(seeds)
    return Spec(GenerateRequest(prompt=prompt, seeds=seeds, num_images=len(seeds), steps=steps, guidance=1.0,
                                recipe="lcm", sampler="lcm", width=64, height=64, **kw), loras=tuple(loras))


def make(engine, lora_dir, **kw):
    return Batcher(engine, Adapters(engine, lora_dir, max_loaded=kw.pop("max_loaded", 8)), **kw)


def results(jobs, timeout=10):
    return [j.future.result(timeout) for j in jobs]


def test_compatible_requests_share_one_call_and_keys_split_batches(lora_dir):
    engine = FakeEngine()
    b = make(engine, lora_dir, max_batch=4, max_wait=0.0)
    jobs = [b.submit(spec("a", [1]), 10), b.submit(spec("b", [2], steps=3), 10), b.submit(spec("c", [3, 4]), 10),
            b.submit(spec("d", [5], loras=[("a", 1.0)]), 10), b.submit(spec("e", [6]), 10)]
    b.start()
    out = results(jobs)
    b.close()
    # oldest first; the first batch takes every waiting request with its key, up to max_batch images
    assert [c["prompts"] for c in engine.calls] == [["a", "c", "c", "e"], ["b"], ["d"]]
    assert [c["seeds"] for c in engine.calls] == [[1, 3, 4, 6], [2], [5]]
    assert out[2].images == [("c", 3, ()), ("c", 4, ())] and out[2].seeds == [3, 4]
    assert out[3].images == [("d", 5, (("a", 1.0),))]
    assert out[0].batch_images == 4 and out[1].batch_images == 1


def test_a_large_request_is_split_into_batches_and_reassembled(lora_dir):
    engine = FakeEngine()
    b = make(engine, lora_dir, max_batch=3, max_wait=0.0)
    job = b.submit(spec("x", range(10, 17)), 10)
    b.start()
    (out,) = results([job])
    b.close()
    assert [len(c["seeds"]) for c in engine.calls] == [3, 3, 1]
    assert [im[1] for im in out.images] == list(range(10, 17))


def test_each_batch_runs_with_exactly_its_own_adapter_set(lora_dir):
    engine = FakeEngine()
    b = make(engine, lora_dir, max_batch=8, max_wait=0.0, max_loaded=2)
    sets = [(), (("a", 1.0),), (("a", 0.5),), (("a", 1.0), ("b", -1.0)), (("c", 2.0),), (), (("b", 0.25),)]
    jobs = [b.submit(spec(f"p{i}", [i], loras=s), 10) for i, s in enumerate(sets * 3)]
    b.start()
    out = results(jobs)
    b.close()
    for job, r in zip(jobs, out):
        assert r.images[0][2] == job.spec.loras  # what was fused while its batch ran
    for call in engine.calls:  # and never a mix: one set per call
        assert len({tuple(sorted(call["loras"].items()))}) == 1
    assert len(engine.calls) == len(set(sets))  # requests of one set batch together
    assert engine.loras == {}  # closing takes the server's adapters out of the engine


def test_batches_wait_for_company_at_most_max_wait(lora_dir):
    engine = FakeEngine()
    b = make(engine, lora_dir, max_batch=4, max_wait=1.0)
    b.start()
    t0 = time.monotonic()
    first = b.submit(spec("a", [1]), 10)
    time.sleep(0.05)
    second = b.submit(spec("b", [2]), 10)
    results([first, second])
    assert engine.calls[0]["prompts"] == ["a", "b"]
    assert 0.95 < time.monotonic() - t0 < 5
    four = [b.submit(spec(f"q{i}", [i]), 10) for i in range(4)]
    t0 = time.monotonic()
    results(four)
    assert time.monotonic() - t0 < 0.6  # a full batch does not wait
    b.close()


def test_cancelled_or_expired_jobs_cost_nothing_and_a_batch_of_leavers_stops(lora_dir):
    engine = FakeEngine(delay=0.05)
    b = make(engine, lora_dir, max_batch=1, max_wait=0.0)
    running = b.submit(spec("run", [1], steps=40), 10)
    queued = b.submit(spec("queued", [2]), 10)
    expired = b.submit(spec("expired", [3]), 0.01)
    b.start()
    time.sleep(0.2)
    running.cancel()
    queued.cancel()
    with pytest.raises(Cancelled):
        running.future.result(5)
    with pytest.raises((Cancelled, TimedOut)):
        queued.future.result(5)
    with pytest.raises(TimedOut):
        expired.future.result(5)
    b.close()
    assert [c["prompts"] for c in engine.calls] == [["run"]]
    assert engine.steps < 40


def test_a_failing_request_fails_alone(lora_dir):
    engine = FakeEngine(fail_on="bad")
    b = make(engine, lora_dir, max_batch=4, max_wait=0.0)
    good, bad = b.submit(spec("good", [1]), 10), b.submit(spec("bad", [2]), 10)
    b.start()
    assert good.future.result(5).images[0][0] == "good"
    with pytest.raises(RequestError):
        bad.future.result(5)
    b.close()


def test_a_full_queue_refuses_with_a_retry_time(lora_dir):
    from fewstep.serve.batcher import QueueFull

    b = make(FakeEngine(), lora_dir, max_batch=2, queue_size=4)
    b.submit(spec("a", [1, 2, 3]), 10)
    with pytest.raises(QueueFull) as e:
        b.submit(spec("b", [4, 5]), 10)
    assert e.value.retry_after >= 1
    b.submit(spec("c", [6]), 10)  # what still fits is taken
    b.close()


def test_adapter_names_resolve_only_inside_the_folder(lora_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "evil.safetensors").write_bytes(b"")
    adapters = Adapters(FakeEngine(), lora_dir, max_per_request=2)
    assert adapters.check({"b": 0.5, "a": 1, "c": 0}) == (("a", 1.0), ("b", 0.5))
    assert adapters.available() == ["a", "b", "c"]
    for name in ("../outside/evil", str(outside / "evil"), "a/../b", ".hidden", "sub/a", "missing", "a.safetensors"):
        with pytest.raises(RequestError):
            adapters.check({name: 1.0})
    for weights in ({"a": float("nan")}, {"a": 99.0}, {"a": 1, "b": 1, "c": 1}):
        with pytest.raises(RequestError):
            adapters.check(weights)
    with pytest.raises(RequestError):
        Adapters(FakeEngine(), None).check({"a": 1.0})


# ---- on the real default model ---------------------------------------------------------------------------------
CASES = [  # prompt, seed, n, loras
    ("a red circle", 1, 1, {}),
    ("a blue square", 2, 1, {"a": 1.0}),
    ("a red circle", 3, 2, {"a": 1.0}),
    ("a green star", 4, 1, {"a": -0.7}),
    ("a red circle", 1, 1, {"b": 1.0}),
    ("a blue square", 5, 1, {"a": 1.0, "b": 0.5}),
    ("a yellow ring", 6, 1, {}),
    ("a red circle", 1, 1, {"a": 1.0}),
]


def pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def real_loras(tmp_path_factory):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora
    from tests.support.serve import default_engine

    engine = default_engine()
    root = tmp_path_factory.mktemp("serve-loras")
    for i, name in enumerate(("a", "b")):
        save_file(random_lora(engine.c.unet, seed=i + 1, scale=0.1), str(root / f"{name}.safetensors"))
    return engine, root


def alone(engine, root, prompt, seed, n, loras):
    """The images one request gets from an engine with only its adapters loaded."""
    for name, w in loras.items():
        engine.load_lora(str(root / f"{name}.safetensors"), name=f"alone-{name}", weight=w)
    try:
        return engine.generate(prompt, seed=seed, num_images=n, steps=2, width=32, height=32).images
    finally:
        for name in loras:
            engine.unload_lora(f"alone-{name}")


def test_concurrent_requests_with_different_adapters_get_the_images_they_get_alone(real_loras):
    from fewstep.serve.config import ServeConfig
    from tests.support.serve import LiveServer, decode_png

    engine, root = real_loras
    before = set(engine.loras)  # the default model's own LCM-LoRA
    expected = [alone(engine, root, *case) for case in CASES]
    assert np.abs(pixels(expected[0][0]) - pixels(expected[-1][0])).max() > 10  # the LoRA changes the image
    config = ServeConfig(lora_dir=str(root), max_batch=4, max_wait=0.4)
    with LiveServer(engine, config) as server:
        def post(case):
            prompt, seed, n, loras = case
            r = server.client.post("/v1/images/generations",
                                   json=dict(prompt=prompt, seed=seed, n=n, steps=2, loras=loras, size="32x32"))
            assert r.status_code == 200, r.text
            return [decode_png(d["b64_json"]) for d in r.json()["data"]]

        barrier = threading.Barrier(len(CASES))

        def together(case):
            barrier.wait()
            return post(case)

        with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
            got = list(pool.map(together, CASES))
        batch_sum = server.metric("fewstep_batch_images_sum")
        batches = server.metric("fewstep_batch_images_count")
        switches = server.metric("fewstep_adapter_switches_total")
    for case, ours, ref in zip(CASES, got, expected):
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert np.abs(pixels(a) - pixels(b)).max() <= 2, case
    assert batch_sum == sum(c[2] for c in CASES)
    assert batches < len(CASES)  # some requests shared a UNet batch
    assert switches >= 3  # and the adapter set changed between batches
    assert set(engine.loras) == before  # the server's adapters are gone with it


def test_calls_run_on_the_engine_thread_with_their_adapters_and_take_turns_with_batches(lora_dir):
    engine = FakeEngine(delay=0.01)
    b = make(engine, lora_dir, max_batch=1, max_wait=0.0)
    order = []

    def frame(i):
        def fn(e):
            fused = {n[len(PREFIX):]: s.weight for n, s in e.loras.items() if s.weight}
            order.append(("call", i))
            return threading.current_thread().name, fused
        return fn

    jobs = [b.submit(spec(f"p{i}", [i]), 10) for i in range(4)]
    calls = [b.call(frame(i), loras=(("a", 0.5),)) for i in range(4)]
    engine_run = engine.run

    def run(req, callback=None, **kw):
        order.append(("batch", req.prompt[0]))
        return engine_run(req, callback=callback, **kw)

    engine.run = run
    b.start()
    outs = [c.result(10) for c in calls]
    results(jobs)
    b.close()
    assert all(name == "fewstep-engine" and fused == {"a": 0.5} for name, fused in outs)
    kinds = [k for k, _ in order]
    # neither kind runs twice in a row while the other waits
    assert all(kinds[i] != kinds[i + 1] for i in range(len(kinds) - 1)), kinds
    with pytest.raises(Cancelled):
        b.call(frame(9))  # closed
