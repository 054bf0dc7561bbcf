"""How fast, apart from what: memory format, compilation, the tiny decoder, offload. Model code stays eager.

Settings are chosen per device by `auto_settings`; `build` turns them into a FastPath (the decoder that runs and the
hot callables, compiled or graphed) that the Engine keeps, never rebound globals. It runs when the Engine is made,
before any adapter is fused, so adapters always fuse into weights already in their final memory layout.
"""

import contextlib
import logging
import time
from dataclasses import dataclass, replace

import torch

from .errors import LoadError

log = logging.getLogger("fewstep")

TINY_DECODERS = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}  # by preset.xl


@dataclass(frozen=True)
class SpeedSettings:
    """The fast-path switches; None means "decide for the device"."""

    channels_last: bool | None = None  # the UNet in NHWC
    decoder_channels_last: bool | None = None  # the full VAE decoder in NHWC (H100: NCHW decodes 1.5x faster)
    compile: bool = False  # torch.compile the UNet and the decoder (opt-in on CPU: compile takes minutes)
    compile_mode: str | None = None  # None: "max-autotune-no-cudagraphs" on CPU, "reduce-overhead" (CUDA graphs) on CUDA
    vae: str = "full"  # "full", "tiny" (TAESD/TAESDXL from the hub cache), or a path / hub id of an AutoencoderTiny
    offload: bool = False  # keep components on the CPU and move each to the GPU only while it runs
    prompt_cache: int = 64  # prompt embeddings kept for repeated prompts (0: off)
    attention_slicing: bool | None = None  # MPS only, for large images
    phase_upsample: bool | None = None  # the full VAE decoder's upsamplers as sub-pixel convolutions (CPU default)
    # let cuDNN time its convolution algorithms for our fixed shapes (CUDA); off: the H100 probe found it helped NCHW
    # steps, not channels_last ones (our default)
    cudnn_benchmark: bool = False
    cuda_graphs: bool = False  # replay the UNet step as a captured CUDA graph (no per-kernel launch cost)
    fused_qkv: bool = False  # one q/k/v (self-attention) and k/v (cross-attention) projection GEMM; no CPU gain
    backend: str = "torch"  # "openvino": the UNet and the VAE converted and run by OpenVINO (fewstep.backends)
    openvino_cache: str | None = None  # where converted models are kept (default: fewstep.backends.openvino)
    openvino_background: bool = False  # convert a new weight state in a thread, torch runs meanwhile (servers)
    quantize: str | None = None  # "int8": the OpenVINO UNet hybrid int8 (calibrated), the VAE int8 weights
    deep_cache: int = 1  # every n-th UNet call of a run full, the others reuse its deep features (1: off)
    tome: float = 0.0  # share of the first level's tokens merged before each self-attention (fewstep.tokenmerge)


def auto_settings(device, **overrides):
    """The defaults for a device: channels_last everywhere (oneDNN and cuDNN prefer NHWC convolutions)."""
    s = SpeedSettings(**overrides)
    if s.channels_last is None:
        s = replace(s, channels_last=device.type in ("cpu", "cuda"))
    if s.decoder_channels_last is None:
        s = replace(s, decoder_channels_last=s.channels_last and device.type == "cpu")
    if s.compile_mode is None and s.compile:
        s = replace(s, compile_mode="reduce-overhead" if device.type == "cuda" else "max-autotune-no-cudagraphs")
    if s.attention_slicing is None:
        s = replace(s, attention_slicing=False)
    if s.phase_upsample is None:
        s = replace(s, phase_upsample=device.type == "cpu")
    if s.cuda_graphs and (device.type != "cuda" or s.offload or s.compile):
        raise LoadError("--cuda-graphs needs a CUDA device, without --offload (weights must stay put) and without "
                        "--compile (its reduce-overhead mode already uses CUDA graphs)")
    if s.quantize is not None:
        from .backends import check_quantize

        check_quantize(s.quantize, s.backend)
    if s.backend != "torch":
        from .backends import check

        check(s.backend, device)
        if s.compile or s.cuda_graphs:
            raise LoadError(f"--backend {s.backend} runs its own compiled models: drop --compile / --cuda-graphs")
    from .featurecache import check_interval
    from .tokenmerge import check_ratio

    for flag, on in (("--deep-cache", check_interval(s.deep_cache) > 1), ("--tome", check_ratio(s.tome) > 0)):
        if on and (s.compile or s.cuda_graphs or s.backend != "torch"):
            raise LoadError(f"{flag} runs the eager UNet: drop --compile / --cuda-graphs / --backend")
    if s.offload and device.type != "cuda":
        raise LoadError("--offload keeps weights in CPU memory for a GPU; it does nothing on " + device.type)
    return s


