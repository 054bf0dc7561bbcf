"""The OpenVINO backend: the UNet, the VAE decoder and the VAE encoder that fewstep loaded, converted with
openvino.convert_model (adapters already fused into their weights) and run by OpenVINO's CPU plugin.

What is converted is the torch module as it is at the first call with a new weight state: a fingerprint of its
weights (a strided sample of every tensor, recomputed only when a tensor's in-place version counter moves) keys
the converted model, so a LoRA weight change is a new conversion (SD1.5's UNet: ~2 min on 2 cores), and going back
to weights seen before is a cache hit. Converted models are saved as OpenVINO IR in the cache folder (keyed by
role, weights fingerprint, trace class and precision; the model's name and adapters are written beside them), so
the next process only reads and compiles. Shapes are static: each (input shapes) key is reshaped from the IR and
compiled once, the few most recent kept.

A weight state not converted yet is converted at once (with a progress line) or, with background=True (the
server), in a worker thread from a copy of the module while the torch module runs the calls meanwhile: a weight
change never stalls requests, it only runs them at torch's speed until the conversion is done. OpenVINO GenAI's
run-time LoRA (state variables holding the factors) would avoid re-conversion but runs the LoRA's matmuls unfused
at every step, the cost fewstep's fusion exists to remove; it is not used.

Calls OpenVINO cannot take as converted (ControlNet residuals) run on the torch module.

quantize="int8" (fewstep.backends.quantize): the UNet runs NNCF's hybrid int8, calibrated per request class (the
recipe, steps, guidance and size of the request being served) on the UNet's own inputs, and the VAE int8 weights;
the quantized IR is cached beside the fp32 one, keyed also by the mode and the calibration set. Until a request
class has its int8 model (a server still recording, or a failed quantization) its calls run on the fp32 model.
"""

import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import quantize as int8

log = logging.getLogger("fewstep")

KEEP_COMPILED = 3  # compiled (static-shape) models kept per role; each holds its own copy of the weights
KEEP_ON_DISK = 8  # converted models kept in the cache folder (least recently used removed)
SAMPLE = 4096  # elements sampled per tensor for the weights fingerprint
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# torch.jit.trace (inside convert_model) is not thread-safe: two runners' background workers tracing at once failed
# its sanity check ("Graphs differed across invocations"); NNCF's passes take the same lock (they share the cores)
_HEAVY = threading.Lock()


def cache_root(override=None):
    """Where converted models go: override, $FEWSTEP_OPENVINO_CACHE, $FEWSTEP_HOME/openvino or the user cache."""
    if override:
        return Path(override)
    if os.environ.get("FEWSTEP_OPENVINO_CACHE"):
        return Path(os.environ["FEWSTEP_OPENVINO_CACHE"])
    if os.environ.get("FEWSTEP_HOME"):
        return Path(os.environ["FEWSTEP_HOME"]) / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewstep" / "openvino"


def versions(module):
    """A cheap token of the module's weight state: every tensor's storage and in-place version counter (LoRA
    fusion writes with copy_/addmm_, which move it)."""
    return tuple((t.data_ptr(), t._version) for t in module.state_dict(keep_vars=True).values())


