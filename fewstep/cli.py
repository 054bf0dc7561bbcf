"""The fewstep command line: a thin layer over fewstep.load() and Engine.generate()."""

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from . import speed_cli as speed
from .errors import FewstepError, RequestError
from .recipes import RECIPES, SAMPLERS

MAX_STEPS = 1000  # the training schedule's length: no sampler runs more steps than it has timesteps
MAX_STEP_COUNTS = 64  # counts in one --steps range (an image and a grid cell each)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # as fewstep.schedules (which imports torch)

log = logging.getLogger("fewstep")

# Subcommand modules: each has add_parser(subparsers), which sets `func` to its handler(args) -> exit code.
# Their top-level imports stay light (no torch), so `fewstep --help` is fast.
SUBCOMMANDS = ["fewstep.lora.cli", "fewstep.serve.cli", "fewstep.train.cli", "fewstep.bench",
               "fewstep.worlds.shapes.cli", "fewstep.recipes_cli", "fewstep.stream_cli"]


def parse_steps(text):
    """"4" -> [4]; "1-8" -> [1, ..., 8]."""
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            if a < 1 or b < a:
                raise ValueError
            counts = list(range(a, b + 1))
        else:
            counts = [int(text)]
    except ValueError:
        raise RequestError(f"--steps takes a number or a range like 1-8, got {text!r}") from None
    if counts[-1] > MAX_STEPS or len(counts) > MAX_STEP_COUNTS:
        raise RequestError(f"--steps {text}: at most {MAX_STEPS} steps and {MAX_STEP_COUNTS} counts in a range "
                           "(one image each)")
    return counts


def parse_timesteps(text):
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise RequestError(f"--timesteps takes comma-separated integers like 999,759,499,259, got {text!r}") from None


def parse_lora(text):
    """SRC[:WEIGHT] -> (src, weight); a trailing part that is not a number belongs to the path."""
    src, sep, weight = text.rpartition(":")
    if sep:
        try:
            return src, float(weight)
        except ValueError:
            pass
    return text, 1.0


def preprocessor_names():
    """The built-in preprocessors (fewstep.control's; "canny"): `--control KIND:IMAGE` runs one on the image."""
    try:
        from .control import preprocessors
    except ModuleNotFoundError as e:
        if not str(e.name).startswith("fewstep"):  # a missing dependency of a present module is a real error
            raise
        return ("canny",)
    return tuple(preprocessors())


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def parse_control(text, kinds=("canny",)):
    """KIND_OR_MODEL:IMAGE[:SCALE[:START:END]] -> dict(kind, source, image, scale, start, end).

    Trailing numbers are the scale and the guidance window; a path with colons in it is split where the image part
    names a file (as parse_lora, a trailing part that is not a number belongs to the path).
    """
    flag = f"--control {text}"
    parts = text.split(":")
    numbers = []
    while len(parts) > 2 and len(numbers) < 3 and _number(parts[-1]) is not None:
        numbers.insert(0, _number(parts.pop()))
    if len(numbers) == 2:
        raise RequestError(f"{flag}: give SCALE or SCALE:START:END after the image, not two numbers")
    if len(parts) < 2 or not all(parts):
        raise RequestError(f"{flag}: use KIND_OR_MODEL:IMAGE[:SCALE[:START:END]], e.g. canny:photo.png:0.8")
    scale, start, end = (numbers + [0.0, 1.0]) if len(numbers) == 1 else (numbers or [1.0, 0.0, 1.0])
    if not 0 <= scale <= 10:
        raise RequestError(f"{flag}: SCALE must be in 0..10, got {scale:g}")
    if not 0 <= start < end <= 1:
        raise RequestError(f"{flag}: START and END are fractions of the steps with 0 <= START < END <= 1, got "
                           f"{start:g} and {end:g}")
    if parts[0] in kinds:
        return dict(kind=parts[0], source=None, image=":".join(parts[1:]), scale=scale, start=start, end=end)
    from .sources import is_hub_id, local_path

    splits = [(":".join(parts[:i]), ":".join(parts[i:])) for i in range(1, len(parts))]
    found = [(m, im) for m, im in splits if local_path(im).is_file()]
    both = [(m, im) for m, im in found if local_path(m).exists() or is_hub_id(m)]
    source, image = (both or found or splits)[0]
    if not (local_path(source).exists() or is_hub_id(source)):
        raise RequestError(f"{flag}: {source} is neither a preprocessor ({', '.join(kinds)}) nor a ControlNet "
                           "folder, file or hub id")
    return dict(kind=None, source=source, image=image, scale=scale, start=start, end=end)


