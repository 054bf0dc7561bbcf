"""The camera stream socket, /v1/stream: JPEG/WebP frames in and out over a WebSocket, a JSON control channel.

Each connection holds one engine stream (Engine.stream), touched only on the batcher's worker thread: every frame is
one Batcher.call, so frames and HTTP batches take turns. Back-pressure is a latest-frame slot per connection: a frame
that arrives while the engine is busy replaces the one waiting (counted as dropped), so a client sending faster than
the engine serves costs at most one waiting frame of memory, and the newest frame always wins.
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from collections import deque
from typing import Literal
from urllib.parse import parse_qs

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..errors import Cancelled, FewstepError, RequestError
from . import dialects

log = logging.getLogger("fewstep")
PROTOCOL = "fewstep"  # the subprotocol the server answers; a browser must offer it next to a key protocol
KEY_PROTOCOL = "fewstep.key."  # + the API key in unpadded base64url: a browser cannot set Authorization on a socket
UPDATABLE = ("prompt", "negative_prompt", "strength", "steps", "guidance", "seed", "similarity")  # Stream.update's
RESTART = ("width", "height", "recipe", "loras")  # fixed per engine stream: a change starts a new one
FPS_WINDOW = 2.0  # seconds of outputs the reported fps is measured over
IDLE_SECONDS = 60.0  # a stream that sends nothing for this long is closed, so idle sockets do not hold the slots


class Switched(Exception):
    """The server now serves another model: the engine stream belongs to the old one."""


class Control(BaseModel):
    """One control message: any subset of these fields (validated before any engine work)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    negative_prompt: str | None = None
    strength: float | None = Field(None, gt=0, le=1)
    steps: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    similarity: float | None = Field(None, ge=0, le=1)
    guidance: float | None = Field(None, ge=0)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    recipe: str | None = None
    loras: dict[str, float] | None = None
    format: Literal["jpeg", "webp", "png"] | None = None  # of the frames sent back (default jpeg; png: lossless)
    quality: int | None = Field(None, ge=1, le=100)  # of the frames sent back (default 85)
    flush: bool = False  # send the frames still in the stream batch now


class Streams:
    """The open streams of one server, at most `limit` at a time."""

    def __init__(self, server):
        self.server = server
        self.limit = server.config.max_streams
        self.open = set()

    def held_bytes(self):
        """Bytes of frames waiting in the slots of all open streams (at most one frame per stream)."""
        return sum(len(s.slot[0]) for s in self.open if s.slot is not None)


def add_route(app, server):
    """Register /v1/stream on the app (the API key is checked before it runs: app.Gate)."""
    streams = app.state.streams = Streams(server)

    @app.websocket("/v1/stream")
    async def stream_socket(ws: WebSocket):
        protocol = PROTOCOL if PROTOCOL in ws.scope.get("subprotocols", ()) else None
        refusal = None
        if server.batcher is None or not server.loading.ready:
            refusal = "the server is still loading its model: retry when GET /health answers 200"
        elif len(streams.open) >= streams.limit:
            server.metrics.refused.labels("too_many_streams").inc()
            refusal = f"this server runs at most {streams.limit} streams at a time: retry later"
        if refusal is not None:
            await ws.accept(subprotocol=protocol)
            await ws.send_text(json.dumps({"type": "error", "field": None, "message": refusal}))
            return await ws.close(1013, refusal[:120])  # 1013: try again later
        session = Session(server, ws)
        streams.open.add(session)
        try:
            await ws.accept(subprotocol=protocol)
            await session.run()
        finally:
            streams.open.discard(session)


def offered_key(scope):
    """The API key a WebSocket client sent where a browser can put one (bytes), or None: a subprotocol
    `fewstep.key.<base64url of the key>`, or the query parameter `key`."""
    for p in scope.get("subprotocols", ()):
        if p.startswith(KEY_PROTOCOL):
            value = p[len(KEY_PROTOCOL):]
            try:
                return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            except (binascii.Error, ValueError):
                return None
    keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key")
    return keys[0].encode() if keys else None