def fingerprint(module):
    """A hash of the module's weights: names, shapes, dtypes and a strided sample of every tensor (a fused LoRA
    changes every element of the weights it touches, so a sample sees it)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // SAMPLE)].float().cpu().numpy().tobytes())
    return h.hexdigest()


class _Ticker:
    """A one-line progress message with the elapsed seconds while a long step runs (stderr)."""

    def __init__(self, what):
        self.what, self.stop = what, threading.Event()

    def __enter__(self):
        self.t0 = time.perf_counter()
        tty = sys.stderr.isatty()
        log.info("%s...", self.what)
        if tty:
            self.thread = threading.Thread(target=self._tick, daemon=True)
            self.thread.start()
        else:
            print(f"{self.what}...", file=sys.stderr, flush=True)
        return self

    def _tick(self):
        while not self.stop.wait(1.0):
            print(f"\r{self.what}... {time.perf_counter() - self.t0:.0f}s", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self.stop.set()
        end = "\r" if sys.stderr.isatty() else ""
        how = "failed after" if exc[0] is not None else "done in"
        print(f"{end}{self.what}: {how} {time.perf_counter() - self.t0:.1f}s", file=sys.stderr, flush=True)
        return False


class Runner:
    """One torch module run through OpenVINO: converted per weight state and trace class, compiled per shape.

    call(module) -> a torch.nn.Module taking named float32 tensors (the inputs dict's keys) and returning one
    float32 tensor: the conversion target. trace_class(inputs) names what the torch trace bakes in besides shapes.
    """

    def __init__(self, role, module, call, *, precision, label, cache=None, background=False, trace_class=None,
                 quantize=None):
        import openvino

        self.ov = openvino
        self.core = openvino.Core()
        self.role, self.module, self.call, self.label = role, module, call, label
        self.precision, self.background = precision, background
        self.trace_class = trace_class or (lambda inputs: "")
        self.root = cache_root(cache)
        self.compiled = OrderedDict()  # (fingerprint, shapes) -> compiled model
        self.lock = threading.Lock()
        self.pending = {}  # key -> Future of a background conversion
        self.failed = set()  # keys OpenVINO could not convert or compile: they run on torch, not retried
        self.worker = None
        self._state = (None, None)  # (versions, fingerprint)
        self.stats = dict(openvino_calls=0, torch_calls=0, conversions=0, disk_hits=0, int8_calls=0,
                          quantizations=0, calibration_calls=0)
        # quantize: None, "weights" (int8 weights, the VAE) or "hybrid" (the UNet: needs a calibration set)
        self.quantize = quantize
        self.context = None  # hybrid: (calibration key, engine, request, prompts) of the request being served (prepare)
        self.recording = None  # a list while calibration runs: calls go to torch and their inputs are kept
        self.served = {}  # background hybrid: calibration key -> the served calls recorded so far

    # ---- keys ----------------------------------------------------------------------------------------------------
    def weights_key(self):
        ver = versions(self.module)
        if self._state[0] != ver:
            self._state = (ver, fingerprint(self.module))
        return self._state[1]

    def ir_dir(self, fp, trace, quant=None):
        ov_version = self.ov.__version__.split("-")[0]
        extra = "" if quant is None else f"|{quant}|nncf {int8.nncf_version()}"
        tag = hashlib.blake2b(f"{trace}|{self.precision}|{ov_version}{extra}".encode(), digest_size=6).hexdigest()
        return self.root / f"{self.role}-{fp}-{tag}"

    def quant_tag(self):
        """What this call's quantized model is keyed by: "int8-weights", the request class's calibration set, or
        None (fp32 only: no quantization, or no request context yet)."""
        if self.quantize == "weights":
            return "int8-weights"
        if self.quantize == "hybrid" and self.context is not None:
            return self.context[0]
        return None

    # ---- running -------------------------------------------------------------------------------------------------
    def __call__(self, inputs, fallback):
        """The module's output for inputs ({name: tensor}) through OpenVINO, or fallback() (the torch module) while
        a background conversion of this weight state runs."""
        if self.recording is not None:  # a calibration run: torch computes, the inputs are kept
            self.recording.append({k: v.detach().float().clone() for k, v in inputs.items()})
            self.stats["calibration_calls"] += 1
            return fallback()
        fp = self.weights_key()
        shapes = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        quant = self.quant_tag()
        keys = [(fp, shapes, quant)] + ([(fp, shapes, None)] if quant else [])  # int8 first, else fp32
        if self.background:  # fp32 first in the worker's queue: it serves meanwhile
            found = {key: self._ready(key, inputs) for key in reversed(keys)}
        else:  # int8 first, prepared now; fp32 only if that failed
            found = {}
            for key in keys:
                found[key] = self._ready(key, inputs)
                if found[key] is not None:
                    break
        key, compiled = next(((k, found[k]) for k in keys if found.get(k) is not None), (None, None))
        if compiled is None:
            self.stats["torch_calls"] += 1
            return fallback()
        self.stats["openvino_calls"] += 1
        if key[2]:
            self.stats["int8_calls"] += 1
        arrays = {k: v.detach().float().contiguous().numpy() for k, v in inputs.items()}
        out = compiled(arrays, share_inputs=True)[0]
        return torch.from_numpy(out.copy())

    def _ready(self, key, inputs):
        """The compiled model of key, prepared now (foreground) or queued for the worker (background); None when
        it is not there (yet)."""
        with self.lock:
            compiled = self.compiled.get(key)
            if compiled is not None:
                self.compiled.move_to_end(key)
                return compiled
        if key in self.failed:
            return None
        if self.background:
            self._convert_later(key, inputs)
            return None
        try:
            return self._prepare(key, self.module, inputs)
        except Exception:  # what OpenVINO (or NNCF) cannot take runs on fp32 / torch, with one warning
            what = "quantize" if key[2] else "convert"
            log.warning("OpenVINO could not %s the %s for %s; it runs on %s", what, self.role, key[1],
                        "the fp32 model" if key[2] else "torch", exc_info=log.isEnabledFor(logging.DEBUG))
            self.failed.add(key)
            return None

    def _convert_later(self, key, inputs):
        fp, _, quant = key
        with self.lock:
            if key in self.pending or key in self.compiled or key in self.failed:
                return
        if quant and self.quantize == "hybrid" and not self.ir_dir(fp, self.trace_class(inputs), quant).is_dir():
            # a server calibrates on the calls it serves (no extra work on its engine thread): recorded until there
            # are enough, then quantized in the worker
            calls = self.served.setdefault(quant, [])
            if len(calls) < int8.CALIBRATION_CALLS:
                calls.append({k: v.detach().float().clone() for k, v in inputs.items()})
            if len(calls) < int8.CALIBRATION_CALLS:
                return
        with self.lock:
            if key in self.pending:
                return
            if self.worker is None:
                self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"openvino-{self.role}")
            # a copy of the module as it is now: the engine may change its weights before the worker gets to it
            snapshot = self.module if self.ir_dir(key[0], self.trace_class(inputs)).is_dir() \
                else copy.deepcopy(self.module)
            example = {k: v.detach().float().clone() for k, v in inputs.items()}
            self.pending[key] = self.worker.submit(self._background, key, snapshot, example)

    def _background(self, key, snapshot, example):
        try:
            self._prepare(key, snapshot, example)
        except Exception:  # the torch module keeps serving this state
            log.exception("OpenVINO could not convert the %s; it runs on torch", self.role)
            self.failed.add(key)
        finally:
            with self.lock:
                self.pending.pop(key, None)

    def wait(self):
        """Block until background conversions are done (tests, benchmarks)."""
        while True:
            with self.lock:
                futures = list(self.pending.values())
            if not futures:
                return
            for f in futures:
                f.exception()

    def _prepare(self, key, module, inputs):
        fp, shapes, quant = key
        trace = self.trace_class(inputs)
        model = self._quantized(fp, trace, quant, module, inputs) if quant else \
            self._converted(fp, trace, module, inputs)
        model.reshape({k: self.ov.PartialShape(list(s)) for k, s in shapes})
        what = f"{self.role}{' (int8)' if quant else ''}"
        with _Ticker(f"OpenVINO: compiling the {what} for {' '.join(f'{k}{list(s)}' for k, s in shapes)}"):
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": self.precision,
                                                              "PERFORMANCE_HINT": "LATENCY"})
        with self.lock:
            self.compiled[key] = compiled
            if quant:  # the fp32 model that served meanwhile is not needed any more
                self.compiled.pop((fp, shapes, None), None)
            while len(self.compiled) > KEEP_COMPILED:
                self.compiled.popitem(last=False)
        return compiled

    def _quantized(self, fp, trace, quant, module, inputs):
        """The int8 ov.Model of this weight state: read from the cache folder, or quantized from the fp32 one."""
        folder = self.ir_dir(fp, trace, quant)
        cached = self._read_cached(folder)
        if cached is not None:
            return cached
        calibration = None
        if self.quantize == "hybrid":
            calls = self.served.pop(quant, None) if self.background else self._calibrate()
            if not calls:
                raise RuntimeError("no calibration set for the int8 UNet")
            calibration = int8.samples(calls)
        model = self._converted(fp, trace, module, inputs)
        what = f"{len(calibration)} calibration samples" if calibration else "weights only"
        with _Ticker(f"NNCF: quantizing the {self.role} of {self.label} to int8 ({what}; cached in {self.root})"):
            foreground = not self.background
            with _HEAVY:
                model = int8.hybrid(model, calibration, foreground=foreground) if calibration else \
                    int8.compress(model, foreground=foreground)
        self._save(folder, model, dict(quantize=quant, nncf=int8.nncf_version(),
                                       calibration_samples=len(calibration or ()), weights=fp, trace=trace))
        self.stats["quantizations"] += 1
        return self.core.read_model(folder / "model.xml")

    def _calibrate(self):
        """The calibration calls of the request being served: the engine's sampler on the calibration prompts,
        the UNet in torch (fewstep.backends.quantize.collect)."""
        quant, engine, req, prompts = self.context
        self.recording = []
        try:
            with _Ticker(f"NNCF: calibrating the int8 {self.role} ({len(prompts)} prompts, {req.sampler} "
                         f"{req.steps} steps, guidance {req.guidance:g}, {req.width}x{req.height})"):
                return int8.collect(engine, req, prompts, self.recording)
        finally:
            self.recording = None

    def _converted(self, fp, trace, module, inputs):
        """The ov.Model of this weight state: read from the cache folder, or converted and saved there."""
        folder = self.ir_dir(fp, trace)
        cached = self._read_cached(folder)
        if cached is not None:
            return cached
        with _Ticker(f"OpenVINO: converting the {self.role} of {self.label} (once per weights and shape class; "
                     f"cached in {self.root})"):
            example = {k: v.detach().float() for k, v in inputs.items()}
            if any(t.dtype != torch.float32 for t in module.state_dict().values()):
                # converted with bf16 weights, OpenVINO 2026.4's graphs returned NaN: convert an fp32 copy; the
                # precision hint (bf16) still sets what the CPU computes in
                module = (copy.deepcopy(module) if module is self.module else module).float()
            with _HEAVY, torch.no_grad(), warnings.catch_warnings():
                # the trace warns of every shape-dependent Python branch; the trace class keys exactly those
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                model = self.ov.convert_model(self.call(module), example_input=example)  # inputs named as keys
            self._save(folder, model, dict(weights=fp, trace=trace, inputs=list(example)))
        self.stats["conversions"] += 1
        return self.core.read_model(folder / "model.xml")

    def _read_cached(self, folder):
        """The ov.Model saved in folder (marked most recently used), or None when there is none."""
        xml = folder / "model.xml"
        if not xml.is_file():
            return None
        self.stats["disk_hits"] += 1
        os.utime(folder)  # most recently used
        return self.core.read_model(xml)

    def _save(self, folder, model, info):
        """model saved as folder/model.xml (through a temporary folder: readers never see half a model)."""
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        # weights kept as they are (no fp16 compression): the image must match the torch backend's
        self.ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)
        (tmp / "info.json").write_text(json.dumps(dict(role=self.role, model=self.label, precision=self.precision,
                                                       openvino=self.ov.__version__, **info)))
        try:
            tmp.rename(folder)
        except OSError:  # another process saved the same model first
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(self.root)


def _prune(root, keep=KEEP_ON_DISK):
    folders = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp" not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# ---- the modules fewstep runs ----------------------------------------------------------------------------------
class _UNetCall(torch.nn.Module):
    """The UNet over flat float32 inputs (what convert_model traces): casts to the UNet's dtype, float32 out."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, text_embeds=None, time_ids=None):
        dt = self.unet.dtype
        added = None if text_embeds is None else {"text_embeds": text_embeds.to(dt), "time_ids": time_ids.to(dt)}
        return self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt),
                         timestep_cond=None if timestep_cond is None else timestep_cond.to(dt),
                         added_cond_kwargs=added, return_dict=False)[0].float()