def load_tiny_decoder(spec, xl, device, dtype):
    """AutoencoderTiny from "tiny" (the TAESD/TAESDXL hub repo), a local folder or a hub id."""
    from diffusers import AutoencoderTiny

    from .sources import resolve

    src = TINY_DECODERS[xl] if spec == "tiny" else spec
    path = resolve(src, what="tiny decoder", patterns=["config.json", "*.safetensors"],
                   expect="a folder with an AutoencoderTiny or a hub id")
    try:
        dec = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot load the tiny decoder from {src}: {str(e).splitlines()[0]}") from None
    return dec.to(device).eval().requires_grad_(False)


class FastPath:
    """What runs: the decoder (the full VAE, a view of it with sub-pixel upsamplers, or a tiny one) and the hot
    callables (eager modules, compiled functions or CUDA-graph replays); `report` says what was done."""

    def __init__(self, settings, unet_fn, decoder, decode_fn, report, encode_fn=None):
        self.settings, self.unet_fn, self.decoder, self.decode_fn, self.report = (settings, unet_fn, decoder,
                                                                                   decode_fn, report)
        self.encode_fn = encode_fn  # pixels -> latent distribution; None: the VAE's own encode

    def prepare(self, engine, req):
        """Per-request work of the callables before a request's steps (the OpenVINO UNet's int8 calibration)."""
        hook = getattr(self.unet_fn, "prepare", None)
        if hook is not None:
            hook(engine, req)


def build(components, device, dtype, settings=None, *, tiny_decoder=None):
    """The FastPath of settings over components (placed already); changes module layouts in place, so it runs
    before any adapter is fused (Engine.__init__). None settings: everything off (the eager modules as they are).

    tiny_decoder: an AutoencoderTiny to use when settings.vae is not "full" (benchmarks pass one with random weights).
    """
    c, done = components, {}
    settings = settings or SpeedSettings()
    decoder = c.vae
    if settings.vae not in ("full", None):
        decoder = tiny_decoder or load_tiny_decoder(settings.vae, c.preset.xl, device, dtype)
        done["decoder"] = "tiny"
    if settings.phase_upsample and decoder is c.vae:
        decoder, count = phase_upsample_view(c.vae)
        if count:
            done["phase_upsample"] = count
    if settings.fused_qkv:
        done["fused_qkv"] = fuse_qkv(c.unet)
    if settings.tome:
        from . import tokenmerge

        done["tome"] = tokenmerge.apply(c.unet, settings.tome)  # wraps the processors set so far (fused ones too)
    if settings.channels_last:
        c.unet.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if settings.decoder_channels_last:
        decoder.to(memory_format=torch.channels_last)
        done["decoder_channels_last"] = True
    if settings.attention_slicing and device.type == "mps":
        c.unet.set_attention_slice("auto")
        done["attention_slicing"] = True
    unet_fn, decode_fn = c.unet, decoder.decode
    if settings.compile:
        # Only the hot callables are compiled; weights change in place (LoRA fuse), so compiled code stays valid.
        unet_fn = torch.compile(c.unet, mode=settings.compile_mode, fullgraph=False, dynamic=False)
        decode_fn = torch.compile(decoder.decode, mode=settings.compile_mode, dynamic=False)
        done["compile"] = settings.compile_mode
    elif settings.cuda_graphs:
        unet_fn = GraphedUNet(c.unet)
        done["cuda_graphs"] = True
    if settings.deep_cache > 1:
        from . import featurecache

        unet_fn = featurecache.wrap(c.unet, settings.deep_cache)
        done["deep_cache"] = settings.deep_cache
    encode_fn = None
    if settings.backend == "openvino":
        from .backends import openvino

        # the sub-pixel upsamplers are a torch kernel choice (the same sums): OpenVINO converts diffusers' decoder
        source = c.vae if done.get("phase_upsample") else decoder
        unet_fn, decode_fn, encode_fn = openvino.wrap(c, source, dtype, label=c.name, cache=settings.openvino_cache,
                                                      background=settings.openvino_background,
                                                      quantize=settings.quantize)
        done["backend"] = "openvino"
    return FastPath(settings, unet_fn, decoder, decode_fn, done, encode_fn)


