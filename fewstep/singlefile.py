"""Load one original-layout checkpoint (LDM: SD 1.x/2.x; SGM: SDXL, SSD-1B) into diffusers/transformers models, offline.

Key layouts are converted by diffusers' public converters (diffusers.loaders.single_file_utils). What this module owns:
detection, configs inferred from tensor shapes (plus per-family defaults for what weights cannot show), strict loading,
and the few places where the converters fall short (each marked "converter gap").
"""

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from fewstep.arch import BY_CROSS_WIDTH, CLIP_TOKEN_IDS, PRESETS, SD_SCHEDULER
from fewstep.errors import LoadError
from fewstep.sources import is_pickle

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SGM_TEXT_1 = "conditioner.embedders.0.transformer."
SGM_TEXT_2 = "conditioner.embedders.1.model."
# Per-family facts the weights do not show (heads, text encoder kind, sample sizes, VAE scaling, upcast attention,
# empty-prompt zeros) come from fewstep.arch's registry: the published diffusers configs (SD 1.5, SD 2.1, SDXL base,
# SSD-1B). SD 2.x's sizes are those of the 768-v models; 2.x-base (epsilon, 512 px) gets 64 / 512 (see _sample_sizes).


def read_state_dict(path, *, allow_pickle=False):
    """Tensors of a .safetensors file (or, with allow_pickle, of a trusted .ckpt/.bin/.pt/.pth/.pkl pickle)."""
    return _read(Path(path), allow_pickle)[0]


