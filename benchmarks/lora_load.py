"""Load + fuse time of an LCM-LoRA-sized adapter on a real-size UNet (random weights), and what switching costs.

    nice -n 19 .venv/bin/python benchmarks/lora_load.py --arch sdxl --dtype bf16

The file is kohya-format, rank 64, fp16, on the recipe's 788 SDXL targets (about 394 MB, the size of the published
lcm-lora-sdxl); it is written once into --cache and read from the page cache afterwards (a first read from disk adds
the disk's time). Rows: attach (read header, plan, read tensors, save base copies, fuse; run 0 allocates the copies,
later runs reuse their buffers), re-weight (every touched tensor re-fused from its base copy), unload (base copies
back), and a check that the base came back bit for bit. cpu s is this process's CPU time: on a busy machine,
cpu / threads is close to what the step takes on an idle one.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lora_common import Timer, build_engine, environment, header, quiet, rss_gib, write_lora  # noqa: E402


def checksums(unet):
    """One integer per tensor over its raw bits: equal before and after means restored bit for bit."""
    out = {}
    for name, p in unet.state_dict().items():
        bits = p.view(torch.int16) if p.element_size() == 2 else p.view(torch.int32)
        out[name] = (int(bits.to(torch.int64).sum()), int((bits.to(torch.int64) * 7919).remainder(65521).sum()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sdxl", choices=["sd15", "sdxl"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="attach/unload cycles (the first is reported apart)")
    ap.add_argument("--cache", default="/tmp/fewstep-bench", help="folder for the generated LoRA file")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    with Timer() as t_build:
        engine = build_engine(args.arch, dtype)
    path = Path(args.cache) / f"lcm-lora-{args.arch}-r{args.rank}-random.safetensors"
    size = write_lora(path, engine.c.unet, rank=args.rank)
    before = checksums(engine.c.unet)
    rows = []
    for run in range(args.runs):
        with Timer() as t_attach:
            report = engine.load_lora(str(path), name="lcm", lcm=True)
        with Timer() as t_weight:
            engine.set_lora_weights({"lcm": 0.5})
        with Timer() as t_unload:
            engine.unload_lora("lcm")
        rows.append(dict(run=run, attach_s=round(t_attach.s, 3), attach_cpu_s=round(t_attach.cpu, 3),
                         read_s=report.seconds["read"], fuse_s=report.seconds["fuse"], reweight_s=round(t_weight.s, 3),
                         reweight_cpu_s=round(t_weight.cpu, 3), unload_s=round(t_unload.s, 3)))
    exact = checksums(engine.c.unet) == before
    env = environment(dtype)
    result = dict(env, arch=args.arch, lora_mb=round(size / 1e6, 1), modules=report.modules, tensors=report.tensors,
                  rank=args.rank, build_s=round(t_build.s, 1), runs=rows, restored_bit_exact=exact,
                  peak_rss_gib=round(rss_gib(), 2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(header(env))
    print(f"# {args.arch} UNet (random weights, built in {t_build.s:.0f}s); LoRA {size / 1e6:.1f} MB fp16, rank "
          f"{args.rank}, {report.modules} modules, {report.tensors} tensors")
    print(f"{'run':>3} {'attach s':>9} {'(read':>7} {'fuse)':>7} {'cpu s':>7} {'re-weight s':>12} {'cpu s':>7} "
          f"{'unload s':>9}")
    for r in rows:
        print(f"{r['run']:>3} {r['attach_s']:>9.3f} {r['read_s']:>7.3f} {r['fuse_s']:>7.3f} {r['attach_cpu_s']:>7.2f} "
              f"{r['reweight_s']:>12.3f} {r['reweight_cpu_s']:>7.2f} {r['unload_s']:>9.3f}")
    print(f"base restored bit-exactly: {exact}; peak RSS {result['peak_rss_gib']} GiB")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
