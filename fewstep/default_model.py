"""The embedded default model: the shapes world's teacher and its LCM-LoRA, both trained by fewstep.

They ship as package data (a diffusers folder with fp16 weights, and a kohya-layout LoRA) so that `fewstep generate`
works offline on a fresh machine in 4 steps; fewstep/worlds/shapes/runs/ holds their training logs and commands.
"""

from pathlib import Path

from .arch import PRESETS

NAME = "shapes-teacher-v1"
SHIPPED = Path(__file__).resolve().parent / "data" / "shapes" / "teacher"
LCM_LORA = Path(__file__).resolve().parent / "data" / "shapes" / "lcm-lora.safetensors"
OUTLINE_LORA = Path(__file__).resolve().parent / "data" / "shapes" / "outline-lora.safetensors"
TEACHER_DEFAULTS = dict(PRESETS["shapes"].standard)  # what the teacher was evaluated with (fewstep.arch)


def default_model_path():
    """Folder of the default model."""
    return SHIPPED


def default_lcm_lora():
    """The shapes teacher's LCM-LoRA when it ships, else None."""
    return LCM_LORA if LCM_LORA.is_file() else None


def default_outline_lora():
    """The shapes teacher's outline-style LoRA (trained with `fewstep train lora`) when it ships, else None."""
    return OUTLINE_LORA if OUTLINE_LORA.is_file() else None
