"""Shared by the LoRA benchmarks: real-size random-weight engines and LCM-LoRA-shaped random files."""

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fewstep.arch import PRESETS, SD_SCHEDULER
from fewstep.lora.reference import TEXT, UNETS, random_lora
from fewstep.train.config import TARGETS as LORA_PRESETS

# the LCM-LoRA recipe's targets: 278 modules on SD 1.5, 788 on SDXL (the published files' counts)
TARGETS = tuple(LORA_PRESETS["lcm"])
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def environment(dtype):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(device="cpu", cpu=cpu, threads=torch.get_num_threads(), dtype=str(dtype).removeprefix("torch."),
                torch=torch.__version__, commit=commit, load=os.getloadavg()[0])


def header(env):
    """The first line of a benchmark's table: where and how it ran."""
    return (f"# {env['cpu']}, {env['threads']} threads, {env['dtype']}, torch {env['torch']}, commit {env['commit']}, "
            f"load avg {env['load']:.1f}")


def build_engine(arch, dtype, *, text=False, seed=0):
    """An Engine around a real-size UNet with random weights (text encoders real when `text`, else on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.engine import Engine
    from fewstep.loading import Components
    from fewstep.tokenizers import bundled_tokenizer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNETS[arch])
    unet = unet.to_empty(device="cpu").to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():  # written once, so that no page is first touched inside a timed region
            p.copy_(torch.empty(p.shape).uniform_(-0.03, 0.03, generator=gen))
    encoders = []
    for i, cfg in enumerate(TEXT[arch]):
        cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
        config = CLIPTextConfig(**cfg)
        if text:
            torch.manual_seed(seed + 1 + i)
            encoders.append(cls(config).to(dtype).eval().requires_grad_(False))
        else:
            with torch.device("meta"):
                encoders.append(cls(config))
    # a narrow VAE with the real one's factor 8: decoding stays cheap and apart from the steps being measured
    vae = AutoencoderKL(block_out_channels=(32,) * 4, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1).to(dtype).eval()
    vae.requires_grad_(False)
    preset = PRESETS[arch]
    comps = Components(arch=arch, unet=unet, vae=vae, text_encoders=encoders,
                       tokenizers=[bundled_tokenizer(kind) for kind in preset.tokenizers],
                       scheduler_config=dict(SD_SCHEDULER, prediction_type="epsilon"),  # timing only: any type
                       source="random", name=f"{arch}-random",
                       force_zeros_for_empty_prompt=preset.force_zeros_for_empty_prompt)
    return Engine(comps, torch.device("cpu"), dtype)


def write_lora(path, unet, *, rank=64, ends=TARGETS, seed=0, scale=0.01, dtype=torch.float16):
    """A kohya file with diffusers block names, fp16, alphas: the published LCM-LoRAs' layout. Returns its size."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        return path.stat().st_size
    sd = random_lora(unet, ends, rank=rank, seed=seed, scale=scale, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.rename(path)
    return path.stat().st_size


def rss_gib():
    """Peak resident memory of this process so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Timer:
    """Wall seconds (s) and this process's CPU seconds (cpu): on a shared machine cpu / threads shows the work."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.s, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


def quiet():
    """Library chatter off: these scripts print a table."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("fewstep").setLevel(logging.ERROR)
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()
