"""Kernel-level probe on a GPU: is the UNet step compute-bound, and what do the fast-path switches give?

Random weights of the real SDXL architecture (compute does not depend on the values). Prints: the fp16 matmul rate,
the SDXL UNet step at 1024 (batch 1 and 2) with channels_last and cudnn.benchmark on/off, the top kernels of one
step, and the SDXL VAE decode with diffusers' upsamplers vs fewstep's sub-pixel (phase) upsamplers.
Usage: python3 benchmarks/gpu_probe.py [--arch sdxl]
"""

import argparse

import torch

from fewstep.arch import REAL


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return sorted(times)[len(times) // 2]


def main():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from fewstep.speed import phase_upsample_view

    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="sdxl")
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    sec = timed(lambda: a @ b, 10)
    print(f"{torch.cuda.get_device_name()}: fp16 matmul {n}^3: {2 * n**3 / sec / 1e12:.0f} TFLOP/s", flush=True)
    del a, b
    unet_cfg, vae_cfg, _ = REAL[args.arch]
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**unet_cfg).to(dt).eval()
        vae = AutoencoderKL(**vae_cfg).to(dt).eval()
    side = unet_cfg.get("sample_size", 128)
    ctx_dim = unet_cfg["cross_attention_dim"]
    for batch in (1, 2):
        x = torch.randn(batch, 4, side, side, device=dev, dtype=dt)
        ctx = torch.randn(batch, 77, ctx_dim, device=dev, dtype=dt)
        t = torch.full((batch,), 999, device=dev)
        kw = {}
        if unet_cfg.get("addition_embed_type") == "text_time":
            kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 1280, device=dev, dtype=dt),
                                           time_ids=torch.randn(batch, 6, device=dev, dtype=dt))
        for cl in (False, True):
            unet.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                with torch.no_grad():
                    s = timed(lambda: unet(xx, t, ctx, **kw))
                print(f"unet batch {batch} channels_last={cl} cudnn.benchmark={bench}: {s * 1000:.1f} ms", flush=True)
        if batch == 1:
            from torch.profiler import ProfilerActivity, profile

            with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                unet(xx, t, ctx, **kw)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    torch.backends.cudnn.benchmark = True
    z = torch.randn(1, 4, side, side, device=dev)
    for vdt in (torch.float16, torch.bfloat16):
        v = vae.to(vdt)
        for cl in (False, True):
            v.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
            view = phase_upsample_view(v)[0]
            zz = z.to(vdt).contiguous(memory_format=torch.channels_last) if cl else z.to(vdt)
            with torch.no_grad():
                s0 = timed(lambda: v.decode(zz), 3)
                s1 = timed(lambda: view.decode(zz), 3)
            print(f"vae decode {vdt} channels_last={cl}: diffusers upsamplers {s0 * 1000:.1f} ms, phase upsamplers "
                  f"{s1 * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
