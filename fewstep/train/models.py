"""The networks a training run holds: the teacher / base model read through fewstep.loading, the LoRA attached with
peft (diffusers' own adapter integration), and the exports: kohya-layout LoRA files and diffusers model folders."""

from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import LoadError
from ..loading import DTYPES, Components, read_components, vae_dtype
from ..sources import resolve
from .config import TrainError


def torch_dtype(name):
    """A precision name as a torch dtype: accelerate's "no" (or None) is float32, the rest are loading's names."""
    return torch.float32 if name in (None, "no") else DTYPES[name]


def load_models(source, *, allow_pickle=False, vae=None):
    """Components of a diffusers folder, single-file checkpoint or hub id, in float32 on the CPU."""
    parts = read_components(source, allow_pickle=allow_pickle, dtype=torch.float32)
    if vae is not None:
        parts["vae"] = load_vae(vae)
    return Components(source=str(source), name=Path(str(source)).name, **parts)


def load_vae(source):
    """An AutoencoderKL from a VAE folder (config.json + weights), a model folder's vae/ or a hub id."""
    from diffusers import AutoencoderKL

    try:
        path = resolve(source, what="--vae", expect="a VAE folder or a hub id",
                       patterns=["config.json", "diffusion_pytorch_model*.safetensors", "vae/config.json",
                                 "vae/diffusion_pytorch_model*.safetensors"])
    except LoadError as e:
        raise TrainError(str(e)) from None
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(str(path), subfolder=sub, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TrainError(f"--vae {source}: cannot load an AutoencoderKL ({str(e).splitlines()[0]})") from None


def place_frozen(models, device, weight_dtype, *, custom_vae=False):
    """Text encoders and VAE on the device, frozen, in the compute dtype, but the VAE in float32 where the
    engine's rule (loading.vae_dtype) would not run it in fp16."""
    for enc in models.text_encoders:
        enc.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
    # A deliberate choice, not another rule: training only encodes (once per image), so float32 costs little where
    # the engine would upcast, and an overflow there is a NaN loss rather than one bad image (diffusers' LCM
    # scripts keep the VAE in float32 too). A --vae the user picked (an fp16-fixed one) runs as given.
    vae_dt = weight_dtype
    if not custom_vae and vae_dtype(models.arch, models.vae, weight_dtype, device) != weight_dtype:
        vae_dt = torch.float32
    models.vae.to(device=device, dtype=vae_dt).eval().requires_grad_(False)


# ---- LoRA ---------------------------------------------------------------------------------------------------
def add_lora(unet, *, rank, alpha, targets):
    """Attach a trainable LoRA (peft) to the UNet's target modules; A random, B zero, so training starts at the
    base model. Returns the number of adapted modules."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
    except ImportError:
        raise TrainError("training a LoRA needs peft: pip install 'fewstep[train]'") from None

    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True))
    except ValueError as e:
        raise TrainError(f"--targets {','.join(targets)}: {str(e).splitlines()[0]}") from None
    from diffusers.training_utils import cast_training_params

    # the adapter trains in float32 whatever the frozen weights' dtype (mixed precision keeps fp32 masters)
    cast_training_params(unet, dtype=torch.float32)
    return sum(isinstance(m, LoraLayer) for m in unet.modules())


@contextmanager
def adapters_disabled(unet):
    """The UNet as the teacher (its LoRA off). peft's toggle also flips requires_grad, so this serves only no-grad
    passes that run before the student's forward."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def kohya_lora(unet, dtype=torch.float16):
    """The UNet's LoRA as a kohya-layout state dict with diffusers block names, the layout of the published
    LCM-LoRAs: lora_unet_<path with _>.lora_down.weight / .lora_up.weight / .alpha."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().to("cpu", dtype).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(module.lora_alpha["default"]), dtype=dtype)
    return sd


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) looks for


def lora_student(unet, cfg, device, weight_dtype):
    """The UNet, frozen in the compute dtype, with a trainable float32 LoRA (cfg's rank, alpha and targets)."""
    unet.to(device=device, dtype=weight_dtype)
    add_lora(unet, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.target_modules())
    return unet.train()


def save_lora(unet, folder, *, dtype, metadata):
    """Write folder/pytorch_lora_weights.safetensors (via a temporary name: never a half-written file)."""
    from safetensors.torch import save_file

    path = Path(folder) / LORA_FILE
    tmp = path.with_name(f".{path.name}.part")
    save_file(kohya_lora(unet, dtype), str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.replace(path)
    return path


# ---- full LCM student ---------------------------------------------------------------------------------------
def lcm_student(teacher_unet, time_cond_proj_dim):
    """A copy of the teacher UNet that also takes the guidance embedding (timestep_cond), starting equal to it.

    diffusers' script leaves the new cond_proj layer at its random init; zeroing it makes the student start
    exactly at the teacher, and the layer still learns (its gradient is the embedding times the upstream one).
    """
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise TrainError(f"the teacher UNet does not fit its own config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def save_pipeline(models, unet, out, *, dtype):
    """A diffusers folder with the LCM UNet and the LCMScheduler: LatentConsistencyModelPipeline for SD 1.x/2.x,
    StableDiffusionXLPipeline for SDXL-type models (as latent-consistency/lcm-sdxl is published)."""
    import inspect

    from diffusers import LCMScheduler, LatentConsistencyModelPipeline, StableDiffusionXLPipeline

    def cast(m):
        # in place: this is the run's last use of the networks, and a copy of a large UNet would double memory
        return m.to("cpu", dtype)

    known = inspect.signature(LCMScheduler.__init__).parameters
    scheduler = LCMScheduler.from_config({k: v for k, v in models.scheduler_config.items() if k in known})
    common = dict(vae=cast(models.vae), text_encoder=cast(models.text_encoders[0]), tokenizer=models.tokenizers[0],
                  unet=cast(unet), scheduler=scheduler)
    if len(models.text_encoders) > 1:
        pipe = StableDiffusionXLPipeline(text_encoder_2=cast(models.text_encoders[1]),
                                         tokenizer_2=models.tokenizers[1],
                                         force_zeros_for_empty_prompt=models.force_zeros_for_empty_prompt, **common)
    else:
        pipe = LatentConsistencyModelPipeline(safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False, **common)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