def _read(path, allow_pickle):
    """(tensors, hints): hints hold what a file says about itself besides tensors (global_step, prediction type)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LoadError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    hints = {}
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state_dict = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LoadError(f"{path}: not a readable safetensors file ({e}); the download may be incomplete") from None
        hints["prediction_type"] = metadata.get("modelspec.prediction_type")
    elif is_pickle(path):
        if not allow_pickle:
            raise LoadError(f"{path}: {suffix} files are Python pickles and can run code when loaded; use a "
                            ".safetensors file, or pass --allow-pickle (CLI) / allow_pickle=True if you trust it")
        try:
            # The caller vouched for the file; Lightning checkpoints hold objects that weights_only refuses.
            data = torch.load(str(path), map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as e:
            raise LoadError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        if not isinstance(data, dict):
            raise LoadError(f"{path}: holds a {type(data).__name__}, not a state dict")
        hints["global_step"] = data.get("global_step")
        data = data.get("state_dict", data)
        state_dict = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    else:
        raise LoadError(f"{path}: unsupported checkpoint type {suffix or '(no suffix)'}; expected .safetensors")
    if not state_dict:
        raise LoadError(f"{path}: holds no tensors")
    return state_dict, hints


def detect_arch(state_dict):
    """Architecture from the key layout: "sd15", "sd2", "sdxl" or "ssd1b"; LoadError for anything else.

    Inpainting checkpoints (9 UNet input channels: latents, mask, masked-image latents) are their family's.
    """
    conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        found = ", ".join(list(state_dict)[:3])
        raise LoadError(f"not a Stable Diffusion 1.x/2.x, SDXL or SSD-1B checkpoint (found keys like {found})")
    if "edm_mean" in state_dict:
        raise LoadError("Playground v2.5 (EDM) checkpoints are not supported")
    if _has_prefix(state_dict, "conditioner.embedders.0.model."):
        raise LoadError("SDXL refiner checkpoints are not supported; use an SDXL base model")
    # The text encoder's layout names the family; diffusers keys SD 2.x on a cross-attention width of 1024 instead,
    # which only holds for real sizes, so that is the fallback for files without a text encoder.
    if _has_prefix(state_dict, SD2_TEXT):
        return "sd2"
    if _has_prefix(state_dict, SD1_TEXT):
        return "sd15"
    if not _has_prefix(state_dict, SGM_TEXT_2):
        width = _cross_attention_dim(state_dict)
        if width not in BY_CROSS_WIDTH:
            raise LoadError(f"unrecognised UNet with cross-attention width {width} and no text encoder")
        if not PRESETS[BY_CROSS_WIDTH[width]].xl:
            return BY_CROSS_WIDTH[width]
    # SSD-1B is SDXL with transformer blocks removed: its mid block has no transformer and its up blocks are
    # shallower than the down blocks they mirror ([4, 4, 10], [2, 1, 1]); SDXL's depths are symmetric.
    return "sdxl" if _unet_layout(state_dict).symmetric() else "ssd1b"


def load_single_file(path, *, allow_pickle=False, torch_dtype=torch.float32):
    """Components of an original-layout checkpoint: arch, unet, vae, text encoder(s), tokenizer(s), scheduler config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from fewstep.tokenizers import bundled_tokenizer

    path = Path(path)
    state_dict, hints = _read(path, allow_pickle)
    try:
        arch = detect_arch(state_dict)
        family = PRESETS[arch]
        sgm = family.xl
        first_prefix = {"sd15": SD1_TEXT, "sd2": SD2_TEXT}.get(arch, SGM_TEXT_1)
        if not _has_prefix(state_dict, first_prefix) or (sgm and not _has_prefix(state_dict, SGM_TEXT_2)):
            raise LoadError("the checkpoint has no text encoder (UNet-only files are not supported); use a full "
                            "checkpoint or a diffusers folder")
        if not _has_prefix(state_dict, VAE):
            raise LoadError("the checkpoint has no VAE (first_stage_model.*); use a full checkpoint")
        prediction_type = _prediction_type(arch, state_dict, hints)
        # OpenCLIP's text_projection is applied as x @ P, so its second dimension is the pooled width.
        pooled_dim = _need(state_dict, SGM_TEXT_2 + "text_projection").shape[1] if sgm else None
        unet_config = unet_config_from_state_dict(state_dict, arch, pooled_dim=pooled_dim,
                                                  prediction_type=prediction_type)
        vae_config = vae_config_from_state_dict(state_dict, arch, prediction_type=prediction_type)
        latent = vae_config["latent_channels"]
        # an inpainting UNet takes the latents, the mask and the masked image's latents (2 x latent + 1)
        if unet_config["in_channels"] not in (latent, 2 * latent + 1):
            raise LoadError(f"the UNet takes {unet_config['in_channels']} channels but the VAE makes {latent} "
                            f"({2 * latent + 1} for inpainting); variants with other extra inputs (instruct-pix2pix, "
                            "upscalers) are not supported")

        out = dict(arch=arch)
        if family.text_kind == "openclip":
            text, act = _open_clip_to_hf(sfu, state_dict, first_prefix, penultimate=True), "gelu"
        else:
            text, act = _hf_clip(sfu.convert_ldm_clip_checkpoint(state_dict)), "quick_gelu"
        text_config = _text_config(text, act)
        out["text_encoder"] = _build(lambda: CLIPTextModel(text_config), text, "text encoder", torch_dtype, clip=True)
        out["tokenizer"] = bundled_tokenizer(family.text_kind)
        if sgm:
            text_2 = _open_clip_to_hf(sfu, state_dict, SGM_TEXT_2, penultimate=False)
            config_2 = _text_config(text_2, "gelu", projection_dim=pooled_dim)
            out["text_encoder_2"] = _build(lambda: CLIPTextModelWithProjection(config_2), text_2,
                                           "second text encoder", torch_dtype, clip=True)
            out["tokenizer_2"] = bundled_tokenizer("openclip")

        unet_weights = sfu.convert_ldm_unet_checkpoint(state_dict, unet_config)
        # Converter gap: LCM-distilled UNets keep diffusers' name for the guidance embedding (the diffusers-to-
        # original script passes unknown keys through) and convert_ldm_unet_checkpoint drops it.
        for name in ("weight", "bias"):
            key = f"{UNET}time_embedding.cond_proj.{name}"
            if key in state_dict:
                unet_weights[f"time_embedding.cond_proj.{name}"] = state_dict[key]
        out["unet"] = _build(lambda: UNet2DConditionModel(**unet_config), unet_weights, "UNet", torch_dtype)
        vae_weights = sfu.convert_ldm_vae_checkpoint(state_dict, vae_config)
        out["vae"] = _build(lambda: AutoencoderKL(**vae_config), vae_weights, "VAE", torch_dtype)
    except LoadError as e:
        raise LoadError(f"{path.name}: {e}") from None

    out["scheduler_config"] = dict(SD_SCHEDULER, prediction_type=prediction_type)
    out["force_zeros_for_empty_prompt"] = family.force_zeros_for_empty_prompt
    return out


