"""Validation images: the student sampled by the fewstep Engine itself (LCM at 1/2/4/8 steps for distillation,
Euler for style LoRAs and ControlNets), one grid per validation with a row per prompt; seeds fixed so grids compare
over a run. A ControlNet's rows start with their control image."""

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("fewstep")


@torch.no_grad()
def validate(method, cfg, *, step, prompts, out):
    """Write out/validation/step-NNNNNNNN.png; returns its path. prompts: strings, or (prompt, control image)
    pairs for a ControlNet."""
    from ..engine import Engine
    from ..images import grid, save_png

    m = method.models
    unet = method.validation_unet()
    was_training = unet.training
    unet.eval()
    comps = replace(m, unet=unet, name=f"{cfg.method} step {step}", notes=[])
    standard = cfg.method in ("lora", "controlnet")
    # the adapter being trained is live in the UNet (unfused peft layers), not an adapter of the engine's, so the
    # recipe is the engine's own: the LCM sampler for distillation, the standard one for style LoRAs and ControlNets
    recipe = "standard" if standard else "lcm"
    engine = Engine(comps, method.device, method.weight_dtype, recipe=recipe)
    sampler = "euler" if standard else "lcm"
    controlnet = cfg.method == "controlnet"
    images, labels = [], []
    quiet = logging.getLogger("fewstep").level
    log.setLevel(logging.ERROR)  # the engine's advice (e.g. about guidance) is noise in a training log
    try:
        if controlnet:
            _load_training_controlnet(engine, method)
        for i, prompt in enumerate(prompts):
            extra = {}
            if controlnet:
                from ..request import ControlUnit

                prompt, image = prompt
                extra["control"] = (ControlUnit(model="training", image=image),)
                images.append(image.resize((cfg.resolution, cfg.resolution)))
                labels.append("control")
            for steps in cfg.validation_steps:
                with method.autocast():
                    g = engine.generate(prompt, sampler=sampler, steps=int(steps), guidance=cfg.validation_guidance,
                                        seed=cfg.seed + i, width=cfg.resolution, height=cfg.resolution, **extra)
                images.append(g.images[0])
                labels.append(f"{steps} step{'s' if steps > 1 else ''}")
        prompts = [p[0] if controlnet else p for p in prompts]
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
    save_png(grid(images, labels, cols=len(cfg.validation_steps) + controlnet), path,
             f"{text}\nSampler: {sampler}, CFG scale: {cfg.validation_guidance:g}, Step: {step}")
    return path


def _load_training_controlnet(engine, method):
    """The ControlNet being trained, loaded into the engine as "training" through the folder it would be saved as
    (the path users take), in float32; the engine holds its own copy (the live module is left as it is)."""
    from .controlnet import save_controlnet

    with tempfile.TemporaryDirectory(prefix="fewstep-validate-") as tmp:
        save_controlnet(method.student, tmp, dtype=torch.float32)
        engine.load_controlnet(tmp, name="training")
