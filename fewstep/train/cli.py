"""`fewstep train lcm-lora|lcm|lora|controlnet`: flags and/or a config file -> TrainConfig -> fewstep.train.train.

Light imports only: torch loads when a command runs, not when `fewstep --help` builds the parser.
"""

import argparse
import os

from .config import TARGETS, TrainConfig, TrainError, read_config_file

S = argparse.SUPPRESS  # flags not given stay absent, so a config file's values are not overridden by defaults


def _ints(text):
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, got {text!r}") from None


def _common(p, lora=True):
    d = TrainConfig.__dataclass_fields__
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=S, help="image folder (metadata.jsonl {file_name, text}, or .txt captions "
                   "next to the images; for controlnet also a control image per image: conditioning/<path> or "
                   "metadata's conditioning_image), tar shards (folder, shard-{000..099}.tar, glob), or NAME:ARG "
                   "(shapes:SEED, shapes:SEED,controlnet)")
    g.add_argument("--out", default=S, help="output folder: result, checkpoints/, validation/, log.jsonl, "
                   "train_config.json")
    g.add_argument("--config", default=S, help="JSON/TOML file of settings (flag names as keys); flags override it; "
                   "a run's train_config.json repeats that run")
    g.add_argument("--resolution", type=int, default=S, help="square training size (default: the model's native)")
    g.add_argument("--crop", choices=["center", "random"], default=S, help="crop after resizing (default center)")
    g.add_argument("--flip", action="store_true", default=S, help="random horizontal flips")
    g.add_argument("--num-workers", type=int, default=S, help="image-decoding threads (default 4)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=S, help=f"optimizer steps (default {d['max_steps'].default})")
    g.add_argument("--batch-size", type=int, default=S, help="examples per process per micro-step (default 16)")
    g.add_argument("--grad-accum", type=int, default=S, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=S, help="learning rate (default 1e-4 LoRAs, 1e-6 full LCM)")
    g.add_argument("--lr-warmup", type=int, default=S, help="linear warmup steps (default 0)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default=S)
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 1e-2)")
    g.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping (default 1)")
    g.add_argument("--seed", type=int, default=S, help="seed of the data order and every random draw (default 0)")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=S,
                   help="compute dtype (default: accelerate's config, else no); LoRA weights stay fp32")
    g.add_argument("--gradient-checkpointing", action="store_true", default=S, help="less memory, ~30%% slower")
    g.add_argument("--device", default=S, help="auto (default), cpu, cuda, mps; under accelerate launch each "
                   "process gets its own GPU")
    if lora:
        _lora(p)
    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--resume", nargs="?", const="latest", default=S, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest checkpoint (or the one given); exact")
    g.add_argument("--checkpoint-every", type=int, default=S, help="steps between checkpoints (default 500)")
    g.add_argument("--keep-checkpoints", type=int, default=S, help="newest checkpoints kept (default 3)")
    g.add_argument("--validate-every", type=int, default=S, help="steps between validation grids, plus one at the "
                   "end (default 500; 0: none)")
    g.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=S,
                   help="a validation prompt (repeatable; default: the first two captions of the data)")
    g.add_argument("--validation-steps", type=_ints, default=S, help="step counts (default 1,2,4,8 LCM; 25 lora, "
                   "controlnet)")
    g.add_argument("--validation-guidance", type=float, default=S)
    g.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default=S, help="dtype of the result "
                   "(default fp16 LoRA files, fp32 model and ControlNet folders)")
    g.add_argument("--vae", default=S, help="another VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix)")
    g.add_argument("--allow-pickle", action="store_true", default=S, help="allow .ckpt/.bin model files")
    g.add_argument("--quiet", "-q", action="store_true", default=S, help="no progress bar")


def _lora(p):
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=S, help="LoRA rank (default 64 lcm-lora, 16 lora)")
    g.add_argument("--lora-alpha", type=float, default=S, help="LoRA alpha (default: the rank)")
    g.add_argument("--targets", default=S, help=f"module name suffixes, comma-separated, or a preset: "
                   f"{', '.join(TARGETS)} (default lcm for lcm-lora, transformer for lora)")


def _distill(p, full):
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", dest="model", default=S, help="teacher: diffusers folder, .safetensors or hub id")
    g.add_argument("--w-min", type=float, default=S, help="guidance range, LCM form w = scale - 1 (default 5, "
                   "SDXL 3)")
    g.add_argument("--w-max", type=float, default=S, help="(default 15)")
    g.add_argument("--loss", choices=["huber", "l2"], default=S, help="default huber, c = --huber-c")
    g.add_argument("--huber-c", type=float, default=S, help="default 0.001")
    g.add_argument("--ddim-steps", type=int, default=S, help="DDIM solver grid points (default 50: skip 20)")
    g.add_argument("--timestep-scaling", type=float, default=S, help="boundary-condition scaling (default: the "
                   "teacher scheduler's, 10)")
    if full:
        g.add_argument("--ema-decay", type=float, default=S, help="target network EMA (default 0.95)")
        g.add_argument("--time-cond-proj-dim", type=int, default=S, help="guidance embedding width (default 256)")


def add_parser(subparsers):
    t = subparsers.add_parser("train", help="distil an LCM-LoRA or full LCM, fine-tune a LoRA, train a ControlNet",
                              description="Train. The same command runs data-parallel under `accelerate launch`.")
    sub = t.add_subparsers(dest="method", required=True)
    specs = [("lcm-lora", "distil an LCM-LoRA from a teacher (kohya-layout .safetensors)"),
             ("lcm", "distil a full LCM (diffusers folder with the guidance-embedding UNet)"),
             ("lora", "fine-tune a style LoRA with the noise-prediction loss"),
             ("controlnet", "train a ControlNet (ControlNetModel.from_unet) on a frozen base model: a diffusers "
                            "ControlNet folder")]
    for name, help_ in specs:
        p = sub.add_parser(name, help=help_, description=help_)
        if name in ("lora", "controlnet"):
            g = p.add_argument_group("fine-tuning")
            g.add_argument("--base", dest="model", default=S, help="base model: folder, .safetensors or hub id")
            g.add_argument("--caption-dropout", type=float, default=S, help="share of empty captions (default 0)")
            g.add_argument("--snr-gamma", type=float, default=S, help="min-SNR loss weighting gamma (e.g. 5)")
        else:
            _distill(p, full=name == "lcm")
        _common(p, lora=name in ("lcm-lora", "lora"))
        p.set_defaults(func=handle)


def config_from_args(args):
    """TrainConfig from parsed flags: the dataclass defaults, then the config file, then the flags."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given)
    values["method"] = args.method
    if isinstance(values.get("validation_prompts"), list):
        values["validation_prompts"] = tuple(values["validation_prompts"])
    flag = {"model": "--base" if args.method in ("lora", "controlnet") else "--teacher", "data": "--data",
            "out": "--out"}
    missing = [f for k, f in flag.items() if not values.get(k)]
    if missing:
        raise TrainError(f"train {args.method} needs {', '.join(missing)} (as flags or in --config)")
    return TrainConfig(**values)


def handle(args):
    from . import train

    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line from a data-parallel run, not one per process
        print(result)
    return 0
