"""Random LoRA files for tiny models, in the layouts found in the wild."""

import torch

# the LCM-LoRA recipe's targets (attention, projections, feed-forward, resnet convs, samplers, time embedding)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def lora_targets(unet):
    return [name for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(TARGETS)]


def random_lora(unet, *, rank=4, alpha=2.0, seed=0, layout="kohya", scale=0.05):
    """A LoRA over the recipe's UNet targets: kohya keys with alphas, or peft keys (unet. prefix, no alpha)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in lora_targets(unet):
        w = unet.get_submodule(name).weight
        down_shape = (rank, *w.shape[1:])  # 3x3 convs get a 3x3 down and a 1x1 up (LoCon)
        up_shape = (w.shape[0], rank) + ((1, 1) if w.ndim == 4 else ())
        down = torch.randn(down_shape, generator=gen) * scale
        up = torch.randn(up_shape, generator=gen) * scale
        if layout == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        else:
            sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = down, up
    return sd
