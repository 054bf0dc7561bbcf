"""Other executors of the same modules. A backend replaces the hot callables of the fast path (the UNet call, the
decoder, the encoder), never the loop, the samplers or the adapter set: fewstep fuses adapters into the torch
weights as always, and a backend runs what those weights are now.

torch: the modules themselves (fewstep.speed). openvino: the same diffusers modules converted with
openvino.convert_model, the adapters fused before conversion (fewstep.backends.openvino), optionally int8 through
NNCF (fewstep.backends.quantize).
"""

import importlib.util

from ..errors import LoadError

BACKENDS = ("torch", "openvino")
QUANTIZE = ("int8",)


def check(name, device):
    """Refuse an unknown backend, or OpenVINO where it cannot run, with one clear line (before any loading)."""
    if name not in BACKENDS:
        raise LoadError(f"unknown backend {name!r} (use {' or '.join(BACKENDS)})")
    if name == "openvino":
        if device.type != "cpu":
            raise LoadError(f"the OpenVINO backend runs on the CPU, not on {device.type}: add --device cpu or use "
                            "--backend torch")
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise LoadError("the OpenVINO backend needs the openvino package: pip install 'fewstep[openvino]'") \
                from None


def check_quantize(mode, backend):
    """Refuse a quantization the backend cannot run, with one clear line (before any loading)."""
    if mode not in QUANTIZE:
        raise LoadError(f"unknown quantization {mode!r} (use {' or '.join(QUANTIZE)})")
    if backend != "openvino":
        raise LoadError(f"--quantize {mode} quantizes OpenVINO's converted models: add --backend openvino")
    if importlib.util.find_spec("nncf") is None:
        raise LoadError(f"--quantize {mode} needs the nncf package: pip install 'fewstep[int8]'")
