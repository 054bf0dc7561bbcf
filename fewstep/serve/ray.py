"""fewstep on Ray Serve: one HTTP ingress in front of N replicas, each a whole `fewstep serve` app.

Ray owns what a cluster needs (placing replicas on nodes and GPUs, autoscaling on ongoing requests, restarting a
dead replica); fewstep writes no scheduler of its own. Each replica runs the same FastAPI app, engine and batcher
as a single server, so a request answered on Ray is the request answered by one server (same batching by adapter
set, same limits, same errors). The ingress only forwards requests (method, path, headers, body), choosing the
replica by the request's adapter set through Ray Serve's model multiplexing (requests with one LoRA set go to a
replica that has it fused when one is free; Ray falls back to any replica under load), retries a request once on
another replica when its replica dies, and counts adapter re-fusions per replica in its own /metrics.

Use it as `fewstep serve --ray ...`, or as a Serve application: `serve run fewstep.serve.ray:app model=... ` / a
Serve config file naming `fewstep.serve.ray:app` with the same arguments (docs/ray.md).
"""

import asyncio
import json
import logging
import os
import re
import time

log = logging.getLogger("fewstep")

# what the replica's app reads; host: the URLs it builds (response_format "url") name the public address
ROUTED_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "host", "origin",
                  "access-control-request-method", "access-control-request-headers")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")  # as fewstep.lora.prompt (light: no torch here)
NO_ADAPTERS = "-"  # Ray refuses an empty multiplexed model id
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def need_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        from .config import ConfigError

        raise ConfigError(f"fewstep serve --ray needs {e.name}: pip install 'fewstep[ray]'") from None


def adapter_key(body, content_type=""):
    """The routing key of a request: its LoRA set as "name:weight,..." (sorted), "-" for none or unreadable.

    Read from the JSON body's `loras` field and the `<lora:...>` tags of its prompt, the way the replica's app
    reads them; a wrong guess costs only a re-fusion, never a wrong image (the replica's batcher decides)."""
    if "json" not in (content_type or "") or not body:
        return NO_ADAPTERS
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return NO_ADAPTERS
    if not isinstance(data, dict):
        return NO_ADAPTERS
    found = {}
    loras = data.get("loras")
    if isinstance(loras, dict):
        for name, w in loras.items():
            if isinstance(w, (int, float)) and w:
                found[str(name)] = found.get(str(name), 0.0) + float(w)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        for name, w in TAG.findall(prompt):
            try:
                found[name.strip()] = found.get(name.strip(), 0.0) + (1.0 if w in ("", None) else float(w))
            except ValueError:
                pass
    return ",".join(f"{n}:{w:g}" for n, w in sorted(found.items()) if w) or NO_ADAPTERS


# ---- the replica ---------------------------------------------------------------------------------------------
class ReplicaApp:
    """One engine and its fewstep app, answering forwarded requests in-process (no socket of its own)."""

    def __init__(self, load, config, store=None):
        import fewstep

        from .app import create_app
        from .config import ServeConfig

        load = dict(load)
        controlnets = load.pop("controlnets", ())
        warmup = load.pop("warmup", True)
        t0 = time.perf_counter()
        engine = fewstep.load(load.pop("model", None), **load)
        from ..arch import controlnet_name

        for src in controlnets:
            engine.load_controlnet(src, name=controlnet_name(src), allow_pickle=load.get("allow_pickle", False))
        if warmup:
            engine.generate("warm-up", seed=0)
        self.app = create_app(engine, ServeConfig(**config))
        self.server = self.app.state.server
        if store is not None:  # PNGs kept for response_format "url" are fetched through any replica
            self.server.files = SharedFiles(store)
        self._lifespan = None
        self.pid = os.getpid()
        log.warning("fewstep replica %d: %s ready after %.1f s", self.pid, engine.c.name, time.perf_counter() - t0)

    async def start(self):
        if self._lifespan is None:  # the app's lifespan starts its batcher; ASGITransport does not run it
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()

    async def stop(self):
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None

    async def handle(self, method, path, query, headers, body):
        """The app's answer as it is sent: first (status, headers), then the body's chunks.

        The app is called as an ASGI app with the forwarded request (no socket, no client library: httpx's
        ASGITransport would buffer the whole body, so an event stream would arrive at its end and a client that left
        would go unseen). When this generator is closed early (the client left; Ray cancels it), the app's next
        receive() says http.disconnect, exactly what a single server's app hears from uvicorn."""
        from urllib.parse import urlencode

        await self.start()
        messages, gone = asyncio.Queue(), asyncio.Event()
        hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": urlencode(query).encode(), "headers": hdrs, "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 80), "state": {}}
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await messages.put(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while True:
                m = await messages.get()
                if m is None:
                    task.result()  # the app's own failure (it answers 500s itself; this is a crash)
                    return
                if m["type"] == "http.response.start":
                    out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in m.get("headers", ())]
                    out = [(k, v) for k, v in out if k.lower() not in HOP_HEADERS]
                    yield (m["status"], out + [("x-fewstep-replica", str(self.pid)),
                                              ("x-fewstep-adapter-switches", str(self.server.adapters.switches))])
                elif m["type"] == "http.response.body":
                    if m.get("body"):
                        yield m["body"]
                    if not m.get("more_body"):
                        return
        finally:
            gone.set()  # the app sees the disconnect and drops its work (it finishes on its own, never awaited)

    def healthy(self):
        thread = self.server.batcher._thread
        return thread is None or thread.is_alive()


