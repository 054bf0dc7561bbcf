"""`fewstep eval shapes`: the shapes world's quality table (issue 5) for the shipped models or your own."""

import logging
import shlex
import sys


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="evaluate a model against a world with known answers",
                              description="Evaluate models of a world whose images can be checked by detectors.")
    sub = p.add_subparsers(dest="eval_command", required=True)
    s = sub.add_parser("shapes", help="the shapes world's table: teacher vs LCM-LoRA vs outline LoRA vs ControlNet",
                       description="Attribute accuracy, all-four-correct rate, outline rate and pixel distance to "
                                   "the teacher's 50-step image, for the teacher with Euler (1-50 steps) and the LCM "
                                   "sampler, its LCM-LoRA (1-8 steps) and the LCM-LoRA with the outline LoRA; and, "
                                   "where a ControlNet ships (or --controlnet), how often an edge map alone puts the "
                                   "right shape at the right position (prompts name only the colours). Writes "
                                   "results.md, results.json, grid.png (and control.png).")
    s.add_argument("--model", help="the teacher: a diffusers folder (default: the shipped shapes teacher)")
    s.add_argument("--lcm-lora", help="its LCM-LoRA (default: the shipped one)")
    s.add_argument("--outline-lora", help="the outline-style LoRA (default: the shipped one)")
    s.add_argument("--no-outline", action="store_true", help="leave out the outline rows")
    s.add_argument("--controlnet", help="the edge-map ControlNet: a diffusers ControlNet folder (default: the shipped "
                                        "one, when it ships)")
    s.add_argument("--no-controlnet", action="store_true", help="leave out the ControlNet rows")
    s.add_argument("--controlnet-only", action="store_true", help="only the ControlNet rows (and no grid.png)")
    s.add_argument("-n", "--n", type=int, default=200, help="captions and seeds (default 200, the issue's table)")
    s.add_argument("--guidance", type=float, help="the teacher's CFG (default 4, what it was trained and tuned for)")
    s.add_argument("--lcm-guidance", type=float, default=1.0,
                   help="guidance of the LCM-LoRA rows (default 1: no CFG, fewstep's default for LCM-LoRAs)")
    s.add_argument("--out", default="eval-shapes", help="folder for results.md, results.json, grid.png")
    s.add_argument("--batch", type=int, default=100, help="images per forward pass (default 100)")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_shapes)


def cmd_shapes(args):
    from pathlib import Path

    from ... import default_model
    from ...errors import RequestError

    if args.n < 1 or args.batch < 1:
        raise RequestError("--n and --batch must be at least 1")
    if (args.guidance is not None and args.guidance < 0) or args.lcm_guidance < 0:
        raise RequestError("--guidance and --lcm-guidance must be >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RequestError(f"--out {out}: exists and is not a folder")
    lcm = args.lcm_lora or default_model.default_lcm_lora()
    outline = None if args.no_outline else args.outline_lora or default_model.default_outline_lora()
    if lcm is None:
        raise RequestError("no LCM-LoRA: the shipped one is not installed; pass --lcm-lora FILE")
    if outline is None and not args.no_outline:
        raise RequestError("no outline LoRA: the shipped one is not installed; pass --outline-lora FILE or "
                           "--no-outline")

    import fewstep

    from . import table as t
    from .evaluate import EVAL_SEED
    from .table import TEACHER_GUIDANCE, generations, grid_image, markdown, run_table, standard_rows, targets, write

    # the ControlNet rows run where a ControlNet ships or is given: the table stands without them
    controlnet = None if args.no_controlnet else args.controlnet or t.shipped_controlnet()
    if args.controlnet_only and controlnet is None:
        raise RequestError("--controlnet-only: no ControlNet (none ships, or --no-controlnet): pass --controlnet DIR")

    guidance = TEACHER_GUIDANCE if args.guidance is None else args.guidance
    # a 1-step row may be poor: it is scored, not refused (no NaN check)
    engine = fewstep.load(args.model, device=args.device, dtype=args.dtype, lcm=False, check_finite=False)
    if engine.arch != "shapes":
        raise RequestError(f"{args.model}: a {engine.c.preset.title} model, not a model of the shapes world")
    engine.load_lora(lcm, name="lcm", weight=0.0, lcm=True)
    if outline is not None:
        engine.load_lora(outline, name="outline", weight=0.0)
    if controlnet is not None:
        engine.load_controlnet(str(controlnet), name=t.CONTROLNET)
    rows = [] if args.controlnet_only else standard_rows(guidance, args.lcm_guidance, outline=outline is not None)
    crows = t.control_rows(guidance, args.lcm_guidance) if controlnet is not None else []
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        total = (len(generations(rows, guidance)) + len(crows)) * args.n
        bar = tqdm(total=total, desc="eval shapes", unit="img", file=sys.stderr)
    log = logging.getLogger("fewstep")
    level = log.level
    log.setLevel(logging.ERROR)  # the rows' settings are deliberate: no per-request advice
    try:
        results, images = [], {}
        if rows:
            results, images = run_table(engine, rows, n=args.n, teacher_guidance=guidance, batch=args.batch,
                                        progress=bar.update if bar else None)
        cresults, cimages = [], {}
        if crows:
            cresults, cimages = t.run_control_table(engine, crows, n=args.n, batch=args.batch,
                                                    progress=bar.update if bar else None)
    finally:
        log.setLevel(level)
        if bar:
            bar.close()
    report = dict(world="shapes", n=args.n, seed=EVAL_SEED, model=str(args.model or default_model.NAME),
                  lcm_lora=str(lcm), outline_lora=str(outline), device=str(engine.device),
                  dtype=str(engine.dtype).replace("torch.", ""), command=_command(args), rows=results)
    report["targets"] = targets(results)
    cgrid = None
    if crows:
        shipped = "shipped (fewstep/data/shapes/controlnet)"
        report.update(controlnet=str(args.controlnet) if args.controlnet else shipped, control_rows=cresults,
                      control_targets=t.control_targets(cresults))
        cgrid = t.control_grid(crows, cimages, args.n)
    paths = write(report, grid_image(rows, images, args.n) if rows else None, out, cgrid)
    print(markdown(report), end="")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def _command(args):
    """The command line that reproduces this table."""
    parts = ["fewstep", "eval", "shapes"]
    for flag, value in (("--model", args.model), ("--lcm-lora", args.lcm_lora), ("--outline-lora", args.outline_lora),
                        ("--controlnet", args.controlnet),
                        ("--n", args.n if args.n != 200 else None), ("--guidance", args.guidance),
                        ("--lcm-guidance", args.lcm_guidance if args.lcm_guidance != 1.0 else None),
                        ("--device", None if args.device == "auto" else args.device),
                        ("--dtype", None if args.dtype == "auto" else args.dtype), ("--out", args.out)):
        if value is not None:
            parts += [flag, str(value)]
    for flag in ("no_outline", "no_controlnet", "controlnet_only"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    return shlex.join(parts)
