"""`fewstep bench --stream`: the stream (fewstep.stream) against the plain one-frame-at-a-time img2img loop, same
engine, same frames, same run: frames/s and per-frame latency.

Rows: the shapes model (the embedded default, real weights) at 64 px, and SD 1.5 at 512 px with random weights of
its architecture and of TAESD's (compute does not depend on the values). Both paths run the same img2img steps
(LCM, strength 0.5) with the similarity filter off (every frame is work). A stream frame's latency is the time from
its process() call to the end of the call that returns it (k - 1 calls later, with k steps).
"""

import json
import statistics
import sys
import time

PROMPT = "a red circle and a yellow square on a blue background"
# (model, side, LCM steps, timed frames on CPU, on CUDA)
SETUPS = {"shapes": (64, 2, 48, 200), "sd15": (512, 2, 3, 100)}


def frames(n, size):
    """A moving-shapes clip: every frame differs from the last (the filter would skip nothing either)."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (30, 40, 160))
        d = ImageDraw.Draw(img)
        s = size / 64
        x = (4 + 3 * (i % 12)) * s
        d.ellipse((x, 10 * s, x + 24 * s, 34 * s), fill=(220, 40, 40))
        d.rectangle((38 * s, (28 + 2 * (i % 8)) * s, 58 * s, (46 + 2 * (i % 8)) * s), fill=(240, 220, 60))
        out.append(img)
    return out


def run_stream_bench(args, *, commit, device_name):
    """The --stream rows; commit and device_name(dev): fewstep.bench's, for the same row metadata."""
    import torch

    from . import loading
    from .errors import RequestError

    which = [w for w in (args.stream or "shapes,sd15").split(",") if w]
    unknown = [w for w in which if w not in SETUPS]
    if unknown:
        raise RequestError(f"--stream takes {','.join(SETUPS)} (comma-separated), got {','.join(unknown)}")
    dev = loading.resolve_device(args.device)
    dt = loading.resolve_dtype(args.dtype, dev)
    rows = []
    for name in which:
        side, steps, n_cpu, n_gpu = SETUPS[name]
        side = args.size or side
        n = n_gpu if dev.type == "cuda" else n_cpu
        print(f"fewstep bench --stream: {name} at {side} px on {dev} ({n} frames per path)...", file=sys.stderr)
        engine, tiny, weights = _build(name, dev, dt, args)
        clip = frames(n + 4, side)
        meta = dict(model=name, weights=weights, size=side, steps=steps, strength=0.5, device=device_name(dev),
                    dtype=str(dt).split(".")[-1], commit=commit, torch=torch.__version__)
        rows.append(dict(meta, mode="img2img loop", **_sequential(engine, clip, side, steps, dev)))
        rows.append(dict(meta, mode="stream, full VAE", **_stream(engine, clip, side, steps, dev, "full")))
        if tiny is not None:
            rows.append(dict(meta, mode="stream, tiny VAE", **_stream(engine, clip, side, steps, dev, tiny)))
        base = rows[-2 - (tiny is not None)]["fps"]
        for r in rows[-2 - (tiny is not None):]:
            r["vs_loop"] = round(r["fps"] / base, 2)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _build(name, dev, dt, args):
    """(engine, tiny autoencoder source or None, "real"/"random") for a benchmark model."""
    from pathlib import Path

    if name == "shapes":
        import fewstep

        from .stream import SHAPES_TINY_VAE

        engine = fewstep.load(device=args.device, dtype=args.dtype)
        tiny = str(SHAPES_TINY_VAE) if (SHAPES_TINY_VAE / "config.json").exists() else None
        return engine, tiny, "real"
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    from . import loading, speed
    from .arch import random_components
    from .engine import Engine
    from .lora.reference import random_lora
    from .train.config import TARGETS

    parts = random_components("sd15")
    # a random LCM-LoRA of the recipe's key set, fused as `fewstep bench` does (its weights do not change the time)
    lora_file = Path("/tmp/fewstep-bench-stream-lcm-lora-sd15.safetensors")
    save_file(random_lora(parts["unet"], tuple(TARGETS["lcm"]), scale=1e-3), str(lora_file))
    tiny_dir = Path("/tmp/fewstep-bench-stream-taesd-random")
    AutoencoderTiny().save_pretrained(tiny_dir)  # TAESD's architecture, random weights
    engine = Engine(loading.place(parts, "random-sd15", "sd15", dev, dt), dev, dt, speed=speed.auto_settings(dev),
                    check_finite=False)
    engine.load_lora(str(lora_file), name="lcm", lcm=True)
    return engine, str(tiny_dir), "random"


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _sequential(engine, clip, side, steps, dev):
    """engine.generate per frame: the plain img2img loop (full VAE, as a user's loop runs it)."""
    kw = dict(init_image=None, strength=0.5, steps=steps, seed=0, width=side, height=side)
    for f in clip[:2]:  # warm-up
        engine.generate(PROMPT, **dict(kw, init_image=f))
    times = []
    _sync(dev)
    t_start = time.perf_counter()
    for f in clip[4:]:
        t0 = time.perf_counter()
        engine.generate(PROMPT, **dict(kw, init_image=f))
        _sync(dev)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_start
    return dict(fps=round(len(times) / total, 2), latency_ms=round(1000 * statistics.median(times), 1),
                unet_calls_per_frame=steps)


def _stream(engine, clip, side, steps, dev, tiny_vae):
    """The stream over the same frames: fps over the timed frames, latency from a frame's process() call in to the
    end of the call that returns it."""
    s = engine.stream(PROMPT, strength=0.5, steps=steps, seed=0, width=side, height=side, similarity=None,
                      tiny_vae=tiny_vae)
    for f in clip[:4]:  # warm-up, and the pipeline filled
        s.process(f)
    k = s.depth
    calls0 = s.stats["unet_calls"]
    started, latencies = [], []
    _sync(dev)
    t_start = time.perf_counter()
    for f in clip[4:]:
        started.append(time.perf_counter())
        out = s.process(f)
        _sync(dev)
        if out is not None and len(started) >= k:
            latencies.append(time.perf_counter() - started[-k])
    total = time.perf_counter() - t_start
    frames_out = len(clip) - 4
    return dict(fps=round(frames_out / total, 2), latency_ms=round(1000 * statistics.median(latencies), 1),
                unet_calls_per_frame=round((s.stats["unet_calls"] - calls0) / frames_out, 2),
                decoder="tiny" if s.vae is not None else "full")


def table(rows):
    head = f"{'model':<7} {'weights':<7} {'size':>4} {'steps':>5} {'mode':<18} {'fps':>7} {'latency ms':>10} " \
           f"{'x loop':>6} {'unet/frame':>10}  device, dtype, commit"
    lines = [head]
    for r in rows:
        lines.append(f"{r['model']:<7} {r['weights']:<7} {r['size']:>4} {r['steps']:>5} {r['mode']:<18} "
                     f"{r['fps']:>7.2f} {r['latency_ms']:>10.1f} {r['vs_loop']:>6.2f} {r['unet_calls_per_frame']:>10}"
                     f"  {r['device']}, {r['dtype']}, {r['commit']}")
    return "\n".join(lines)
