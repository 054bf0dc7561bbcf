"""Test helper: diffusers/transformers state dicts -> the original single-file layouts (LDM for SD 1.x/2.x, SGM for
SDXL), written independently of diffusers' converters so that tests can make original-layout files from tiny models."""

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               # diffusers' name survives in LCM checkpoints converted back to the original layout
               "time_embedding.cond_proj": "time_embedding.cond_proj"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def to_original(components, arch):
    """The single-file state dict of sd15 / sd2 / sdxl (or ssd1b) components, as the original repositories save it."""
    out = unet_to_ldm(components["unet"].state_dict())
    out.update(vae_to_ldm(components["vae"].state_dict()))
    if arch == "sd15":
        out.update(clip_to_ldm(components["text_encoder"].state_dict(), "cond_stage_model.transformer."))
    elif arch == "sd2":
        out.update(clip_to_openclip(components["text_encoder"].state_dict(), "cond_stage_model.model.",
                                    unused_last_layer=True))
    elif arch in ("sdxl", "ssd1b"):
        out.update(clip_to_ldm(components["text_encoder"].state_dict(), "conditioner.embedders.0.transformer."))
        out.update(clip_to_openclip(components["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    else:
        raise ValueError(arch)
    return out


def _resnet(rest):
    name, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[name]}.{tail}"


def unet_to_ldm(state_dict):
    """UNet2DConditionModel keys -> model.diffusion_model.{input_blocks, middle_block, output_blocks, ...}."""
    layers = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("down_blocks.0.resnets."))
    per = layers + 1  # original blocks per level: the resnets plus a downsampler (down) or one more resnet (up)
    up_with_attention = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in state_dict.items():
        head = key.rsplit(".", 1)[0]
        if head in _UNET_FIXED:
            new = f"{_UNET_FIXED[head]}.{key.rsplit('.', 1)[1]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            index = 1 + int(m[1]) * per + int(m[3])
            new = f"input_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{index}.1.{m[4]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            index = int(m[1]) * per + int(m[3])
            new = f"output_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block = int(m[1])
            # the upsampler follows the last resnet, after its attention when the block has one
            slot = 2 if block in up_with_attention else 1
            new = f"output_blocks.{block * per + layers}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(key)
        out[UNET + new] = value
    return out


def vae_to_ldm(state_dict):
    """AutoencoderKL keys -> first_stage_model.{encoder.down.i.block.j, decoder.up.i (reversed), mid.attn_1, ...}."""
    levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state_dict.items():
        new = key
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # the original decoder numbers its levels like the encoder (0 = full resolution) and runs them
            # in reverse, while diffusers numbers them in running order
            level = levels - 1 - int(m[1])
            new = f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[VAE + new] = value
    return out


def clip_to_ldm(state_dict, prefix):
    """HF CLIPTextModel keys under prefix + text_model. (SD 1.x, SDXL's first encoder)."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state_dict.items()
            if not key.endswith("position_ids")}


def clip_to_openclip(state_dict, prefix, *, unused_last_layer=False):
    """HF CLIP text keys -> OpenCLIP (fused in_proj, ln_1/ln_2, c_fc/c_proj, text_projection as x @ P).

    unused_last_layer appends the 24th-layer stand-in of SD 2.x files (and their square text_projection): the
    penultimate-layer encoder never runs it, so its values are arbitrary.
    """
    sd = {key.removeprefix("text_model."): value for key, value in state_dict.items()
          if not key.endswith("position_ids")}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"]}
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(layers):
        old, new = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{old}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{new}attn.in_proj_{kind}"] = torch.cat(qkv)
            for hf, oc in _OPENCLIP_LAYER.items():
                out[f"{new}{oc}.{kind}"] = sd[f"{old}{hf}.{kind}"]
    if unused_last_layer:
        generator = torch.Generator().manual_seed(0)
        new = f"transformer.resblocks.{layers}."
        for key, value in list(out.items()):
            if key.startswith(f"transformer.resblocks.{layers - 1}."):
                out[new + key.split(".", 3)[3]] = torch.randn(value.shape, generator=generator)
        hidden = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.randn(hidden, hidden, generator=generator)
        out["logit_scale"] = torch.tensor(4.6052)
    return {prefix + key: value for key, value in out.items()}