def _prediction_type(arch, state_dict, hints):
    """epsilon or v_prediction; weights alone cannot tell, so explicit markers win, then diffusers' SD 2.x rule."""
    declared = (hints.get("prediction_type") or "").lower()
    if declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if declared in ("epsilon", "eps"):
        return "epsilon"
    # ComfyUI marks v-prediction checkpoints (SDXL ones included) with an empty "v_pred" tensor.
    if "v_pred" in state_dict:
        return "v_prediction"
    # diffusers' rule (_legacy_load_scheduler; from_single_file's default SD 2 config, stable-diffusion-2-1, agrees):
    # SD 2.x is v_prediction (the 768-v models) unless a .ckpt says global_step 875000, the 2.0-base / 2.1-base
    # 512 px models. A 2.x-base .safetensors without a marker is thus taken as v_prediction; callers can override.
    if arch == "sd2":
        # SD 2 inpainting (512-inpainting-ema) predicts epsilon, as from_single_file's inpainting_v2 config says
        conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.shape[1] == 9:
            return "epsilon"
        return "epsilon" if hints.get("global_step") == 875000 else "v_prediction"
    return "epsilon"


@dataclass(frozen=True)
class _Layout:
    """Transformer depth of every UNet attention (0 = none), per down level, per up block, and in the mid block."""

    channels: list
    layers: int
    down: list  # [level][resnet]
    up: list  # [up block][resnet]
    mid: int | None  # None: the mid block is a single resnet (SSD-1B)

    def symmetric(self):
        """Up blocks mirror the down levels and the mid block is as deep as the last level (SD, SDXL)."""
        mirrored = [[depths[0]] * (self.layers + 1) for depths in reversed(self.down)]
        uniform = all(len(set(depths)) == 1 for depths in self.down)
        return uniform and self.up == mirrored and self.mid == self.down[-1][0]


_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle_block\.(\d+)\.(.+)")


def _unet_layout(state_dict):
    """The UNet's block structure, read from its original key names."""
    blocks = {"input_blocks": {}, "output_blocks": {}}
    middle = {}
    for key in state_dict:
        if not key.startswith(UNET):
            continue
        key = key[len(UNET):]
        if m := _BLOCK.fullmatch(key):
            blocks[m[1]].setdefault(int(m[2]), {}).setdefault(int(m[3]), []).append(m[4])
        elif m := _MIDDLE.fullmatch(key):
            middle.setdefault(int(m[1]), []).append(m[2])

    def depth(names):
        return len({name.split(".")[1] for name in names if name.startswith("transformer_blocks.")})

    inputs, outputs = blocks["input_blocks"], blocks["output_blocks"]
    levels, channels = [[]], []
    for i in range(1, max(inputs, default=0) + 1):
        parts = inputs.get(i, {})
        if any(name.startswith("op.") for name in parts.get(0, [])):
            levels.append([])
        elif parts:
            if not levels[-1]:
                channels.append(_need(state_dict, f"{UNET}input_blocks.{i}.0.out_layers.3.weight").shape[0])
            levels[-1].append(depth(parts.get(1, [])))
        else:
            raise LoadError(f"the UNet has no input block {i}")
    layers = len(levels[0])
    if not layers or any(len(level) != layers for level in levels) or len(outputs) != len(levels) * (layers + 1):
        raise LoadError("unrecognised UNet layout (uneven blocks per level)")
    up = [[depth(outputs[b * (layers + 1) + r].get(1, [])) for r in range(layers + 1)] for b in range(len(levels))]
    if sorted(middle) == [0, 1, 2]:
        mid = depth(middle[1])
    elif sorted(middle) == [0]:
        mid = None
    else:
        raise LoadError("unrecognised UNet mid block")
    return _Layout(channels, layers, levels, up, mid)


def _cross_attention_dim(state_dict):
    for key, value in state_dict.items():
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight"):
            return value.shape[1]
    raise LoadError("the UNet has no cross-attention layers")


