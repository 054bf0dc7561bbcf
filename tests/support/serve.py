"""A live `fewstep serve` app on a loopback port in a thread, and engine wrappers that control timing in tests."""

import base64
import functools
import io
import socket
import threading
import time

import anyio
import httpx

anyio.open_file  # noqa: B018 - import anyio's lazily loaded file module now: a first import from a server thread
# races pytest's assertion rewriting of the anyio plugin (a Python 3.11 "AST constructor recursion" error)


@functools.cache
def default_engine():
    """The embedded default model (the shapes teacher, 64x64), loaded once per test session in float32 on the CPU."""
    import fewstep

    return fewstep.load(device="cpu", dtype="fp32")


def decode_png(b64):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


class LiveServer:
    """create_app(engine, config) served by uvicorn on 127.0.0.1:<free port>; a context manager."""

    def __init__(self, engine, config=None, *, app=None):
        from fewstep.serve.app import create_app

        self.app = app or create_app(engine, config)  # app: one made otherwise (models loaded in the background)
        self.state = self.app.state.server

    def __enter__(self):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(20)

    def metric(self, name, **labels):
        """The value of one sample of the Prometheus registry (0 when absent)."""
        value = self.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


class Gated:
    """An engine whose generations wait for `gate` and count the steps they run (everything else passes through)."""

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, req, *, callback=None, **kw):
        self.entered.set()
        self.gate.wait(30)

        def counted(i, n):
            self.steps += 1
            if callback:
                callback(i, n)

        return self.engine.run(req, callback=counted, **kw)
