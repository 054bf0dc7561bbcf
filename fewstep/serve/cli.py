"""`fewstep serve`: load a model once, warm it up, then serve the HTTP APIs and the page (light imports here)."""

import ipaddress
import logging
import os
import socket
import sys
import time

from .. import speed_cli as speed
from ..errors import FewstepError
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
    p.add_argument("--model", help="diffusers folder, hub id or single .safetensors file (default: the embedded "
                                   "default model)")
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
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per UNet batch ({d.max_batch})")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait * 1000,
                   help=f"how long a request waits for others to batch with ({d.max_wait * 1000:g} ms)")
    g.add_argument("--queue-size", type=int, default=d.queue_size,
                   help=f"images that may wait; more get 429 with Retry-After ({d.queue_size})")
    g.add_argument("--timeout", type=float, default=d.timeout,
                   help=f"seconds a request may take; later ones get 504 and their work is dropped ({d.timeout:g})")
    g.add_argument("--max-size", type=int, default=d.max_size, help=f"largest width or height ({d.max_size})")
    g.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"images per request: OpenAI n, A1111 batch_size x n_iter ({d.max_images})")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help=f"steps per request ({d.max_steps})")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"largest request body in MiB ({d.max_body_bytes / 2**20:g})")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest init image, in pixels ({d.max_image_pixels})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt or negative prompt ({d.max_prompt_chars})")
    g.add_argument("--max-loras", type=int, default=d.max_loras, help=f"LoRAs per request ({d.max_loras})")
    g.add_argument("--loaded-loras", type=int, default=d.loaded_loras,
                   help=f"LoRAs kept loaded between requests, least recently used unloaded first ({d.loaded_loras})")
    g.add_argument("--keep-images", type=int, default=d.keep_images,
                   help=f"PNGs kept in memory for response_format url ({d.keep_images})")
    g.add_argument("--no-warmup", dest="warmup", action="store_false", help="serve without a warm-up generation")
    g.add_argument("--verbose", "-v", action="store_true", help="log every HTTP request")
    speed.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def config_from(args):
    from pathlib import Path

    from .config import ServeConfig

    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise ServeError(f"--lora-dir {args.lora_dir} is not a folder")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {args.port}")
    return ServeConfig(lora_dir=args.lora_dir, api_key=args.api_key or None, max_batch=args.max_batch,
                       max_wait=args.max_wait_ms / 1000, queue_size=args.queue_size, timeout=args.timeout,
                       max_size=args.max_size, max_images=args.max_images, max_steps=args.max_steps,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_image_pixels=args.max_image_pixels,
                       max_prompt_chars=args.max_prompt_chars, max_loras=args.max_loras,
                       loaded_loras=args.loaded_loras, keep_images=args.keep_images, allow_pickle=args.allow_pickle)


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
    sock = bind(args.host, args.port)
    if not is_loopback(args.host) and not config.api_key:
        log.warning(f"serving on {args.host} without --api-key: anyone who can reach this port can use it")
    t0 = time.perf_counter()
    engine = fewstep.load(args.model, device=args.device, dtype=args.dtype, lcm=args.lcm, unet=args.unet,
                          recipe=args.recipe, prediction_type=args.prediction, allow_pickle=args.allow_pickle,
                          **speed.speed_kwargs(args))
    for note in engine.c.notes:
        log.warning(note)
    from ..arch import controlnet_name

    for src in args.controlnet:
        name = engine.load_controlnet(src, name=controlnet_name(src), allow_pickle=args.allow_pickle)
        log.info(f"ControlNet {name} loaded from {src}")
    if args.warmup:
        engine.generate("warm-up", seed=0)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"fewstep: serving {engine.c.name} ({engine.device}, {str(engine.dtype).split('.')[-1]}) on "
          f"http://{shown}:{port}/ after {time.perf_counter() - t0:.1f} s; OpenAI /v1/images/generations, "
          f"/v1/images/edits, A1111 /sdapi/v1/txt2img, /sdapi/v1/img2img"
          + (f"; ControlNets {', '.join(engine.controlnets)}" if engine.controlnets else ""),
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level="info" if args.verbose else "warning",
                                          access_log=args.verbose, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C once it has shut down gracefully
        pass
    print("fewstep: stopped", file=sys.stderr)
    return 0
