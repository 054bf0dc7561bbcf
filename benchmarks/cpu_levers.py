"""The other CPU levers of issue 16 (section 5), measured on random-weight SD1.5-architecture modules:

    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py attention [--runs 5]
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py threads [--size 256] [--rounds 2]
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py deepcache [--size 512]
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py preview | preview_shapes
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py quality [--sampler euler ...]
    flock /tmp/fewstep-bench.lock nice -n 5 .venv/bin/python benchmarks/cpu_levers.py tome [--ratio 0.5]

attention: the 4096-token self-attention of SD1.5's 64x64 level (8 heads of 40) through torch SDPA (default
backend and the math backend), a query-chunked matmul-softmax-matmul, and OpenVINO's SDPA op, alternated in one
process. threads: one UNet step in child processes with each thread setting (the OpenMP environment must be set
before the process starts), the configurations alternated round by round. deepcache: one full UNet call against
fewstep.featurecache's shallow call (the outermost level only). preview: one progress preview of a 512 px image
(its latent shrunk to 32x32 as fewstep.serve.progress does) through the full VAE decoder, the tiny decoder and the
linear latent-to-RGB map; preview_shapes: the shapes model's server preview before and after. quality: the shapes
world's accuracy of plain runs against --deep-cache runs; tome: fewstep.tokenmerge on one SD1.5 step and on the
shapes world. Every figure is printed with the load average; SD1.5 weights are random.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load():
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_time(fn, runs, warm=1):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def header(what):
    from fewstep.bench import _cpu_flags

    print(f"# {what}: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {_cpu_flags()}; "
          f"{load()}", flush=True)


# ---- attention ---------------------------------------------------------------------------------------------------
def chunked_attention(q, k, v, chunk):
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    out = [torch.softmax((c @ kt) * scale, dim=-1) @ v for c in q.split(chunk, dim=2)]
    return torch.cat(out, dim=2)


def attention(args):
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    header("SD1.5 64x64-level self-attention (4096 tokens, 8 heads x 40)")
    core = ov.Core()
    for batch in (1, 2):
        shape = (batch, 8, 4096, 40)
        params = [ops.parameter(shape, ov.Type.f32, name=n) for n in "qkv"]
        model = ov.Model([ops.scaled_dot_product_attention(*params, causal=False)], params, "sdpa")
        compiled = {p: core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": p,
                                                         "PERFORMANCE_HINT": "LATENCY"}) for p in ("f32", "bf16")}
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
            prec = "bf16" if dtype == torch.bfloat16 else "f32"
            req = compiled[prec].create_infer_request()
            qn, kn, vn = (np.ascontiguousarray(t.float().numpy()) for t in (q, k, v))

            def math():
                with sdpa_kernel(SDPBackend.MATH):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            def ov_call():
                req.infer({0: qn, 1: kn, 2: vn})
                return torch.from_numpy(req.get_output_tensor(0).data.copy())

            def ov_from_torch():  # what an attention processor would pay: the dtype/layout copies both ways
                a = [np.ascontiguousarray(t.float().numpy()) for t in (q, k, v)]
                req.infer({0: a[0], 1: a[1], 2: a[2]})
                return torch.from_numpy(req.get_output_tensor(0).data).to(dtype)

            configs = {"sdpa (default)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                       "sdpa math": math,
                       "chunked 1024": lambda: chunked_attention(q, k, v, 1024),
                       "chunked 256": lambda: chunked_attention(q, k, v, 256),
                       f"openvino sdpa {prec} (infer only)": ov_call,
                       f"openvino sdpa {prec} (with copies)": ov_from_torch}
            times = {n: [] for n in configs}
            errs = {}
            for n, fn in configs.items():  # warm-up and error
                errs[n] = (fn().float() - ref).abs().max().item()
            for _ in range(args.runs):  # alternated
                for n, fn in configs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
            base = statistics.median(times["sdpa (default)"])
            flops = 4 * batch * 8 * 4096 * 4096 * 40
            print(f"\n## batch {batch}, {str(dtype)[6:]}, median of {args.runs} ({load()})")
            print("| kernel | ms | vs sdpa | GFLOP/s | max abs err vs fp32 sdpa |\n|---|---|---|---|---|")
            for n, ts in times.items():
                m = statistics.median(ts)
                print(f"| {n} | {m * 1e3:.1f} | {base / m:.2f}x | {flops / m / 1e9:.0f} | {errs[n]:.1e} |")
            sys.stdout.flush()
    with torch.no_grad():  # which kernel SDPA picks on the CPU (the profiler names it)
        q = torch.randn(1, 8, 4096, 40, dtype=torch.bfloat16)
        with torch.profiler.profile() as prof:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        names = sorted({e.name for e in prof.events() if "attention" in e.name})
        print(f"\nSDPA's CPU kernels (profiler): {', '.join(names)}")


# ---- UNet step (a child per thread setting) ----------------------------------------------------------------------
def sd15_unet(dtype, nhwc):
    from diffusers import UNet2DConditionModel

    from fewstep.arch import PRESETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**PRESETS["sd15"].unet).eval().requires_grad_(False).to(dtype)
    if nhwc:
        unet.to(memory_format=torch.channels_last)
    return unet


def unet_inputs(size, dtype, batch=1):
    g = torch.Generator().manual_seed(0)
    h = size // 8
    return dict(sample=torch.randn(batch, 4, h, h, generator=g).to(dtype), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 77, 768, generator=g).to(dtype))


def step(args):
    """(child) one UNet step, timed: prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop:
        torch.set_num_interop_threads(args.interop)
    if args.pin:
        os.sched_setaffinity(0, set(range(args.pin)))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet = sd15_unet(dtype, args.nhwc)
    x = unet_inputs(args.size, dtype)
    with torch.no_grad():
        t = median_time(lambda: unet(**x, return_dict=False), args.runs)
    print(json.dumps({"seconds": t, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}), flush=True)