class SharedFiles:
    """Server.files for a replica: the PNGs of response_format "url" live in one Ray actor (FileStore), so the
    GET of an image's URL finds it whichever replica answers."""

    def __init__(self, store):
        self.store = store

    def __setitem__(self, token, png):
        import ray

        ray.get(self.store.put.remote(token, png))  # stored before the URL goes out (milliseconds)

    def __len__(self):
        return 0  # the store keeps at most keep_images itself

    def get(self, token, default=None):
        import ray

        png = ray.get(self.store.get.remote(token))
        return default if png is None else png


def file_store(keep):
    """The app's FileStore actor, created by the first replica and found by the others (it outlives a replica)."""
    import ray

    @ray.remote(num_cpus=0)
    class FileStore:
        def __init__(self, keep):
            from collections import OrderedDict

            self.files, self.keep = OrderedDict(), keep

        def put(self, token, png):
            self.files[token] = png
            while len(self.files) > self.keep:
                self.files.popitem(last=False)

        def get(self, token):
            return self.files.get(token)

    return FileStore.options(name="fewstep-files", get_if_exists=True, lifetime="detached").remote(keep)


# ---- the ingress ---------------------------------------------------------------------------------------------
class Ingress:
    """Forwards every route to a replica chosen by adapter set; retries once when the replica dies."""

    def __init__(self, replica, retries=1, timeout=None):
        self.replica = replica
        self.retries = retries
        self.timeout = timeout
        self.switches = {}  # replica pid -> adapter switches it reported last
        self.counts = {"forwarded": 0, "retried": 0, "replica_failures": 0, "cancelled": 0}

    async def forward(self, request):
        from fastapi.responses import StreamingResponse

        body = await request.body()
        ctype = request.headers.get("content-type", "")
        key = adapter_key(body, ctype)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ROUTED_HEADERS}
        query = list(request.query_params.multi_items())
        path = request.url.path
        last = None
        for attempt in range(1 + self.retries):
            gen = self.replica.options(multiplexed_model_id=key, stream=True).handle.remote(
                request.method, path, query, headers, body)
            try:
                # the status comes when the app starts answering: for a plain route, once its images are done,
                # so a replica that dies while generating is seen here and the request is sent again
                status, out = await self._first(gen, request)
            except ClientLeft:
                self.counts["cancelled"] += 1
                from fastapi.responses import Response

                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - a dead replica or a lost actor: the only errors Ray raises here
                if not is_replica_failure(e):
                    raise
                self.counts["replica_failures"] += 1
                last = e
                log.warning("fewstep: replica failed during %s %s (%s): %s", request.method, path,
                            type(e).__name__, "retrying" if attempt < self.retries else "giving up")
                if attempt < self.retries:
                    self.counts["retried"] += 1
                    continue
                break
            self.counts["forwarded"] += 1
            hdr = dict(out)
            pid = hdr.get("x-fewstep-replica")  # kept: which replica answered (logs, tests)
            switches = hdr.pop("x-fewstep-adapter-switches", None)
            if pid is not None and switches is not None:
                self.switches[pid] = int(switches)
            tail = b""
            if path == "/metrics" and status == 200:  # one replica's metrics, then the ingress's own
                tail = self.metrics().encode()
                hdr.pop("content-length", None)
            return StreamingResponse(self._rest(gen, tail), status_code=status, headers=hdr)
        from .app import error

        return error(503, f"the replica serving this request failed ({type(last).__name__}) and so did its retry: "
                          "try again", headers={"Retry-After": "5"})

    async def _first(self, gen, request):
        """The replica's (status, headers); cancels the replica's work when the client disconnects first."""
        task = asyncio.ensure_future(gen.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    gen.cancel()  # Ray cancels the replica's generator: the app hears a disconnect, the engine stops
                    raise ClientLeft()
        except asyncio.CancelledError:  # Ray's proxy saw the client leave first and cancelled this handler
            self.counts["cancelled"] += 1
            gen.cancel()
            raise
        finally:
            if not task.done():
                task.cancel()

    async def _rest(self, gen, tail):
        """The body's chunks as the replica sends them; closing early (the client left) cancels the replica's."""
        try:
            async for chunk in gen:
                yield chunk
            if tail:
                yield tail
        finally:
            gen.cancel()  # no effect once it has finished

    def metrics(self):
        lines = ["# HELP fewstep_ray_adapter_switches Changes of the fused LoRA set, per replica",
                 "# TYPE fewstep_ray_adapter_switches gauge"]
        lines += [f'fewstep_ray_adapter_switches{{replica="{pid}"}} {n}' for pid, n in sorted(self.switches.items())]
        lines += ["# HELP fewstep_ray_requests Requests the ingress handled, by outcome",
                  "# TYPE fewstep_ray_requests counter"]
        lines += [f'fewstep_ray_requests_total{{outcome="{k}"}} {v}' for k, v in self.counts.items()]
        return "\n".join(lines) + "\n"


class ClientLeft(Exception):
    """The HTTP client disconnected while its replica worked."""


def is_replica_failure(e):
    from ray import exceptions as rex

    kinds = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                            "WorkerCrashedError", "NodeDiedError") if hasattr(rex, n))
    return isinstance(e, kinds) or type(e).__name__ in ("ActorDiedError", "ActorUnavailableError")


