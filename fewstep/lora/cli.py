"""`fewstep lora info FILE` and `fewstep lora convert FILE --to kohya|peft OUT` (no torch at import)."""

import json

ARCH_CHOICES = ("sd15", "sd2", "sdxl")


def add_parser(subparsers):
    p = subparsers.add_parser("lora", help="inspect and convert LoRA files",
                              description="Inspect LoRA files and convert them between kohya and diffusers/peft "
                                          "layouts. Names are checked against a real architecture (built without "
                                          "weights), guessed from the file unless --arch or --model says.")
    sub = p.add_subparsers(dest="lora_command", required=True)
    i = sub.add_parser("info", help="format, architecture, ranks, alphas, targets and coverage of a LoRA file")
    i.add_argument("file", help="a LoRA .safetensors file, a folder or a hub id")
    _common(i)
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=cmd_info)
    c = sub.add_parser("convert", help="rewrite a LoRA file as kohya (diffusers block names), kohya-ldm or peft",
                       description="Rewrite a LoRA in another layout: kohya (A1111/ComfyUI/diffusers read it), "
                                   "kohya-ldm (original block names) or peft (diffusers' own; alpha/rank folded "
                                   "into lora_B). The file must map completely onto the architecture.")
    c.add_argument("file", help="the LoRA to convert")
    c.add_argument("out", help="the .safetensors file to write")
    c.add_argument("--to", required=True, choices=["kohya", "kohya-ldm", "peft"])
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast the factors (default: keep)")
    c.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    _common(c)
    c.set_defaults(func=cmd_convert)


def _common(p):
    p.add_argument("--arch", choices=ARCH_CHOICES, help="the architecture to resolve names against (default: guessed)")
    p.add_argument("--model", help="a diffusers model folder whose configs give the architecture (e.g. SSD-1B)")
    p.add_argument("--weight-name", help="the file inside a folder or hub repo holding several")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin/.pt files (they can run code)")


def cmd_info(args):
    from .tools import format_info, inspect_lora

    info = inspect_lora(args.file, arch=args.arch, model=args.model, allow_pickle=args.allow_pickle,
                        weight_name=args.weight_name)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_convert(args):
    from pathlib import Path

    from ..errors import RequestError
    from .tools import convert_lora

    if Path(args.out).exists() and not args.force:
        raise RequestError(f"{args.out} exists: pass --force to overwrite it")
    if not args.out.endswith(".safetensors"):
        raise RequestError(f"{args.out}: the output is a .safetensors file")
    done = convert_lora(args.file, args.out, to=args.to, arch=args.arch, model=args.model,
                        allow_pickle=args.allow_pickle, weight_name=args.weight_name, dtype=args.dtype)
    print(f"{done['file']}: {done['format']}, {done['modules']} modules, {done['tensors']} tensors "
          f"(names checked against {done['reference']})")
    return 0
