"""int8 for the OpenVINO backend (NNCF): the UNet quantized in the hybrid way optimum-intel quantizes diffusion
UNets, calibrated on its own inputs; the VAE's weights compressed to int8 (no calibration).

Hybrid, for the UNet: the MatMuls with a constant operand (the linear layers: attention projections, feed-forward,
time embedding) get int8 weights only (nncf.compress_weights), and everything else that NNCF can quantize
(the convolutions and the activation-by-activation MatMuls of attention) gets int8 activations and weights
(nncf.quantize, statistics from the calibration set; SmoothQuant off, NNCF's transformer model type).

The calibration set is what the UNet sees in the request being served: the engine's own sampler (same recipe,
sampler, steps, guidance, size) run on a few prompts, the UNet called in torch, its inputs recorded
(CALIBRATION_CALLS calls; CFG batches split into their halves). The shapes model calibrates on the shapes world's
captions (drawn with a seed other than the evaluation set's), other models on PROMPTS. A server (background
conversion) records the calls of the requests it serves instead, so calibrating never runs extra work on its
engine thread.
"""

import contextlib
import hashlib
import json
import logging
import math
import sys
from dataclasses import replace


MODES = ("int8",)
CALIBRATION_CALLS = 32  # UNet calls recorded (e.g. 8 prompts x 4 LCM steps); with CFG each gives two samples
CALIBRATION_SEED = 1000  # the calibration images' seeds (and the shapes captions' draw): not the evaluation set's
SHAPES_CAPTION_SEED = 17  # the shapes world's eval set uses seed 5 (fewstep.worlds.shapes.evaluate)
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a bowl of fruit on a wooden table, still life, soft light",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old man with a beard, studio lighting",
    "a city street at night in the rain, neon signs",
    "a cute corgi puppy sitting in the grass",
    "an isometric illustration of a tiny house, pastel colors",
    "a mountain lake with pine trees, morning fog",
    "a red sports car on a desert highway",
    "a plate of sushi, top view, food photography",
    "a fantasy castle on a cliff, digital art",
    "black and white pencil sketch of a cat",
    "a cozy living room with a fireplace, interior design",
    "abstract geometric shapes in bright colors",
    "a robot reading a book in a library",
    "a field of sunflowers under a blue sky",
)


class _Collected(Exception):
    """Raised after the last step of a calibration run: the decode is not needed."""


def prompts_for(engine, steps):
    """The calibration prompts for a model and a step count: enough runs for CALIBRATION_CALLS UNet calls."""
    n = max(2, math.ceil(CALIBRATION_CALLS / max(1, steps)))
    if engine.arch == "shapes":
        from ..worlds.shapes.world import sample_captions

        return list(sample_captions(SHAPES_CAPTION_SEED, n))
    return list(PROMPTS[:n])


def request_class(req):
    """What of a resolved request shapes the UNet's inputs, besides the prompt and the seed."""
    return dict(recipe=req.recipe, sampler=req.sampler, steps=req.steps,
                timesteps=None if req.timesteps is None else list(req.timesteps), guidance=req.guidance,
                gamma=req.gamma, original_steps=req.original_steps, width=req.width, height=req.height,
                negative_prompt=req.negative_prompt)


def calibration_key(source, req, prompts=()):
    """The calibration set's name in the cache key: its source ("prompts" and which, or "served"), the request
    class and the recipe of the set (calls, seeds)."""
    text = json.dumps(dict(source=source, prompts=list(prompts), request=request_class(req), calls=CALIBRATION_CALLS,
                           seed=CALIBRATION_SEED), sort_keys=True)
    return "int8-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def collect(engine, req, prompts, recording):
    """Run the engine's sampler on prompts with the request's settings (text-to-image), stopping after the last
    step; the UNet callable records its inputs into `recording` meanwhile (fewstep.backends.openvino.Runner)."""
    def stop(i, n):
        if i == n - 1:
            raise _Collected

    for i, prompt in enumerate(prompts):
        one = replace(req, prompt=(prompt,), num_images=1, seed=CALIBRATION_SEED + i, seeds=None, init_image=None,
                      mask=None, control=(), strength=None)
        try:
            engine.run(one, callback=stop)
        except _Collected:
            pass
        if len(recording) >= CALIBRATION_CALLS:
            break
    return recording


def samples(calls):
    """Batch-1 calibration samples (numpy, float32) from recorded UNet calls: batches split along their first
    dimension (CFG's [uncond, cond] halves become two samples), scalars kept."""
    out = []
    for inputs in calls:
        n = inputs["sample"].shape[0]
        for b in range(n):
            out.append({k: (v[b:b + 1] if v.ndim else v).float().contiguous().numpy() for k, v in inputs.items()})
    return out


@contextlib.contextmanager
def _quiet(foreground):
    """NNCF logs its plan at INFO on stdout and draws progress bars there: keep them off fewstep's stdout (in a
    server's worker thread stdout is left alone; redirecting it is process-wide)."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr) if foreground else contextlib.nullcontext():
        yield


def weighted_matmuls(model):
    """Friendly names of the MatMuls with a constant operand (through Convert/Reshape/FakeQuantize nodes)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(op.get_input_size()):
            node = op.input_value(port).get_node()
            while node.get_type_name() in ("Convert", "Reshape", "FakeQuantize") and node.get_input_size():
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def compress(model, *, foreground=True):
    """Weight-only int8 (the VAE decoder and encoder): every weight int8 with a per-channel scale."""
    import nncf

    with _quiet(foreground):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def hybrid(model, calibration, *, foreground=True):
    """The UNet's hybrid int8: weight-only for the linear layers, activations and weights for the rest."""
    import nncf
    from nncf.parameters import ModelType

    linear = weighted_matmuls(model)
    first = calibration[0]
    model.reshape({k: list(v.shape) for k, v in first.items()})  # batch 1, as the samples
    with _quiet(foreground):
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        advanced = nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.DISABLE)
        advanced.smooth_quant_alphas.matmul = -1  # off, as optimum-intel's hybrid mode
        return nncf.quantize(model, nncf.Dataset(calibration), preset=nncf.QuantizationPreset.MIXED,
                             model_type=ModelType.TRANSFORMER, subset_size=len(calibration),
                             ignored_scope=nncf.IgnoredScope(names=linear, validate=False),
                             advanced_parameters=advanced)


def nncf_version():
    from importlib.metadata import version

    return version("nncf")
