"""`fewstep serve`: load a model once, warm it up, then serve the HTTP APIs and the page (light imports here)."""

import ipaddress
import logging
import os
import socket
import sys
import time

from .. import speed_cli as speed
from ..errors import Cancelled, FewstepError
from ..recipes import RECIPES

log = logging.getLogger("fewstep")


class ServeError(FewstepError):
    """A server that cannot start as asked (bad folder, busy port, missing extra)."""


def add_parser(subparsers):
    from .config import ServeConfig

    d = ServeConfig()
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP: OpenAI and A1111 image APIs and a web page",
        description="Load a model once and serve POST /v1/images/generations (OpenAI), /sdapi/v1/txt2img and "
                    "/sdapi/v1/img2img (A1111), GET /health, /metrics, /v1/models, and a page at /. Concurrent "
                    "requests with compatible parameters share one UNet batch.")
    p.add_argument("--model", action="append", dest="models", default=[], metavar="MODEL",
                   help="diffusers folder, hub id or single .safetensors file (default: the embedded default model); "
                        "repeatable: the first is served at start, A1111 clients switch with POST /sdapi/v1/options "
                        "sd_model_checkpoint, and the others load on first use")
    p.add_argument("--model-memory", type=float, metavar="GIB",
                   help="GiB of weights the loaded models may take together: past it the least recently used model "
                        "is unloaded (default: no limit, a model stays loaded once used)")
    p.add_argument("--lcm", nargs="?", const=True, default=True, metavar="PATH",
                   help="attach the LCM-LoRA for the model's architecture (default), or the one at PATH / hub id")
    p.add_argument("--no-lcm", dest="lcm", action="store_false", help="no LCM-LoRA: the standard pipeline")
    p.add_argument("--unet", metavar="FILE", help="a UNet-only file or folder replacing the model's (Lightning, "
                                                  "DMD2, Hyper-SD UNets)")
    p.add_argument("--recipe", choices=list(RECIPES), help="the default recipe of requests that name none (see "
                                                           "`fewstep recipes`); requests may send their own")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"],
                   help="override the model's prediction type (SDXL-Lightning's 1-step x0 UNet: sample)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.bin/.pt files for the model, UNet and ControlNets (they can run code)")
    p.add_argument("--controlnet", action="append", default=[], metavar="SRC",
                   help="a ControlNet (folder, .safetensors file or hub id) loaded at start, named by its file stem "
                        "in requests (repeatable); a request naming only a module (canny) loads the model family's "
                        "default ControlNet for it on first use")
    p.add_argument("--lora-dir", help="folder of .safetensors LoRAs that requests may name (by file stem only)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--api-key", default=os.environ.get("FEWSTEP_API_KEY"),
                   help="require Authorization: Bearer KEY on every route but /health and the page's files "
                        "(default: $FEWSTEP_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (http://localhost:3000, or * for any) call the API from a "
                        "browser: CORS headers and preflights (repeatable; none by default)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per UNet batch ({d.max_batch})")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait * 1000,
                   help=f"how long a request waits for others to batch with ({d.max_wait * 1000:g} ms)")
    g.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"images that may wait; more get 429 with Retry-After ({d.queue_size})")
    g.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds a request may take; later ones get 504 and their work stops within a UNet block; "
                        f"one this server's measured speed cannot finish in time is refused up front with 422 "
                        f"({d.timeout:g})")
    g.add_argument("--max-size", type=int, default=d.max_size,
                   help="largest width or height (default: twice the model's native size: 128 for the 64 px "
                        "default model, 1024 for SD 1.5, 2048 for SDXL)")
    g.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images per request: OpenAI n, A1111 batch_size x n_iter ({d.max_images})")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"steps per request ({d.max_steps})")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"largest request body in MiB ({d.max_body_bytes / 2**20:g})")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest uploaded image, in pixels, checked before decoding (default: (2 x --max-size)^2, "
                        "at most 4096x4096)")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt or negative prompt ({d.max_prompt_chars})")
    g.add_argument("--max-loras", type=int, default=d.max_loras, help=f"LoRAs per request ({d.max_loras})")
    g.add_argument("--loaded-loras", type=int, default=d.loaded_loras,
                   help=f"LoRAs kept loaded between requests, least recently used unloaded first ({d.loaded_loras})")
    g.add_argument("--keep-images", type=int, default=d.keep_images,
                   help=f"PNGs kept in memory for response_format url ({d.keep_images})")
    g.add_argument("--max-streams", type=int, default=d.max_streams,
                   help=f"camera streams (/v1/stream) open at a time; more are refused ({d.max_streams})")
    g.add_argument("--max-frame-kb", type=int, default=d.max_frame_bytes // 1024,
                   help=f"largest stream frame in KiB ({d.max_frame_bytes // 1024})")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="serve without a warm-up generation")
    g.add_argument("--verbose", "-v", action="store_true", help="log every HTTP request")
    speed.add_arguments(p)
    from .ray import add_arguments as ray_arguments

    ray_arguments(p)
    p.set_defaults(func=cmd_serve)


