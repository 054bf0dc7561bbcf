"""OpenAI's image streaming (stream=true): partial images while the steps run, then each finished image, as the
Server-Sent Events the openai SDK parses (`image_generation.partial_image` / `.completed`, `image_edit.*`)."""

import asyncio
import base64
import concurrent.futures
import io
import json
import logging
import threading
import time

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import Cancelled, FewstepError
from . import dialects
from .batcher import TimedOut

log = logging.getLogger("fewstep")
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}  # the SDK's events carry token usage; fewstep counts none


def preview_steps(total, k):
    """The steps after which a partial image is sent: k of the steps before the last, spread evenly (the last one
    makes the finished image)."""
    m = total - 1
    if k <= 0 or m <= 0:
        return set()
    if k >= m:
        return set(range(m))
    return {int((j + 1) * m / (k + 1)) for j in range(k)}


def event(name, data):
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def respond(server, spec, body, kind):
    """The StreamingResponse for a checked Spec; kind is "image_generation" or "image_edit".

    The work runs alone on the engine's thread (Batcher.call), not batched with other requests: its steps report
    the predicted clean latents (Engine.run's preview), decoded into the partial images. A client that disconnects
    stops it within a UNet block (Engine.run's cancel)."""
    cfg, k, target = server.config, body.partial_images or 0, server.target
    server.batcher.admit(spec, cfg.timeout)  # as a queued request: refused up front
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    gone = threading.Event()
    deadline = time.monotonic() + cfg.timeout
    common = {"background": "opaque", "output_format": "png", "quality": "auto", "size": f"{spec.width}x{spec.height}"}

    def put(item):
        loop.call_soon_threadsafe(events.put_nowait, item)

    checked_on = target.engine

    def work(engine):
        if engine is not checked_on:  # a client switched models (/sdapi/v1/options) while this one waited
            raise Cancelled("the server switched to another model before this request ran: send it again")
        latest, sent = [None], [0]

        def preview(i, x0):
            latest[0] = x0

        def on_step(i, total):
            server.metrics.unet_steps.inc()
            if time.monotonic() > deadline:
                raise TimedOut(f"the request did not finish within {cfg.timeout:g} s")
            if i in preview_steps(total, k) and latest[0] is not None:
                for j, image in enumerate(engine.decode(latest[0])):
                    put(("partial", {"b64_json": _png(image), "partial_image_index": sent[0], "image_index": j}))
                sent[0] += 1

        t0 = time.perf_counter()
        gen = engine.run(spec.request, callback=on_step, cancel=gone, preview=preview if k else None)
        return gen, time.perf_counter() - t0

    future = server.batcher.call(work, spec.loras)
    future.add_done_callback(lambda f: put(("done", f)))

    async def stream():
        try:
            while True:
                what, item = await events.get()
                if what == "partial":
                    yield event(f"{kind}.partial_image", dict(item, type=f"{kind}.partial_image",
                                                              created_at=int(time.time()), **common))
                    continue
                try:
                    gen, seconds = item.result()
                except (FewstepError, concurrent.futures.CancelledError) as e:  # timed out, or shutting down
                    message = str(e) or "the server is shutting down"
                    code = 504 if isinstance(e, TimedOut) else 503
                    yield event("error", {"error": {"message": message, "type": "server_error", "code": code}})
                    return
                except Exception as e:  # a bug or a device fault: it belongs to this request
                    log.exception("streamed generation failed")
                    yield event("error", {"error": {"message": f"generation failed: {type(e).__name__}",
                                                    "type": "server_error", "code": 500}})
                    return
                params = spec.params(gen.params)
                pngs = await run_in_threadpool(dialects.encode_pngs, gen.images, gen.seeds, params, server.adapters)
                warnings = list(dict.fromkeys([*spec.notes, *gen.warnings]))
                for png, seed in zip(pngs, gen.seeds):
                    data = dict(type=f"{kind}.completed", b64_json=base64.b64encode(png).decode(),
                                created_at=int(time.time()), usage=USAGE, seed=seed, revised_prompt=spec.prompt,
                                compute_s=round(seconds, 4), **common)
                    if warnings:
                        data["warnings"] = warnings
                    yield event(f"{kind}.completed", data)
                server.metrics.images.inc(len(pngs))
                return
        finally:
            gone.set()  # the client left (or all was sent): work still running stops within a UNet block
            future.cancel()  # not started yet: it never will

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

