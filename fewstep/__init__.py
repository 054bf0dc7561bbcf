"""fewstep: Stable Diffusion-family models in 1-8 steps (LCM-LoRA and the latent-consistency sampler)."""

__version__ = "0.1.0"

__all__ = ["load", "Engine", "GenerateRequest", "Generation", "FewstepError", "__version__"]


def load(source=None, *, device="auto", dtype="auto", lcm=True, allow_pickle=False, unet=None, recipe=None,
         prediction_type=None, check_finite=True, **speed):
    """Load a model (diffusers folder, hub id, single .safetensors file; None: the embedded default) as an Engine.

    lcm: True attaches the published LCM-LoRA for the detected architecture, a path or hub id attaches that file,
    False loads the model as it is (the standard 25-step pipeline). Full LCM models need no LoRA.
    unet: a UNet-only file replacing the model's (Lightning, DMD2, Hyper-SD UNets), with the recipe it needs
    (guessed from its file name when left out); prediction_type overrides the scheduler config's.
    speed: fewstep.speed.SpeedSettings fields (vae="tiny", compile=True, offload=True, channels_last=False, ...).
    """
    from .engine import load as load_engine

    return load_engine(source, device=device, dtype=dtype, lcm=lcm, allow_pickle=allow_pickle, unet=unet,
                       recipe=recipe, prediction_type=prediction_type, check_finite=check_finite, **speed)


def __getattr__(name):
    # light imports: torch and diffusers load only when these are touched
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "Generation":
        from .engine import Generation

        return Generation
    if name == "GenerateRequest":
        from .request import GenerateRequest

        return GenerateRequest
    if name == "FewstepError":
        from .errors import FewstepError

        return FewstepError
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
