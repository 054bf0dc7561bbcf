"""The trainer: LCM-LoRA and full-LCM distillation from any SD-family teacher, and style-LoRA fine-tuning.

`fewstep train lcm-lora|lcm|lora ...` on the command line; `fewstep.train.train(TrainConfig(...))` from Python.
Submodules import torch lazily so that `fewstep --help` stays fast.
"""

__all__ = ["TrainConfig", "train"]


def train(config, *, source=None):
    """Run a training job; returns the path of the result (LoRA file or model folder).

    source: an optional in-memory data source (see fewstep.train.data.Source) used instead of config.data.
    """
    from .loop import run

    return run(config, source=source)


def __getattr__(name):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'fewstep.train' has no attribute {name!r}")