class _Decode(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents):
        return self.decoder.decode(latents.to(self.decoder.dtype), return_dict=False)[0].float()


class _Encode(torch.nn.Module):
    """The VAE encoder's moments (mean and log-variance), as AutoencoderKL.encode computes them before sampling."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels):
        return self.vae._encode(pixels.to(self.vae.dtype)).float()


class UNet:
    """engine.unet_fn through OpenVINO: the UNet's call signature, the torch UNet for what is not converted."""

    def __init__(self, unet, runner):
        self.unet, self.runner = unet, runner

    @property
    def dtype(self):
        return self.unet.dtype

    def prepare(self, engine, req):
        """Before a request's steps (fewstep.speed.FastPath.prepare): name its calibration set, so that its calls
        run the int8 model of its request class (calibrated at its first call, or from served calls)."""
        r = self.runner
        if r.quantize != "hybrid" or r.recording is not None:  # nothing to do, or a calibration run itself
            return
        if r.background:
            r.context = (int8.calibration_key("served", req), engine, req, ())
        else:
            prompts = int8.prompts_for(engine, req.steps)
            r.context = (int8.calibration_key("prompts", req, prompts), engine, req, prompts)

    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                 return_dict=False, **kw):
        def torch_call():
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                             added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kw)

        if kw:  # ControlNet residuals: the converted graph has no inputs for them
            return torch_call()
        inputs = dict(sample=sample, timestep=torch.as_tensor(timestep, dtype=torch.float32).reshape(()),
                      encoder_hidden_states=encoder_hidden_states)
        if timestep_cond is not None:
            inputs["timestep_cond"] = timestep_cond
        if added_cond_kwargs:
            inputs.update(text_embeds=added_cond_kwargs["text_embeds"], time_ids=added_cond_kwargs["time_ids"])
        out = self.runner(inputs, lambda: torch_call()[0])
        return (out.to(sample.dtype),)


