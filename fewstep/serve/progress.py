"""The running batch as A1111's /sdapi/v1/progress reports it: step, jobs, ETA, interrupt and skip flags, and a
preview of the current prediction decoded on request."""

import threading
import time

PREVIEW_LATENT = 32  # previews decode at most 32x32 latents (256 px for SD): a bounded cost whatever the size
PREVIEW_WAIT = 1.0  # seconds a progress request waits for the next step's preview


class Progress:
    """Written by the batcher's worker, read by request handlers (one lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.running = 0  # jobs in the running batch
        self.images = 0
        self.step = 0
        self.steps = 0
        self.started = None  # time.time() of the running batch
        self.timestamp = "0"
        self.estimate = None  # seconds the running batch should take (fewstep.serve.admission.Speed)
        self.stop = None  # None, "interrupt" or "skip": asked of the running batch
        self.interrupted = self.skipped = False  # what the last batch was asked (A1111 keeps them until the next)
        self.x0 = None  # the latest predicted clean latents of the batch (a reference, not a copy)
        self._want = threading.Event()
        self._fresh = threading.Event()
        self.preview = None  # a PIL image of the first image's prediction

    # ---- the worker ---------------------------------------------------------------------------------------------
    def begin(self, jobs, images, steps, estimate):
        with self._lock:
            self.running, self.images, self.step, self.steps = jobs, images, 0, steps
            self.started, self.estimate = time.time(), estimate
            self.timestamp = time.strftime("%Y%m%d%H%M%S")
            self.stop, self.interrupted, self.skipped = None, False, False
            self.x0, self.preview = None, None

    def on_step(self, i, x0, engine):
        """After step i: keep x0; decode a preview when a client asked for one since the last."""
        with self._lock:
            self.step, self.x0 = i + 1, x0
        if self._want.is_set() and x0 is not None:
            self._want.clear()
            image = preview_image(engine, x0[:1])
            with self._lock:
                self.preview = image
            self._fresh.set()

    def end(self):
        with self._lock:
            self.running = self.images = self.step = self.steps = 0
            self.started = self.estimate = self.x0 = None

    def stopping(self):
        """The stop asked of the running batch (read between UNet blocks, no lock: one attribute read)."""
        return self.stop

    # ---- the request side ---------------------------------------------------------------------------------------
    def ask(self, what):
        """Interrupt or skip the running batch (nothing when none runs, as A1111)."""
        with self._lock:
            if self.running:
                self.stop = what
                self.interrupted |= what == "interrupt"
                self.skipped |= what == "skip"

    def current_image(self):
        """A preview of the running batch's first image: asks the worker for one and waits briefly for it."""
        if not self.running:
            return None
        self._fresh.clear()
        self._want.set()
        self._fresh.wait(PREVIEW_WAIT)
        with self._lock:
            return self.preview

    def report(self, queued):
        """A1111's ProgressResponse fields (but current_image) with `queued` requests waiting."""
        with self._lock:
            running, step, steps, started, estimate = self.running, self.step, self.steps, self.started, self.estimate
            state = {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                     "job": f"job {self.timestamp}" if running else "", "job_count": running + queued,
                     "job_timestamp": self.timestamp, "job_no": 0, "sampling_step": step, "sampling_steps": steps}
        if running + queued == 0:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "textinfo": None, "current_task": None}
        done = step / steps if steps else 0.0
        progress = min(1.0, 0.01 + done) if running else 0.0  # A1111 starts at 0.01 (never divides by zero)
        elapsed = time.time() - started if running else 0.0
        if estimate:
            eta = max(0.0, estimate - elapsed)
        else:
            eta = elapsed / progress - elapsed if progress else 0.0
        return {"progress": progress, "eta_relative": eta, "state": state, "textinfo": None, "current_task": None}


def preview_image(engine, x0):
    """x0 (1, C, h, w) through the engine's preview decoder (fewstep.previews: a tiny decoder or a linear
    latent-to-RGB map, never the full VAE decoder), the latents shrunk to at most PREVIEW_LATENT a side first; None
    when it cannot be decoded (a NaN)."""
    import torch.nn.functional as F

    from ..errors import FewstepError
    from ..previews import preview_images

    h, w = x0.shape[-2:]
    scale = PREVIEW_LATENT / max(h, w)
    if scale < 1:
        x0 = F.interpolate(x0, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear")
    try:
        return preview_images(engine, x0)[0]
    except FewstepError:
        return None
