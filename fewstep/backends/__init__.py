"""Other executors of the same modules. A backend replaces the hot callables of the fast path (the UNet call, the
decoder, the encoder), never the loop, the samplers or the adapter set: fewstep fuses adapters into the torch
weights as always, and a backend runs what those weights are now.

torch: the modules themselves (fewstep.speed). openvino: the same diffusers modules converted with
openvino.convert_model, the adapters fused before conversion (fewstep.backends.openvino).
"""

from ..errors import LoadError

BACKENDS = ("torch", "openvino")


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
