"""`fewstep bench`: fewstep against diffusers' own pipelines, same model, same process, alternated, median of N.

Random weights of the real architecture unless --model is given (compute does not depend on the values; every row
says which). diffusers runs twice: as the LCM-LoRA blog's code runs it (LoRA loaded unfused through peft, the
dtype a user gets by default: fp32 on CPU, fp16 on GPU) and tuned (the fastest PyTorch configuration measured here
on the CPU, fp16 on GPUs; LoRA fused, SDPA).

Each system builds its own copy of the weights from the source (the same seed or file; no pristine copy is kept).
Where all of them fit in MemAvailable they are built together and their runs alternate, so drift hits every system
alike; otherwise (or with --one-at-a-time) each is built, warmed, timed and freed before the next, and its row's
peak RSS is the process's peak while it alone was in memory (SDXL's fp32 systems need ~14 GB each).
"""

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .arch import PRESETS, REAL
from .recipes import RECIPES, get_recipe
from .train.config import TARGETS

PROMPT = "a photo of an astronaut riding a horse on the moon"
LCM_TARGETS = tuple(TARGETS["lcm"])
SYSTEMS = ("fewstep", "diffusers-seed", "diffusers-tuned", "openvino")  # the LCM-LoRA recipe's key set, as the trainer uses it


