"""Validation images: the student sampled by the fewstep Engine itself (LCM at 1/2/4/8 steps for distillation,
Euler for style LoRAs), one grid per validation with a row per prompt; seeds fixed so grids compare over a run."""

import logging
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("fewstep")


@torch.no_grad()
def validate(method, cfg, *, step, prompts, out):
    """Write out/validation/step-NNNNNNNN.png; returns its path."""
    from ..engine import Engine
    from ..images import grid, save_png

    m = method.models
    unet = method.validation_unet()
    was_training = unet.training
    unet.eval()
    comps = replace(m, unet=unet, name=f"{cfg.method} step {step}", notes=[])
    # the adapter being trained is live in the UNet (unfused peft layers), not an adapter of the engine's, so the
    # recipe is the engine's own: the LCM sampler for distillation, the standard one for style LoRAs
    recipe = "standard" if cfg.method == "lora" else "lcm"
    engine = Engine(comps, method.device, method.weight_dtype, recipe=recipe)
    sampler = "euler" if cfg.method == "lora" else "lcm"
    images, labels = [], []
    quiet = logging.getLogger("fewstep").level
    log.setLevel(logging.ERROR)  # the engine's advice (e.g. about guidance) is noise in a training log
    try:
        for i, prompt in enumerate(prompts):
            for steps in cfg.validation_steps:
                with method.autocast():
                    g = engine.generate(prompt, sampler=sampler, steps=int(steps), guidance=cfg.validation_guidance,
                                        seed=cfg.seed + i, width=cfg.resolution, height=cfg.resolution)
                images.append(g.images[0])
                labels.append(f"{steps} step{'s' if steps > 1 else ''}")
    finally:
        log.setLevel(quiet)
        unet.train(was_training)
    if images[0].width < 128:  # tiny models: enlarge (nearest) so that pixels and labels stay readable
        from PIL import Image

        k = -(-128 // images[0].width)
        images = [im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST) for im in images]
    path = Path(out) / "validation" / f"step-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"row {i + 1}: {p}" for i, p in enumerate(prompts))
    save_png(grid(images, labels, cols=len(cfg.validation_steps)), path,
             f"{text}\nSampler: {sampler}, CFG scale: {cfg.validation_guidance:g}, Step: {step}")
    return path
