"""`fewstep bench`: fewstep against diffusers' own pipelines, same model, same process, alternated, median of N.

Random weights of the real architecture unless --model is given (compute does not depend on the values; every row
says which). diffusers runs twice: as the LCM-LoRA blog's code runs it (LoRA loaded unfused through peft, the
dtype a user gets by default: fp32 on CPU, fp16 on GPU) and tuned (bf16 on CPU / fp16 on GPU, LoRA fused, SDPA).
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
    b.add_argument("--quick", action="store_true", help="half the native size: a short run")
    b.add_argument("--runs", type=int, default=3, help="timed runs of each configuration (median reported)")
    b.add_argument("--modes", default="lcm,euler",
                   help="lcm (the few-step mode: LCM-LoRA 4 steps, or --recipe) and/or euler (25 steps, CFG 7.5)")
    b.add_argument("--recipe", default="lcm", choices=[r for r in RECIPES if r != "standard"],
                   help="the few-step mode's recipe: fewstep runs it, diffusers runs the scheduler its card names")
    b.add_argument("--systems", default="fewstep,diffusers-seed,diffusers-tuned",
                   help=f"any of {','.join(SYSTEMS)} (openvino: diffusers' pipeline through OpenVINO, CPU)")
    b.add_argument("--euler-steps", type=int, default=25)
    b.add_argument("--batch", default="1", help="batch sizes for the throughput rows, e.g. 1,4,8 (LCM mode)")
    b.add_argument("--vae", default="full", help="fewstep's decoder: full, tiny, or an AutoencoderTiny path/hub id")
    b.add_argument("--compile", action="store_true", help="torch.compile fewstep's UNet and decoder (time reported)")
    b.add_argument("--cuda-graphs", action="store_true", help="replay fewstep's UNet steps as CUDA graphs")
    b.add_argument("--fused-qkv", action="store_true", help="fuse fewstep's attention q/k/v projections")
    b.add_argument("--backend", choices=("torch", "openvino"), default="torch",
                   help="fewstep's executor (openvino: converted in the warm-up, its time reported); the openvino "
                        "system (--systems ...,openvino) is diffusers' pipeline through OpenVINO, without fewstep")
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
        self.times = {"text": 0.0, "unet": [], "decode": 0.0}
        self.handles, self.wrapped = [], []
        for enc in text_encoders:
            self._hook(enc, "text")
        if isinstance(unet, tuple):
            self._wrap(*unet, "unet")
        else:
            self._hook(unet, "unet")
        self._wrap(decode_owner, decode_attr, "decode")

    def _record(self, key, dt):
        if key == "unet":
            self.times["unet"].append(dt)
        else:
            self.times[key] += dt

    def _wrap(self, owner, attr, key):
        real = getattr(owner, attr)

        def timed(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = real(*a, **k)
            self.sync()
            self._record(key, time.perf_counter() - t0)
            return out

        setattr(owner, attr, timed)
        self.wrapped.append((owner, attr, real))

    def _hook(self, module, key):
        start = {}

        def pre(*_):
            self.sync()
            start["t"] = time.perf_counter()

        def post(*_):
            self.sync()
            self._record(key, time.perf_counter() - start["t"])

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

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
    from .errors import RequestError
    from .lora.reference import random_lora

    dev = loading.resolve_device(args.device)
    dt = loading.resolve_dtype(args.dtype, dev)
    size = args.size or (PRESETS[args.arch].native_size // (2 if args.quick else 1))
    modes = [m for m in args.modes.split(",") if m]
    recipe = get_recipe(args.recipe)
    systems = [s for s in args.systems.split(",") if s]
    batches = [int(b) for b in args.batch.split(",")]
    if not set(modes) <= {"lcm", "euler"} or not set(systems) <= set(SYSTEMS):
        raise RequestError(f"--modes takes lcm,euler; --systems takes {','.join(SYSTEMS)}")
    if "openvino" in systems:
        from .backends import check

        check("openvino", dev)  # before any model is built: installed, and a CPU run
    print(f"fewstep bench: building {args.arch} ({'weights of ' + args.model if args.model else 'random weights'})"
          f" on {dev}...", file=sys.stderr)
    parts = loading.read_components(args.model) if args.model else _random(args.arch)
    weights = "real" if args.model else "random"
    lora = random_lora(parts["unet"], LCM_TARGETS, scale=1e-3)  # the LCM-LoRA recipe's key set, rank 64, fp16
    lora_file = Path(f"/tmp/fewstep-bench-lcm-lora-{args.arch}.safetensors")
    save_file(lora, str(lora_file))

    # diffusers as the blog runs it keeps its own copy in the default dtype (fp32 CPU / fp16 GPU)
    seed_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    tuned_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    tuned_nhwc = True
    if "diffusers-tuned" in systems and dev.type == "cpu":  # the fastest PyTorch configuration here, measured
        from .bench_openvino import fastest_torch_config

        tuned_dtype, tuned_nhwc, probe = fastest_torch_config(parts["unet"], size, xl=PRESETS[args.arch].xl,
                                                              device=dev)
        print("bench: diffusers-tuned UNet step " + ", ".join(f"{k} {v:.2f}s" for k, v in probe.items()) +
              f" -> {str(tuned_dtype).split('.')[-1]}{' channels_last' if tuned_nhwc else ''}", file=sys.stderr)
    own_tuned = "diffusers-tuned" in systems and (tuned_dtype != dt or not tuned_nhwc)
    pristine = copy.deepcopy(parts) if ({"diffusers-seed", "openvino"} & set(systems) or own_tuned) else None
    reference_parts = copy.deepcopy(parts) if args.quality else None
    tiny = None
    if args.vae == "tiny" and not args.model:  # random weights of TAESD's architecture: the same compute
        from diffusers import AutoencoderTiny

        tiny = AutoencoderTiny().to(dev, dt).eval().requires_grad_(False)
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
                                   **(dict(backend="openvino", openvino_cache=ov_cache) if ov_cache else {}))
    t0 = time.perf_counter()
    # random weights may overflow; speed does not care
    engine = _engine(parts, args.model or f"random-{args.arch}", args.arch, dev, dt, lora_file, settings,
                     tiny=tiny, check_finite=weights == "real")
    comps = engine.c
    fuse_time = time.perf_counter() - t0
    report = engine.speed_report
    compile_time = speed.warmup(engine, width=size, height=size, steps=2) \
        if args.compile or args.cuda_graphs or ov_cache else None

    pipes = {}
    if own_tuned:
        # a careful user's pipeline: bf16/fp16, the LoRA loaded and fused, SDPA (diffusers' default attention)
        pipes["diffusers-tuned"] = _pipeline(loading.place(copy.deepcopy(pristine), "tuned", comps.arch, dev,
                                                           tuned_dtype), tuned_dtype)
        if tuned_nhwc:
            pipes["diffusers-tuned"].unet.to(memory_format=torch.channels_last)
        pipes["diffusers-tuned"].load_lora_weights(lora)
        pipes["diffusers-tuned"].fuse_lora()
        pipes["diffusers-tuned"].tuned_fused = True
    elif "diffusers-tuned" in systems:
        # same dtype as fewstep: the tuned pipeline shares fewstep's modules, in which the LoRA is already fused
        pipes["diffusers-tuned"] = _pipeline(engine.c, tuned_dtype)
    ov_convert = ov_dtype = None
    if "openvino" in systems:  # diffusers' fp32 pipeline, LoRA fused, UNet and decoder through OpenVINO
        from .bench_openvino import openvino_pipeline

        ov_parts = loading.place(copy.deepcopy(pristine), "openvino", comps.arch, dev, torch.float32)
        pipes["openvino"], ov_convert, ov_precision = openvino_pipeline(_pipeline(ov_parts, torch.float32), lora,
                                                                        size, xl=comps.preset.xl)
        ov_dtype = f"openvino-{ov_precision}"
    if "diffusers-seed" in systems:
        pipes["diffusers-seed"] = _pipeline(loading.place(pristine, "seed", comps.arch, dev, seed_dtype), seed_dtype)
        pipes["diffusers-seed"].load_lora_weights(lora)  # peft layers, unfused: what the blog's code does
    control, cn_pipes = _controlnets(args, engine, pipes, size) if args.controlnet else ((), {})
    rows = []
    meta = dict(arch=comps.arch, weights=weights, size=size, device=_device_name(dev), commit=_commit(),
                torch=torch.__version__, fewstep_dtype=str(dt).split(".")[-1], compile=args.compile,
                decoder=report.get("decoder", "full"), channels_last=report.get("channels_last", False),
                cuda_graphs=args.cuda_graphs, fused_qkv=args.fused_qkv, controlnet=args.controlnet)

    def one(system, mode, batch, timed):
        lcm = mode == "lcm"
        steps, guidance = (recipe.steps, recipe.guidance) if lcm else (args.euler_steps, 7.5)
        if system == "fewstep":
            _set_lora(engine, lcm)
            fn = lambda: engine.generate(PROMPT, recipe=recipe.name if lcm else "standard", steps=steps,  # noqa
                                         guidance=guidance, width=size, height=size, num_images=batch, seed=0,
                                         control=control if lcm else ())
            mods = (engine.c.text_encoders, (engine.fast, "unet_fn"), engine.fast, "decode_fn")
        else:
            pipe = pipes[system]
            if system == "diffusers-tuned" and not getattr(pipe, "tuned_fused", False):
                _set_lora(engine, lcm)  # shares fewstep's modules: same weights as fewstep's run of this mode
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

    for batch in batches:
        for mode in modes:
            if mode == "euler" and batch > 1:
                continue
            # the openvino system has the LCM-LoRA fused into its converted UNet: few-step rows only
            run_systems = [s for s in systems if s != "openvino" or mode == "lcm"]
            for system in run_systems:  # warm-up
                one(system, mode, batch, False)
            totals = {s: [] for s in run_systems}
            mems = {s: 0 for s in run_systems}
            for _ in range(args.runs):  # alternated, so drift hits every system alike
                for system in run_systems:
                    total, extra, _ = one(system, mode, batch, True)
                    totals[system].append(total)
                    mems[system] = max(mems[system], extra)
            for system in run_systems:
                _, _, stages = one(system, mode, batch, "stages")
                med = statistics.median(totals[system])
                rows.append(dict(meta, system=system, mode=mode, batch=batch,
                                 recipe=recipe.name if mode == "lcm" else "standard",
                                 steps=recipe.steps if mode == "lcm" else args.euler_steps,
                                 guidance=recipe.guidance if mode == "lcm" else 7.5,
                                 dtype=str(_system_dtype(system, dt, seed_dtype, tuned_dtype, ov_dtype)).split(".")[-1],
                                 seconds=med, runs=totals[system], images_per_s=batch / med,
                                 peak_extra_bytes=mems[system], text_s=stages["text"],
                                 unet_step_s=statistics.median(stages["unet"]) if stages["unet"] else None,
                                 unet_calls=len(stages["unet"]), decode_s=stages["decode"]))
    if args.quality:
        _quality(rows, engine, reference_parts, lora_file, size)
    for r in rows:
        ref = {x["system"]: x["seconds"] for x in rows if x["mode"] == r["mode"] and x["batch"] == r["batch"]}
        r["speedup_vs"] = {s: ref[s] / r["seconds"] for s in ref if s != r["system"]} if r["system"] == "fewstep" else {}
    extra = dict(lora_load_fuse_s=fuse_time, compile_s=compile_time, lora_tensors=len(lora),
                 tuned=f"{str(tuned_dtype).split('.')[-1]}{' channels_last' if tuned_nhwc else ''}",
                 openvino_convert_s=ov_convert, backend=args.backend, peak_rss_bytes=_peak_rss())
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, **extra), indent=2))
    if args.json:
        print(json.dumps(dict(rows=rows, **extra), indent=2))
    else:
        print(table(rows, extra))
    return 0


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


def _controlnets(args, engine, pipes, size):
    """One random-weight ControlNet (from_unet, seeded; its zero convolutions made non-zero so it acts) loaded
    into fewstep and into a diffusers ControlNet pipeline per system, and an edge image: (units, pipelines)."""
    import copy

    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline
    from PIL import Image, ImageDraw

    from .request import ControlUnit

    torch.manual_seed(0)
    levels = engine.vae_factor.bit_length()  # the conditioning embedding shrinks control images to latent size
    net = ControlNetModel.from_unet(engine.c.unet.float(),
                                    conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    engine.c.unet.to(engine.dtype)
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 1e-3)
    folder = Path(f"/tmp/fewstep-bench-controlnet-{args.arch}")
    net.save_pretrained(folder)
    name = engine.load_controlnet(folder, name="bench")
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline=(255, 255, 255),
                                    width=max(1, size // 128))
    cls = StableDiffusionXLControlNetPipeline if engine.c.preset.xl else StableDiffusionControlNetPipeline
    cn_pipes = {}
    for system, pipe in pipes.items():
        own = engine.controlnets[name] if pipe.unet is engine.c.unet else copy.deepcopy(net).to(pipe.unet.device,
                                                                                              pipe.unet.dtype)
        # from_pipe casts every component to float32 unless told: some are fewstep's own modules, shared
        cn_pipes[system] = cls.from_pipe(pipe, controlnet=own, torch_dtype=pipe.unet.dtype)
        cn_pipes[system].set_progress_bar_config(disable=True)
    return (ControlUnit(name, image),), cn_pipes


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
    head = ("system", "mode", "batch", "dtype", "e2e s", "img/s", "text s", "unet step s", "decode s", "peak+ GiB",
            "fewstep speedup")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup_vs"].items())
        lines.append(" | ".join(str(x) for x in (
            r["system"], f"{r['mode']} {r['steps']}", r["batch"], r["dtype"], f"{r['seconds']:.3f}",
            f"{r['images_per_s']:.3f}", f"{r['text_s']:.3f}",
            f"{r['unet_step_s']:.3f}" if r["unet_step_s"] else "-", f"{r['decode_s']:.3f}",
            f"{r['peak_extra_bytes'] / 2**30:.2f}", "; ".join(x for x in (
                sp, f"PSNR vs fp32 {r['psnr_vs_fp32']:.1f} dB" if "psnr_vs_fp32" in r else "") if x))))
    r0 = rows[0] if rows else {}
    lines.append(f"\n{r0.get('arch')} {r0.get('size')}px, {r0.get('weights')} weights, {r0.get('device')}, torch "
                 f"{r0.get('torch')}, commit {r0.get('commit')}, decoder {r0.get('decoder')}, compile "
                 f"{r0.get('compile')}, cuda graphs {r0.get('cuda_graphs')}; LCM-LoRA ({extra['lora_tensors']} tensors) load+fuse "
                 f"{extra['lora_load_fuse_s']:.2f}s" + (f", compile/capture+warm-up {extra['compile_s']:.1f}s"
                                                       if extra["compile_s"] else ""))
    if "peak_rss_bytes" in extra:  # CPU figures: what ran, and the memory all systems took together
        lines.append(f"fewstep backend {extra['backend']}; diffusers-tuned ran {extra['tuned']}"
                     + (f"; openvino system converted in {extra['openvino_convert_s']:.1f}s"
                        if extra.get("openvino_convert_s") else "")
                     + f"; peak RSS {extra['peak_rss_bytes'] / 2**30:.2f} GiB; CPU flags: {_cpu_flags()}")
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