def add_parser(sub):
    b = sub.add_parser("bench", help="benchmark fewstep against diffusers on this machine",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("--arch", default="sd15", choices=sorted(REAL))
    b.add_argument("--model", help="real weights (diffusers folder, hub id or .safetensors) instead of random ones")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto", help="fewstep's dtype (auto: bf16 on AMX CPUs, fp16 on GPUs)")
    b.add_argument("--size", type=int, help="image side (default: the architecture's native size)")
    b.add_argument("--quick", action="store_true",
                   help="a run of minutes: half the native size, --runs 1, --modes lcm, the stages timed in the "
                        "timed run (each given flag still wins)")
    b.add_argument("--runs", type=int, help="timed runs of each configuration (median reported; default 3, 1 quick)")
    b.add_argument("--modes", help="lcm (the few-step mode: LCM-LoRA 4 steps, or --recipe) and/or euler (25 steps, "
                                   "CFG 7.5); default lcm,euler (lcm with --quick)")
    b.add_argument("--recipe", default="lcm", choices=[r for r in RECIPES if r != "standard"],
                   help="the few-step mode's recipe: fewstep runs it, diffusers runs the scheduler its card names")
    b.add_argument("--systems", default="fewstep,diffusers-seed,diffusers-tuned",
                   help=f"any of {','.join(SYSTEMS)} (openvino: diffusers' pipeline through OpenVINO, CPU)")
    at_once = b.add_mutually_exclusive_group()
    at_once.add_argument("--one-at-a-time", action="store_true",
                         help="build, run and free each system before the next (what fits SDXL in 24 GB); the "
                              "default (auto) does so only where all systems at once would not fit in MemAvailable")
    at_once.add_argument("--alternate", action="store_true",
                         help="all systems in memory at once, their runs alternated (so drift hits all alike)")
    b.add_argument("--euler-steps", type=int, default=25)
    b.add_argument("--matmul-size", type=int, default=4096, metavar="N",
                   help="the machine's matmul rate is timed on N x N products (the UNet's share is of that rate)")
    b.add_argument("--batch", default="1", help="batch sizes for the throughput rows, e.g. 1,4,8 (LCM mode)")
    b.add_argument("--vae", default="full", help="fewstep's decoder: full, tiny, or an AutoencoderTiny path/hub id")
    b.add_argument("--compile", action="store_true", help="torch.compile fewstep's UNet and decoder (time reported)")
    b.add_argument("--cuda-graphs", action="store_true", help="replay fewstep's UNet steps as CUDA graphs")
    b.add_argument("--fused-qkv", action="store_true", help="fuse fewstep's attention q/k/v projections")
    b.add_argument("--backend", choices=("torch", "openvino"), default="torch",
                   help="fewstep's executor (openvino: converted in the warm-up, its time reported); the openvino "
                        "system (--systems ...,openvino) is diffusers' pipeline through OpenVINO, without fewstep")
    b.add_argument("--quantize", choices=("int8",), help="with --backend openvino: fewstep's UNet in int8 (calibrated "
                   "and quantized in the warm-up, see fewstep.backends.quantize)")
    b.add_argument("--controlnet", action="store_true",
                   help="the few-step rows also run one ControlNet (random weights of the model's ControlNet "
                        "architecture, from_unet) on an edge image: fewstep vs diffusers' ControlNet pipeline")
    b.add_argument("--quality", action="store_true",
                   help="also PSNR of fewstep's image against an fp32 run with every speed option off (same seed)")
    b.add_argument("--stream", nargs="?", const="shapes,sd15", metavar="MODELS",
                   help="benchmark the stream (fewstep.stream) against the one-frame-at-a-time img2img loop instead: "
                        "shapes (64 px) and/or sd15 (512 px, random weights, TAESD's architecture); see "
                        "fewstep/bench_stream.py")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.add_argument("--out", help="also write the JSON rows to this file")
    b.set_defaults(func=run_bench)


class PeakMemory:
    """Peak memory of a run: CUDA's allocator peak, or the process RSS sampled every 5 ms on the CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.extra = self.peak_bytes - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss())
            self.extra = self.peak - self.base
        return False


def _peak_rss():
    """The process's peak resident memory (all systems built so far)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class StageTimer:
    """Times the text encoders, each UNet call and the decoder (synchronising on CUDA).

    unet: a module (timed by forward hooks) or (owner, attribute) of a callable, which is wrapped for the run -
    fewstep's engine.fast.unet_fn may be compiled or a CUDA-graph replay, which module hooks do not see.
    """

    def __init__(self, device, text_encoders, unet, decode_owner, decode_attr):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.times = {"text": 0.0, "unet": [], "unet_samples": [], "decode": 0.0}
        self.handles, self.wrapped = [], []
        for enc in text_encoders:
            self._hook(enc, "text")
        if isinstance(unet, tuple):
            self._wrap(*unet, "unet")
        else:
            self._hook(unet, "unet")
        self._wrap(decode_owner, decode_attr, "decode")

    def _record(self, key, dt, args=(), kwargs=None):
        if key == "unet":  # and the call's samples: its input's batch (CFG may run two per image)
            sample = args[0] if args else (kwargs or {}).get("sample")
            self.times["unet"].append(dt)
            self.times["unet_samples"].append(sample.shape[0] if hasattr(sample, "shape") else 1)
        else:
            self.times[key] += dt

    def _wrap(self, owner, attr, key):
        real = getattr(owner, attr)

        def timed(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = real(*a, **k)
            self.sync()
            self._record(key, time.perf_counter() - t0, a, k)
            return out

        setattr(owner, attr, timed)
        self.wrapped.append((owner, attr, real))

    def _hook(self, module, key):
        start = {}

        def pre(module, args, kwargs):
            self.sync()
            start["t"] = time.perf_counter()

        def post(module, args, kwargs, out):
            self.sync()
            self._record(key, time.perf_counter() - start["t"], args, kwargs)

        self.handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                         module.register_forward_hook(post, with_kwargs=True)]

    def close(self):
        for h in self.handles:
            h.remove()
        for owner, attr, real in reversed(self.wrapped):
            setattr(owner, attr, real)


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except OSError:
        return None


def run_bench(args):
    if args.stream:
        from .bench_stream import run_stream_bench

        return run_stream_bench(args, commit=_commit(), device_name=_device_name)
    import copy

    import torch
    from safetensors.torch import save_file

    from . import loading, speed
    from .engine import free_memory
    from .errors import RequestError
    from .lora.reference import random_lora
    from .request import ControlUnit

    dev = loading.resolve_device(args.device)
    dt = loading.resolve_dtype(args.dtype, dev)
    size, runs, modes = plan(args)
    recipe = get_recipe(args.recipe)
    systems = [s for s in args.systems.split(",") if s]
    batches = [int(b) for b in args.batch.split(",")]
    if not set(modes) <= {"lcm", "euler"} or not set(systems) <= set(SYSTEMS):
        raise RequestError(f"--modes takes lcm,euler; --systems takes {','.join(SYSTEMS)}")
    if "openvino" in systems:
        from .backends import check

        check("openvino", dev)  # before any model is built: installed, and a CPU run
    if args.quantize:
        from .backends import check_quantize

        check_quantize(args.quantize, args.backend)  # before any model is built
    print(f"fewstep bench: building {args.arch} ({'weights of ' + args.model if args.model else 'random weights'})"
          f" on {dev}...", file=sys.stderr)
    weights = "real" if args.model else "random"
    # every system builds its own copy from the source: the same file, or the same seed (no pristine copy kept)
    fresh = (lambda: loading.read_components(args.model)) if args.model else (lambda: _random(args.arch))
    if args.model:
        shape = fresh()
    else:
        with torch.device("meta"):  # the architecture's shapes, no memory: for the LoRA, the counts, the FLOPs
            shape = _random(args.arch)
    arch = shape["arch"]
    xl = PRESETS[arch].xl
    lora = random_lora(shape["unet"], LCM_TARGETS, scale=1e-3)  # the LCM-LoRA recipe's key set, rank 64, fp16
    lora_file = Path(f"/tmp/fewstep-bench-lcm-lora-{args.arch}.safetensors")
    save_file(lora, str(lora_file))
    rates = matmul_rates(dev, n=args.matmul_size)
    print("bench: matmul rate " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.items()), file=sys.stderr)
    unet_flops = unet_sample_flops(shape["unet"], size, xl=xl)  # per sample (the UNet's work is linear in batch)
    counts = {k: sum(p.numel() for m in ms for p in m.parameters())
              for k, ms in (("unet", [shape["unet"]]), ("vae", [shape["vae"]]), ("text", shape["text_encoders"]))}
    cn_levels = len(shape["vae"].config.block_out_channels)
    del shape

    # diffusers as the blog runs it keeps its own copy in the default dtype (fp32 CPU / fp16 GPU)
    seed_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    tuned_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    tuned_nhwc = True
    scratch = None  # a throwaway UNet: the ControlNet's source and the tuned probe's subject (cast in place)
    if args.controlnet or ("diffusers-tuned" in systems and dev.type == "cpu"):
        scratch = _fresh_unet(args, fresh)
    net = _controlnet(args, scratch, cn_levels, size) if args.controlnet else None
    if "diffusers-tuned" in systems and dev.type == "cpu":  # the fastest PyTorch configuration here, measured
        from .bench_openvino import fastest_torch_config

        tuned_dtype, tuned_nhwc, probe = fastest_torch_config(scratch, size, xl=xl, device=dev)
        print("bench: diffusers-tuned UNet step " + ", ".join(f"{k} {v:.2f}s" for k, v in probe.items()) +
              f" -> {str(tuned_dtype).split('.')[-1]}{' channels_last' if tuned_nhwc else ''}", file=sys.stderr)
    del scratch
    _release()

    available = free_memory(torch.device("cpu"))  # MemAvailable: the systems' weights live in host memory
    share_tuned = "fewstep" in systems and tuned_dtype == dt and tuned_nhwc
    estimate = _footprint(systems, counts, dt, tuned_dtype, share_tuned, size, max(batches), args.quality,
                          fewstep_openvino=args.backend == "openvino")
    # a fifth of margin: the estimate leaves out the allocator's slack and the libraries' own buffers
    one_at_a_time = args.one_at_a_time or (not args.alternate and available is not None and
                                           estimate * 1.2 > available)
    share_tuned = share_tuned and not one_at_a_time  # alone, the tuned system builds its own copy
    schedule = "one-at-a-time" if one_at_a_time else "alternated"
    print(f"bench: systems {schedule.replace('-', ' ')} (estimated {estimate / 2**30:.1f} GiB for all at once, "
          f"{available / 2**30 if available else float('nan'):.1f} GiB available"
          f"{'; forced' if args.one_at_a_time or args.alternate else ''})", file=sys.stderr)

    # the prompt cache would skip fewstep's text encoder on repeated runs; diffusers has none, so it is off here
    ov_cache = None
    if args.backend == "openvino":  # random weights: their converted models go to a folder removed at exit
        import atexit
        import shutil
        import tempfile

        ov_cache = tempfile.mkdtemp(prefix="fewstep-bench-openvino-")
        atexit.register(shutil.rmtree, ov_cache, True)
    settings = speed.auto_settings(dev, vae=args.vae, compile=args.compile, prompt_cache=0,
                                   cuda_graphs=args.cuda_graphs, fused_qkv=args.fused_qkv,
                                   **(dict(backend="openvino", openvino_cache=ov_cache) if ov_cache else {}),
                                   **(dict(quantize=args.quantize) if args.quantize else {}))
    live, control, cn_pipes, info = {}, (), {}, dict(fuse_time=None, compile_time=None, ov_convert=None,
                                                     ov_dtype=None, report={})

    def build(system):
        if system == "fewstep":
            tiny = None
            if args.vae == "tiny" and not args.model:  # random weights of TAESD's architecture: the same compute
                from diffusers import AutoencoderTiny

                tiny = AutoencoderTiny().to(dev, dt).eval().requires_grad_(False)
            parts = fresh()
            t0 = time.perf_counter()
            # random weights may overflow; speed does not care
            engine = _engine(parts, args.model or f"random-{args.arch}", arch, dev, dt, lora_file, settings,
                             tiny=tiny, check_finite=weights == "real")
            info["fuse_time"] = time.perf_counter() - t0
            info["report"] = engine.speed_report
            if args.compile or args.cuda_graphs or ov_cache:
                info["compile_time"] = speed.warmup(engine, width=size, height=size, steps=2)
            live["fewstep"] = engine
        elif system == "diffusers-tuned" and share_tuned:
            # same dtype as fewstep: the tuned pipeline shares fewstep's modules, in which the LoRA is already fused
            live[system] = _pipeline(live["fewstep"].c, tuned_dtype)
        elif system == "diffusers-tuned":
            # a careful user's pipeline: bf16/fp16, the LoRA loaded and fused, SDPA (diffusers' default attention)
            pipe = _pipeline(loading.place(fresh(), "tuned", arch, dev, tuned_dtype), tuned_dtype)
            if tuned_nhwc:
                pipe.unet.to(memory_format=torch.channels_last)
            pipe.load_lora_weights(lora)
            pipe.fuse_lora()
            pipe.tuned_fused = True
            live[system] = pipe
        elif system == "openvino":  # diffusers' fp32 pipeline, LoRA fused, UNet and decoder through OpenVINO
            from .bench_openvino import openvino_pipeline

            ov_parts = loading.place(fresh(), "openvino", arch, dev, torch.float32)
            live[system], info["ov_convert"], precision = openvino_pipeline(_pipeline(ov_parts, torch.float32), lora,
                                                                            size, xl=xl)
            info["ov_dtype"] = f"openvino-{precision}"
        else:
            pipe = _pipeline(loading.place(fresh(), "seed", arch, dev, seed_dtype), seed_dtype)
            pipe.load_lora_weights(lora)  # peft layers, unfused: what the blog's code does
            live[system] = pipe
        if net is not None:
            attach_controlnet(system)

    def attach_controlnet(system):
        nonlocal control
        folder, model, image = net
        if system == "fewstep":
            control = (ControlUnit(live["fewstep"].load_controlnet(folder, name="bench"), image),)
            return
        pipe = live[system]
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

        own = live["fewstep"].controlnets["bench"] if system == "diffusers-tuned" and share_tuned else \
            copy.deepcopy(model).to(pipe.unet.device, pipe.unet.dtype)
        cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
        # from_pipe casts every component to float32 unless told: some are fewstep's own modules, shared
        cn_pipes[system] = cls.from_pipe(pipe, controlnet=own, torch_dtype=pipe.unet.dtype)
        cn_pipes[system].set_progress_bar_config(disable=True)

    def one(system, mode, batch, timed):
        lcm = mode == "lcm"
        steps, guidance = (recipe.steps, recipe.guidance) if lcm else (args.euler_steps, 7.5)
        if system == "fewstep":
            engine = live["fewstep"]
            _set_lora(engine, lcm)
            fn = lambda: engine.generate(PROMPT, recipe=recipe.name if lcm else "standard", steps=steps,  # noqa
                                         guidance=guidance, width=size, height=size, num_images=batch, seed=0,
                                         control=control if lcm else ())
            mods = (engine.c.text_encoders, (engine.fast, "unet_fn"), engine.fast, "decode_fn")
        else:
            pipe = live[system]
            if system == "diffusers-tuned" and not getattr(pipe, "tuned_fused", False):
                _set_lora(live["fewstep"], lcm)  # shares fewstep's modules: same weights as fewstep's run of this mode
            _set_diffusers_mode(pipe, system, lcm, recipe)
            call = dict(recipe.diffusers[2]) if lcm else {}
            call.setdefault("num_inference_steps", None if "timesteps" in call else steps)
            if lcm and control:  # the same components with the ControlNet: diffusers' ControlNet pipeline
                scheduler, pipe = pipe.scheduler, cn_pipes[system]
                pipe.scheduler = scheduler
                call.update(image=control[0].image)
            fn = lambda: pipe(PROMPT, guidance_scale=guidance, height=size, width=size,  # noqa
                              num_images_per_prompt=batch, generator=torch.Generator().manual_seed(0), **call)
            mods = (_encoders(pipe), pipe.unet, pipe.vae, "decode")
        if not timed:
            fn()
            return None
        timer = StageTimer(dev, *mods) if timed == "stages" else None
        try:
            with PeakMemory(dev) as mem:
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                total = time.perf_counter() - t0
        finally:
            if timer:
                timer.close()
        return total, mem.extra, (timer.times if timer else None)

    rows, peaks, built = [], PhasePeaks(), {}
    base = _rss()
    for group in ([[s] for s in systems] if one_at_a_time else [systems]):
        peaks.start()
        for system in sorted(group, key=lambda s: s != "fewstep"):  # fewstep first: the tuned system may share it
            before = _rss()
            build(system)
            if not one_at_a_time:  # the fp32 copy it was placed from returned, so that its RSS is what it keeps
                _release()
            built[system] = max(0, _rss() - before)
        group_rows = []
        for batch in batches:
            for mode in modes:
                if mode == "euler" and batch > 1:
                    continue
                # the openvino system has the LCM-LoRA fused into its converted UNet: few-step rows only
                run_systems = [s for s in group if s != "openvino" or mode == "lcm"]
                for system in run_systems:  # warm-up
                    one(system, mode, batch, False)
                totals = {s: [] for s in run_systems}
                mems = {s: 0 for s in run_systems}
                stages = {}
                for i in range(runs):  # alternated, so drift hits every system alike
                    for system in run_systems:
                        # --quick times the stages in its one timed run (the hooks cost nothing on the CPU)
                        total, extra, st = one(system, mode, batch, "stages" if args.quick and i == 0 else True)
                        totals[system].append(total)
                        mems[system] = max(mems[system], extra)
                        stages[system] = st or stages.get(system)
                for system in run_systems:
                    st = stages[system] or one(system, mode, batch, "stages")[2]
                    med = statistics.median(totals[system])
                    group_rows.append(dict(
                        system=system, mode=mode, batch=batch, recipe=recipe.name if mode == "lcm" else "standard",
                        steps=recipe.steps if mode == "lcm" else args.euler_steps,
                        guidance=recipe.guidance if mode == "lcm" else 7.5,
                        dtype=str(_system_dtype(system, dt, seed_dtype, tuned_dtype, info["ov_dtype"])).split(".")[-1],
                        seconds=med, runs=totals[system], images_per_s=batch / med, peak_extra_bytes=mems[system],
                        text_s=st["text"], unet_step_s=statistics.median(st["unet"]) if st["unet"] else None,
                        unet_calls=len(st["unet"]), decode_s=st["decode"],
                        **_unet_rate(st, unet_flops, rates, _system_dtype(system, dt, seed_dtype, tuned_dtype,
                                                                           info["ov_dtype"]))))
        if args.quality and "fewstep" in group:
            _quality(group_rows, live["fewstep"], fresh(), lora_file, size)
        group_peak = peaks.stop()
        for r in group_rows:  # alone: the process's peak while the system was built and ran; together: an estimate
            r["system_peak_rss_bytes"] = group_peak if one_at_a_time else \
                base + built[r["system"]] + r["peak_extra_bytes"]
            r["system_peak_measured"] = one_at_a_time
        rows += group_rows
        for system in sorted(group, key=lambda s: s == "fewstep"):  # fewstep last: the tuned system may share it
            live.pop(system, None)
            cn_pipes.pop(system, None)
        control = ()
        _release()
    # the rate again at the end, the best of both kept: a rate timed while another job ran would flatter every row
    rates.update({k: max(v, rates[k]) for k, v in matmul_rates(dev, n=args.matmul_size).items()})
    for r in rows:
        r["unet_rate_fraction"] = r["unet_flop_per_s"] / rates[r["matmul_rate_dtype"]] if r["unet_flop_per_s"] else None
    order = {s: i for i, s in enumerate(systems)}
    rows.sort(key=lambda r: (batches.index(r["batch"]), modes.index(r["mode"]), order[r["system"]]))
    report = info["report"]
    meta = dict(arch=arch, weights=weights, size=size, device=_device_name(dev), commit=_commit(),
                torch=torch.__version__, fewstep_dtype=str(dt).split(".")[-1], compile=args.compile,
                decoder=report.get("decoder", "full"), channels_last=report.get("channels_last", False),
                cuda_graphs=args.cuda_graphs, fused_qkv=args.fused_qkv, controlnet=args.controlnet)
    rows = [dict(meta, **r) for r in rows]
    for r in rows:
        ref = {x["system"]: x["seconds"] for x in rows if x["mode"] == r["mode"] and x["batch"] == r["batch"]}
        r["speedup_vs"] = {s: ref[s] / r["seconds"] for s in ref if s != r["system"]} if r["system"] == "fewstep" else {}
    extra = dict(lora_load_fuse_s=info["fuse_time"], compile_s=info["compile_time"], lora_tensors=len(lora),
                 tuned=f"{str(tuned_dtype).split('.')[-1]}{' channels_last' if tuned_nhwc else ''}"
                 if "diffusers-tuned" in systems else None,
                 tuned_shares_fewstep=share_tuned, openvino_convert_s=info["ov_convert"], backend=args.backend,
                 quantize=args.quantize,
                 schedule=schedule, estimate_bytes=estimate, mem_available_bytes=available,
                 peak_rss_bytes=peaks.process_peak(), matmul_rates=rates, unet_sample_flops=unet_flops,
                 matmul_size=args.matmul_size, runs_each=runs, quick=args.quick)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, **extra), indent=2))
    if args.json:
        print(json.dumps(dict(rows=rows, **extra), indent=2))
    else:
        print(table(rows, extra))
    return 0


