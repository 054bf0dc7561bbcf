"""One SD1.5-architecture UNet step (random weights) on this CPU: torch fp32/bf16 x NCHW/NHWC against OpenVINO
f32/bf16 of the same converted module, alternated in one process; then why diffusers-seed's LoRA steps use one core.

    nice -n 10 .venv/bin/python benchmarks/cpu_openvino.py [--size 512] [--runs 2] [--skip-seed]

Prints each configuration's median step, its CPU time per wall second (2.0 = both cores busy on 2 cores) and the
ratios; the seed part profiles the fp32 UNet with peft's unfused LoRA layers and names the slowest kernels.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_inputs(unet, size, dtype):
    h = size // 8
    torch.manual_seed(0)
    return dict(sample=torch.randn(1, 4, h, h, dtype=dtype), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim, dtype=dtype))


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall = time.perf_counter() - t0
    return out, wall, (time.process_time() - c0) / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-seed", action="store_true")
    args = ap.parse_args()
    import openvino as ov

    from fewstep.arch import random_components
    from fewstep.bench import LCM_TARGETS, _cpu_flags
    from fewstep.lora.reference import random_lora

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), openvino {ov.__version__}, CPU flags: "
          f"{_cpu_flags()}; SD1.5 UNet, random weights, {args.size}px, batch 1", flush=True)
    parts = random_components("sd15")
    unet = parts["unet"].eval().requires_grad_(False)
    del parts
    lora = random_lora(unet, LCM_TARGETS, scale=1e-3)
    x32 = step_inputs(unet, args.size, torch.float32)
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    x16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and v.ndim else v for k, v in x32.items()}

    class Graph(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(Graph(unet), example_input=x32)
    print(f"openvino.convert_model of the UNet: {time.perf_counter() - t0:.1f}s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-ov-probe-"))
    ov.save_model(model, tmp / "unet.xml", compress_to_fp16=False)
    del model
    core = ov.Core()
    compiled = {}
    for prec in ("f32", "bf16"):
        m = core.read_model(tmp / "unet.xml")
        m.reshape({p: ov.PartialShape(list(x32[n].shape)) for p, n in zip(m.inputs, x32)})
        t0 = time.perf_counter()
        compiled[prec] = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": prec,
                                                       "PERFORMANCE_HINT": "LATENCY"})
        print(f"compile {prec}: {time.perf_counter() - t0:.1f}s", flush=True)
    arrays = [v.numpy() for v in x32.values()]

    def torch_step(m, x, nhwc):
        def run():
            m.to(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            with torch.no_grad():
                return m(**x, return_dict=False)[0].float()
        return run

    configs = {"torch fp32 NCHW": torch_step(unet, x32, False), "torch fp32 NHWC": torch_step(unet, x32, True),
               "torch bf16 NCHW": torch_step(bf16, x16, False), "torch bf16 NHWC": torch_step(bf16, x16, True),
               "openvino f32": lambda: torch.from_numpy(compiled["f32"](arrays)[0]),
               "openvino bf16": lambda: torch.from_numpy(compiled["bf16"](arrays)[0])}
    outs = {k: fn() for k, fn in configs.items()}  # warm-up (and the memory-format change)
    times = {k: [] for k in configs}
    util = {k: [] for k in configs}
    for _ in range(args.runs):
        for k, fn in configs.items():
            if k.startswith("torch"):
                fn()  # re-lay out the shared module outside the timing
            _, wall, u = timed(fn)
            times[k].append(wall)
            util[k].append(u)
    ref = outs["torch fp32 NCHW"]
    best_torch = min((k for k in configs if k.startswith("torch")), key=lambda k: statistics.median(times[k]))
    for k in configs:
        med = statistics.median(times[k])
        diff = (outs[k] - ref).abs().max().item()
        print(f"{k:18s} step {med:6.2f}s  cpu/wall {statistics.median(util[k]):.2f}  max|out - fp32 NCHW| "
              f"{diff:.2e}  {statistics.median(times[best_torch]) / med:.2f}x vs {best_torch}", flush=True)
    compiled.clear()
    del bf16
    if args.skip_seed:
        return
    # diffusers-seed: the blog's fp32 UNet with peft's unfused LoRA layers, NCHW (diffusers' default format)
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from fewstep.arch import random_components as rc

    p = rc("sd15")
    pipe = StableDiffusionPipeline(vae=p["vae"], text_encoder=p["text_encoders"][0], tokenizer=p["tokenizers"][0],
                                   unet=unet.to(memory_format=torch.contiguous_format), scheduler=EulerDiscreteScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora)
    dtypes = {}
    for name, m in pipe.unet.named_modules():
        if hasattr(m, "lora_A") and "default_0" in m.lora_A:
            key = (type(m.base_layer).__name__, str(m.base_layer.weight.dtype), str(m.lora_A["default_0"].weight.dtype))
            dtypes[key] = dtypes.get(key, 0) + 1
    print("peft LoRA layers (base type, base dtype, LoRA dtype): count", dtypes, flush=True)
    run = torch_step(pipe.unet, x32, False)
    run()
    _, wall, u = timed(run)
    print(f"seed (fp32 NCHW + peft LoRA) step {wall:.2f}s cpu/wall {u:.2f}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)


if __name__ == "__main__":
    main()
