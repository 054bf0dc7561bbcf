"""Request batching: compatible requests share one UNet batch; one worker thread owns the engine.

Requests are grouped by everything that must be equal inside one engine call (steps, guidance, sampler, size,
negative prompt, adapter set, init image and mask, ControlNets and their scales); prompts and seeds may differ,
since the engine takes one seed per image: a batched image matches the image the same request gets alone to within
1/255 (the batch size changes the GEMM blocking, so the last bit moves; not bit for bit). The oldest waiting request
picks the next batch, which waits at most `max_wait` for company; adapter sets are switched between batches, never
during one.

Work stops within a fraction of a step once nobody waits for it (every client of the batch gone or out of time) or
a client interrupts it (A1111's /interrupt and /skip): the engine checks between UNet blocks (Engine.run's
`cancel`). A request that could not finish in time on this engine is refused before it queues (admission.py).
"""

import concurrent.futures
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace

from ..errors import Cancelled, FewstepError
from ..request import GenerateRequest
from . import admission
from .progress import Progress

log = logging.getLogger("fewstep")


class QueueFull(FewstepError):
    """The queue holds as many images as it may; retry after `retry_after` seconds."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(FewstepError):
    """A request that was still waiting or running when its time was up."""


class Interrupted(Cancelled):
    """A batch stopped by a client (POST /sdapi/v1/interrupt or /skip) before any step had finished."""


class GenerationFailed(Exception):
    """An unexpected engine failure (a bug or a device fault), reported to the requests of its batch."""


# What may differ between the requests of one engine call: each image has its own prompt and seed. Init images and
# masks are compared by identity: one of each per engine call (the server hands identical uploads the same object).
PER_IMAGE = ("prompt", "seeds", "seed", "num_images", "init_image", "mask", "control")


@dataclass(frozen=True)
class Spec:
    """One request as the engine will run it: the request resolved by the engine (defaults filled in, checked,
    one seed per image) and its canonical adapter set ((name, weight), ...) sorted, no zero weights.

    controlnets: (name, source) of the ControlNets it names that the worker loads before its batch runs (a
    preprocessor's default ControlNet on first use); notes: what the server changed in it (a resized mask), said
    in the response's warnings."""

    request: GenerateRequest
    loras: tuple = ()
    controlnets: tuple = ()
    notes: tuple = ()

    @property
    def prompt(self):
        return self.request.prompt[0]

    @property
    def seeds(self):
        return self.request.seeds

    @property
    def n(self):
        return len(self.request.seeds)

    def __getattr__(self, name):  # the request's fields read through: spec.steps, spec.width, spec.sampler...
        if name.startswith("_") or name == "request":
            raise AttributeError(name)
        return getattr(self.request, name)

    def params(self, engine_params):
        """The parameters its images were made with (metadata, infotexts): the engine's, with this request's prompt,
        adapter set and negative prompt, and A1111's inpainting fields where describe() leaves them out."""
        p = dict(engine_params, prompt=self.prompt, loras=dict(self.loras), negative_prompt=self.negative_prompt)
        if self.mask is not None:
            p.setdefault("mask_blur", self.mask_blur)
            p.setdefault("padding_mask_crop", self.padding_mask_crop)
        return p

    def key(self):
        """Requests with equal keys can run in one engine call: the same ControlNets with the same scales and
        steps; their control images may differ (the engine takes one per image, fewstep.control.prepare)."""
        r = self.request
        same = tuple(getattr(r, f.name) for f in fields(r) if f.name not in PER_IMAGE)
        units = tuple((u.model, u.scale, u.start, u.end, u.preprocess) for u in r.control)
        return same + (id(r.init_image), id(r.mask), units, self.loras)


def random_seeds(n, seed=None):
    """n consecutive seeds from `seed`, or from a random one."""
    base = secrets.randbelow(2**31) if seed is None else seed
    return tuple(base + i for i in range(n))


@dataclass
class Result:
    images: list
    seeds: list
    params: dict  # as Engine.describe, for this request alone
    queue_seconds: float  # arrival to the start of its first batch
    compute_seconds: float  # engine time of the batches it rode in
    total_seconds: float
    batch_images: int  # the largest batch it rode in
    warnings: list


@dataclass(eq=False)
class Target:
    """One loaded model as the worker runs it: its engine, the server's adapter set and ControlNets for it, and the
    running estimate of its speed. A job keeps the Target it was checked against, even if the server switches."""

    engine: object
    adapters: object
    controlnets: object = None
    speed: admission.Speed = field(default_factory=admission.Speed)
    config: object = None  # its ServeConfig (limits derived from its native size); None: no admission bounds
    name: str | None = None


class Job:
    """A submitted Spec: its images are filled in by one or more batches; `future` gets the Result."""

    def __init__(self, spec, timeout, target=None):
        self.spec = spec
        self.target = target
        self.limit = spec.n  # an interrupt lowers it to the images already handed to batches
        self.future = concurrent.futures.Future()
        self.arrived = time.monotonic()
        self.deadline = self.arrived + timeout
        self.scheduled = 0  # images handed to batches so far
        self.images = [None] * spec.n
        self.done = 0
        self.started = None
        self.compute = 0.0
        self.batch_images = 0
        self.params = None
        self.warnings = []
        self._cancelled = threading.Event()

    @property
    def cancelled(self):
        return self._cancelled.is_set() or self.future.done()

    def cancel(self):
        """Stop spending compute on this job (client gone, timed out): queued images are dropped, a batch of only
        cancelled jobs stops before its next UNet block."""
        self._cancelled.set()

    def fail(self, error):
        self._cancelled.set()
        self._settle(self.future.set_exception, error)

    def _settle(self, setter, value):
        # the request side may cancel the future at any moment (its client left): then nobody wants the outcome
        try:
            if not self.future.done():
                setter(value)
        except concurrent.futures.InvalidStateError:
            pass

    def deliver(self, start, images, params, seconds, batch_images, warnings):
        self.images[start:start + len(images)] = images
        self.done += len(images)
        self.compute += seconds
        self.batch_images = max(self.batch_images, batch_images)
        self.params = params
        self.warnings = sorted(set(self.warnings) | set(warnings))
        if self.done >= self.limit:
            total = time.monotonic() - self.arrived
            self._settle(self.future.set_result, Result(self.images[:self.limit], list(self.spec.seeds[:self.limit]),
                                                        params,
                                                        self.started - self.arrived, self.compute, total,
                                                        self.batch_images, self.warnings))


class Batcher:
    """Queue + one worker thread that runs every engine call (generation and adapter switches)."""

    def __init__(self, engine, adapters, *, max_batch=8, max_wait=0.02, queue_size=64, metrics=None,
                 controlnets=None):
        # controlnets: fewstep.serve.controlnets.ControlNets, loads what a batch names; the server switches
        # `target` when a client picks another model (fewstep.serve.models)
        self.target = Target(engine, adapters, controlnets)
        self.progress = Progress()
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.metrics = metrics
        self.seconds_per_image = None  # running estimate, for Retry-After
        self._pending = deque()  # jobs with images not yet handed to a batch, oldest first
        self._calls = deque()  # (fn, loras, future): other work on the engine's thread (stream frames)
        self._turn = False  # alternates calls and batches when both wait, so neither starves the other
        self._cv = threading.Condition()
        self._closed = False
        self._thread = None

    @property
    def engine(self):
        return self.target.engine

    @property
    def adapters(self):
        return self.target.adapters

    @property
    def controlnets(self):
        return self.target.controlnets

    # ---- the request side --------------------------------------------------------------------------------------
    def submit(self, spec, timeout):
        """Queue a Spec; raises OverBudget when this engine could not finish it within `timeout` (measured
        speed), QueueFull when it would not fit the queue or the work ahead of it would make it time out there."""
        target = self.target
        job = Job(spec, timeout, target)
        with self._cv:
            self.admit(spec, timeout)
            self._pending.append(job)
            self._cv.notify()
        return job

    def admit(self, spec, timeout):
        """Refuse a Spec that this engine could not finish within `timeout` (OverBudget), that would not fit the
        queue or that would time out behind the work ahead of it (QueueFull): before it queues, and for work that
        runs through call() (a streamed request) before it is handed there."""
        target = self.target
        c = target.config
        bounds = {} if c is None else dict(max_n=c.max_images, max_steps=c.max_steps, max_size=c.max_size)
        admission.check(target.speed, spec, target.engine, timeout, **bounds)
        with self._cv:
            if self._closed:
                raise Cancelled("the server is shutting down")
            queued = self.queued_images()
            if queued + spec.n > self.queue_size:
                per_image = self.seconds_per_image or 1.0
                wait = max(1, math.ceil(queued * per_image))
                raise QueueFull(f"the queue is full ({queued} images waiting, at most {self.queue_size}): retry in "
                                f"{wait} s", wait)
            own = admission.estimate(target.speed, spec.request, spec.n, target.engine)
            ahead = self._seconds_ahead()
            if own is not None and ahead + own > timeout:  # it would time out in the queue: say when to come back
                wait = max(1, math.ceil(ahead + own - timeout))
                raise QueueFull(f"the server is busy: about {ahead:.0f} s of work is ahead of this request, which "
                                f"needs about {own:.0f} s, and a request may take {timeout:g} s (--timeout): retry "
                                f"in {wait} s", wait)

    def call(self, fn, loras=()):
        """Run fn(engine) on the engine's thread with the adapter set `loras` (from Adapters.check) fused; returns
        a concurrent Future. Calls and HTTP batches take turns when both wait: one cannot starve the other."""
        future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise Cancelled("the server is shutting down")
            self._calls.append((fn, tuple(loras), future))
            self._cv.notify()
        return future

    def _seconds_ahead(self):
        """Estimated seconds of the work queued and running, one image after another (on a CPU batching saves
        little; on a GPU, where it saves more, this overestimates the wait). Jobs on a model not measured yet count
        nothing. Caller holds the lock."""
        total = 0.0
        for j in self._pending:
            t = j.target or self.target
            total += admission.estimate(t.speed, j.spec.request, j.spec.n - j.scheduled, t.engine) or 0.0
        p = self.progress
        if p.running and p.estimate:
            total += max(0.0, p.estimate - (time.time() - p.started))
        return total

    def queued_images(self):
        with self._cv:
            self._drop_dead()
            return sum(j.spec.n - j.scheduled for j in self._pending)

    def queued_requests(self):
        with self._cv:
            self._drop_dead()
            return len(self._pending)

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._loop, name="fewstep-engine", daemon=True)
        self._thread.start()

    def close(self, timeout=30):
        """Refuse new work, fail what waits, finish the running batch, take the server's adapters out."""
        with self._cv:
            self._closed = True
            for job in self._pending:
                job.fail(Cancelled("the server is shutting down"))
            self._pending.clear()
            for _, _, future in self._calls:
                future.cancel()
            self._calls.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker --------------------------------------------------------------------------------------------
    def _loop(self):
        try:
            while True:
                batch = self._take()
                if batch is None:
                    break
                if callable(batch):
                    batch()
                else:
                    self._run(batch)
        finally:
            try:
                self.adapters.unload_all()
            except Exception:  # noqa: BLE001 - shutting down; the engine is discarded with the process anyway
                log.exception("unloading the server's LoRAs failed")

    def _drop_dead(self):
        """Forget queued jobs whose client left or whose time ran out (caller holds the lock)."""
        now = time.monotonic()
        for job in [j for j in self._pending if j.cancelled or now > j.deadline]:
            job.fail(TimedOut("the request timed out while queued") if now > job.deadline
                     else Cancelled("the client has gone"))
            self._pending.remove(job)

    def _take(self):
        """The next batch: [(job, first image, count)], all with the oldest job's key, or a queued call (a
        callable); None when closed."""
        with self._cv:
            while True:
                self._drop_dead()
                if self._closed:
                    return None
                if self._calls and (self._turn or not self._pending):
                    self._turn = False
                    return self._call(*self._calls.popleft())
                if not self._pending:
                    self._cv.wait()
                    continue
                head = self._pending[0]
                key = self._key(head)
                ready = sum(j.spec.n - j.scheduled for j in self._pending
                            if self._key(j) == key)
                left = head.arrived + self.max_wait - time.monotonic()
                if ready >= self.max_batch or left <= 0:
                    break
                if self._calls:  # a call runs while the batch waits for company
                    return self._call(*self._calls.popleft())
                self._cv.wait(min(left, 0.05))  # wake up to drop jobs of clients that left
            self._turn = True
            batch, room = [], self.max_batch
            for job in list(self._pending):
                if room == 0:
                    break
                if self._key(job) != key:
                    continue
                count = min(room, job.spec.n - job.scheduled)
                batch.append((job, job.scheduled, count))
                job.scheduled += count
                room -= count
                if job.scheduled == job.spec.n:
                    self._pending.remove(job)
            return batch

    @staticmethod
    def _key(job):
        return (id(job.target), job.spec.key())

    def interrupt(self, skip=False):
        """A1111's /interrupt (the running batch stops and its jobs end with what they have) and /skip (the
        running batch stops; its jobs go on with their other images)."""
        self.progress.ask("skip" if skip else "interrupt")

    def _call(self, fn, loras, future):
        """The worker's closure for one queued call (run outside the lock)."""

        def run():
            if not future.set_running_or_notify_cancel():
                return
            try:
                self.adapters.apply(loras)
                future.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - the caller gets every failure of its own call
                future.set_exception(e)

        return run

    def _control(self, batch):
        """The batch's ControlUnits: the first job's, with one control image per image when they may differ."""
        units = batch[0][0].spec.request.control
        if not units or len(batch) == 1:
            return units
        return tuple(replace(u, image=tuple(j.spec.request.control[k].image for j, _, count in batch
                                            for _ in range(count)))
                     for k, u in enumerate(units))

    def _run(self, batch):
        """One engine call for the batch; on an error with several jobs, each runs alone so only its own fails."""
        batch = [c for c in batch if not c[0].cancelled]
        if not batch:
            return
        jobs = list({id(j): j for j, _, _ in batch}.values())
        spec, target = batch[0][0].spec, batch[0][0].target or self.target
        engine, adapters, controlnets = target.engine, target.adapters, target.controlnets
        now = time.monotonic()
        for job in jobs:
            if job.started is None:
                job.started = now
                if self.metrics:
                    self.metrics.queue_seconds.observe(now - job.arrived)
        images = sum(count for _, _, count in batch)
        r = spec.request
        passes, steps = admission.passes_of(r, engine), admission.steps_run(r)
        estimate = target.speed.seconds(images, r.width, r.height, steps, passes) if target.speed.known else None
        progress = self.progress
        progress.begin(len(jobs), images, steps, estimate)
        req = None
        try:
            before = adapters.switches
            adapters.apply(spec.loras)
            if self.metrics and adapters.switches != before:
                self.metrics.adapter_switches.inc()
            if controlnets is not None and spec.controlnets:
                controlnets.ensure(spec.controlnets)
            req = replace(spec.request, num_images=1,
                          prompt=tuple(j.spec.prompt for j, _, count in batch for _ in range(count)),
                          seeds=tuple(s for j, start, count in batch for s in j.spec.seeds[start:start + count]),
                          control=self._control(batch))

            def on_step(i, total):
                if self.metrics:
                    self.metrics.unet_steps.inc()

            def stop():  # read before every UNet block: a few attribute reads
                if progress.stop is not None:
                    return True
                t = time.monotonic()
                return all(j.cancelled or t > j.deadline for j in jobs)

            t0 = time.perf_counter()
            gen = engine.run(req, callback=on_step, cancel=stop,
                             preview=lambda i, x0: progress.on_step(i, x0, engine))
            seconds = time.perf_counter() - t0
        except Cancelled as e:
            asked, x0, step = progress.stop, progress.x0, progress.step
            progress.end()
            if self.metrics:
                self.metrics.cancelled_batches.inc()
            if asked is not None and not all(j.cancelled for j in jobs):
                return self._stopped(batch, jobs, req, asked, x0, step, engine)
            for job in jobs:
                job.fail(e)
            return
        except Exception as e:  # noqa: BLE001 - any failure belongs to the requests of this batch, not the server
            progress.end()
            if len(batch) > 1:
                for chunk in batch:
                    self._run([chunk])
                return
            if not isinstance(e, FewstepError):
                log.exception("generation failed")
                e = GenerationFailed(f"generation failed: {type(e).__name__}")
            for job in jobs:
                job.fail(e)
            return
        progress.end()
        n = len(gen.images)
        target.speed.observe(gen, n, r.width, r.height, passes)
        self.seconds_per_image = seconds / n if self.seconds_per_image is None else (
            0.8 * self.seconds_per_image + 0.2 * seconds / n)
        if self.metrics:
            self.metrics.batch_images.observe(n)
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.images.inc(n)
        self._deliver(batch, gen.images, gen.params, seconds, n, gen.warnings, engine)

    def _deliver(self, batch, images, params, seconds, n, warnings, engine):
        k = 0
        for job, start, count in batch:
            job.deliver(start, images[k:k + count], job.spec.params(params), seconds, n, warnings)
            k += count

    def _stopped(self, batch, jobs, req, asked, x0, step, engine):
        """A batch a client interrupted or skipped: as A1111, its images are the prediction of the last step that
        finished (decoded now); an interrupt also drops its jobs' images still queued. Before any step finished,
        or with a mask (the paste-back needs the whole run), its jobs fail with Interrupted."""
        import torch

        if asked == "interrupt":
            with self._cv:
                for job in jobs:
                    job.limit = job.scheduled
                    if job in self._pending:
                        self._pending.remove(job)
        if x0 is None or req is None or req.mask is not None:
            for job in jobs:
                job.fail(Interrupted(f"the request was stopped by POST /sdapi/v1/{asked} before its first step "
                                     "finished"))
            return
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                resolved = engine.resolve(req)[0]
                images = engine.decode(x0)
                params = engine.describe(resolved, engine.schedule(resolved))
        except FewstepError as e:
            for job in jobs:
                job.fail(e)
            return
        note = (f"stopped by POST /sdapi/v1/{asked} after step {step} of {params['steps']}: the images are the "
                "prediction at that step")
        self._deliver(batch, images, params, time.perf_counter() - t0, len(images), [note], engine)