# torch's CPU wheel links GNU OpenMP (libgomp): KMP_AFFINITY (Intel's) does nothing there; OMP_PROC_BIND does
THREAD_CONFIGS = {  # name -> (extra child args, extra environment)
    "torch default (2 threads)": ([], {}),
    "1 thread": (["--threads", "1"], {}),
    "2 threads, OMP_PROC_BIND=close OMP_PLACES=cores": ([], {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
    "1 thread pinned to core 0 (sched_setaffinity)": (["--threads", "1", "--pin", "1"], {}),
    "2 threads, interop 1": (["--interop", "1"], {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def threads(args):
    header(f"SD1.5 UNet step, {args.size} px, batch 1, random weights, one child process per setting")
    rows = {}
    for dtype, nhwc in (("bf16", True), ("fp32", False)):
        results = {n: [] for n in THREAD_CONFIGS}
        for _ in range(args.rounds):
            for name, (extra, env) in THREAD_CONFIGS.items():
                cmd = [sys.executable, __file__, "step", "--size", str(args.size), "--dtype", dtype,
                       "--runs", str(args.runs), *(["--nhwc"] if nhwc else []), *extra]
                out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        label = f"{dtype} {'NHWC' if nhwc else 'NCHW'}"
        base = statistics.median(r["seconds"] for r in results["torch default (2 threads)"])
        print(f"\n## {label}: median over {args.rounds} rounds of each child's median of {args.runs} steps")
        print("| setting | step s | vs default | load (1 min) |\n|---|---|---|---|")
        for name, rs in results.items():
            m = statistics.median(r["seconds"] for r in rs)
            loads = " ".join(f"{r['load']:.1f}" for r in rs)
            print(f"| {name} | {m:.3f} | {base / m:.2f}x | {loads} |")
        rows[label] = results
        sys.stdout.flush()


# ---- feature cache -----------------------------------------------------------------------------------------------
def deepcache(args):
    from fewstep.featurecache import FeatureCacheUNet

    header(f"SD1.5 UNet full call vs feature-cache shallow call, {args.size} px, batch 1, random weights")
    for dtype, nhwc in ((torch.bfloat16, True), (torch.float32, True)):
        unet = sd15_unet(dtype, nhwc)
        x = unet_inputs(args.size, dtype)
        cached = FeatureCacheUNet(unet, interval=2)
        with torch.no_grad():
            def full():
                return cached(**x, return_dict=False)  # a full call (stores the features)

            def shallow():
                cached.calls, cached.last_t = 1, float("inf")  # as the second call of a run: the shallow path
                return cached(**x, return_dict=False)

            full(), shallow()
            tf, ts = [], []
            for _ in range(args.runs):
                cached.reset()
                t0 = time.perf_counter()
                full()
                tf.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                shallow()
                ts.append(time.perf_counter() - t0)
        f, s = statistics.median(tf), statistics.median(ts)
        print(f"{str(dtype)[6:]} NHWC: full {f:.3f} s, shallow {s:.3f} s ({s / f:.0%} of a full call); 4 LCM steps "
              f"with interval 2 cost {(2 * f + 2 * s) / (4 * f):.0%} of the plain run's UNet time ({load()})",
              flush=True)


def quality(args):
    """The shapes world with the LCM-LoRA (guidance 1): accuracy, PSNR against the plain 4-step image and the UNet
    calls of plain runs at 2-8 steps against --deep-cache runs, the auto dtype (bf16 here)."""
    import numpy as np

    import fewstep
    from fewstep.worlds.shapes.detect import detect
    from fewstep.worlds.shapes.evaluate import eval_set, generate, score

    header(f"shapes world, {args.sampler} sampler, guidance {args.guidance}, n={args.n}, dtype {args.dtype}; plain against "
           "--deep-cache")
    attrs, captions, seeds = eval_set(args.n)
    configs = [(1, s) for s in args.steps] + [(n, s) for n in args.intervals for s in args.cached_steps]
    engines = {n: fewstep.load(device="cpu", dtype=args.dtype, deep_cache=n, lcm=args.sampler == "lcm")
               for n in {1, *args.intervals}}
    run = dict(sampler=args.sampler, guidance=args.guidance)
    images, secs, calls = {}, {c: [] for c in configs}, {}
    generate(engines[1], captions[:4], seeds[:4], steps=2, **run)  # warm-up
    for _ in range(args.rounds):  # alternated
        for n, steps in configs:
            e = engines[n]
            fc = e.unet_fn if n > 1 else None
            before = (fc.full_calls, fc.cached_calls) if fc else None
            t0 = time.perf_counter()
            images[n, steps] = generate(e, captions, seeds, batch=args.batch, steps=steps, **run)
            secs[n, steps].append(time.perf_counter() - t0)
            batches = -(-args.n // args.batch)
            calls[n, steps] = ((fc.full_calls - before[0]) / batches, (fc.cached_calls - before[1]) / batches) \
                if fc else (steps, 0)
    ref = [np.asarray(im, dtype=np.float64) for im in images[1, args.reference]]
    print(f"\n({load()}, engine dtype {engines[1].dtype}, {args.sampler} sampler, guidance {args.guidance}; PSNR: "
          f"median over the images against the plain {args.reference}-step image of the same seed)\n| run | UNet calls per image: full + cached | all-four | color | shape | position "
          "| background | PSNR vs the reference | generation s |\n|---|---|---|---|---|---|---|---|---|")
    for n, steps in configs:
        ims = images[n, steps]
        sc = score(attrs, [detect(im) for im in ims])
        mse = [np.mean((np.asarray(im, dtype=np.float64) - r) ** 2) for im, r in zip(ims, ref)]
        psnr = statistics.median(99.0 if m == 0 else 10 * np.log10(255 ** 2 / m) for m in mse)
        name = f"plain {steps} steps" if n == 1 else f"--deep-cache {n}, {steps} steps"
        full, cached = calls[n, steps]
        print(f"| {name} | {full:g} + {cached:g} | {sc['all']:.3f} | {sc['color']:.3f} | {sc['shape']:.3f} | "
              f"{sc['position']:.3f} | {sc['background']:.3f} | {psnr:.1f} dB | {statistics.median(secs[n, steps]):.2f} |")
    sys.stdout.flush()


# ---- token merging ------------------------------------------------------------------------------------------
def tome(args):
    """fewstep.tokenmerge's processors against the plain ones: one SD1.5 step (alternated) and the shapes world."""
    import numpy as np

    import fewstep
    from fewstep import tokenmerge
    from fewstep.worlds.shapes.detect import detect
    from fewstep.worlds.shapes.evaluate import eval_set, generate, score

    header(f"token merging (ToMe, self-attention of the top level, ratio {args.ratio}): SD1.5 step and shapes")
    for dtype in (torch.bfloat16, torch.float32):
        unet = sd15_unet(dtype, True)
        x = unet_inputs(args.size, dtype)
        plain_p = dict(unet.attn_processors)
        size = tokenmerge._Size()
        unet.register_forward_pre_hook(size, with_kwargs=True)
        tome_p = {k: tokenmerge.ToMeProcessor(v, size, args.ratio) if k.endswith("attn1.processor") else v
                  for k, v in plain_p.items()}
        times = {"plain": [], "tome": []}
        outs = {}
        with torch.no_grad():
            for r in range(args.runs + 1):
                for name, procs in (("plain", plain_p), ("tome", tome_p)):
                    unet.set_attn_processor(dict(procs))  # (diffusers pops the dict it is given)
                    t0 = time.perf_counter()
                    outs[name] = unet(**x, return_dict=False)[0].float()
                    if r:
                        times[name].append(time.perf_counter() - t0)
        p, t = statistics.median(times["plain"]), statistics.median(times["tome"])
        rel = ((outs["tome"] - outs["plain"]).norm() / outs["plain"].norm()).item()
        print(f"SD1.5 {args.size} px {str(dtype)[6:]} NHWC: plain {p:.3f} s, ToMe {t:.3f} s ({p / t:.2f}x); relative "
              f"difference of the UNet output {rel:.3f} (random weights; {load()})", flush=True)
        del unet
    attrs, captions, seeds = eval_set(args.n)
    engine = fewstep.load(device="cpu", dtype="auto")
    merged = fewstep.load(device="cpu", dtype="auto", tome=args.ratio)
    rows = {}
    for name, e in (("plain", engine), ("tome", merged)):
        ims = generate(e, captions, seeds, batch=100, sampler="lcm", steps=4, guidance=1.0)
        rows[name] = (score(attrs, [detect(im) for im in ims]), ims)
    for name, (sc, ims) in rows.items():
        mse = [np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
               for a, b in zip(ims, rows["plain"][1])]
        psnr = statistics.median(99.0 if m == 0 else 10 * np.log10(255 ** 2 / m) for m in mse)
        print(f"shapes, LCM-LoRA 4 steps, {engine.dtype}, n={args.n}, {name}: all-four {sc['all']:.3f} (color "
              f"{sc['color']:.3f}, shape {sc['shape']:.3f}, position {sc['position']:.3f}, background "
              f"{sc['background']:.3f}), PSNR vs plain {psnr:.1f} dB ({load()})", flush=True)


# ---- previews ----------------------------------------------------------------------------------------------------
def preview(args):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from fewstep.arch import PRESETS
    from fewstep.previews import LatentRGB

    header("one progress preview (512 px image: a 64x64 latent shrunk to 32x32), random weights")
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        vae = AutoencoderKL(**PRESETS["sd15"].vae).eval().requires_grad_(False).to(dtype)
        vae.to(memory_format=torch.channels_last)
        tiny = AutoencoderTiny().eval().requires_grad_(False).to(dtype)
        rgb = LatentRGB.for_channels(4)
        z = torch.randn(1, 4, 32, 32).to(dtype)
        with torch.no_grad():
            configs = {"full VAE decoder": lambda: vae.decode(z, return_dict=False),
                       "tiny decoder (AutoencoderTiny)": lambda: tiny.decode(z, return_dict=False),
                       "linear latent-to-RGB": lambda: rgb(z.float())}
            times = {n: [] for n in configs}
            for fn in configs.values():
                fn()
            for _ in range(args.runs):
                for n, fn in configs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        LatentRGB.fit(vae, 8)
        fit = time.perf_counter() - t0
        base = statistics.median(times["full VAE decoder"])
        print(f"\n## {str(dtype)[6:]}, median of {args.runs} ({load()}); fitting the linear map from the VAE encoder "
              f"(once per engine): {fit * 1e3:.0f} ms\n| preview decoder | ms | vs full |\n|---|---|---|")
        for n, ts in times.items():
            m = statistics.median(ts)
            print(f"| {n} | {m * 1e3:.1f} | {base / m:.0f}x |")
        sys.stdout.flush()


def preview_shapes(args):
    """The server's preview of the shapes default model (64 px, a 16x16 latent): the full VAE decoder (before) and
    fewstep.serve.progress.preview_image (after: the tiny decoder that ships with the model), alternated."""
    import fewstep
    from fewstep.previews import preview_decoder
    from fewstep.serve.progress import preview_image

    header("the shapes model's progress preview, before (full VAE) and after (preview_image)")
    for dtype in ("fp32", "auto"):
        e = fewstep.load(device="cpu", dtype=dtype)
        x0 = torch.randn(1, 4, 16, 16)
        t0 = time.perf_counter()
        preview_decoder(e)
        first = time.perf_counter() - t0
        old, new = [], []
        for _ in range(3):
            e.decode(x0), preview_image(e, x0)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            e.decode(x0)
            old.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            preview_image(e, x0)
            new.append(time.perf_counter() - t0)
        o, n = statistics.median(old), statistics.median(new)
        print(f"shapes {e.dtype}: full VAE decoder {o * 1e3:.1f} ms, preview_image {n * 1e3:.1f} ms ({o / n:.1f}x); "
              f"choosing and loading the tiny decoder once: {first * 1e3:.0f} ms ({load()})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention")
    a.add_argument("--runs", type=int, default=5)
    t = sub.add_parser("threads")
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--runs", type=int, default=3)
    s = sub.add_parser("step")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--dtype", default="bf16")
    s.add_argument("--nhwc", action="store_true")
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--interop", type=int, default=0)
    s.add_argument("--pin", type=int, default=0)
    d = sub.add_parser("deepcache")
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--runs", type=int, default=3)
    q = sub.add_parser("quality")
    q.add_argument("--n", type=int, default=200)
    q.add_argument("--batch", type=int, default=100)
    q.add_argument("--rounds", type=int, default=2)
    q.add_argument("--dtype", default="auto")
    q.add_argument("--intervals", type=int, nargs="+", default=[2])
    q.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4, 6, 8], help="plain runs")
    q.add_argument("--cached-steps", type=int, nargs="+", default=[4, 8], help="--deep-cache runs")
    q.add_argument("--reference", type=int, default=4, help="the plain run the PSNR compares with")
    q.add_argument("--sampler", default="lcm", help="lcm: the LCM-LoRA fused; another: the teacher alone")
    q.add_argument("--guidance", type=float, default=1.0)
    m = sub.add_parser("tome")
    m.add_argument("--size", type=int, default=512)
    m.add_argument("--ratio", type=float, default=0.5)
    m.add_argument("--runs", type=int, default=3)
    m.add_argument("--n", type=int, default=200)
    ps = sub.add_parser("preview_shapes")
    ps.add_argument("--runs", type=int, default=20)
    p = sub.add_parser("preview")
    p.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    globals()[args.what](args)


if __name__ == "__main__":
    main()
