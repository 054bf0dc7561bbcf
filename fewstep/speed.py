"""How fast, apart from what: memory format, compilation, the tiny decoder, offload. Model code stays eager.

Settings are chosen per device by `auto_settings` and applied by `apply`; compiled callables live on the engine
(engine.unet_fn, engine.decode_fn), never rebound globals.
"""

import logging
import time
from dataclasses import dataclass, replace

import torch

from .errors import LoadError

log = logging.getLogger("fewstep")

TINY_DECODERS = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}  # by preset.xl


@dataclass(frozen=True)
class SpeedSettings:
    """The fast-path switches; None means "decide for the device"."""

    channels_last: bool | None = None
    compile: bool = False  # torch.compile the UNet and the decoder (opt-in on CPU: compile takes minutes)
    compile_mode: str | None = None  # None: "max-autotune-no-cudagraphs" on CPU, "reduce-overhead" (CUDA graphs) on CUDA
    vae: str = "full"  # "full", "tiny" (TAESD/TAESDXL from the hub cache), or a path / hub id of an AutoencoderTiny
    offload: bool = False  # keep components on the CPU and move each to the GPU only while it runs
    prompt_cache: int = 64  # prompt embeddings kept for repeated prompts (0: off)
    attention_slicing: bool | None = None  # MPS only, for large images


def auto_settings(device, **overrides):
    """The defaults for a device: channels_last everywhere (oneDNN and cuDNN prefer NHWC convolutions)."""
    s = SpeedSettings(**overrides)
    if s.channels_last is None:
        s = replace(s, channels_last=device.type in ("cpu", "cuda"))
    if s.compile_mode is None and s.compile:
        s = replace(s, compile_mode="reduce-overhead" if device.type == "cuda" else "max-autotune-no-cudagraphs")
    if s.attention_slicing is None:
        s = replace(s, attention_slicing=False)
    if s.offload and device.type != "cuda":
        raise LoadError("--offload keeps weights in CPU memory for a GPU; it does nothing on " + device.type)
    return s


def load_tiny_decoder(spec, xl, device, dtype):
    """AutoencoderTiny from "tiny" (the TAESD/TAESDXL hub repo), a local folder or a hub id."""
    from diffusers import AutoencoderTiny

    from .loading import HUB_ID, hub_snapshot

    src = TINY_DECODERS[xl] if spec == "tiny" else spec
    from pathlib import Path

    path = Path(src).expanduser()
    if not path.exists():
        if not HUB_ID.match(src):
            raise LoadError(f"tiny decoder {src} not found: give a folder with an AutoencoderTiny or a hub id")
        path = hub_snapshot(src, patterns=["config.json", "*.safetensors"])
    try:
        dec = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot load the tiny decoder from {src}: {str(e).splitlines()[0]}") from None
    return dec.to(device).eval().requires_grad_(False)


def apply(engine, settings):
    """Apply settings to a loaded engine; returns a dict of what was done."""
    c, done = engine.c, {}
    if settings.vae not in ("full", None):
        engine.decoder = load_tiny_decoder(settings.vae, c.preset.xl, engine.device, engine.dtype)
        done["decoder"] = "tiny"
    if settings.channels_last:
        c.unet.to(memory_format=torch.channels_last)
        engine.decoder.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if settings.attention_slicing and engine.device.type == "mps":
        c.unet.set_attention_slice("auto")
        done["attention_slicing"] = True
    engine.unet_fn, engine.decode_fn = c.unet, engine.decoder.decode
    if settings.compile:
        # Only the hot callables are compiled; weights change in place (LoRA fuse), so compiled code stays valid.
        engine.unet_fn = torch.compile(c.unet, mode=settings.compile_mode, fullgraph=False, dynamic=False)
        engine.decode_fn = torch.compile(engine.decoder.decode, mode=settings.compile_mode, dynamic=False)
        done["compile"] = settings.compile_mode
    engine.speed = settings
    return done


def warmup(engine, *, width=None, height=None, steps=2, num_images=1):
    """Run one small generation so that compilation (if any) happens now; returns its seconds."""
    t0 = time.perf_counter()
    engine.generate("warm-up", steps=steps, width=width, height=height, num_images=num_images, seed=0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class OnDevice:
    """Context that moves a module to the GPU for its use and back to the CPU after (model offload)."""

    def __init__(self, engine, module):
        self.engine, self.module = engine, module

    def __enter__(self):
        if self.engine.speed.offload:
            self.module.to(self.engine.device)
        return self.module

    def __exit__(self, *exc):
        if self.engine.speed.offload:
            self.module.to("cpu")
        return False