def unet_config_from_state_dict(state_dict, arch, *, pooled_dim=None, prediction_type="epsilon"):
    """UNet2DConditionModel config: structure from the tensors, heads and sizes from the family defaults."""
    family = PRESETS[arch]
    layout = _unet_layout(state_dict)
    last = len(layout.down) - 1

    def block_type(depths, kind):
        if all(depths):
            return f"CrossAttn{kind}Block2D"
        if not any(depths):
            return f"{kind}Block2D"
        raise LoadError(f"unsupported UNet: a {kind.lower()} block mixes layers with and without attention")

    # Depth per level; levels without attention take 1 (diffusers' default) except the last, whose value diffusers
    # also uses for the mid block.
    per_level = []
    for level, depths in enumerate(layout.down):
        if any(depths):
            per_level.append(depths[0] if len(set(depths)) == 1 else list(depths))
        else:
            per_level.append(layout.mid if level == last and layout.mid else 1)
    if layout.mid is not None and per_level[-1] != layout.mid:
        raise LoadError("unsupported UNet: its mid block and last level have different transformer depths")

    proj_in = next((value for key, value in state_dict.items()
                    if key.startswith(UNET) and key.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise LoadError("the UNet has no attention blocks")
    conv_in = _need(state_dict, UNET + "input_blocks.0.0.weight")
    if family.heads_per_block is not None:
        heads = family.heads_per_block
    else:
        heads = [max(1, channels // 64) for channels in layout.channels]
    config = dict(
        sample_size=_sample_sizes(arch, prediction_type)[0],
        in_channels=conv_in.shape[1],
        out_channels=_need(state_dict, UNET + "out.2.weight").shape[0],
        down_block_types=[block_type(depths, "Down") for depths in layout.down],
        up_block_types=[block_type(depths, "Up") for depths in layout.up],
        mid_block_type="UNetMidBlock2DCrossAttn" if layout.mid else "UNetMidBlock2D",
        block_out_channels=list(layout.channels),
        layers_per_block=layout.layers,
        cross_attention_dim=_cross_attention_dim(state_dict),
        attention_head_dim=heads,
        # proj_in is a Linear in SD 2.x / SDXL and a 1x1 conv in SD 1.x.
        use_linear_projection=proj_in.ndim == 2,
        transformer_layers_per_block=per_level[0] if all(v == per_level[0] for v in per_level) else per_level,
        upcast_attention=family.upcast_attention,
    )
    # diffusers mirrors the down depths onto the up blocks unless told otherwise (SSD-1B's up blocks differ).
    mirrored = all(isinstance(value, int) for value in per_level) and all(
        not any(depths) or depths == [value] * (layout.layers + 1)
        for depths, value in zip(layout.up, reversed(per_level)))
    if not mirrored:
        config["reverse_transformer_layers_per_block"] = [
            depths if any(depths) else [1] * (layout.layers + 1) for depths in layout.up]
    time_embed_dim = _need(state_dict, UNET + "time_embed.0.weight").shape[0]
    if time_embed_dim != 4 * layout.channels[0]:
        config["time_embedding_dim"] = time_embed_dim
    if UNET + "time_embedding.cond_proj.weight" in state_dict:
        config["time_cond_proj_dim"] = state_dict[UNET + "time_embedding.cond_proj.weight"].shape[1]
    label = state_dict.get(UNET + "label_emb.0.0.weight")
    if label is not None:
        if not family.xl or pooled_dim is None:
            raise LoadError("unsupported UNet with a class/label embedding (unCLIP or upscaler variant)")
        # SDXL's added condition: pooled text embedding + 6 Fourier-embedded size/crop numbers.
        time_dim, remainder = divmod(label.shape[1] - pooled_dim, 6)
        if remainder or time_dim <= 0:
            raise LoadError(f"SDXL added-condition width {label.shape[1]} does not fit a pooled width {pooled_dim}")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=label.shape[1])
    return config


def vae_config_from_state_dict(state_dict, arch, *, prediction_type="epsilon"):
    """AutoencoderKL config: channels and depth from the tensors, scaling factor from the family."""
    family = PRESETS[arch]
    encoder = VAE + "encoder."
    levels = sorted({int(key.split(".")[3]) for key in state_dict if key.startswith(encoder + "down.")})
    if not levels:
        raise LoadError("the VAE has no encoder blocks")
    blocks = {int(key.split(".")[5]) for key in state_dict if key.startswith(encoder + "down.0.block.")}
    channels = [_need(state_dict, f"{encoder}down.{i}.block.0.conv1.weight").shape[0] for i in levels]
    return dict(
        sample_size=_sample_sizes(arch, prediction_type)[1],
        in_channels=_need(state_dict, encoder + "conv_in.weight").shape[1],
        out_channels=_need(state_dict, VAE + "decoder.conv_out.weight").shape[0],
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels,
        layers_per_block=len(blocks),
        latent_channels=_need(state_dict, VAE + "decoder.conv_in.weight").shape[1],
        scaling_factor=family.scaling_factor,
        force_upcast=True,
        mid_block_add_attention=encoder + "mid.attn_1.q.weight" in state_dict,
        use_quant_conv=VAE + "quant_conv.weight" in state_dict,
        use_post_quant_conv=VAE + "post_quant_conv.weight" in state_dict,
    )


def _sample_sizes(arch, prediction_type):
    """(UNet, VAE) sample sizes; SD 2.x-base (epsilon) is a 512 px model, the v-prediction SD 2.x models 768 px."""
    if arch == "sd2" and prediction_type == "epsilon":
        return 64, 512
    family = PRESETS[arch]
    return family.unet_sample_size, family.vae_sample_size


def _text_config(hf_state_dict, act, projection_dim=None):
    """CLIPTextConfig from HF-layout tensors; heads (not visible in weights) are one per 64 channels."""
    from transformers import CLIPTextConfig

    tokens = _need(hf_state_dict, "text_model.embeddings.token_embedding.weight")
    hidden = tokens.shape[1]
    layers = {int(key.split(".")[3]) for key in hf_state_dict if key.startswith("text_model.encoder.layers.")}
    return CLIPTextConfig(
        vocab_size=tokens.shape[0], hidden_size=hidden, num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=_need(hf_state_dict, "text_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        max_position_embeddings=_need(hf_state_dict, "text_model.embeddings.position_embedding.weight").shape[0],
        hidden_act=act, projection_dim=projection_dim or hidden, **CLIP_TOKEN_IDS)


def _hf_clip(state_dict):
    """HF CLIP tensors as `text_model.*` keys, whichever way the file (or transformers version) spelled them."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("text_model.")
        # Converter gap: position_ids is a non-persistent buffer in current transformers; files from older versions
        # carry it (some merges with corrupted float values), and the model rebuilds it anyway.
        if key != "embeddings.position_ids":
            out[key if key == "text_projection.weight" else "text_model." + key] = value
    return out


def _open_clip_to_hf(sfu, state_dict, prefix, *, penultimate):
    """OpenCLIP text tower -> HF CLIP tensors via diffusers' converter; penultimate drops the last block (SD 2.x)."""
    tower = _with_prefix(state_dict, prefix)
    width = _need(tower, "token_embedding.weight").shape[1]
    if penultimate:
        # SD 2.x conditions on the penultimate layer, so diffusers' SD 2 text encoder has one layer less (23 for
        # ViT-H's 24) and no projection. Converter gap: its ignore list hard-codes resblocks.23; the last block
        # is dropped here by count, and the prefix is stripped so that list never matches.
        blocks = {int(key.split(".")[2]) for key in tower if key.startswith("transformer.resblocks.")}
        last = f"transformer.resblocks.{max(blocks, default=0)}."
        tower = {key: value for key, value in tower.items() if not key.startswith(last) and key != "text_projection"}
    # The stand-in model only answers the converter's fallback question: the width used to split q, k, v.
    stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    return _hf_clip(sfu.convert_open_clip_checkpoint(stand_in, tower, prefix=""))


def _with_prefix(state_dict, prefix):
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def _has_prefix(state_dict, prefix):
    return any(key.startswith(prefix) for key in state_dict)


def _need(state_dict, key):
    value = state_dict.get(key)
    if value is None:
        raise LoadError(f"the checkpoint is missing {key}; the file is incomplete or not a supported layout")
    return value


def _build(factory, weights, what, dtype, *, clip=False):
    """Model from factory() on the meta device, then the weights (cast to dtype) assigned with strict checks."""
    with torch.device("meta"):
        model = factory().eval()
    expected = model.state_dict()
    if clip and not hasattr(model, "text_model"):
        # transformers >= 5.6 flattened CLIPTextModel (no text_model. prefix).
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    # The converters look keys up with .get, so a tensor missing from the file arrives as None.
    present = {key: value for key, value in weights.items() if value is not None}
    missing = sorted(expected.keys() - present.keys())
    unexpected = sorted(present.keys() - expected.keys())
    if missing or unexpected:
        detail = [f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})"] if missing else []
        detail += [f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        raise LoadError(f"the {what} does not match its inferred architecture: {'; '.join(detail)}")
    for key, value in present.items():
        if value.shape != expected[key].shape:
            raise LoadError(f"the {what} tensor {key} has shape {tuple(value.shape)}, "
                            f"expected {tuple(expected[key].shape)}")
    # Casting tensors here rather than the model afterwards: ModelMixin.to(dtype) warns even when no module has to
    # stay in float32.
    present = {key: value.to(dtype) if value.is_floating_point() else value for key, value in present.items()}
    model.load_state_dict(present, strict=True, assign=True)
    if clip:
        # CLIP's position_ids is a non-persistent buffer: no file has it, so it is rebuilt off the meta device.
        embeddings = (model.text_model if hasattr(model, "text_model") else model).embeddings
        positions = torch.arange(embeddings.position_embedding.num_embeddings).expand((1, -1))
        embeddings.register_buffer("position_ids", positions, persistent=False)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left on the meta device after loading: {left[:3]}")
    return model
