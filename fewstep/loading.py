"""Model source -> components: a diffusers folder, a hub id or a single-file checkpoint; device and dtype."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arch, sources
from .errors import LoadError
from .sources import PICKLE_SUFFIXES

PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLPipeline",
             "StableDiffusionXLImg2ImgPipeline", "LatentConsistencyModelPipeline",
             "LatentConsistencyModelImg2ImgPipeline", "AutoPipelineForText2Image", "StableDiffusionInpaintPipeline",
             "StableDiffusionXLInpaintPipeline"}
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

    @property
    def vae_factor(self):
        """Pixels per latent cell (8 for SD's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self):
        return self.unet.config.sample_size * self.vae_factor

    @property
    def zeros_for_empty_prompt(self):
        """SDXL-type models condition an empty negative prompt on zeros, not on the encoded "" (diffusers' rule)."""
        return self.preset.xl and self.force_zeros_for_empty_prompt

    @property
    def added_conditions(self):
        """The UNet takes SDXL's pooled text embedding and size/crop ids."""
        return self.unet.config.get("addition_embed_type") == "text_time"


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
                        "LCM text-to-image and inpainting models")
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


def read_shipped(folder, dtype=torch.float32):
    """Components (on CPU, in dtype) of the embedded default model, without from_pretrained.

    Its files are known: one safetensors file per part beside its config, and a tokenizer whose vocabulary, merges
    and special tokens are the bundled CLIP tokenizer's (tests/test_first_image.py checks). So each network is built
    from its config on the meta device and its tensors are assigned (gpt-fast's way), skipping what from_pretrained
    does for large models from anywhere: file resolution, accelerate's empty-weights init, transformers' checkpoint
    key conversion rules, and a 3.6 MB tokenizer.json parsed in Python: the load outside its imports went from
    0.61 to 0.24 s (benchmarks/first_image.py, 2-core Xeon); the imports of the model classes are the rest.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizers import bundled_tokenizer

    def built(make, file):
        with torch.device("meta"):
            module = make()
        state = load_file(str(file))
        check_fit(module.state_dict(), state, f"{file} does not fit its config")
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return module.eval()

    def diffusers_part(cls, sub):
        return built(lambda: cls.from_config(cls.load_config(str(folder / sub))),
                     folder / sub / "diffusion_pytorch_model.safetensors")

    unet, vae = diffusers_part(UNet2DConditionModel, "unet"), diffusers_part(AutoencoderKL, "vae")
    encoder = built(lambda: CLIPTextModel(CLIPTextConfig.from_json_file(str(folder / "text_encoder" / "config.json"))),
                    folder / "text_encoder" / "model.safetensors")
    # the one tensor no file holds: CLIP's position ids (0..76), a non-persistent buffer of its embeddings
    for name, buf in list(encoder.named_buffers()):
        if buf.is_meta and name.rpartition(".")[2] == "position_ids":
            setattr(encoder.get_submodule(name.rpartition(".")[0]), "position_ids",
                    torch.arange(buf.shape[-1]).expand(buf.shape))
    left = [n for m in (unet, vae, encoder) for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if left:  # a library version that adds state outside the files: say so rather than run on meta tensors
        raise LoadError(f"the default model's loader left {left[:3]} unset: this diffusers/transformers version "
                        "needs fewstep.loading.read_shipped updated")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return dict(arch=arch.detect(unet.config), unet=unet, vae=vae, text_encoders=[encoder],
                tokenizers=[bundled_tokenizer("clip")], scheduler_config=sched, force_zeros_for_empty_prompt=False)


def read_components(source, *, allow_pickle=False, dtype=torch.float32):
    """Components on CPU in dtype from a folder, a single file or a hub id."""
    path = sources.local_path(source)
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
    elif sources.is_hub_id(source):
        parts = _from_folder(sources.hub_snapshot(str(source), HUB_PATTERNS), allow_pickle, dtype)
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


def read_unet(source, base, *, allow_pickle=False, dtype=torch.float32):
    """A UNet-only file or folder (a Lightning / DMD2 / Hyper-SD distilled UNet) for the model whose UNet is `base`:
    a diffusers folder (config.json), or one file in diffusers or original (LDM/SGM) layout, safetensors or - with
    allow_pickle - a pickle. Its tensors must fit `base`'s architecture exactly; on CPU in dtype."""
    from diffusers import UNet2DConditionModel

    path = sources.resolve(source, what="UNet", patterns=["config.json", "*.safetensors"],
                           expect="a UNet .safetensors file, a diffusers UNet folder or a hub id")
    title = arch.PRESETS[arch.detect(base.config)].title
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) + (sorted(path.glob("*.bin")) if allow_pickle else [])
        if not (path / "config.json").is_file() and len(files) == 1:
            path = files[0]
        elif not (path / "config.json").is_file():
            raise LoadError(f"UNet {source}: a folder needs config.json and its weights, or exactly one weights file")
        else:
            try:
                unet = UNet2DConditionModel.from_pretrained(str(path), torch_dtype=dtype,
                                                            use_safetensors=None if allow_pickle else True)
            except (OSError, EnvironmentError, ValueError) as e:
                if any(path.glob("*.bin")) and not allow_pickle:
                    raise LoadError(f"UNet {source} has only pickle weights (.bin), which can run code when loaded; "
                                    "pass --allow-pickle if you trust them") from None
                raise LoadError(f"cannot load UNet {source}: {str(e).splitlines()[0]}") from None
            _check_unet_fits(unet.config, base.config, source, title)
            return unet
    from .singlefile import read_state_dict

    if sources.is_pickle(path) and not allow_pickle:
        raise LoadError(f"UNet {path.name} is a pickle file, which can run code when loaded: pass --allow-pickle "
                        "(allow_pickle=True) if you trust it, or convert it to .safetensors")
    state = read_state_dict(path, allow_pickle=allow_pickle)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    ldm = "model.diffusion_model."
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in state):
        state = {ldm + k: v for k, v in state.items()}
    if any(k.startswith(ldm) for k in state):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        try:
            state = convert_ldm_unet_checkpoint(state, dict(base.config))
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise LoadError(f"UNet {path.name} does not fit this {title} model's UNet: the original-layout tensors "
                            f"do not convert ({type(e).__name__}: {e})") from None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(base.config)
    check_fit(unet.state_dict(), state, f"UNet {path.name} does not fit this {title} model's UNet")
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return unet.eval()


def check_fit(expected, state, refusal):
    """A LoadError beginning with `refusal` unless the tensors of `state` are exactly those of `expected` (names
    and shapes): the strict check before a file's tensors are assigned to a model built from a config."""
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    misfit = [k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misfit:
        what = (f"{len(missing)} of its tensors are missing (e.g. {missing[:2]})" if missing else
                f"{len(unexpected)} tensors are not in it (e.g. {unexpected[:2]})" if unexpected else
                f"{misfit[0]} has shape {tuple(state[misfit[0]].shape)}, not {tuple(expected[misfit[0]].shape)}")
        raise LoadError(f"{refusal}: {what}; is it for another architecture?")


def _check_unet_fits(theirs, ours, source, title):
    keys = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "addition_embed_type",
            "transformer_layers_per_block", "layers_per_block")
    for k in keys:
        a, b = theirs.get(k), ours.get(k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise LoadError(f"UNet {source} does not fit this {title} model's UNet: {k} is {a}, the model's is {b}; "
                            "is it for another architecture?")
