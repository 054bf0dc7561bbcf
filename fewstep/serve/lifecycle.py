"""The server's life around its models: loading in the background while /health says so, the warm-up that teaches
admission control this engine's speed, and A1111's routes about the running job and the models (progress,
interrupt, skip, options, sd-models, refresh-checkpoints, memory)."""

import base64
import io
import logging
import os
import threading
import time
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import FewstepError
from ..request import classifier_free

log = logging.getLogger("fewstep")
HEARTBEAT = 5.0  # seconds between "still loading" lines
PROGRESS = "/sdapi/v1/progress"  # answers while loading too: one job, so webuiapi's util_wait_for_ready waits


class Loading:
    """Where the server is before it can serve: loading, ready or failed (with the stage and the error)."""

    def __init__(self):
        self.state = "loading"
        self.stage = "starting"
        self.started = time.monotonic()
        self.error = None
        self.finished = threading.Event()

    @property
    def ready(self):
        return self.state == "ready"

    def at(self, stage):
        self.stage = stage

    def done(self):
        self.state = "ready"
        self.finished.set()

    def fail(self, error):
        self.state, self.error = "failed", error
        self.finished.set()

    def health(self):
        """(HTTP status, body) of /health."""
        if self.state == "ready":
            return 200, {"status": "ok"}
        body = {"status": self.state, "stage": self.stage, "seconds": round(time.monotonic() - self.started, 1)}
        if self.error is not None:
            body["error"] = str(self.error)
        return 503, body


def model_config(base, engine):
    """The settings of one model: --max-size defaults to twice its native size (a 64 px model does not take
    1024 px requests; SD 1.5 takes up to 1024, SDXL up to 2048)."""
    if base.max_size is not None:
        return base
    return replace(base, max_size=2 * engine.native_size)


def warm_up(target):
    """One generation at the model's defaults (native size): the first run's one-time costs are paid before a
    client waits, and its per-stage timings are the speed admission control starts from."""
    engine = target.engine
    gen = engine.generate("warm-up", seed=0)
    d = engine.defaults()
    passes = 2 if classifier_free(d["guidance"], engine.full_lcm) else 1
    target.speed.observe(gen, len(gen.images), engine.native_size, engine.native_size, passes)
    return gen


def start_loading(server, *, warmup=True, announce=None):
    """Load the current model on a thread, warm it up, then serve it; announce(kind, text) hears "stage" lines
    (with a heartbeat while one lasts), "ready" and "failed"."""
    announce = announce or (lambda kind, text: None)
    loading, models = server.loading, server.models

    def stage(text):
        loading.at(text)
        announce("stage", text)

    models.on_stage = stage

    def heartbeat():
        while not loading.finished.wait(HEARTBEAT):
            announce("stage", f"still {loading.stage} ({time.monotonic() - loading.started:.0f} s)")

    def run():
        try:
            target = models.get(models.current, server.build)
            if warmup:
                stage(f"warming up {target.name}")
                warm_up(target)
            if loading.state == "loading":  # not shut down meanwhile
                server.ready(target)
                server.batcher.start()
                announce("ready", target.name)
        except Exception as e:  # noqa: BLE001 - a load that fails ends the server with its one-line message
            if not isinstance(e, FewstepError):
                log.exception("loading failed")
            loading.fail(e)
            announce("failed", str(e))

    threading.Thread(target=heartbeat, name="fewstep-heartbeat", daemon=True).start()
    threading.Thread(target=run, name="fewstep-load", daemon=True).start()


