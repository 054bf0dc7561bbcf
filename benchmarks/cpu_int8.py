"""--quantize int8 on this CPU: speed of one SD1.5-architecture UNet step (random weights, 512 px, batch 1) in
OpenVINO f32 / bf16 / int8 (hybrid) against torch bf16 NHWC, alternated in one process; the PSNR of the int8 image
against the fp32 OpenVINO image at real size; and the shapes world's accuracy at 4 steps (torch fp32, OpenVINO fp32,
OpenVINO int8).

    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_int8.py sd15 [--calls 8] [--runs 3]
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_int8.py shapes [-n 200]

sd15: the int8 model is made the way `fewstep generate --backend openvino --quantize int8` makes it (the engine's
LCM sampler, 4 steps, guidance 1, 512 px, on --calls UNet calls of calibration), with fp32 weights and the f32
precision hint; the step timings then compile the cached fp32 and int8 IR with the f32 and the bf16 hint.
Random weights: the PSNR is a weak guard (no real image content to lose), the shapes accuracy is the real one.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_openvino import step_inputs, timed  # noqa: E402

REQUEST = dict(sampler="lcm", steps=4, guidance=1.0, seed=0)


def psnr(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12))


def header():
    import openvino

    from fewstep.backends.quantize import nncf_version
    from fewstep.bench import _cpu_flags

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), openvino {openvino.__version__}, nncf "
          f"{nncf_version()}; CPU flags: {_cpu_flags()}; load average {os.getloadavg()}", flush=True)


def sd15(args):
    import openvino as ov

    from fewstep import loading
    from fewstep.arch import random_components
    from fewstep.backends import quantize
    from fewstep.backends.openvino import runners
    from fewstep.engine import Engine
    from fewstep.speed import SpeedSettings

    quantize.CALIBRATION_CALLS = args.calls
    cache = args.cache or tempfile.mkdtemp(prefix="fewstep-int8-")
    print(f"SD1.5 architecture, random weights, {args.size}px, batch 1; calibration {args.calls} UNet calls; "
          f"cache {cache}", flush=True)
    comps = loading.place(random_components("sd15"), "random", "sd15-random", torch.device("cpu"), torch.float32)
    settings = dict(backend="openvino", openvino_cache=cache, channels_last=True)
    fp32 = Engine(comps, torch.device("cpu"), torch.float32, speed=SpeedSettings(**settings), check_finite=False)
    int8 = Engine(comps, torch.device("cpu"), torch.float32, speed=SpeedSettings(**settings, quantize="int8"),
                  check_finite=False)
    req = dict(REQUEST, width=args.size, height=args.size)
    t0 = time.perf_counter()
    a = fp32.generate("a photograph of an astronaut riding a horse", **req).images[0]
    print(f"fp32 OpenVINO engine, first image (conversion + compile included): {time.perf_counter() - t0:.1f}s",
          flush=True)
    t0 = time.perf_counter()
    b = int8.generate("a photograph of an astronaut riding a horse", **req).images[0]
    print(f"int8 engine, first image (calibration + quantization + compile included): {time.perf_counter() - t0:.1f}s",
          flush=True)
    for e, name in ((fp32, "fp32"), (int8, "int8")):
        print(name, {r.role: dict(r.stats) for r in runners(e.fast)}, flush=True)
    t0 = time.perf_counter()
    b2 = int8.generate("a photograph of an astronaut riding a horse", **req).images[0]
    a2 = fp32.generate("a photograph of an astronaut riding a horse", **req).images[0]
    print(f"second images (int8, then fp32): {time.perf_counter() - t0:.1f}s; PSNR int8 vs fp32 OpenVINO (f32 "
          f"precision, random weights): {psnr(b, a):.2f} dB; repeat: {psnr(b2, a2):.2f} dB", flush=True)
    a.save(Path(cache) / "fp32.png")
    b.save(Path(cache) / "int8.png")

    # the step: the cached IR compiled per precision hint, alternated with torch bf16 NHWC
    unet_runner = int8.fast.unet_fn.runner
    fp = unet_runner.weights_key()
    x = step_inputs(comps.unet, args.size, torch.float32)
    trace = unet_runner.trace_class(x)
    quant = unet_runner.context[0]
    core = ov.Core()
    del fp32, int8
    compiled = {}
    for name, folder in (("f32", unet_runner.ir_dir(fp, trace)), ("int8", unet_runner.ir_dir(fp, trace, quant))):
        for prec in ("f32", "bf16"):
            m = core.read_model(folder / "model.xml")
            m.reshape({k: ov.PartialShape(list(v.shape)) for k, v in x.items()})
            t0 = time.perf_counter()
            label = f"openvino {prec}" if name == "f32" else f"openvino int8 ({prec} rest)"
            compiled[label] = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec,
                                                            "PERFORMANCE_HINT": "LATENCY"})
            print(f"compile {label}: {time.perf_counter() - t0:.1f}s", flush=True)
    arrays = {k: v.numpy() for k, v in x.items()}
    bf16 = comps.unet.to(torch.bfloat16, memory_format=torch.channels_last)
    x16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and v.ndim else v for k, v in x.items()}

    def torch_bf16():
        with torch.no_grad():
            return bf16(**x16, return_dict=False)[0].float()

    configs = {k: (lambda c=c: torch.from_numpy(c(arrays)[0].copy())) for k, c in compiled.items()}
    configs["torch bf16 NHWC"] = torch_bf16
    outs = {k: fn() for k, fn in configs.items()}  # warm-up
    times = {k: [] for k in configs}
    loads = []
    for _ in range(args.runs):
        loads.append(os.getloadavg()[0])
        for k, fn in configs.items():
            _, wall, _ = timed(fn)
            times[k].append(wall)
    ref = outs["openvino f32"]
    base = statistics.median(times["torch bf16 NHWC"])
    print(f"UNet step, median of {args.runs} alternated runs (1-min load average during them: {loads}):", flush=True)
    for k in configs:
        med = statistics.median(times[k])
        rel = (outs[k] - ref).norm() / ref.norm()
        print(f"  {k:26s} {med:6.2f}s  {base / med:.2f}x vs torch bf16 NHWC  |out - f32| / |f32| {rel:.3f}  "
              f"runs {[round(t, 2) for t in times[k]]}", flush=True)


def shapes(args):
    from fewstep.backends.openvino import runners
    from fewstep.worlds.shapes.evaluate import evaluate

    cache = args.cache or tempfile.mkdtemp(prefix="fewstep-int8-shapes-")
    print(f"shapes world, the default model (teacher + its LCM-LoRA), {REQUEST['steps']} LCM steps, n={args.n}, "
          f"fp32 engines; cache {cache}", flush=True)
    import fewstep

    rows = {}
    images = {}
    for name, kw in (("torch fp32", {}), ("openvino fp32", dict(backend="openvino", openvino_cache=cache)),
                     ("openvino int8", dict(backend="openvino", openvino_cache=cache, quantize="int8"))):
        engine = fewstep.load(device="cpu", dtype="fp32", **kw)
        t0 = time.perf_counter()
        engine.generate("warm-up: a red circle in the top left on a blue background",
                        **dict(REQUEST, steps=4, seed=1))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics, imgs, _, _ = evaluate(engine, args.n, batch=args.batch, sampler="lcm", steps=4)
        rows[name] = metrics
        images[name] = imgs
        stats = {r.role: dict(r.stats) for r in runners(engine.fast)} if kw else {}
        print(f"{name}: first image {first:.1f}s (conversion / calibration included), eval "
              f"{time.perf_counter() - t0:.1f}s, load average {os.getloadavg()}; {stats}", flush=True)
        print(f"  {metrics}", flush=True)
    for name in ("openvino fp32", "openvino int8"):
        values = [psnr(a, b) for a, b in zip(images[name], images["torch fp32"])]
        print(f"{name} vs torch fp32 per image PSNR: median {statistics.median(values):.1f} dB, min {min(values):.1f}",
              flush=True)
    values = [psnr(a, b) for a, b in zip(images["openvino int8"], images["openvino fp32"])]
    print(f"openvino int8 vs openvino fp32 per image PSNR: median {statistics.median(values):.1f} dB, min "
          f"{min(values):.1f}", flush=True)
    print("| engine | color | shape | position | background | all four |", flush=True)
    for name, m in rows.items():
        print(f"| {name} | {m['color']:.3f} | {m['shape']:.3f} | {m['position']:.3f} | {m['background']:.3f} | "
              f"{m['all']:.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("sd15", "shapes"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=8, help="calibration UNet calls at real size (default 8)")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--cache", default=None, help="OpenVINO cache folder (default: a new temporary one)")
    args = ap.parse_args()
    header()
    sd15(args) if args.part == "sd15" else shapes(args)


if __name__ == "__main__":
    main()
