"""The pieces every fewstep trainer shares (the distillation and LoRA methods, the shapes teacher): the learning-rate
schedule, EMA networks and min-SNR loss weighting, as pure functions. Checkpoints are fewstep.train.checkpoint."""

import math

import torch


def lr_schedule(step, *, base, total, warmup=0, kind="cosine", floor=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup over `warmup` steps, then constant, or cosine
    from `base` down to `floor * base` at step `total`."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if kind == "cosine":
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))
    return base


def _tensors(x):
    return list(x.parameters()) if isinstance(x, torch.nn.Module) else list(x)


@torch.no_grad()
def ema_update(target, source, decay):
    """target <- decay * target + (1 - decay) * source, over two modules' parameters or two lists of tensors (an
    EMA network: LCM's target, the shapes teacher's evaluated weights); one fused kernel per dtype group."""
    t = _tensors(target)
    s = [p.detach().to(q.dtype) for p, q in zip(_tensors(source), t)]
    torch._foreach_lerp_(t, s, 1.0 - decay)


def min_snr_weight(alpha, gamma, prediction_type="epsilon"):
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr for an epsilon loss,
    min(snr, gamma) / (snr + 1) for a v loss; alpha is alpha_bar at each sample's timestep."""
    snr = alpha / (1 - alpha)
    weight = snr.clamp(max=gamma)
    return weight / (snr + 1) if prediction_type == "v_prediction" else weight / snr
