"""One wrapper turns a UNet into `denoise(x, t, alpha) -> (x0, eps)`: prediction type, CFG, guidance embedding and
SDXL's added conditions live here, once."""

import math

import torch


def to_x0_eps(out, x, alpha, prediction_type):
    """Clean latent and noise from a model output, for x = sqrt(alpha) x0 + sqrt(1 - alpha) eps."""
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (x - b * out) / a, out
    if prediction_type == "v_prediction":
        return a * x - b * out, a * out + b * x
    if prediction_type == "sample":
        return out, (x - a * out) / b
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def guidance_embedding(w, dim):
    """Sinusoidal embedding of 1000 * w (the full-LCM guidance input; LCM, Luo et al. 2023, sec. 4.2)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def make_denoiser(unet, cond, *, prediction_type, guidance=1.0, uncond=None, added=None, added_uncond=None,
                  timestep_cond=None, dtype=None, concat=None, control=None):
    """denoise(x, t, alpha) over `unet`; classifier-free guidance runs when `uncond` embeddings are given.

    cond / uncond: encoder hidden states; added / added_uncond: SDXL's {"text_embeds", "time_ids"}.
    With CFG the batch is [uncond, cond] in one UNet call, as diffusers orders it.
    The extra UNet inputs of the other modes: concat, channels appended to the UNet's input (an inpainting UNet's
    mask and masked-image latents, one per image: doubled here under CFG); control(inp, t, states, added) ->
    (down residuals, mid residual) from ControlNets, given the UNet's own input before the concat (both CFG halves).
    """
    dtype = dtype or unet.dtype
    cfg = uncond is not None
    if cfg:
        states = torch.cat([uncond, cond]).to(dtype)
        extra = None if added is None else {k: torch.cat([added_uncond[k], added[k]]).to(dtype) for k in added}
    else:
        states = cond.to(dtype)
        extra = None if added is None else {k: v.to(dtype) for k, v in added.items()}
    tcond = None if timestep_cond is None else timestep_cond.to(dtype)
    if concat is not None:
        concat = (torch.cat([concat, concat]) if cfg else concat).to(dtype)

    def denoise(x, t, alpha):
        inp = (torch.cat([x, x]) if cfg else x).to(dtype)
        if cfg and t.dim() > 0:  # one timestep per image (a stream batch): both halves get them
            t = torch.cat([t, t])
        kw = {}
        if control is not None:
            down, mid = control(inp, t, states, extra)
            kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        unet_in = inp if concat is None else torch.cat([inp, concat], dim=1)
        out = unet(unet_in, t, encoder_hidden_states=states, timestep_cond=tcond, added_cond_kwargs=extra,
                   return_dict=False, **kw)[0].float()
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        return to_x0_eps(out, x, alpha, prediction_type)

    return denoise
