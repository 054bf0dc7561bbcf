"""The HTTP app: OpenAI and A1111 routes, health, metrics, the page; access, size and rate limits."""

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import Cancelled, FewstepError, LoadError, ResourceError
from ..recipes import RECIPES, SAMPLERS
from ..request import classifier_free
from . import a1111, admission, dialects, lifecycle, sse, stream
from .adapters import Adapters
from .admission import OverBudget
from .batcher import Batcher, GenerationFailed, Interrupted, QueueFull, Target, TimedOut
from .config import ServeConfig
from .controlnets import ControlNets
from .metrics import Metrics

log = logging.getLogger("fewstep")
STATIC = Path(__file__).parent / "static"
IMAGES_KEPT = 32  # decoded uploads kept by content
OPEN_PATHS = ("/health", "/", "/favicon.ico")  # and /static/: the page's files hold no data and cost no compute
KINDS = {401: "authentication_error", 404: "not_found", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 499: "client_closed_request", 504: "timeout"}


class ClientGone(Exception):
    """The client disconnected before its images were ready."""


class Server:
    """Everything one app holds: the engine (touched only by the batcher's thread), limits, metrics, adapters.

    engine None: the models (fewstep.serve.models.Models) load in the background once the app starts, while
    /health answers "loading"; engine, adapters, controlnets and config are those of the current model."""

    def __init__(self, engine, config, models=None):
        self.base_config = config
        self.metrics = Metrics()
        self.models = models
        self.batcher = None
        self.loading = lifecycle.Loading()
        self.created = int(time.time())
        if engine is not None:
            self.ready(self.build(engine.c.name, engine))
        self.files = OrderedDict()  # token -> PNG bytes, for response_format "url"
        # decoded uploads by content: the same image sent twice is the same object, so its requests may batch
        self.images = OrderedDict()
        self._images_lock = threading.Lock()

    def build(self, name, engine):
        """The batcher's Target of one loaded model: its adapters, ControlNets, limits (fewstep.serve.lifecycle)."""
        config = lifecycle.model_config(self.base_config, engine)
        adapters = Adapters(engine, config.lora_dir, max_weight=config.max_lora_weight,
                            max_per_request=config.max_loras, max_loaded=config.loaded_loras)
        return Target(engine, adapters, ControlNets(engine, allow_pickle=config.allow_pickle), config=config,
                      name=name)

    def ready(self, target):
        """Serve `target` (the first model, or another one a client picked)."""
        if self.batcher is None:
            c = self.base_config
            self.batcher = Batcher(target.engine, target.adapters, max_batch=c.max_batch, max_wait=c.max_wait,
                                   queue_size=c.queue_size, metrics=self.metrics, controlnets=target.controlnets)
            self.metrics.watch(self.batcher)
        self.batcher.target = target
        self.loading.done()

    @property
    def target(self):
        return None if self.batcher is None else self.batcher.target

    @property
    def engine(self):
        return None if self.batcher is None else self.batcher.engine

    @property
    def adapters(self):
        return self.target.adapters

    @property
    def controlnets(self):
        return self.target.controlnets

    @property
    def config(self):
        """The current model's settings (its default --max-size derived from its native size)."""
        return self.base_config if self.batcher is None else self.target.config

    @property
    def model(self):
        return self.target.name

    def decode(self, data, param, mode="RGB"):
        """A base64 upload (str) or a file's bytes as a PIL image, checked (422 naming `param`), kept a while."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data  # a key; decode refuses
        key = (hashlib.sha256(raw).digest(), isinstance(data, str), mode)
        with self._images_lock:
            if key in self.images:
                self.images.move_to_end(key)
                return self.images[key]
        if isinstance(data, str):
            image = dialects.decode_image(data, max_pixels=self.config.max_image_pixels, param=param, mode=mode)
        else:
            image = dialects.decode_bytes(data, max_pixels=self.config.max_image_pixels, param=param, mode=mode)
        with self._images_lock:
            self.images[key] = image
            while len(self.images) > IMAGES_KEPT:
                self.images.popitem(last=False)
        return image

    def keep(self, png):
        token = secrets.token_urlsafe(18)
        self.files[token] = png
        while len(self.files) > self.config.keep_images:
            self.files.popitem(last=False)
        return token

    async def generate(self, request, spec, api):
        """Queue the spec and wait for its Result, dropping the work when the client leaves or time runs out."""
        t0 = time.monotonic()
        job = self.batcher.submit(spec, self.config.timeout)
        fut = asyncio.wrap_future(job.future)
        try:
            while not fut.done():
                left = job.deadline - time.monotonic()
                if left <= 0:
                    raise TimedOut(f"the request did not finish within {self.config.timeout:g} s")
                await asyncio.wait({fut}, timeout=min(0.25, left))
                if not fut.done() and await request.is_disconnected():
                    raise ClientGone()
            result = fut.result()
        finally:
            job.cancel()  # no effect once done; otherwise its queued images are dropped and its batch may stop
            fut.cancel()  # nobody will read the outcome now
        self.metrics.request_seconds.labels(api).observe(time.monotonic() - t0)
        return result


def error(status, message, param=None, reason=None, headers=None):
    """OpenAI's error shape, plus FastAPI's `detail` list naming the field and the reason."""
    kind = KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    if param:
        body["detail"] = [{"loc": ["body", *param.split(".")], "msg": reason or message, "type": "value_error"}]
    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """ASGI middleware: API key, body size limit, and the per-route request counter."""

    def __init__(self, app, server):
        self.app = app
        self.server = server
        key = server.config.api_key
        self.key = key.encode() if key else None

    def authorized(self, scope):
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value.strip(), self.key)
        if scheme.lower() == b"basic":  # A1111 clients send --api-auth as Basic; the password is the key
            try:
                _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._socket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._call(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "other")
            self.server.metrics.requests.labels(label, str(status[0])).inc()

    async def _socket(self, scope, receive, send):
        """WebSockets (/v1/stream): the same key, also as ?key= or a subprotocol (browsers cannot set headers)."""
        offered = stream.offered_key(scope)
        if self.key and not self.authorized(scope) and not (offered and hmac.compare_digest(offered, self.key)):
            self.server.metrics.refused.labels("unauthorized").inc()
            response = error(401, "a valid API key is required: send Authorization: Bearer KEY, the subprotocol "
                                  "fewstep.key.BASE64URL_KEY or ?key=KEY",
                             headers={"WWW-Authenticate": 'Bearer realm="fewstep"'})
            return await stream.deny(scope, receive, send, response)
        await self.app(scope, receive, send)

    async def _call(self, scope, receive, send):
        path, metrics, limit = scope["path"], self.server.metrics, self.server.config.max_body_bytes
        if (not self.server.loading.ready and path not in OPEN_PATHS and not path.startswith("/static/")
                and path != lifecycle.PROGRESS):
            _, body = self.server.loading.health()  # nothing but /health and the page until the model is in
            response = error(503, f"the server is {body['status']} ({body['stage']}): retry when GET /health "
                                  "answers 200", headers={"Retry-After": "2"})
            return await response(scope, receive, send)
        if self.key and path not in OPEN_PATHS and not path.startswith("/static/") and not self.authorized(scope):
            metrics.refused.labels("unauthorized").inc()
            response = error(401, "a valid API key is required: send the header Authorization: Bearer KEY",
                             headers={"WWW-Authenticate": 'Bearer realm="fewstep"'})
            return await response(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            metrics.refused.labels("too_large").inc()
            return await error(413, f"the request body is larger than {limit} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body with no length announced
                    metrics.refused.labels("too_large").inc()
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine, config=None, *, models=None, warmup=True, announce=None):
    """The FastAPI app serving `engine`; its batcher starts and stops with the app's lifespan.

    engine None: `models` (fewstep.serve.models.Models) load their current model once the app starts, warmed up
    unless warmup is False, while /health answers 503 "loading"; announce(kind, text) hears how it goes."""
    config = config or ServeConfig()
    server = Server(engine, config, models)
    server.warmup = warmup

    @asynccontextmanager
    async def lifespan(app):
        if server.batcher is not None:
            server.batcher.start()
        else:
            lifecycle.start_loading(server, warmup=warmup, announce=announce)
        try:
            yield
        finally:
            if server.loading.state == "loading":
                server.loading.fail(Cancelled("the server stopped while loading"))
            if server.batcher is not None:
                await run_in_threadpool(server.batcher.close)

    app = FastAPI(title="fewstep", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Gate, server=server)
    if config.cors_origins:  # outside the Gate: a preflight carries no key, and refusals keep their CORS headers
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After"], max_age=600)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(a1111.router(server))  # the A1111 listings clients read at start-up
    app.include_router(lifecycle.router(server, dialects.Invalid))  # /health, progress, interrupt, options, models
    refused = server.metrics.refused

    # ---- errors --------------------------------------------------------------------------------------------------
    @app.exception_handler(dialects.Invalid)
    async def on_invalid(request, e):
        refused.labels("invalid").inc()
        return error(422, str(e), e.param, e.reason)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, e):
        refused.labels("invalid").inc()
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid value")
        return error(422, f"{param}: {msg}" if param else msg, param, msg)

    @app.exception_handler(HTTPException)
    async def on_http(request, e):
        return error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(QueueFull)
    async def on_full(request, e):
        refused.labels("queue_full").inc()
        return error(429, str(e), headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(OverBudget)
    async def on_over_budget(request, e):
        refused.labels("over_budget").inc()
        response = error(422, str(e), "size", "over the time budget of --timeout")
        body = json.loads(response.body)
        body["error"].update(estimate_seconds=round(e.estimate, 1), limit_seconds=e.limit, fits=e.fits)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(TimedOut)
    async def on_timeout(request, e):
        refused.labels("timeout").inc()
        return error(504, str(e))

    @app.exception_handler(ClientGone)
    async def on_gone(request, e):
        refused.labels("disconnected").inc()
        return error(499, "the client closed the connection")

    @app.exception_handler(FewstepError)
    async def on_fewstep(request, e):
        if isinstance(e, Interrupted):  # a client's /interrupt: not a fault to retry
            return error(409, str(e))
        if isinstance(e, Cancelled):
            return error(503, str(e))
        if isinstance(e, ResourceError):
            return error(503, str(e))
        if isinstance(e, LoadError):  # a file in --lora-dir that does not fit this model
            return error(422, str(e), "loras")
        return error(422, str(e), getattr(e, "field", None))

    @app.exception_handler(GenerationFailed)
    async def on_failed(request, e):
        return error(500, str(e))

    # ---- generation ----------------------------------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def openai_generations(body: dialects.OpenAIImages, request: Request):
        spec = dialects.openai_spec(server, body)
        if body.stream:
            return await sse.respond(server, spec, body, "image_generation")
        result = await server.generate(request, spec, "openai")
        return await openai_reply(request, body, spec, result)

    async def openai_reply(request, body, spec, result):
        """The OpenAI images answer: PNGs with metadata, inline (b64_json) or kept for their URLs."""
        pngs = await run_in_threadpool(dialects.encode_all, result, server.adapters)
        urls = None
        if body.response_format == "url":
            urls = [str(request.url_for("image_file", token=server.keep(png))) for png in pngs]
        return dialects.openai_response(spec, result, pngs, urls)

    @app.get("/v1/images/files/{token}.png", name="image_file")
    async def image_file(token: str):
        png = server.files.get(token)
        if png is None:
            return error(404, "no such image (images are kept for a while only)")
        return Response(png, media_type="image/png")

    @app.post("/v1/images/edits")
    async def openai_edits(request: Request):
        body, image, mask = await edit_form(request)
        spec = await run_in_threadpool(dialects.openai_edit_spec, server, body, image, mask)
        return await openai_image_reply(request, body, spec)

    @app.post("/v1/images/variations")
    async def openai_variations(request: Request):
        body, image, mask = await edit_form(request, dialects.OpenAIVariations)
        if mask is not None:
            raise dialects.Invalid("mask", "variations take no mask: use /v1/images/edits to edit an area")
        spec = await run_in_threadpool(dialects.openai_variation_spec, server, body, image)
        return await openai_image_reply(request, body, spec)

    async def openai_image_reply(request, body, spec):
        if body.stream:
            return await sse.respond(server, spec, body, "image_edit")
        result = await server.generate(request, spec, "openai")
        return await openai_reply(request, body, spec, result)

    async def edit_form(request, kind=dialects.OpenAIEdits):
        """The multipart form of /v1/images/edits and /variations: (body, image RGBA, mask or None), each
        checked. Nested fields come as the openai SDK sends extra_body in a form: loras[NAME]=WEIGHT (or JSON)."""
        from pydantic import ValidationError

        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise dialects.Invalid("image", "send multipart/form-data with the image as a file (as OpenAI's API)")
        form = await request.form(max_files=4, max_fields=64)
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if "loras" in fields:
            try:
                fields["loras"] = json.loads(fields["loras"])
            except ValueError:
                raise dialects.Invalid("loras", 'must be a JSON object like {"name": 0.8}') from None
        tagged = {k[6:-1]: fields.pop(k) for k in list(fields) if k.startswith("loras[") and k.endswith("]")}
        if tagged:
            fields["loras"] = dict(fields.get("loras") or {}, **tagged)
        try:
            body = kind.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            raise dialects.Invalid(param, first.get("msg", "invalid value")) from None
        uploads = {}
        for name in ("image", "image[]", "mask"):
            items = form.getlist(name)
            if any(isinstance(v, str) for v in items):
                raise dialects.Invalid(name.rstrip("[]"), "upload it as a file, not a text field")
            uploads[name] = items
        images = uploads["image"] + uploads["image[]"]
        if len(images) != 1:
            raise dialects.Invalid("image", f"give exactly one image file, got {len(images)}")
        if len(uploads["mask"]) > 1:
            raise dialects.Invalid("mask", "give at most one mask file")
        image = await run_in_threadpool(server.decode, await images[0].read(), "image", None)
        mask = None
        if uploads["mask"]:
            mask = await run_in_threadpool(server.decode, await uploads["mask"][0].read(), "mask", None)
        return body, image, mask

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(body: dialects.A1111Txt2Img, request: Request):
        spec = await run_in_threadpool(dialects.a1111_spec, server, body)
        return await a1111_run(body, spec, request)

    @app.post("/sdapi/v1/img2img")
    async def a1111_img2img(body: dialects.A1111Img2Img, request: Request):
        if len(body.init_images) != 1:
            raise dialects.Invalid("init_images", f"give exactly one image, got {len(body.init_images)}")
        image = await run_in_threadpool(server.decode, body.init_images[0], "init_images")
        mask = None
        if body.mask:
            mask = await run_in_threadpool(server.decode, body.mask, "mask", None)
        spec = await run_in_threadpool(dialects.a1111_spec, server, body, image, mask)
        return await a1111_run(body, spec, request)

    async def a1111_run(body, spec, request):
        result = await server.generate(request, spec, "a1111")
        pngs = await run_in_threadpool(dialects.encode_all, result, server.adapters)
        return dialects.a1111_response(body, spec, result, pngs, server.model)

    # ---- what clients ask before generating ----------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model, "object": "model", "created": server.created,
                                            "owned_by": "fewstep"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        """OpenAI's models.retrieve: one entry of /v1/models, or 404."""
        listed = (await models())["data"]
        found = next((m for m in listed if m["id"] == model_id), None)
        if found is None:
            return error(404, f"no model {model_id!r} here (this server has {', '.join(m['id'] for m in listed)})",
                         "model")
        return found

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": n, "alias": n} for n in server.adapters.available()]

    @app.get("/controlnet/model_list")
    async def controlnet_models():
        return {"model_list": server.controlnets.names()}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        return {"module_list": list(server.controlnets.modules)}

    @app.post("/api/preprocess")
    async def preprocess(request: Request):
        """The page's preview: a built-in preprocessor (form field module, default canny) run on an uploaded
        image (form file image); answers the PNG it makes."""
        from ..control import preprocess as run_preprocessor

        form = await request.form(max_files=1, max_fields=4)
        upload, module = form.get("image"), str(form.get("module") or "canny").lower()
        if upload is None or isinstance(upload, str):
            raise dialects.Invalid("image", "upload the image as a file")
        if module not in server.controlnets.modules[1:]:
            raise dialects.Invalid("module", f"unknown preprocessor {module!r} (this server has "
                                             f"{', '.join(server.controlnets.modules[1:])})")
        image = await run_in_threadpool(server.decode, await upload.read(), "image")

        def run():
            buf = io.BytesIO()
            run_preprocessor(module, image).save(buf, format="PNG")
            return buf.getvalue()

        return Response(await run_in_threadpool(run), media_type="image/png")

    @app.get("/api/info")
    async def info():
        """What the page needs: model, defaults, limits, LoRA names; `sizes`: the square sizes this model accepts
        that the measured speed finishes within --timeout (at the default steps, one image)."""
        c, engine, target = server.config, server.engine, server.target
        d = engine.defaults()
        passes = 2 if classifier_free(d["guidance"], engine.full_lcm) else 1
        sizes = admission.sizes(target.speed, engine, c.timeout, c.max_size, d["steps"], passes)
        return {"models": server.models.names() if server.models else [server.model], "sizes": sizes,
                "seconds_per_pixel_step": target.speed.per_step, "model": server.model, "version": __version__, "notes": list(engine.c.notes),
                "native_size": engine.native_size,
                "size_step": engine.vae_factor, "defaults": engine.defaults(), "recipe": engine.default_recipe(),
                "samplers": list(SAMPLERS), "recipes": list(RECIPES),
                "loras": server.adapters.available(),
                "controlnet": {"models": server.controlnets.names(), "modules": list(server.controlnets.modules),
                               "defaults": dict(server.controlnets.defaults)},
                "limits": {"max_size": c.max_size, "max_images": c.max_images, "max_steps": c.max_steps,
                           "max_guidance": c.max_guidance, "max_lora_weight": c.max_lora_weight,
                           "max_loras": c.max_loras}}

    stream.add_route(app, server)  # /v1/stream: camera frames over a WebSocket

    # ---- the page ------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