# ---- the Serve application -----------------------------------------------------------------------------------
def deployments(load, config, *, replicas=1, autoscale=None, cpus=1.0, gpus=0.0, max_loaded=None, retries=1,
                pin=False):
    """The bound Serve application: Ingress -> Replica (num_replicas or an autoscaling config).

    pin: each replica runs one compute thread on its own core (by its rank on the node): for benchmarks that
    compare replica counts on one machine."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from ray import serve

    from .config import ServeConfig

    cfg = ServeConfig(**config)  # checked here, before any replica starts
    # Ray counts a replica as holding the adapter sets it served last; fewstep fuses one set at a time, so one:
    # with more, Ray would keep sending two alternating sets to one replica that re-fuses on every batch
    sets = max_loaded or 1
    scaling = {"num_replicas": replicas}
    if autoscale is not None:
        lo, hi = autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": cfg.max_batch,
                                          "upscale_delay_s": 10, "downscale_delay_s": 300}}

    @serve.deployment(name="fewstep-replica", max_ongoing_requests=cfg.queue_size + cfg.max_batch,
                      ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}, health_check_period_s=5,
                      graceful_shutdown_timeout_s=10, **scaling)
    class Replica:
        def __init__(self):
            if pin:
                import torch

                rank = serve.get_replica_context().rank.local_rank
                os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
                torch.set_num_threads(1)
            self.core = ReplicaApp(load, config, store=file_store(cfg.keep_images))

        @serve.multiplexed(max_num_models_per_replica=sets)
        async def adapter_set(self, key):
            return key  # a routing hint: the app's batcher fuses the set per batch, as on one server

        async def handle(self, method, path, query, headers, body):
            await self.adapter_set(serve.get_multiplexed_model_id())
            async for part in self.core.handle(method, path, query, headers, body):
                yield part

        def check_health(self):
            if not self.core.healthy():
                raise RuntimeError("the engine thread has stopped")

    api = FastAPI(title="fewstep (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)

    @serve.deployment(name="fewstep-ingress", max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(api)
    class Front:
        def __init__(self, replica):
            self.ingress = Ingress(replica, retries=retries)

        @api.get("/ray/metrics")
        async def ray_metrics(self):
            return PlainTextResponse(self.ingress.metrics())

        @api.api_route("/{path:path}", methods=METHODS)
        async def everything(self, path: str, request: Request):
            return await self.ingress.forward(request)

    return Front.bind(Replica.bind())


def app(args):
    """Ray Serve application builder: `serve run fewstep.serve.ray:app model=PATH lora_dir=DIR replicas=2`.

    Arguments (strings from the command line or a config file): model, lora_dir, api_key, recipe, device, dtype,
    replicas, autoscale (MIN:MAX), cpus_per_replica, gpus_per_replica, and ServeConfig fields by name."""
    from .config import ServeConfig

    args = dict(args or {})
    load = {"model": args.pop("model", None), "device": args.pop("device", "auto"),
            "dtype": args.pop("dtype", "auto"), "recipe": args.pop("recipe", None),
            "warmup": str(args.pop("warmup", "true")).lower() not in ("0", "false", "no")}
    replicas = int(args.pop("replicas", 1))
    autoscale = args.pop("autoscale", None)
    if autoscale is not None:
        autoscale = parse_autoscale(str(autoscale))
    cpus = float(args.pop("cpus_per_replica", 1))
    gpus = float(args.pop("gpus_per_replica", 0))
    fields = {f.name: f.type for f in ServeConfig.__dataclass_fields__.values()}
    config = {}
    for k, v in args.items():
        if k not in fields:
            from .config import ConfigError

            raise ConfigError(f"unknown argument {k!r} for fewstep.serve.ray:app (known: model, replicas, autoscale, "
                              f"cpus_per_replica, gpus_per_replica, {', '.join(fields)})")
        config[k] = _typed(v, fields[k])
    return deployments(load, config, replicas=replicas, autoscale=autoscale, cpus=cpus, gpus=gpus)


def parse_autoscale(text):
    from .config import ConfigError

    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or int(m[1]) > int(m[2]) or int(m[2]) < 1:
        raise ConfigError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(m[1]), int(m[2])


def _typed(value, kind):
    if not isinstance(value, str):
        return value
    kind = str(kind)
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


def add_arguments(p):
    """`fewstep serve` flags for Ray (the rest of serve's flags apply to every replica)."""
    g = p.add_argument_group("Ray Serve (pip install 'fewstep[ray]')")
    g.add_argument("--ray", action="store_true", help="serve on Ray Serve: an ingress and replicas, each with its "
                                                      "own engine (docs/ray.md)")
    g.add_argument("--address", default=None, help="Ray cluster to join: auto (a running one), ray://HOST:PORT; "
                                                   "default: start a local one")
    g.add_argument("--replicas", type=int, default=1, help="replicas (engines) to run (1)")
    g.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas on ongoing "
                                                          "requests instead of --replicas (MIN may be 0)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica (1)")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs per replica (0; 1 on a GPU cluster)")