def plan(args):
    """(size, runs, modes) from the flags: --quick makes each default short (half the native size, one timed run,
    the few-step mode only); a flag given explicitly wins."""
    size = args.size or (PRESETS[args.arch].native_size // (2 if args.quick else 1))
    runs = args.runs or (1 if args.quick else 3)
    modes = [m for m in (args.modes or ("lcm" if args.quick else "lcm,euler")).split(",") if m]
    return size, runs, modes


def _fresh_unet(args, fresh):
    """A UNet of the benchmark's model on the CPU in fp32, built (or read) anew: random weights of the seed, or the
    weights of --model."""
    if args.model:
        return fresh()["unet"]
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**PRESETS[args.arch].unet).eval()


def _release():
    """Give freed memory back: collect cycles, then ask glibc to return its free heap pages to the system (the RSS
    of the next system starts near the process's base, not at the last one's peak)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _footprint(systems, counts, dt, tuned_dtype, share_tuned, size, batch, quality, fewstep_openvino=False):
    """Bytes all the systems take at once at their peak, estimated from the parameter counts: each copy of the
    weights in its dtype (the VAE in fp32 at most; fewstep's base copies of the LoRA's layers), the fp32 copy a
    bf16/fp16 system is built in before it is cast (tensor by tensor: its peak is the fp32 copy), the openvino
    system's fp32 torch copy plus its conversion and compiled UNet (~6 bytes a UNet parameter: measured 5 GB for
    SD1.5), fewstep's own OpenVINO conversion where it runs that backend, and one run's activations (~1 GiB for SD1.5
    at 512 px, batch 1, scaled by pixels). The systems are built fewstep first, then in the order given."""
    import torch

    def copy_bytes(dtype):
        return (counts["unet"] + counts["text"]) * (torch.finfo(dtype).bits // 8) + counts["vae"] * 4

    fp32 = copy_bytes(torch.float32)
    need = {"fewstep": copy_bytes(dt) + counts["unet"] * torch.finfo(dt).bits // 8 * 0.3
            + (counts["unet"] * 8 if fewstep_openvino else 0),  # its conversion: measured 14.3 GiB peak for SD1.5
            "diffusers-seed": fp32, "diffusers-tuned": 0 if share_tuned else copy_bytes(tuned_dtype),
            "openvino": fp32 + counts["unet"] * 6}
    held = peak = fp32 if quality else 0  # --quality's fp32 reference is built beside fewstep
    for system in sorted(systems, key=lambda s: s != "fewstep"):
        peak = max(peak, held + (max(need[system], fp32) if need[system] else 0))
        held += need[system]
    return int(peak + 2**30 * (size / 512) ** 2 * batch)


class PhasePeaks:
    """The process's peak resident memory over a phase: the kernel's high-water mark (VmHWM), reset at each start
    through /proc/self/clear_refs; where it cannot be reset, the process's peak so far (an upper bound)."""

    def __init__(self):
        self.overall = 0

    def start(self):
        self.overall = max(self.overall, _hwm())
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def stop(self):
        peak = _hwm()
        self.overall = max(self.overall, peak)
        return peak

    def process_peak(self):
        return max(self.overall, _hwm())