def config_from(args):
    from pathlib import Path

    from .config import ServeConfig

    args.model = args.models[0] if args.models else None  # the first --model: what one-model paths serve
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise ServeError(f"--lora-dir {args.lora_dir} is not a folder")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    return ServeConfig(lora_dir=args.lora_dir, api_key=args.api_key or None, max_batch=args.max_batch,
                       max_wait=args.max_wait_ms / 1000, queue_size=args.queue_size, timeout=args.timeout,
                       max_size=args.max_size, max_images=args.max_images, max_steps=args.max_steps,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                       max_prompt_chars=args.max_prompt_chars, max_loras=args.max_loras,
                       loaded_loras=args.loaded_loras, keep_images=args.keep_images, allow_pickle=args.allow_pickle,
                       max_streams=args.max_streams, max_frame_bytes=args.max_frame_kb * 1024,
                       cors_origins=tuple(args.cors_origin))


def bind(host, port):
    """A listening-ready socket, bound before the (slow) model load so a busy port fails at once."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name: resolved by bind
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "is in use: pick another with --port" if e.errno == 98 else f"cannot be bound ({e.strerror})"
        raise ServeError(f"{host}:{port} {reason}") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ServeError(f"fewstep serve needs {e.name}: pip install 'fewstep[serve]'") from None
    import fewstep

    from .app import create_app

    config = config_from(args)
    from ..sources import is_hub_id, is_pickle, local_path

    for src in args.controlnet:  # checked before the (slow) load
        if not (local_path(src).exists() or is_hub_id(src)):
            raise ServeError(f"--controlnet {src}: no such file or folder, and not a hub id")
        if is_pickle(src) and not args.allow_pickle:
            raise ServeError(f"--controlnet {src}: a pickle file can run code when loaded: pass --allow-pickle if "
                             "you trust it")
    for src in args.models:  # checked before the port is bound and the (slow) load begins
        if not (local_path(src).exists() or is_hub_id(src)):
            raise ServeError(f"--model {src}: no such file or folder, and not a hub id")
    if args.model_memory is not None and not args.model_memory > 0:
        raise ServeError(f"--model-memory must be a number of GiB > 0, got {args.model_memory:g}")
    if args.ray:  # Ray Serve: an ingress and replicas, each loading the model itself (fewstep.serve.ray)
        from .ray import serve_ray

        return serve_ray(args, config)
    sock = bind(args.host, args.port)
    if not is_loopback(args.host) and not config.api_key:
        log.warning(f"serving on {args.host} without --api-key: anyone who can reach this port can use it")
    t0 = time.perf_counter()
    first = [True]

    def load(source):
        from ..arch import controlnet_name

        engine = fewstep.load(source, device=args.device, dtype=args.dtype, lcm=args.lcm, unet=args.unet,
                              recipe=args.recipe, prediction_type=args.prediction, allow_pickle=args.allow_pickle,
                              **speed.speed_kwargs(args, server=True))
        for note in engine.c.notes:
            log.warning(note)
        for src in args.controlnet:
            try:
                name = engine.load_controlnet(src, name=controlnet_name(src), allow_pickle=args.allow_pickle)
            except FewstepError as e:
                if first[0]:
                    raise
                log.warning(f"--controlnet {src} is left out for {engine.c.name}: {e}")
                continue
            log.info(f"ControlNet {name} loaded from {src}")
        first[0] = False
        return engine

    from .models import Models

    budget = None if args.model_memory is None else int(args.model_memory * 2**30)
    models = Models(args.models or [None], load, budget=budget)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fewstep: listening on http://{shown}:{port}/ (GET /health answers 503 until the model is ready)",
          file=sys.stderr, flush=True)
    holder = {}

    def announce(kind, text):
        if kind == "stage":
            print(f"fewstep: {text}...", file=sys.stderr, flush=True)
        elif kind == "failed":
            holder["server"].should_exit = True
        else:
            engine = holder["app"].state.server.engine
            print(f"fewstep: serving {engine.c.name} ({engine.device}, {str(engine.dtype).split('.')[-1]}) on "
                  f"http://{shown}:{port}/ after {time.perf_counter() - t0:.1f} s; OpenAI /v1/images/generations, "
                  f"/v1/images/edits, A1111 /sdapi/v1/txt2img, /sdapi/v1/img2img"
                  + (f"; ControlNets {', '.join(engine.controlnets)}" if engine.controlnets else "")
                  + (f"; models {', '.join(models.names())}" if len(models.names()) > 1 else ""),
                  file=sys.stderr, flush=True)

    app = holder["app"] = create_app(None, config, models=models, warmup=args.warmup, announce=announce)
    server = holder["server"] = uvicorn.Server(uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                                                              access_log=args.verbose, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C once it has shut down gracefully
        pass
    loading = app.state.server.loading
    if loading.state == "failed" and not isinstance(loading.error, Cancelled):
        if isinstance(loading.error, FewstepError):
            raise loading.error
        raise ServeError(f"loading the model failed: {type(loading.error).__name__}: {loading.error}")
    print("fewstep: stopped", file=sys.stderr)
    return 0