def serve_ray(args, config):
    """Run the Serve application until Ctrl+C: `fewstep serve --ray`."""
    import dataclasses
    import sys

    from .config import ConfigError

    need_ray()
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    if len(getattr(args, "models", ())) > 1:
        raise ConfigError("--ray serves one --model (each replica loads it): run one Ray app per model, or serve "
                          "several models from one process without --ray")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    import ray
    from ray import serve

    from .. import speed_cli as speed

    load = dict(model=args.model, device=args.device, dtype=args.dtype, lcm=args.lcm, unet=args.unet,
                recipe=args.recipe, prediction_type=args.prediction, allow_pickle=args.allow_pickle,
                controlnets=tuple(args.controlnet), warmup=args.warmup, **speed.speed_kwargs(args, server=True))
    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployments(load, dataclasses.asdict(config), replicas=args.replicas, autoscale=autoscale,
                          cpus=args.cpus_per_replica, gpus=args.gpus_per_replica), name="fewstep", route_prefix="/")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    count = f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{args.replicas} replica(s)"
    print(f"fewstep: serving on Ray ({count}) at http://{shown}:{args.port}/ after {time.perf_counter() - t0:.1f} s; "
          "Ctrl+C stops", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        try:  # the detached image store outlives the app on a cluster that keeps running
            ray.kill(ray.get_actor("fewstep-files"))
        except ValueError:
            pass
        ray.shutdown()
    print("fewstep: stopped", file=sys.stderr)
    return 0
