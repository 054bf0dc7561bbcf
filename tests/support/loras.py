"""Random LoRA files for tiny (or meta-device real-size) models, in the layouts found in the wild.

Names are written here independently of fewstep.lora: original block names come from original_layout.unet_to_ldm,
the lead's converter for single-file checkpoints.
"""

import torch

from tests.support.original_layout import UNET, unet_to_ldm

# the LCM-LoRA recipe's targets (attention, projections, feed-forward, resnet convs, samplers, time embedding):
# 278 modules on a real SD 1.5 UNet and 788 on SDXL, as in the published files
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's text-encoder targets
LINEAR_CONV = (torch.nn.Linear, torch.nn.Conv2d)
OLD_TEXT = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def lora_targets(unet, ends=TARGETS):
    return [name for name, m in unet.named_modules() if isinstance(m, LINEAR_CONV) and name.endswith(ends)]


def text_targets(encoder):
    return [name for name, m in encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(TEXT_TARGETS)]


def random_factors(model, names, *, rank=4, seed=0, scale=0.05, dtype=torch.float32, meta=False):
    """{module path: (down, up)}; 3x3 convs get a 3x3 down and a 1x1 up (LoCon). meta: shapes only."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        down_shape = (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        if meta:
            out[name] = (torch.empty(down_shape, device="meta"), torch.empty(up_shape, device="meta"))
        else:
            out[name] = ((torch.randn(down_shape, generator=gen) * scale).to(dtype),
                         (torch.randn(up_shape, generator=gen) * scale).to(dtype))
    return out


def ldm_names(unet):
    """{diffusers module path: original path} from the lead's independent single-file converter."""
    converted = unet_to_ldm({k: None for k in unet.state_dict()})
    keys = list(unet.state_dict())
    return {k.removesuffix(".weight"): v.removeprefix(UNET).removesuffix(".weight")
            for k, v in zip(keys, converted) if k.endswith(".weight")}


def make_lora(parts, *, layout="kohya", alpha=None, xl=False, unet=None):
    """A state dict from {component: {path: (down, up)}} in one layout.

    kohya / kohya-ldm: flat names, lora_down/lora_up/alpha (alpha None: no alpha keys); kohya-ldm needs `unet` for
    the original names. peft: component prefixes, lora_A/lora_B; peft-bare: no unet. prefix and an adapter name
    leaked into the keys; diffusers-old: the attention-processor layout (attention and text mlp only). The peft and
    diffusers layouts have no alphas, so alpha / rank is folded into up for them.
    """
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_",
                    "text_encoder_2": "lora_te2_"}
    original = ldm_names(unet) if layout == "kohya-ldm" else {}
    sd = {}
    for component, factors in parts.items():
        for path, (down, up) in factors.items():
            if layout in ("kohya", "kohya-ldm"):
                name = original[path] if component == "unet" and original else path
                key = kohya_prefix[component] + name.replace(".", "_")
                sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
                if alpha is not None:
                    sd[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
                continue
            if alpha is not None:
                up = (up.float() * (alpha / down.shape[0])).to(up.dtype)
            if layout == "peft":
                sd[f"{component}.{path}.lora_A.weight"], sd[f"{component}.{path}.lora_B.weight"] = down, up
            elif layout == "peft-bare":
                prefix = "" if component == "unet" else f"{component}."
                sd[f"{prefix}{path}.lora_A.default_0.weight"] = down
                sd[f"{prefix}{path}.lora_B.default_0.weight"] = up
            elif layout == "diffusers-old":
                if component == "unet":
                    block, proj = ((path.removesuffix(".to_out.0"), "to_out") if path.endswith(".to_out.0")
                                   else path.rsplit(".", 1))
                    stem = f"unet.{block}.processor.{proj}_lora"
                elif path.endswith(("fc1", "fc2")):
                    stem = f"{component}.{path}.lora_linear_layer"
                else:
                    block, proj = path.rsplit(".", 1)
                    stem = f"{component}.{block}.{OLD_TEXT[proj]}_lora"
                sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up
            else:
                raise ValueError(layout)
    return sd


def random_lora(unet, *, rank=4, alpha=2.0, seed=0, layout="kohya", scale=0.05):
    """A LoRA over the recipe's UNet targets: kohya keys with alphas, or peft keys (unet. prefix, no alpha)."""
    factors = random_factors(unet, lora_targets(unet), rank=rank, seed=seed, scale=scale)
    return make_lora({"unet": factors}, layout=layout, alpha=alpha if layout.startswith("kohya") else None, unet=unet)
