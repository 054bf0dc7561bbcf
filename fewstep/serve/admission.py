"""Admission control from the measured speed of this engine: a request that cannot finish before its deadline is
refused before it queues, with the estimate and the largest size, n and steps that would fit.

The cost model is t = images x pixels x (steps x passes x a + b): `a` seconds per image-pixel-step of one UNet pass
(classifier-free guidance runs two), `b` seconds per image-pixel of the rest (text, VAE encode and decode). Both are
learnt from the warm-up's per-stage timings and follow every batch as a running average, so they track this
machine, its dtype and its load.
"""

import math
import threading

from ..errors import FewstepError
from ..request import classifier_free

CANDIDATE_SIZES = (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048)  # what the page may offer (plus native)
SMOOTHING = 0.3  # weight of the newest batch in the running averages


class OverBudget(FewstepError):
    """A request whose estimated time exceeds its deadline; `fits` holds the largest n, steps and size that would
    fit (each alone, the other parameters as asked), `estimate` and `limit` are seconds."""

    def __init__(self, message, estimate, limit, fits):
        super().__init__(message)
        self.estimate, self.limit, self.fits = estimate, limit, fits


class Speed:
    """The running estimate of one engine's speed (thread-safe: the worker writes, request handlers read)."""

    def __init__(self):
        self.per_step = None  # a: seconds per image-pixel-step of one UNet pass
        self.per_image = None  # b: seconds per image-pixel, outside the steps
        self.batches = 0
        self._lock = threading.Lock()

    @property
    def known(self):
        return self.per_step is not None

    def observe(self, gen, images, width, height, passes):
        """Learn from one engine call: its Generation's timings (steps apart from the rest)."""
        steps = gen.timings.get("steps") or []
        if not steps or images < 1:
            return
        px = images * width * height
        # the median step: the first one pays one-time costs (allocations, caches) that later steps do not
        step = sorted(steps)[len(steps) // 2]
        a = step / (px * passes)
        b = max(0.0, gen.timings.get("total", 0.0) - sum(steps)) / px
        with self._lock:
            if self.per_step is None:
                self.per_step, self.per_image = a, b
            else:
                self.per_step += SMOOTHING * (a - self.per_step)
                self.per_image += SMOOTHING * (b - self.per_image)
            self.batches += 1

    def seconds(self, n, width, height, steps, passes):
        with self._lock:
            a, b = self.per_step, self.per_image
        return n * width * height * (steps * passes * a + b)

    def fits(self, limit, n, width, height, steps, passes, factor=8, max_n=None, max_steps=None, max_size=None):
        """The largest n, steps and square size (a multiple of `factor`) that fit `limit` s, the rest as given;
        0 where even 1 (or the smallest size) does not fit."""
        with self._lock:
            a, b = self.per_step, self.per_image
        per_image = width * height * (steps * passes * a + b)
        fit_n = int(limit // per_image) if per_image > 0 else n
        fit_steps = int((limit / (n * width * height) - b) // (passes * a)) if a > 0 else steps
        side = math.sqrt(limit / (n * (steps * passes * a + b))) if a > 0 else width
        fit_size = int(side // factor * factor)
        return {"n": max(0, min(fit_n, max_n or fit_n)), "steps": max(0, min(fit_steps, max_steps or fit_steps)),
                "size": max(0, min(fit_size, max_size or fit_size))}


def passes_of(request, engine):
    """UNet passes per step: two with classifier-free guidance (the unconditional half), else one."""
    return 2 if classifier_free(request.guidance, engine.full_lcm) else 1


def steps_run(request):
    """The steps a resolved request runs (img2img and inpainting start part way: strength x steps)."""
    steps = len(request.timesteps) if request.timesteps is not None else request.steps
    if request.init_image is not None and request.strength is not None:
        return max(1, math.ceil(steps * request.strength))
    return steps


def estimate(speed, request, n, engine):
    """Seconds `n` images of a resolved request take on this engine; None before any measurement."""
    if not speed.known:
        return None
    return speed.seconds(n, request.width, request.height, steps_run(request), passes_of(request, engine))


def check(speed, spec, engine, limit, *, max_n=None, max_steps=None, max_size=None):
    """Raise OverBudget when `spec` would take longer than `limit` seconds on this engine (no estimate yet: pass)."""
    est = estimate(speed, spec.request, spec.n, engine)
    if est is None or est <= limit:
        return
    r = spec.request
    passes, steps = passes_of(r, engine), steps_run(r)
    fits = speed.fits(limit, spec.n, r.width, r.height, steps, passes, engine.vae_factor, max_n, max_steps, max_size)
    ways = [f"at most {fits['n']} image(s)" if fits["n"] else None,
            f"at most {fits['steps']} steps" if fits["steps"] else None,
            f"at most {fits['size']}x{fits['size']}" if fits["size"] >= engine.vae_factor else None]
    ways = [w for w in ways if w]
    raise OverBudget(f"this request would take about {est:.0f} s on this server ({spec.n} image(s) of {r.width}x"
                     f"{r.height}, {steps} steps; measured {speed.per_step:.2e} s per image-pixel-step) but requests "
                     f"may take {limit:g} s (--timeout): " + ("try " + ", or ".join(ways) if ways
                                                              else "nothing this size fits"), est, limit, fits)


def sizes(speed, engine, limit, max_size, steps, passes):
    """Square sizes the page may offer: up to max_size, a multiple of the latent factor, and (once the speed is
    known) estimated to fit the deadline for one image at the default steps."""
    native = engine.native_size
    out = sorted({native // 2, native, native * 3 // 2, native * 2, *CANDIDATE_SIZES})
    out = [s for s in out if s <= max_size and s % engine.vae_factor == 0]
    if speed.known:
        out = [s for s in out if speed.seconds(1, s, s, steps, passes) <= limit] or out[:1]
    return out
