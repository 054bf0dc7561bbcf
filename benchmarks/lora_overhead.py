"""Per-step cost of fused adapters: a 4-step generation with and without two LoRAs fused (should be equal).

    nice -n 19 .venv/bin/python benchmarks/lora_overhead.py --arch sd15 --size 256

Real-size UNet with random weights; an LCM-LoRA-shaped adapter (rank 64, every recipe target) and a style-shaped one
(rank 16, attention). Runs alternate between the two states in one process, so load on the machine hits both alike;
the table gives the median and the spread of the per-step UNet time and of the whole generation; the ratio of the
minima is the fairest figure on a shared machine (the run least disturbed by other work).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lora_common import ATTENTION, build_engine, environment, header, quiet, write_lora  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5, help="generations per state, alternating")
    ap.add_argument("--cache", default="/tmp/fewstep-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    quiet()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    engine = build_engine(args.arch, dtype, text=True)
    unet = engine.c.unet
    lcm = Path(args.cache) / f"lcm-lora-{args.arch}-r64-random.safetensors"
    style = Path(args.cache) / f"style-{args.arch}-r16-random.safetensors"
    write_lora(lcm, unet, rank=64)
    write_lora(style, unet, rank=16, ends=ATTENTION, seed=1)
    kw = dict(prompt="a toy_face man", sampler="lcm", steps=args.steps, guidance=1.0, width=args.size,
              height=args.size, seed=0)

    def state(fused):
        if fused and not engine.loras:
            engine.load_lora(str(lcm), name="lcm", lcm=True)
            engine.load_lora(str(style), name="style", weight=0.8)
        elif not fused and engine.loras:
            engine.unload_loras()

    samples = {False: [], True: []}
    for fused in (False, True):  # warm-up in both states (first-call allocations, kernel selection)
        state(fused)
        engine.generate(**kw)
    for _ in range(args.runs):
        for fused in (False, True):
            state(fused)
            t = engine.generate(**kw).timings
            samples[fused].append((t["steps"], t["total"]))
    state(False)

    def summary(rows):
        steps, totals = [x for r in rows for x in r[0]], [r[1] for r in rows]
        return dict(step_median_s=round(statistics.median(steps), 4), step_min_s=round(min(steps), 4),
                    step_max_s=round(max(steps), 4), total_median_s=round(statistics.median(totals), 4))

    base, fused = summary(samples[False]), summary(samples[True])
    # the minimum is the run least disturbed by other work on the machine: the fairest comparison on a shared one
    ratio = fused["step_min_s"] / base["step_min_s"]
    env = environment(dtype)
    result = dict(env, arch=args.arch, size=args.size, steps=args.steps, runs=args.runs, no_adapters=base,
                  two_fused=fused, step_min_ratio=round(ratio, 4),
                  step_median_ratio=round(fused["step_median_s"] / base["step_median_s"], 4))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(header(env))
    print(f"# {args.arch} UNet (random weights), {args.size}x{args.size}, {args.steps} LCM steps, {args.runs} runs "
          "each, alternating")
    print(f"{'adapters':<22} {'step median s':>14} {'step min-max s':>16} {'generation median s':>20}")
    for label, r in (("none", base), ("lcm 1.0 + style 0.8", fused)):
        print(f"{label:<22} {r['step_median_s']:>14.4f} {r['step_min_s']:>7.4f}-{r['step_max_s']:<8.4f} "
              f"{r['total_median_s']:>20.4f}")
    print(f"per-step ratio fused / none: {ratio:.3f} (minima), {result['step_median_ratio']:.3f} (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
