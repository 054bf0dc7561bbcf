"""Model source -> components: a diffusers folder, a hub id or a single-file checkpoint; device and dtype."""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch
from .errors import LoadError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
             "StableDiffusionXLImg2ImgPipeline", "LatentConsistencyModelPipeline",
             "LatentConsistencyModelImg2ImgPipeline", "AutoPipelineForText2Image"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a text-to-image folder needs from the hub: configs, tokenizers and safetensors weights, nothing else.
HUB_PATTERNS = ["model_index.json", "*/*.json", "tokenizer*/*.txt", "*/diffusion_pytorch_model*.safetensors",
                "*/model*.safetensors"]


@dataclass
class Components:
    """Everything an Engine runs, loaded and placed."""

    arch: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    source: str
    name: str
    force_zeros_for_empty_prompt: bool = False
    notes: list = field(default_factory=list)

    @property
    def preset(self):
        return arch.PRESETS[self.arch]

    @property
    def full_lcm(self):
        return self.unet.config.get("time_cond_proj_dim") is not None


def resolve_device(device="auto"):
    """cuda > mps > cpu for "auto"; otherwise the named device, checked to exist."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LoadError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device cuda was asked for but this PyTorch build sees no CUDA GPU (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoadError("device mps was asked for but MPS is not available here (use --device cpu)")
    return dev


def cpu_has_bf16_units():
    """True where the CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device):
    """fp16 on CUDA/MPS, bf16 on CPUs with bf16 matrix units, else fp32, for "auto"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return DTYPES[dtype]


def read_model_index(folder):
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{folder}/model_index.json is unreadable: {e}") from None
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise LoadError(f"{folder} holds a {cls} model; fewstep loads Stable Diffusion 1.x/2.x, SDXL, SSD-1B and "
                        "LCM text-to-image models")
    return index


def _variant(folder, sub):
    names = os.listdir(folder / sub) if (folder / sub).is_dir() else []
    if any(n.endswith(".safetensors") and ".fp16." not in n for n in names):
        return None
    return "fp16" if any(".fp16." in n and n.endswith(".safetensors") for n in names) else None


def _from_folder(folder, allow_pickle, dtype=torch.float32):
    """Components (on CPU, in dtype) of a diffusers-format folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .tokenizers import bundled_tokenizer

    index = read_model_index(folder)
    xl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None

    def part(cls, sub, **kw):
        if not (folder / sub).is_dir():
            raise LoadError(f"{folder} has no {sub}/ folder, which a {index['_class_name']} needs")
        try:
            return cls.from_pretrained(str(folder), subfolder=sub, variant=_variant(folder, sub),
                                       use_safetensors=None if allow_pickle else True, torch_dtype=dtype, **kw)
        except (OSError, EnvironmentError, ValueError) as e:
            pickled = any(n.endswith(PICKLE_SUFFIXES) for n in os.listdir(folder / sub))
            if pickled and not allow_pickle:
                raise LoadError(f"{folder}/{sub} has only pickle weights (.bin), which can run code when loaded; "
                                "pass --allow-pickle (allow_pickle=True) if you trust them") from None
            raise LoadError(f"cannot load {folder}/{sub}: {str(e).splitlines()[0]}") from None

    def tokenizer(sub, kind):
        if (folder / sub).is_dir():
            return CLIPTokenizer.from_pretrained(str(folder), subfolder=sub)
        return bundled_tokenizer(kind)

    unet = part(UNet2DConditionModel, "unet")
    vae = part(AutoencoderKL, "vae")
    encoders = [part(CLIPTextModel, "text_encoder")]
    tokenizers = [tokenizer("tokenizer", "clip")]
    if xl:
        encoders.append(part(CLIPTextModelWithProjection, "text_encoder_2"))
        tokenizers.append(tokenizer("tokenizer_2", "openclip"))
    try:
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        sched = {}
    return dict(arch=arch.detect(unet.config), unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                scheduler_config=sched, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", xl))


def hub_snapshot(repo_id, patterns=HUB_PATTERNS):
    """Local folder of a hub repo: the cache when it has it, else a download; a clear error offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "try the network"
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise LoadError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        "download it first or pass a local path")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all mean "cannot get it"
        raise LoadError(f"{repo_id} is not a local path, not in the Hugging Face cache, and could not be downloaded "
                        f"({type(e).__name__}): check the name or your connection, or pass a local path") from None


def read_components(source, *, allow_pickle=False, dtype=torch.float32):
    """Components on CPU in dtype from a folder, a single file or a hub id."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise LoadError(f"{path} is a folder without model_index.json: give a diffusers model folder or a "
                            "single .safetensors checkpoint")
        parts = _from_folder(path, allow_pickle, dtype)
    elif path.is_file():
        from .singlefile import load_single_file

        parts = load_single_file(path, allow_pickle=allow_pickle, torch_dtype=dtype)
        parts = dict(arch=parts["arch"], unet=parts["unet"], vae=parts["vae"],
                     text_encoders=[parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else []),
                     tokenizers=[parts["tokenizer"]] + ([parts["tokenizer_2"]] if "tokenizer_2" in parts else []),
                     scheduler_config=parts["scheduler_config"],
                     force_zeros_for_empty_prompt=parts.get("force_zeros_for_empty_prompt", False))
    elif HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        parts = _from_folder(hub_snapshot(str(source)), allow_pickle, dtype)
    else:
        raise LoadError(f"model {source} not found: give a diffusers folder, a .safetensors file or a hub id "
                        "(owner/name)")
    return parts