# ---- A1111's routes about the running job and the models ---------------------------------------------------------
def default_options(server):
    """The options A1111 clients read (webuiapi's util_get_current_model, front-ends' settings pages), answered
    with what is true of fewstep; keys a client POSTs are kept and read back, as A1111 does."""
    models = server.models
    return {"sd_model_checkpoint": server.model, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "sd_checkpoints_limit": len(models.sources) if models else 1, "sd_checkpoints_keep_in_cpu": False,
            "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
            "samples_format": "png", "samples_save": False, "save_images_add_number": False,
            "enable_pnginfo": True, "live_previews_enable": True, "show_progress_every_n_steps": 1,
            "live_preview_content": "Prompt", "show_progress_type": "Full", "img2img_fix_steps": False,
            "token_merging_ratio": 0.0, "sd_lora": "None", "lora_preferred_name": "Alias from file",
            "sd_unet": "Automatic", "forge_preset": None, "interrupt_after_current": False}


def memory():
    """A1111's /sdapi/v1/memory: the process's RAM (used = its resident set, as A1111) and CUDA's figures."""
    try:
        import psutil

        process = psutil.Process(os.getpid())
        rss, total = process.memory_info().rss, psutil.virtual_memory().total
        ram = {"free": total - rss, "used": rss, "total": total}
    except ImportError:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ram = {"free": total - rss, "used": rss, "total": total}
    import torch

    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(key):
        return {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}

    cuda = {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


def router(server, invalid):
    """/health and the A1111 routes above; invalid(param, reason) makes the app's 422."""
    r = APIRouter()
    options = {}  # what clients set beyond the model

    @r.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        status, body = server.loading.health()
        return JSONResponse(body, status_code=status, headers=None if status == 200 else {"Retry-After": "2"})

    @r.get(PROGRESS)
    async def progress(skip_current_image: bool = False):
        if server.batcher is None:  # loading: one job under way (A1111 itself does not answer before it is up)
            _, body = server.loading.health()
            jobs = 1 if body["status"] == "loading" else 0  # failed: nothing to wait for
            state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": body["stage"],
                     "job_count": jobs, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
            return {"progress": 0.01 * jobs, "eta_relative": 0.0, "state": state,
                    "textinfo": body.get("error", body["stage"]), "current_task": None, "current_image": None}
        p = server.batcher.progress
        out = p.report(server.batcher.queued_requests())
        image = None
        if not skip_current_image and p.running:
            preview = await run_in_threadpool(p.current_image)
            if preview is not None:
                buf = io.BytesIO()
                preview.save(buf, format="PNG")
                image = base64.b64encode(buf.getvalue()).decode()
        out["current_image"] = image
        return out

    @r.post("/sdapi/v1/interrupt")
    async def interrupt():
        server.batcher.interrupt()
        return {}

    @r.post("/sdapi/v1/skip")
    async def skip():
        server.batcher.interrupt(skip=True)
        return {}

    @r.get("/sdapi/v1/options")
    async def get_options():
        return {**default_options(server), **options, "sd_model_checkpoint": server.model}

    @r.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise invalid(None, "send the options as a JSON object") from None
        if not isinstance(body, dict):
            raise invalid(None, "send the options as a JSON object")
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            await select(str(wanted))
        options.update({k: v for k, v in body.items() if k != "sd_model_checkpoint"})  # answers null, as A1111

    async def select(wanted):
        models = server.models
        name = models.find(wanted) if models else (server.model if wanted.lower() == server.model.lower() else None)
        if name is None:
            have = ", ".join(models.names() if models else [server.model])
            raise invalid("sd_model_checkpoint", f"unknown model {wanted!r} (this server has {have})")
        if name == server.model:
            return

        def load():
            fresh = name not in models.loaded
            target = models.get(name, server.build)
            if fresh and server.warmup:
                warm_up(target)
            return target

        target = await run_in_threadpool(load)
        models.current = name
        server.ready(target)
        log.info(f"now serving {name} (POST /sdapi/v1/options)")

    @r.get("/sdapi/v1/sd-models")
    async def sd_models():
        if server.models:
            return server.models.listing()
        return [{"title": server.model, "model_name": server.model, "hash": None, "sha256": None,
                 "filename": server.model, "config": None}]

    @r.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # the models are the ones the server was started with (--model): nothing to rescan

    @r.get("/sdapi/v1/memory")
    async def get_memory():
        return await run_in_threadpool(memory)

    return r