class PhaseUpsample(torch.nn.Module):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution) computed as one 2x2 convolution of the
    low-resolution input that yields the four output phases at once (sub-pixel convolution).

    Every output pixel (2i+a, 2j+b) of the original sees only input rows/columns i-1..i (a=0) or i..i+1 (a=1), so
    its 3x3 kernel collapses to 2x2 by summing the taps that land on the same input pixel: the same sums with 4/9 of
    the multiplications, and no 4x larger intermediate. The phase kernel is rebuilt when the conv weight changes.
    """

    def __init__(self, up):
        super().__init__()
        self.up = up  # the original module (its conv holds the weights; used as is for non-2x output sizes)
        self._cache = (None, None, None)

    def phase_weight(self):
        w, b = self.up.conv.weight, self.up.conv.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._cache[0] != key:
            wf = w.detach().float()
            rows = (torch.stack([wf[:, :, 0], wf[:, :, 1] + wf[:, :, 2]], 2),  # a = 0: input rows i-1, i
                    torch.stack([wf[:, :, 0] + wf[:, :, 1], wf[:, :, 2]], 2))  # a = 1: input rows i, i+1
            phases = [torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if col == 0 else
                      torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1) for r in rows for col in (0, 1)]
            fmt = torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            wp = torch.cat(phases).to(w.dtype).contiguous(memory_format=fmt)
            self._cache = (key, wp, None if b is None else b.detach().repeat(4))
        return self._cache[1], self._cache[2]

    def forward(self, x, output_size=None, *args, **kwargs):
        up = self.up
        n, c, h, w = x.shape
        if (output_size is not None and tuple(output_size) != (2 * h, 2 * w)) or up.norm is not None:
            return up(x, output_size, *args, **kwargs)
        weight, bias = self.phase_weight()
        out_ch = weight.shape[0] // 4
        q = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), weight, bias)  # (n, 4o, h+1, w+1)
        q = q.view(n, 2, 2, out_ch, h + 1, w + 1)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():  # NHWC in, NHWC out
            y = x.new_empty((n, h, 2, w, 2, out_ch))
            for a in (0, 1):
                for b in (0, 1):
                    y[:, :, a, :, b] = q[:, a, b, :, a:a + h, b:b + w].permute(0, 2, 3, 1)
            return y.view(n, 2 * h, 2 * w, out_ch).permute(0, 3, 1, 2)
        y = x.new_empty((n, out_ch, h, 2, w, 2))
        for a in (0, 1):
            for b in (0, 1):
                y[:, :, :, a, :, b] = q[:, a, b, :, a:a + h, b:b + w]
        return y.view(n, out_ch, 2 * h, 2 * w)


def _phase_ready(m):
    from diffusers.models.upsampling import Upsample2D

    conv = getattr(m, "conv", None)
    return (isinstance(m, Upsample2D) and m.use_conv and m.interpolate and not m.use_conv_transpose
            and isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)


def phase_upsample_view(vae):
    """(a view of vae whose decoder upsamplers are PhaseUpsample, how many were replaced).

    The view shares every parameter with vae; only the module containers on the way to the upsamplers are copied,
    so vae itself (its state dict, a pipeline sharing it) is untouched.
    """
    paths = [name for name, m in vae.named_modules() if name.startswith("decoder.") and _phase_ready(m)]
    view = vae
    for path in paths:
        view = _replaced(view, path.split("."), PhaseUpsample(vae.get_submodule(path)))
    return view, len(paths)


def _replaced(module, path, new):
    import copy

    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    head = path[0]
    clone._modules[head] = new if len(path) == 1 else _replaced(module._modules[head], path[1:], new)
    return clone


def warmup(engine, *, width=None, height=None, steps=2, num_images=1):
    """Run one small generation so that compilation (if any) happens now; returns its seconds."""
    t0 = time.perf_counter()
    engine.generate("warm-up", steps=steps, width=width, height=height, num_images=num_images, seed=0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def fuse_qkv(unet):
    """diffusers' fused attention projections, with to_q/to_k/to_v turned into views of the fused weight, so that
    fewstep's in-place LoRA fusion (which writes to_q.weight, ...) lands in the weight that runs. Returns the count.

    The views replace the separate weights (no extra memory); base copies saved earlier stay valid (they are copies).
    """
    from diffusers.models.attention_processor import Attention

    unet.fuse_qkv_projections()
    count = 0
    for m in unet.modules():
        if not isinstance(m, Attention) or not getattr(m, "fused_projections", False):
            continue
        fused, names = (m.to_qkv, ("to_q", "to_k", "to_v")) if hasattr(m, "to_qkv") else (m.to_kv, ("to_k", "to_v"))
        start = 0
        for name in names:
            lin = getattr(m, name)
            rows = lin.weight.shape[0]
            lin.weight = torch.nn.Parameter(fused.weight.data[start:start + rows], requires_grad=False)
            if lin.bias is not None:
                lin.bias = torch.nn.Parameter(fused.bias.data[start:start + rows], requires_grad=False)
            start += rows
        count += 1
    return count


class GraphedUNet:
    """The UNet call replayed from a captured CUDA graph, one graph per input shape (the few most recent kept).

    At batch 1 an SDXL step launches ~2,000 kernels; eager PyTorch spends longer launching them than the GPU spends
    running them, and a graph replays them all with one launch. Weights are read in place at replay, so fused LoRA
    weight changes (copy_ into the same storage) are seen; inputs are copied into the graph's own buffers.
    """

    KEEP = 4

    def __init__(self, unet):
        self.unet = unet
        self.graphs = {}  # key -> (graph, static inputs, static output)

    @property
    def dtype(self):
        return self.unet.dtype

    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                 return_dict=False, **kw):
        inputs = dict(sample=sample, timestep=torch.as_tensor(timestep, device=sample.device),
                      encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                      **{f"added.{k}": v for k, v in (added_cond_kwargs or {}).items()})
        if kw:  # anything unusual runs eagerly
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                             added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kw)
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items() if v is not None)
        if key not in self.graphs:
            while len(self.graphs) >= self.KEEP:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(inputs)
        graph, static, out = self.graphs.pop(key)
        self.graphs[key] = (graph, static, out)  # most recent last
        for k, v in inputs.items():
            if v is not None:
                static[k].copy_(v)
        graph.replay()
        return (out.clone(),)

    def _call(self, static):
        added = {k[6:]: v for k, v in static.items() if k.startswith("added.")}
        return self.unet(static["sample"], static["timestep"], static["encoder_hidden_states"],
                         timestep_cond=static.get("timestep_cond"), added_cond_kwargs=added or None,
                         return_dict=False)[0]

    def _capture(self, inputs):
        static = {k: v.clone() for k, v in inputs.items() if v is not None}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuDNN/cuBLAS choose and allocate here
                self._call(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._call(static)
        return graph, static, out


@contextlib.contextmanager
def cudnn_benchmark(on):
    """torch.backends.cudnn.benchmark set for fewstep's own work only, restored after (it is process-wide)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = bool(on)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class OnDevice:
    """Context that moves a module to the GPU for its use and back to the CPU after (model offload)."""

    def __init__(self, engine, module):
        self.engine, self.module = engine, module

    def __enter__(self):
        if self.engine.speed.offload:
            self.module.to(self.engine.device)
        return self.module

    def __exit__(self, *exc):
        if self.engine.speed.offload:
            self.module.to("cpu")
        return False
