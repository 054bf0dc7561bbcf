"""The benchmark's other CPU systems, with no fewstep code in their path: diffusers' pipeline with its UNet and VAE
decoder run through OpenVINO as optimum-intel / FastSD CPU run them (the LoRA fused into the torch weights, then
openvino.convert_model, static shapes, OpenVINO's own CPU precision and the LATENCY hint), and the probe that
finds the fastest PyTorch configuration of diffusers' UNet on this machine (for "diffusers-tuned").
"""

import sys
import time

import torch  # this module is imported by run_bench only (`fewstep --help` never loads it)


def fastest_torch_config(unet, size, *, xl, device, candidates=None):
    """(dtype, channels_last, {label: seconds}) of the fastest UNet step among fp32/bf16 x NCHW/NHWC at this
    size, batch 1. `unet` is a throwaway: it is cast and re-laid out in place for each candidate (the values do not
    matter for speed), so the probe holds one copy of the UNet (SDXL fits)."""
    candidates = candidates or [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                (torch.bfloat16, True)]
    h = size // 8
    times = {}
    m = unet.to(device).eval().requires_grad_(False)
    for dtype, cl in candidates:
        m.to(dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
        x = torch.randn(1, m.config.in_channels, h, h, dtype=dtype)
        states = torch.randn(1, 77, m.config.cross_attention_dim, dtype=dtype)
        added = {"text_embeds": torch.randn(1, 1280, dtype=dtype), "time_ids": torch.zeros(1, 6, dtype=dtype)} \
            if xl else None
        with torch.no_grad():
            m(x, 500, states, added_cond_kwargs=added)  # warm-up: oneDNN chooses and caches its kernels
            t0 = time.perf_counter()
            m(x, 500, states, added_cond_kwargs=added)
            times[(dtype, cl)] = time.perf_counter() - t0
    best = min(times, key=times.get)
    labels = {f"{str(d).split('.')[-1]}{' channels_last' if c else ''}": t for (d, c), t in times.items()}
    return best[0], best[1], labels


class _UNetGraph(torch.nn.Module):
    """What is converted: the UNet over plain tensors (timestep as a float32 scalar), its sample out."""

    def __init__(self, unet, xl):
        super().__init__()
        self.unet, self.xl = unet, xl

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.xl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class _Compiled:
    """One converted model (dynamic shapes), reshaped and compiled once per input shapes (static, as optimum-intel's
    pipeline.reshape does for the CPU)."""

    def __init__(self, core, model, config):
        self.core, self.model, self.config, self.by_shape = core, model, config, {}

    def __call__(self, inputs):
        import openvino as ov

        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        if key not in self.by_shape:
            m = self.model.clone()
            m.reshape({k: ov.PartialShape(list(s)) for k, s in key})
            self.by_shape[key] = self.core.compile_model(m, "CPU", self.config)
        arrays = {k: v.detach().float().contiguous().numpy() for k, v in inputs.items()}  # 0-d stays 0-d
        return torch.from_numpy(self.by_shape[key](arrays)[0].copy())


def openvino_pipeline(pipe, lora, size, *, xl):
    """pipe (diffusers' fp32 pipeline) with the LoRA fused and its UNet and VAE decoder run through OpenVINO;
    returns (pipe, conversion seconds, the precision OpenVINO runs)."""
    import openvino as ov
    from diffusers.models.autoencoders.vae import DecoderOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; peft's layers go
    core = ov.Core()
    precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # e.g. bf16
    config = {"PERFORMANCE_HINT": "LATENCY"}
    unet, vae, h = pipe.unet, pipe.vae, size // pipe.vae_scale_factor
    example = dict(sample=torch.randn(1, unet.config.in_channels, h, h), timestep=torch.tensor(500.0),
                   encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim))
    if xl:
        example.update(text_embeds=torch.randn(1, 1280), time_ids=torch.zeros(1, 6))
    t0 = time.perf_counter()
    print("bench: converting diffusers' UNet and VAE decoder to OpenVINO...", file=sys.stderr, flush=True)
    with torch.no_grad():
        unet_model = ov.convert_model(_UNetGraph(unet, xl), example_input=example)
        dec_model = ov.convert_model(_DecoderGraph(vae), example_input={"latents": torch.randn(1, 4, h, h)})
    seconds = time.perf_counter() - t0
    run_unet, run_decoder = _Compiled(core, unet_model, config), _Compiled(core, dec_model, config)

    def unet_forward(sample, timestep, encoder_hidden_states=None, timestep_cond=None, cross_attention_kwargs=None,
                     added_cond_kwargs=None, return_dict=True, **_):
        inputs = dict(sample=sample, timestep=torch.as_tensor(timestep, dtype=torch.float32).reshape(()),
                      encoder_hidden_states=encoder_hidden_states)
        if xl:
            inputs.update(text_embeds=added_cond_kwargs["text_embeds"], time_ids=added_cond_kwargs["time_ids"])
        out = run_unet(inputs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def vae_decode(z, return_dict=True, generator=None):
        out = run_decoder({"latents": z})
        return DecoderOutput(sample=out) if return_dict else (out,)

    # the torch modules stay registered (the pipeline reads their configs and dtype); their calls go to OpenVINO
    unet.forward = unet_forward
    vae.decode = vae_decode
    return pipe, seconds, precision