def vae_dtype(arch_name, vae, dtype, device):
    """The dtype a VAE runs in for a model dtype: the SDXL VAE overflows in fp16 (black or NaN images), so it decodes
    in bf16 where the device has it (fp32's range, half the cost), else fp32, unless its config says fp16 is safe (an
    fp16-fixed VAE has force_upcast false)."""
    if dtype == torch.float16 and arch.PRESETS[arch_name].xl and vae.config.get("force_upcast", False):
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return dtype


def place(parts, source, name, device, dtype):
    """Components moved to the device in the dtype; the VAE kept in a dtype that does not overflow."""
    unet, vae = parts["unet"], parts["vae"]
    unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device, dtype=vae_dtype(parts["arch"], vae, dtype, device)).eval().requires_grad_(False)
    for enc in parts["text_encoders"]:
        enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for module in (unet, vae, *parts["text_encoders"]):
        own_tensors(module)
    return Components(source=str(source), name=name, **parts)


ALIGN = 64  # bytes: what PyTorch's CPU allocator gives every fresh tensor, and what vector GEMM kernels assume


def own_tensors(module):
    """Give every parameter and buffer its own contiguous, 64-byte-aligned storage; returns how many moved.

    Loaders hand out views: safetensors tensors sit at arbitrary byte offsets of one memory-mapped file (diffusers,
    transformers and the single-file path alike, each at different offsets), and converters leave transposed views
    (OpenCLIP's text_projection). On some CPUs (AVX2, no AVX-512) oneDNN/MKL pick other kernels for unaligned or
    strided operands, so the same weights loaded from a folder and from a single file gave images 1/255 apart.
    Owned copies make the kernels depend on the weights' values only, and drop the file mapping.
    """
    done = {}  # id(old) -> new: a tensor shared by two modules (tied weights) stays shared
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for key, t in table.items():
                if t is None or t.device.type != "cpu" or t.numel() == 0:
                    continue
                if id(t) not in done:
                    if t.is_contiguous() and t.data_ptr() % ALIGN == 0:
                        continue
                    fresh = torch.empty(t.shape, dtype=t.dtype)
                    fresh.copy_(t)
                    done[id(t)] = (torch.nn.Parameter(fresh, requires_grad=t.requires_grad)
                                   if isinstance(t, torch.nn.Parameter) else fresh)
                table[key] = done[id(t)]
    return len(done)


def load_engine(source=None, *, device="auto", dtype="auto", lcm=True, allow_pickle=False, **speed):
    """fewstep.load: read, place, attach the LCM-LoRA the request asks for, set up the fast path."""
    from . import speed as speed_mod
    from .engine import Engine

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    settings = speed_mod.auto_settings(dev, **speed)
    if dev.type == "cpu" and dt == torch.float16:
        raise LoadError("fp16 on the CPU is very slow and unsupported by many kernels: use bf16 or fp32")
    if source is None:
        from .default_model import NAME, default_model_path

        path, name = default_model_path(), NAME
    else:
        path, name = source, Path(str(source)).name if Path(str(source)).exists() else str(source)
    parts = read_components(path, allow_pickle=allow_pickle, dtype=dt)
    engine = Engine(place(parts, path, name, torch.device("cpu") if settings.offload else dev, dt), dev, dt)
    if lcm and not engine.full_lcm:
        src = engine.c.preset.lcm_lora if lcm is True else lcm
        if src is None and engine.arch == "shapes":
            from .default_model import default_lcm_lora

            src = default_lcm_lora()
            if src is None:
                engine.c.notes.append("the shapes model's LCM-LoRA is not installed: using the teacher's own "
                                      "sampler (Euler, 25 steps, guidance 4)")
        elif src is None:
            raise LoadError(f"there is no published LCM-LoRA for {engine.c.preset.title} models: pass a local one "
                            "with --lcm PATH, or --no-lcm for the standard pipeline")
        if src is not None:
            from .lora import load_lora

            load_lora(engine, src, name="lcm", weight=1.0, allow_pickle=allow_pickle)
            engine.lcm_lora = "lcm"
    engine.speed_report = speed_mod.apply(engine, settings)
    return engine