def read_image(path, flag, noun, mode="RGB"):
    """A PIL image from a file (in `mode`; None: as stored): images.open_image's, its error naming the flag."""
    from .images import open_image

    def then(im):
        if mode is None:
            im.load()
            return im.copy()
        return im.convert(mode)

    try:
        return open_image(path, noun, then=then)
    except RequestError as e:
        raise RequestError(f"{flag}: {e}") from None


def build_parser(command=None):
    """The parser of every subcommand; for command "generate" (the one about to run), of generate's alone: the
    other subcommands' modules (server, trainer, bench...) are not imported for it."""
    from . import __version__

    p = argparse.ArgumentParser(prog="fewstep", description="Stable Diffusion-family models in 1-8 steps.")
    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images. Without --model the embedded default model is used.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--model", help="diffusers folder, hub id (owner/name) or single .safetensors checkpoint")
    g.add_argument("--lcm", nargs="?", const=True, default=True, metavar="PATH",
                   help="attach the LCM-LoRA for the model's architecture (the default unless another recipe is asked "
                        "for or a --lora/--unet file names one), or the one at PATH / hub id")
    g.add_argument("--no-lcm", dest="lcm", action="store_false",
                   help="no LCM-LoRA: the standard pipeline (euler, 25 steps, guidance 7.5)")
    g.add_argument("--lora", action="append", default=[], metavar="SRC[:WEIGHT]",
                   help="a LoRA file, folder or hub id with an optional weight (repeatable); a few-step LoRA "
                        "(Lightning, Hyper-SD, DMD2, PCM, TCD) sets the recipe its name says")
    g.add_argument("--lora-dir", help="folder that <lora:NAME:WEIGHT> tags in the prompt resolve against")
    g.add_argument("--unet", metavar="FILE", help="a UNet-only file or folder replacing the model's (Lightning, DMD2, "
                                                  "Hyper-SD UNets; diffusers or original layout)")
    g.add_argument("--recipe", choices=list(RECIPES), help="a few-step method's settings (see `fewstep recipes`); "
                                                           "default: what the model and its adapters need")
    g.add_argument("--prediction", choices=list(PREDICTION_TYPES),
                   help="override the model's prediction type (SDXL-Lightning's 1-step x0 UNet: sample)")
    g.add_argument("--sampler", choices=list(SAMPLERS), help="override the recipe's sampler")
    g.add_argument("--steps", help="number of steps, or a range like 1-8 (one image per count, and a grid)")
    g.add_argument("--timesteps", help="custom LCM/TCD timesteps, e.g. 999,759,499,259")
    g.add_argument("--guidance", type=float, help="<= 1: no CFG (LCM default 1); > 1: CFG with the negative prompt")
    g.add_argument("--negative", help="negative prompt (used when guidance > 1)")
    g.add_argument("--seed", type=int, help="seed of the first image (random when absent; always printed)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--init-image", help="image-to-image: the starting image")
    g.add_argument("--strength", type=float, help="image-to-image strength in (0, 1] (default 0.6)")
    g.add_argument("--mask", metavar="FILE", help="inpainting: white = repaint, black = keep (with --init-image)")
    g.add_argument("--mask-blur", type=int, default=0, metavar="N", help="blur the mask's edge by N pixels (0)")
    g.add_argument("--padding-mask-crop", type=int, metavar="N",
                   help="inpaint only the mask's box plus N pixels, at full size, and paste it back")
    g.add_argument("--control", action="append", default=[], metavar="KIND_OR_MODEL:IMAGE[:SCALE[:START:END]]",
                   help="a ControlNet (repeatable): KIND (canny) preprocesses IMAGE and loads the model family's "
                        "ControlNet for it; MODEL (folder, .safetensors file or hub id) takes a prepared IMAGE. "
                        "SCALE (1), START:END (0:1, fractions of the steps)")
    g.add_argument("--gamma", type=float, help="TCD stochasticity in [0, 1] (default: the recipe's, 0.3)")
    g.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    g.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.bin/.pt files for the model, UNet, LoRAs and ControlNets (they can run code)")
    g.add_argument("--out", default="outputs", help="output folder, or a .png file name (default: outputs/)")
    g.add_argument("--json", action="store_true", help="print paths, seeds and timings as JSON on stdout")
    g.add_argument("--verbose", "-v", action="store_true", help="also print LoRA reports and per-stage timings")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    speed.add_arguments(g)
    g.set_defaults(func=cmd_generate)
    for module in SUBCOMMANDS if command != "generate" else ():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if not module.startswith(str(e.name)):  # a missing dependency of a present module is a real error
                raise
    return p


