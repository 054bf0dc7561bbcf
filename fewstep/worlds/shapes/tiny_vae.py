"""The shapes world's tiny autoencoder (diffusers' AutoencoderTiny, TAESD's design) for the stream: distilled from
the shapes VAE, whose encode + decode is about a third of a stream frame at 64 px on a CPU (docs/stream.md).

The encoder learns the full VAE's scaled latent mean, the decoder the full decoder's image from those latents (so it
reads what the UNet writes). Images: every image of the world in both styles plus random scenes of several shapes
(camera frames are not shapes-world images). `python -m fewstep.worlds.shapes.tiny_vae --out DIR --minutes M`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

CHANNELS = 16  # one width for every block (AutoencoderTiny's downsampling convs keep the channel count)


def tiny_config(blocks, latent_channels=4, channels=CHANNELS):
    """AutoencoderTiny kwargs with `blocks` blocks (a latent factor of 2 ** (blocks - 1), as the full VAE's)."""
    return dict(encoder_block_out_channels=(channels,) * blocks, decoder_block_out_channels=(channels,) * blocks,
                num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks, latent_channels=latent_channels)


def random_scenes(rng, n, size):
    """uint8 (n, size, size, 3): a background and 1-4 random ellipses / rectangles in random colours."""
    from PIL import Image, ImageDraw

    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = (int(v) for v in rng.integers(-size // 4, size, 2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x0 + w, y0 + h),
                                                               fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out[i] = np.asarray(img)
    return out


def targets(vae, images, batch=64):
    """(pixels in [-1, 1], the VAE's scaled latent means, the full decoder's images from them), float32."""
    from fewstep import latents

    xs, zs, ys = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            mean = vae.encode(x).latent_dist.mean
            xs.append(x)
            zs.append(latents.to_unet(vae, mean))
            ys.append(vae.decode(mean).sample.clamp(-1, 1))
    return torch.cat(xs), torch.cat(zs), torch.cat(ys)


def psnr(a, b):
    mse = ((a - b) / 2).pow(2).mean().item()  # images in [-1, 1] -> [0, 1]
    return 10 * np.log10(1 / max(mse, 1e-12))


def train(out, *, minutes=8.0, seed=0, batch=32, lr=2e-3, n_world=900, n_scenes=500, init=None, log=print):
    """Distil the tiny autoencoder for `minutes` (wall clock); init: a saved one to continue from."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from fewstep.default_model import default_model_path
    from fewstep.worlds.shapes.world import all_attributes, render_array

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL.from_pretrained(Path(default_model_path()) / "vae").eval().requires_grad_(False)
    size = vae.config.sample_size
    every = all_attributes(False) + all_attributes(True)
    world = render_array([every[i] for i in rng.permutation(len(every))[:n_world]], size)
    scenes = random_scenes(rng, n_scenes, size)
    images = np.concatenate([world, scenes])
    order = rng.permutation(len(images))
    n_held = min(150, len(images) // 5)
    held = order[:n_held]
    t0 = time.perf_counter()
    x, z, y = targets(vae, images)
    log(f"targets for {len(images)} images in {time.perf_counter() - t0:.0f}s")
    train_idx = torch.from_numpy(order[n_held:])
    if init is not None:
        tiny = AutoencoderTiny.from_pretrained(init, torch_dtype=torch.float32)
    else:
        tiny = AutoencoderTiny(**tiny_config(len(vae.config.block_out_channels), vae.config.latent_channels))
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    step, t_start = 0, time.perf_counter()
    budget = minutes * 60
    while time.perf_counter() - t_start < budget:
        frac = (time.perf_counter() - t_start) / budget
        for g in opt.param_groups:  # cosine decay over the time budget
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        idx = train_idx[torch.randint(len(train_idx), (batch,))]
        xb, zb, yb = x[idx], z[idx], y[idx]
        enc = tiny.encoder(xb)
        dec = tiny.decoder(zb)
        loss_enc = torch.nn.functional.mse_loss(enc, zb)
        loss_dec = torch.nn.functional.l1_loss(dec, yb) + torch.nn.functional.mse_loss(dec, yb)
        opt.zero_grad(set_to_none=True)
        (loss_enc + loss_dec).backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"step {step}: encoder mse {loss_enc.item():.4f}, decoder l1+mse {loss_dec.item():.4f}")
    tiny.eval()
    h = torch.from_numpy(held)
    with torch.no_grad():
        enc = tiny.encoder(x[h])
        report = dict(steps=step, minutes=round((time.perf_counter() - t_start) / 60, 1), images=len(images),
                      channels=CHANNELS, seed=seed,
                      held_out=dict(
                          encoder_latent_rmse=round(float((enc - z[h]).pow(2).mean().sqrt()), 4),
                          latent_std=round(float(z[h].std()), 4),
                          decoder_psnr_vs_full_decoder=round(psnr(tiny.decoder(z[h]).clamp(-1, 1), y[h]), 2),
                          round_trip_psnr_vs_full_round_trip=round(psnr(tiny.decoder(enc).clamp(-1, 1), y[h]), 2),
                          full_vae_round_trip_psnr=round(psnr(y[h], x[h]), 2)))
    out = Path(out)
    tiny.to(torch.float16).save_pretrained(out)  # fp16 on disk: small; loaded in the engine's dtype
    report["command"] = f"python -m fewstep.worlds.shapes.tiny_vae --out DIR --minutes {minutes:g} --seed {seed}" + (
        " --init PREVIOUS" if init is not None else "")
    if init is not None and (Path(init) / "training.json").exists():
        report["continued_from"] = json.loads((Path(init) / "training.json").read_text())
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps(report))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fewstep.worlds.shapes.tiny_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue from this saved tiny autoencoder")
    a = p.parse_args(argv)
    train(a.out, minutes=a.minutes, seed=a.seed, init=a.init, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