def _hwm():
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _peak_rss()


def matmul_rates(device, n=4096, repeats=3):
    """The machine's matmul rate in FLOP/s (2 n^3 per n x n product, best of `repeats` after a warm-up): fp32, and
    bf16 where the CPU has native bf16 units (AMX-BF16 / AVX512-BF16); on CUDA fp32, fp16 and bf16."""
    import torch

    from .loading import cpu_has_bf16_units

    dtypes = [torch.float32]
    if device.type == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    elif cpu_has_bf16_units():
        dtypes.append(torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - t0)
        rates[str(dtype).split(".")[-1]] = 2 * n**3 / best
    return rates


def unet_sample_flops(unet, size, *, xl):
    """FLOPs of one UNet evaluation of one sample at this image size (torch.utils.flop_counter; a matmul or
    convolution of m x k by k x n counts 2mkn), counted on a meta-device copy of the same config (no compute).

    On the meta device attention runs as its math kernel, whose two matmuls are counted; on a real CPU the fused
    attention kernel has no formula in the counter and would count 0 (a tenth of SD1.5's work at 512 px)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = unet if unet.device.type == "meta" else UNet2DConditionModel.from_config(unet.config)
        h = size // 8
        x = torch.empty(1, m.config.in_channels, h, h)
        states = torch.empty(1, 77, m.config.cross_attention_dim)
        added = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)} if xl else None
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x, 500, states, added_cond_kwargs=added)
    return counter.get_total_flops()


def _unet_rate(stages, flops, rates, dtype):
    """The UNet's achieved FLOP rate over a run's calls (each call's samples from its batch) and the matmul rate it
    is a fraction of: the dtype's (bf16 without native units, and OpenVINO's f32, against fp32)."""
    name = str(dtype).split(".")[-1].removeprefix("openvino-")
    name = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(name, name)
    ref = name if name in rates else "float32"
    seconds = sum(stages["unet"])
    achieved = flops * sum(stages["unet_samples"]) / seconds if seconds and flops else None
    return dict(unet_flop_per_s=achieved, matmul_rate_dtype=ref)


def _engine(parts, path, name, dev, dtype, lora_file, settings, *, tiny=None, check_finite=False):
    """An Engine over parts (placed on dev in dtype) with the fast path of settings and the benchmark's LCM-LoRA
    fused as "lcm"."""
    from . import loading
    from .engine import Engine

    engine = Engine(loading.place(parts, path, name, dev, dtype), dev, dtype, speed=settings, tiny_decoder=tiny,
                    check_finite=check_finite)
    engine.load_lora(str(lora_file), name="lcm", lcm=True)
    return engine


def _quality(rows, engine, parts, lora_file, size):
    """psnr_vs_fp32 on fewstep's rows: its image against fp32 with channels_last, sub-pixel upsamplers, the tiny
    decoder, compile and CUDA graphs all off, same seed (the quality guard of the fast path at real size)."""
    import numpy as np
    import torch

    from . import speed

    plain = speed.SpeedSettings(channels_last=False, decoder_channels_last=False, phase_upsample=False,
                                prompt_cache=0, cudnn_benchmark=False)
    ref = _engine(parts, "reference", parts["arch"], engine.device, torch.float32, lora_file, plain)
    for r in rows:
        if r["system"] != "fewstep" or r["batch"] != 1:
            continue
        lcm = r["mode"] == "lcm"
        req = dict(recipe=r["recipe"], steps=r["steps"], guidance=r["guidance"], width=size, height=size, seed=0)
        _set_lora(engine, lcm)
        _set_lora(ref, lcm)
        a = np.asarray(engine.generate(PROMPT, **req).images[0], dtype=np.float64)
        b = np.asarray(ref.generate(PROMPT, **req).images[0], dtype=np.float64)
        mse = float(np.mean((a - b) ** 2))
        r["psnr_vs_fp32"] = 10 * np.log10(255**2 / max(mse, 1e-10))


def _controlnet(args, unet, levels, size):
    """One random-weight ControlNet (from_unet, seeded; its zero convolutions made non-zero so it acts), saved for
    fewstep to load, and an edge image: (folder, model, image). Each system then gets its own copy."""
    import torch
    from diffusers import ControlNetModel
    from PIL import Image, ImageDraw

    torch.manual_seed(0)
    # the conditioning embedding shrinks control images to latent size: one level per VAE level
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 1e-3)
    folder = Path(f"/tmp/fewstep-bench-controlnet-{args.arch}")
    net.save_pretrained(folder)
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline=(255, 255, 255),
                                    width=max(1, size // 128))
    return folder, net.eval().requires_grad_(False), image


def _random(arch):
    from .arch import random_components

    return random_components(arch)


def _device_name(dev):
    import platform

    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _system_dtype(system, dt, seed_dtype, tuned_dtype, ov_dtype=None):
    return {"fewstep": dt, "diffusers-seed": seed_dtype, "diffusers-tuned": tuned_dtype, "openvino": ov_dtype}[system]


def _encoders(pipe):
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def _pipeline(c, dtype):
    """diffusers' own pipeline over the given components (no safety checker; SDXL pipeline for xl models).

    Its VAE is in the pipeline's dtype, as from_pretrained(torch_dtype=...) gives it (the SDXL pipeline upcasts
    for decoding itself); a VAE fewstep keeps in another dtype is copied.
    """
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    vae = c.vae if c.vae.dtype == dtype else copy.deepcopy(c.vae).to(dtype)

    sched = EulerDiscreteScheduler(**{k: v for k, v in c.scheduler_config.items() if not k.startswith("_")})
    if c.preset.xl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet,
                                         scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                       unet=c.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _set_lora(engine, on):
    """fewstep: the LCM-LoRA fused for LCM runs, the base weights restored for the standard pipeline."""
    engine.set_lora_weights({"lcm": 1.0 if on else 0.0})


def _set_diffusers_mode(pipe, system, lcm, recipe):
    """The scheduler the mode's recipe names (the standard one: Euler), and the LoRA on or off."""
    r = recipe if lcm else get_recipe("standard")
    if not hasattr(pipe, "model_scheduler_config"):  # the model's own, before any recipe's overrides
        pipe.model_scheduler_config = pipe.scheduler.config
    if getattr(pipe, "recipe", None) != r.name:
        pipe.scheduler = r.diffusers_scheduler(pipe.model_scheduler_config)
        pipe.recipe = r.name
    if system == "diffusers-seed":
        pipe.enable_lora() if lcm else pipe.disable_lora()
    elif getattr(pipe, "tuned_fused", False) and getattr(pipe, "tuned_lcm", True) != lcm:
        # the standard pipeline runs without the LCM-LoRA: unfuse for euler, fuse again for lcm
        pipe.fuse_lora() if lcm else pipe.unfuse_lora()
        pipe.tuned_lcm = lcm