def output_paths(out, n, stem):
    """n unused .png paths: inside the folder `out`, or derived from the file name `out`."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        if n == 1:
            return [out]
        return [out.with_name(f"{out.stem}-{i + 1}.png") for i in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    paths, taken = [], set()
    for i in range(n):
        base = f"{stem}-{i + 1}" if n > 1 else stem
        path, k = out / f"{base}.png", 1
        while path.exists() or path in taken:
            k += 1
            path = out / f"{base}_{k}.png"
        taken.add(path)
        paths.append(path)
    return paths


def check_out(out):
    """Refuse an --out that cannot be written before any work: a folder that cannot be made or written, a file
    where a folder is wanted, a .png name in a folder that cannot be. Makes the folder (it is made anyway)."""
    import os

    out = Path(out)
    folder = out.parent if out.suffix.lower() == ".png" else out
    if out.suffix.lower() == ".png" and out.is_dir():
        raise RequestError(f"--out {out}: is a folder, not a .png file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RequestError(f"--out {out}: {folder} is a file, not a folder") from None
    except OSError as e:
        raise RequestError(f"--out {out}: cannot make the folder {folder} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RequestError(f"--out {out}: the folder {folder} is not writable")


def check_steps(engine, req, step_counts):
    """Every step count of --steps, resolved by the engine before the first image: a count past the schedule is
    found before any work, not after the images before it were made."""
    from dataclasses import replace

    for steps in step_counts:
        try:
            engine.schedule(engine.resolve(replace(req, steps=steps))[0])
        except RequestError as e:
            raise RequestError(f"--steps {steps}: {e}") from None


def cmd_generate(args):
    import fewstep

    from .images import grid, parameters_text, save_png
    from .request import GenerateRequest

    from dataclasses import replace

    from .recipes import detect

    check_out(args.out)
    step_counts = parse_steps(args.steps) if args.steps else [None]
    timesteps = parse_timesteps(args.timesteps) if args.timesteps else None
    if timesteps and args.steps:
        raise RequestError("give --steps or --timesteps, not both")
    if args.init_image is None and args.strength is not None:
        raise RequestError("--strength only applies with --init-image")
    if args.mask is not None and args.init_image is None:
        raise RequestError("--mask needs --init-image: the image to paint into")
    if args.mask is None and (args.mask_blur or args.padding_mask_crop is not None):
        raise RequestError("--mask-blur and --padding-mask-crop only apply with --mask")
    if not 0 <= args.mask_blur <= 256:
        raise RequestError(f"--mask-blur takes 0..256 pixels, got {args.mask_blur}")
    if args.padding_mask_crop is not None and args.padding_mask_crop < 0:
        raise RequestError(f"--padding-mask-crop takes pixels >= 0, got {args.padding_mask_crop}")
    kinds = preprocessor_names() if args.control else ()
    controls = [parse_control(text, kinds) for text in args.control]
    for c in controls:
        c["picture"] = read_image(c["image"], f"--control {c['kind'] or c['source']}", "control image")
        if c["source"] is not None and not args.allow_pickle:
            from .sources import is_pickle

            if is_pickle(c["source"]):
                raise RequestError(f"--control {c['source']}: a pickle file can run code when loaded: pass "
                                   "--allow-pickle if you trust it")
    from .lora.prompt import adapters_for

    prompt, loras = adapters_for(args.prompt, [parse_lora(s) for s in args.lora], args.lora_dir)
    # the recipes the adapter and UNet files name (Lightning, Hyper-SD...): they set the defaults
    named = [(detect(Path(str(src)).name), src) for src, _, _ in loras]
    if args.unet:
        named.append((detect(Path(args.unet).name), args.unet))
    few_step = [(recipe, steps) for (recipe, steps), _ in named if recipe not in (None, "lcm")]
    if step_counts == [None] and timesteps is None and few_step and few_step[0][1]:
        step_counts = [few_step[0][1]]  # "..._4step_lora" runs 4 steps unless told otherwise
    seed = args.seed if args.seed is not None else __import__("secrets").randbelow(2**31)
    # the one request, checked before the (slow) load: invalid input costs nothing
    init = read_image(args.init_image, "--init-image", "init image") if args.init_image else None
    # the mask as stored: a transparent one is its alpha; the engine fits it to the image (and says so)
    mask = read_image(args.mask, "--mask", "mask", None) if args.mask is not None else None
    req = GenerateRequest(prompt=prompt, negative_prompt=args.negative, guidance=args.guidance, seed=seed,
                          recipe=args.recipe, sampler=args.sampler, timesteps=timesteps, width=args.width,
                          height=args.height, num_images=args.num_images, strength=args.strength, gamma=args.gamma,
                          init_image=init, mask=mask, mask_blur=args.mask_blur,
                          padding_mask_crop=args.padding_mask_crop)
    # a Lightning / Hyper-SD / DMD2... adapter replaces the LCM-LoRA, it does not join it
    lcm = False if few_step and args.lcm is True else args.lcm

    t0 = time.perf_counter()
    engine = fewstep.load(args.model, device=args.device, dtype=args.dtype, lcm=lcm, allow_pickle=args.allow_pickle,
                          unet=args.unet, recipe=args.recipe, prediction_type=args.prediction,
                          **speed.speed_kwargs(args))
    load_time = time.perf_counter() - t0
    for note in engine.c.notes:
        log.warning(note)
    if engine.lcm_lora and args.verbose:
        log.info(engine.loras[engine.lcm_lora].report.summary())
    for ((recipe, _), _), (src, weight, name) in zip(named, loras):
        report = engine.load_lora(src, name=name, weight=weight, allow_pickle=args.allow_pickle,
                                  recipe=None if recipe == "lcm" and engine.lcm_lora else recipe)
        if args.verbose:
            log.info(report.summary() + (f" (recipe {recipe})" if recipe else ""))
    req = replace(req, control=load_controls(engine, controls, args.allow_pickle))
    check_steps(engine, req, step_counts)
    runs, total = [], 0
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(desc="generating", unit="step", file=sys.stderr, leave=False)

    def on_step(i, n):
        if bar is not None:
            if i == 0:
                bar.total = (bar.total or 0) + n
                bar.refresh()
            bar.update(1)

    try:
        for steps in step_counts:
            result = engine.run(replace(req, steps=steps), callback=on_step)
            runs.append(result)
            total += len(result.images)
    finally:
        if bar is not None:
            bar.close()

    from . import __version__

    stem = f"fewstep-{seed}"
    records, all_images = [], []
    paths = output_paths(args.out, total, stem)
    k = 0
    for result in runs:
        params = dict(inpaint_params(req), **result.params, version=__version__,
                      timesteps=result.timesteps if timesteps else None)
        params.update(lora_params(engine, args.prompt, loras))
        for image, s in zip(result.images, result.seeds):
            save_png(image, paths[k], parameters_text(params, s))
            records.append(dict(path=str(paths[k]), seed=s, steps=result.steps_run, timesteps=result.timesteps))
            all_images.append(image)
            k += 1
    grid_path = None
    if len(runs) > 1:
        labels = [f"{r.steps_run} step{'s' if r.steps_run > 1 else ''}" for r in runs for _ in r.images]
        cols = len(runs) if args.num_images == 1 else None
        grid_path = Path(str(paths[0].parent / f"{stem}-grid.png"))
        if Path(args.out).suffix.lower() == ".png":
            grid_path = Path(args.out).with_name(f"{Path(args.out).stem}-grid.png")
        save_png(grid(all_images, labels, cols), grid_path,
                 parameters_text(dict(runs[0].params, version=__version__, steps=args.steps)
                                 | lora_params(engine, args.prompt, loras), seed))
    if args.json:
        print(json.dumps(dict(
            model=engine.c.name, arch=engine.arch, device=str(engine.device), dtype=str(engine.dtype).split(".")[-1],
            recipe=runs[0].params["recipe"], sampler=runs[0].params["sampler"], guidance=runs[0].params["guidance"],
            seed=seed, images=records,
            grid=str(grid_path) if grid_path else None, load_seconds=round(load_time, 4),
            loras={n: s.weight for n, s in engine.loras.items()},
            timings=[dict(r.timings, steps_run=r.steps_run) for r in runs],
            control=[dict(model=u.model, source=c["source"], image=c["image"], preprocess=u.preprocess,
                          scale=u.scale, start=u.start, end=u.end) for u, c in zip(req.control, controls)],
            mask=args.mask, mask_blur=args.mask_blur if args.mask else None,
            padding_mask_crop=args.padding_mask_crop,
            warnings=sorted({w for r in runs for w in r.warnings}), notes=engine.c.notes), indent=2))
    else:
        p0 = runs[0].params
        print(f"seed {seed}  recipe {p0['recipe']}  sampler {p0['sampler']}  guidance {p0['guidance']:g}  "
              f"model {engine.c.name}")
        for u, c in zip(req.control, controls):
            via = f"{u.preprocess} of {c['image']}" if u.preprocess else c["image"]
            print(f"control {u.model} ({via}) scale {u.scale:g} steps {u.start:g}-{u.end:g}")
        if args.mask:
            print(f"inpainting {args.init_image} where {args.mask} is white (blur {args.mask_blur})"
                  + (f", masked area + {args.padding_mask_crop} px" if args.padding_mask_crop is not None else ""))
        for r in records:
            print(f"{r['path']}  (seed {r['seed']}, {r['steps']} step{'s' if r['steps'] > 1 else ''})")
        if grid_path:
            print(f"{grid_path}  (grid)")
        if args.verbose:
            for r in runs:
                t = r.timings
                steps = " ".join(f"{s:.3f}" for s in t["steps"])
                print(f"timings ({r.steps_run} steps): text {t['text']:.3f}s, steps [{steps}]s, decode "
                      f"{t['decode']:.3f}s, total {t['total']:.3f}s")
    return 0


def lora_params(engine, prompt, loras):
    """The metadata fields of the LoRAs, as the server writes them (fewstep.images.parameters_text): the prompt as
    typed (its tags stay), the adapters the user named (the built-in LCM-LoRA is the recipe's, not named) and
    A1111's short hashes of their files."""
    from .lora.apply import lora_hash, lora_path

    hashes = {}
    for src, _, name in loras:
        try:
            hashes[name] = lora_hash(lora_path(src))
        except (OSError, FewstepError):  # not a file (a state dict, a pickle folder): no hash to give
            continue
    named = {name: engine.loras[name].weight for _, _, name in loras if engine.loras[name].weight != 0}
    return dict(prompt=prompt, loras=named, lora_hashes=hashes)


def load_controls(engine, controls, allow_pickle):
    """The ControlUnits of parsed --control values, loading each ControlNet once (a kind: the family's default)."""
    from .arch import controlnet_name, default_controlnet
    from .request import ControlUnit

    names, units = {}, []
    for c in controls:
        src = c["source"]
        if src is None:
            src = default_controlnet(engine.arch, c["kind"])
            if src is None:
                raise RequestError(f"--control {c['kind']}: fewstep knows no {c['kind']} ControlNet for "
                                   f"{engine.c.preset.title} models: give one as MODEL:IMAGE")
        if src not in names:
            stem = controlnet_name(src)
            name, k = stem, 1
            while name in engine.controlnets:
                k += 1
                name = f"{stem}-{k}"
            names[src] = engine.load_controlnet(src, name=name, allow_pickle=allow_pickle)
        units.append(ControlUnit(model=names[src], image=c["picture"], scale=c["scale"], start=c["start"],
                                 end=c["end"], preprocess=c["kind"]))
    return tuple(units)


def inpaint_params(req):
    """Metadata of inpainting the engine's describe() may leave out (A1111's Mask blur, Only masked padding)."""
    if req.mask is None:
        return {}
    return dict(mask_blur=req.mask_blur, padding_mask_crop=req.padding_mask_crop)


def quiet_libraries():
    """diffusers/transformers chatter (progress bars, deprecation notes) is not for fewstep's users."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fewstep: %(levelname)s: %(message)s"))
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")
    log.addHandler(handler)
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    log.propagate = False
    try:
        quiet_libraries()
        return args.func(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("fewstep: error: out of memory: lower --num-images or the size", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            print("fewstep: error: the device ran out of memory: lower --num-images or the size", file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