async def deny(scope, receive, send, response):
    """Refuse a WebSocket handshake with an HTTP response (401...), where the server supports it; else a close.
    (uvicorn's websockets-sansio protocol then logs a spurious "returned without completing handshake": its PR 3138.)"""
    await WebSocket(scope, receive, send).send_denial_response(response)


class Session:
    """One connection: its parameters, its latest-frame slot and its engine stream."""

    def __init__(self, server, ws):
        self.server = server
        self.ws = ws
        self.params = {"prompt": ""}  # what the engine stream runs with (the last accepted values)
        self.pending = {}  # accepted by validation, not yet applied on the engine thread
        self.stream = None  # the engine's stream object: touched only inside Batcher.call (but Stream.fit, pure)
        self.engine = None  # the engine it belongs to
        self.size = None
        self.loras = ()
        self.slot = None  # (frame bytes, arrival time): the latest frame not yet taken
        self.flush_asked = False
        self.wake = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.format, self.quality = "jpeg", 85
        self.received = self.dropped = self.processed = self.sent = 0
        self.arrivals = deque()  # arrival times of the frames in the stream batch, oldest first (at most k)
        self.skipped = 0
        self.sent_at = deque()
        self.outbox = asyncio.Queue(maxsize=2)  # outputs waiting to be encoded and sent (the engine waits if full)

    # ---- three tasks: receive (never waits for the engine), serve (one engine call at a time), send --------------
    async def run(self):
        async with anyio.create_task_group() as tasks:

            async def worker():
                await self.serve()
                tasks.cancel_scope.cancel()  # the worker closed the socket: stop receiving

            tasks.start_soon(worker)
            tasks.start_soon(self.sender)
            await self.receive()
            tasks.cancel_scope.cancel()  # the client has gone: drop the frame in the engine's queue, if any

    async def receive(self):
        try:
            while True:
                try:
                    message = await asyncio.wait_for(self.ws.receive(), IDLE_SECONDS)
                except TimeoutError:
                    await self.error(None, f"nothing received for {IDLE_SECONDS:g} s: closing the stream")
                    return await self.close(1000, "idle")
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await self.on_frame(message["bytes"])
                elif message.get("text") is not None:
                    await self.on_control(message["text"])
        except (WebSocketDisconnect, OSError):  # an answer to a client that has gone (uvicorn: ClientDisconnected)
            return

    async def on_frame(self, raw):
        limit = self.server.config.max_frame_bytes
        if len(raw) > limit:
            return await self.error("frame", f"the frame is {len(raw)} bytes, more than {limit}: send a smaller "
                                             f"JPEG or WebP")
        self.received += 1
        if self.slot is not None:
            self.dropped += 1  # the engine has not taken the previous one yet: the newer frame replaces it
        self.slot = (raw, time.monotonic())
        self.wake.set()

    async def on_control(self, text):
        try:
            message = json.loads(text)
        except ValueError:
            return await self.error(None, "a text message must be a JSON object of control fields")
        if not isinstance(message, dict):
            return await self.error(None, "a text message must be a JSON object of control fields")
        try:
            control = Control.model_validate(message)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first.get("loc", ())) or None
            return await self.error(field, f"{field}: {first.get('msg', 'invalid value')}")
        changes = {k: getattr(control, k) for k in control.model_fields_set if k in UPDATABLE + RESTART}
        try:
            self.check_limits(changes)
        except RequestError as e:
            return await self.error(e.field, str(e))
        if control.format is not None:
            self.format = control.format
        if control.quality is not None:
            self.quality = control.quality
        self.pending.update(changes)
        self.flush_asked |= control.flush
        self.wake.set()

    def check_limits(self, changes):
        """The server's limits on the fields of a control message (RequestError naming the field)."""
        c = self.server.config
        for name in ("prompt", "negative_prompt"):
            if changes.get(name) is not None and len(changes[name]) > c.max_prompt_chars:
                raise RequestError(f"{name}: at most {c.max_prompt_chars} characters", field=name)
        if changes.get("prompt", "") is None:
            raise RequestError("prompt: must be a string", field="prompt")
        for name, top in (("steps", c.max_steps), ("width", c.max_size), ("height", c.max_size),
                          ("guidance", c.max_guidance)):
            if changes.get(name) is not None and changes[name] > top:
                raise RequestError(f"{name}: at most {top:g}", field=name)
        if changes.get("loras") is not None:
            try:
                changes["loras"] = self.server.adapters.check(changes["loras"])
            except FewstepError as e:
                raise RequestError(f"loras: {e}", field="loras") from None

    async def serve(self):
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                if self.pending or (self.stream is None and self.slot is not None):
                    await self.configure()
                if self.stream is not None and self.slot is not None:
                    raw, arrived = self.slot
                    self.slot = None
                    await self.process(raw, arrived)
                if self.stream is not None and self.flush_asked:
                    await self.flush()
            except Switched:  # a client picked another model: the next frame starts a stream on it
                self.stream = None
                self.wake.set()
                continue
            except Cancelled as e:  # the server is shutting down
                return await self.close(1001, str(e))
            except FewstepError as e:  # this frame or change failed; the stream goes on
                await self.error(getattr(e, "field", None), str(e))
            except (WebSocketDisconnect, OSError):  # the client has gone
                return
            except Exception as e:  # noqa: BLE001 - an engine fault ends this stream, never the server
                if self.ws.client_state != WebSocketState.CONNECTED:
                    return
                log.exception("stream failed")
                await self.error(None, f"the stream failed: {type(e).__name__}")
                return await self.close(1011, "the stream failed")
            self.flush_asked = False
            if self.slot is not None or self.pending:
                self.wake.set()

    # ---- engine work (each piece one Batcher.call) -------------------------------------------------------------
    async def call(self, fn, new=False):
        """fn(engine) on the engine's thread, on this stream's engine (Switched if the server changed models)."""

        def run(engine):
            if not new and engine is not self.engine:
                raise Switched()
            return fn(engine)

        future = self.server.batcher.call(run, loras=self.loras)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancelled() and not asyncio.current_task().cancelling():  # cancelled by Batcher.close
                raise Cancelled("the server is shutting down") from None
            raise

    async def configure(self):
        """Apply the pending changes: Stream.update, or a new engine stream when a fixed field changed."""
        changes, self.pending = self.pending, {}
        if self.stream is None or any(k in RESTART for k in changes):
            params = {**self.params, **changes}
            kwargs = {k: v for k, v in params.items() if k != "loras" and v is not None}
            previous, self.loras = self.loras, params.get("loras") or ()

            def start(engine):
                s = engine.stream(**kwargs)
                return s, tuple(s.size), engine

            try:
                self.stream, self.size, self.engine = await self.call(start, new=True)
            except Cancelled:
                raise
            except FewstepError as e:  # a bad value, a LoRA file that does not fit: the old stream (if any) goes on
                self.loras = previous
                return await self.error(getattr(e, "field", None), str(e))
            self.params = params
            self.arrivals.clear()
            self.skipped = 0
            w, h = self.size
            return await self.send_json({"type": "ready", "width": w, "height": h,
                                         "params": {k: v for k, v in params.items() if k != "loras"},
                                         "loras": dict(self.loras)})
        stream = self.stream

        def update(engine):
            before = stream.sched
            stream.update(**changes)
            return stream.sched is not before  # a new schedule or noise: the frames in flight were dropped

        try:
            refilled = await self.call(update)
        except RequestError as e:
            return await self.error(e.field, str(e))
        except Switched:
            self.pending = {**changes, **self.pending}  # they apply to the stream started on the new model
            raise
        if refilled:
            self.arrivals.clear()
        self.params.update(changes)
        await self.send_json({"type": "updated", "params": changes})

    async def process(self, raw, arrived):
        stream = self.stream
        try:
            image = await run_in_threadpool(self.decode, stream, raw)
        except dialects.Invalid as e:
            return await self.error("frame", f"frame: {e.reason}")

        def step(engine):
            return stream.process(image), dict(stream.stats)

        try:
            out, stats = await self.call(step)
        except RequestError as e:
            return await self.error(e.field or "frame", str(e))
        except Switched:
            if self.slot is None:
                self.slot = (raw, arrived)  # the stream started on the new model takes it
            raise
        self.processed += 1
        now = time.monotonic()
        latency, resent = None, stats.get("skipped", 0) > self.skipped
        if resent:  # the similarity filter skipped the frame: the last output again, at once
            self.skipped = stats["skipped"]
            latency = now - arrived
        else:
            self.arrivals.append(arrived)
            if out is not None:  # the oldest frame in flight came out (None: the stream batch is filling)
                latency = now - self.arrivals.popleft()
        await self.outbox.put((out, latency, stats, resent))

    async def flush(self):
        stream = self.stream

        def rest(engine):
            return list(stream.flush()), dict(stream.stats)

        images, stats = await self.call(rest)
        for image in images:
            arrived = self.arrivals.popleft() if self.arrivals else None
            await self.outbox.put((image, None if arrived is None else time.monotonic() - arrived, stats, False))
        self.arrivals.clear()

    def decode(self, stream, raw):
        """The frame at the stream's size: decoded (pixel count checked first), then the stream's own centre crop
        and resize (Stream.fit, a pure function of the frame), here off the engine's thread."""
        image = dialects.decode_bytes(raw, max_pixels=self.server.config.max_image_pixels, param="frame")
        return stream.fit(image)

    def encode(self, image):
        buf = io.BytesIO()
        image.save(buf, format=self.format.upper(), quality=self.quality)
        return buf.getvalue()

    # ---- sending -----------------------------------------------------------------------------------------------
    async def sender(self):
        """Encode and send the outputs in order, while the engine works on the next frame."""
        try:
            while True:
                await self.send_frame(*await self.outbox.get())
        except (WebSocketDisconnect, OSError):
            return
        except RuntimeError:  # starlette: a send after the worker closed the socket (an engine fault)
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                raise

    async def send_frame(self, image, latency, stats, resent=False):
        """The output frame (binary), then its stats (text); a None image (stream batch filling) sends stats only."""
        if image is not None:
            data = await run_in_threadpool(self.encode, image)
            async with self.send_lock:
                await self.ws.send_bytes(data)
            self.sent += 1
            now = time.monotonic()
            self.sent_at.append(now)
            while self.sent_at and now - self.sent_at[0] > FPS_WINDOW:
                self.sent_at.popleft()
        span = self.sent_at[-1] - self.sent_at[0] if len(self.sent_at) > 1 else 0
        fps = (len(self.sent_at) - 1) / span if span > 0 else None
        await self.send_json({
            "type": "frame", "output": image is not None, "resent": resent, "fps": None if fps is None else round(fps, 2),
            "latency_ms": None if latency is None else round(latency * 1000, 1),
            "engine_ms": None if stats.get("last_seconds") is None else round(stats["last_seconds"] * 1000, 1),
            "received": self.received, "dropped": self.dropped, "processed": self.processed, "sent": self.sent,
            "skipped": stats.get("skipped", 0), "unet_calls": stats.get("unet_calls")})

    async def send_json(self, obj):
        async with self.send_lock:
            await self.ws.send_text(json.dumps(obj))

    async def error(self, field, message):
        await self.send_json({"type": "error", "field": field, "message": message})

    async def close(self, code, reason):
        try:
            await self.ws.close(code, reason[:120])
        except RuntimeError:  # already closed
            pass