def _unet_trace_class(unet):
    """What diffusers' UNet forward decides in Python from the input shapes (the trace bakes it in): whether the
    latent size needs explicit upsample sizes, and the large-batch contiguous copy in its upsamplers."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)

    def trace(inputs):
        n, _, h, w = inputs["sample"].shape
        return f"{sorted(inputs)}|{h % factor == 0 and w % factor == 0}|{n >= 64}"

    return trace


def _image_trace_class(inputs):
    (x,) = inputs.values()
    return f"{x.shape[0] >= 64}"


class Decoder:
    """decode_fn through OpenVINO (the decoder's decode(z, return_dict=False) signature)."""

    def __init__(self, decoder, runner):
        self.decoder, self.runner = decoder, runner

    def __call__(self, z, return_dict=False):
        out = self.runner({"latents": z}, lambda: self.decoder.decode(z, return_dict=False)[0])
        return (out.to(z.dtype),)


class Encoder:
    """encode_fn through OpenVINO: pixels -> the latent distribution, as vae.encode(x).latent_dist."""

    def __init__(self, vae, runner):
        self.vae, self.runner = vae, runner

    def __call__(self, x):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.runner({"pixels": x}, lambda: self.vae._encode(x))
        return DiagonalGaussianDistribution(moments.to(x.dtype))


def wrap(components, decoder, dtype, *, label, cache=None, background=False, quantize=None):
    """(unet_fn, decode_fn, encode_fn) running the components' UNet, the given decoder and the VAE's encoder
    through OpenVINO at the precision of dtype (bf16 where the engine runs bf16: OpenVINO's own CPU default on
    CPUs with bf16 units; f32 otherwise); quantize "int8": the UNet hybrid int8, the VAE int8 weights."""
    precision = PRECISIONS.get(dtype, "f32")
    c = components

    def runner(role, module, call, trace, quant):
        return Runner(role, module, call, precision=precision, label=label, cache=cache, background=background,
                      trace_class=trace, quantize=quant if quantize else None)

    unet = UNet(c.unet, runner("unet", c.unet, _UNetCall, _unet_trace_class(c.unet), "hybrid"))
    dec = Decoder(decoder, runner("decoder", decoder, _Decode, _image_trace_class, "weights"))
    enc = Encoder(c.vae, runner("encoder", c.vae, _Encode, _image_trace_class, "weights")) \
        if hasattr(c.vae, "_encode") else None
    return unet, dec, enc


def runners(fast):
    """The Runners of a fast path's OpenVINO callables (for wait() and stats)."""
    return [f.runner for f in (fast.unet_fn, fast.decode_fn, getattr(fast, "encode_fn", None))
            if isinstance(f, (UNet, Decoder, Encoder))]