def table(rows, extra):
    """A plain-text table of the rows."""
    head = ("system", "mode", "batch", "dtype", "e2e s", "img/s", "text s", "unet step s", "unet % of matmul",
            "decode s", "peak+ GiB", "peak RSS GiB", "fewstep speedup")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup_vs"].items())
        frac = r.get("unet_rate_fraction")
        peak = r.get("system_peak_rss_bytes")
        lines.append(" | ".join(str(x) for x in (
            r["system"], f"{r['mode']} {r['steps']}", r["batch"], r["dtype"], f"{r['seconds']:.3f}",
            f"{r['images_per_s']:.3f}", f"{r['text_s']:.3f}",
            f"{r['unet_step_s']:.3f}" if r["unet_step_s"] else "-",
            f"{100 * frac:.2g}% of {r['matmul_rate_dtype']}" if frac else "-", f"{r['decode_s']:.3f}",
            f"{r['peak_extra_bytes'] / 2**30:.2f}",
            f"{'' if r.get('system_peak_measured') else '~'}{peak / 2**30:.2f}" if peak else "-", "; ".join(x for x in (
                sp, f"PSNR vs fp32 {r['psnr_vs_fp32']:.1f} dB" if "psnr_vs_fp32" in r else "") if x))))
    r0 = rows[0] if rows else {}
    fuse = extra["lora_load_fuse_s"]
    lines.append(f"\n{r0.get('arch')} {r0.get('size')}px, {r0.get('weights')} weights, {r0.get('device')}, torch "
                 f"{r0.get('torch')}, commit {r0.get('commit')}, decoder {r0.get('decoder')}, compile "
                 f"{r0.get('compile')}, cuda graphs {r0.get('cuda_graphs')}; LCM-LoRA ({extra['lora_tensors']} tensors)"
                 + (f" fewstep load+fuse {fuse:.2f}s" if fuse is not None else "")
                 + (f", compile/capture+warm-up {extra['compile_s']:.1f}s" if extra["compile_s"] else ""))
    if extra.get("matmul_rates"):
        lines.append(f"matmul rate ({extra['matmul_size']}^3 torch.mm, best of 3 at the start and 3 at the end): "
                     + ", ".join(
            f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in extra["matmul_rates"].items())
            + f"; UNet {extra['unet_sample_flops'] / 1e12:.3f} TFLOP per sample (FlopCounterMode); unet % of "
              "matmul: the UNet calls' FLOP rate over that of the dtype's matmul")
    if "schedule" in extra:
        avail = extra["mem_available_bytes"]
        lines.append(f"systems {extra['schedule']} (estimated {extra['estimate_bytes'] / 2**30:.1f} GiB all at once, "
                     f"{avail / 2**30 if avail else float('nan'):.1f} GiB available); peak RSS per system: "
                     + ("measured while it alone was built and run" if extra["schedule"] == "one-at-a-time" else
                        "~ the process's base + its build + its run's peak extra")
                     + f"; process peak RSS {extra['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "backend" in extra:  # what ran, and the CPU that decides the fast dtype
        lines.append(f"fewstep backend {extra['backend']}" + (f" {extra['quantize']}" if extra.get("quantize") else "")
                     + (f"; diffusers-tuned ran {extra['tuned']}" if extra.get("tuned") else "")
                     + (" (sharing fewstep's modules)" if extra.get("tuned_shares_fewstep") else "")
                     + (f"; openvino system converted in {extra['openvino_convert_s']:.1f}s"
                        if extra.get("openvino_convert_s") else "")
                     + f"; CPU flags: {_cpu_flags()}")
    return "\n".join(lines)


def _cpu_flags():
    """The CPU's vector and matrix flags that decide the fast dtype (AVX2, AVX-512, bf16, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                                       "amx_bf16", "amx_int8", "amx_tile")]
    return " ".join(keep) or "none of avx2/avx512/amx"
