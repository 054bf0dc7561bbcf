"""The quality table of issue 5: the teacher against its LCM-LoRA, like the LCM paper evaluates LCMs.

For n fixed captions and seeds (evaluate.eval_set), every row generates one image per caption from the same initial
noise and reports attribute accuracy, the all-four-correct rate, the outline rate and the mean pixel distance to the
teacher's own 50-step Euler image of that caption and seed (for outline rows: the teacher with the outline LoRA at
the same weight, 50 Euler steps). One engine serves every row: the LoRAs are fused once and re-weighted per row.

The ControlNet rows (issue 12): the same n images of the world, but the prompt names only the colours ("a red shape
on a blue background") and the control image is the edge map of the target shape at its position; a case is right
when the detectors find that shape at that position.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...default_model import TEACHER_DEFAULTS
from .detect import detect
from .evaluate import ATTRIBUTES, EVAL_SEED, eval_set, generate, score
from .world import colors_caption, edge_map, render

SHIPPED_CONTROLNET = Path(__file__).resolve().parents[2] / "data" / "shapes" / "controlnet"
CONTROLNET = "edges"  # the name the ControlNet rows load the shapes ControlNet under
CONTROL_TARGET = 0.9  # issue 12: the LCM-LoRA at 4 steps draws shape S at position P in >= 90% of the cases


def shipped_controlnet():
    """The shapes teacher's edge-map ControlNet (trained with `fewstep train controlnet`) when it ships, else None."""
    return SHIPPED_CONTROLNET if (SHIPPED_CONTROLNET / "config.json").is_file() else None

REFERENCE_STEPS = 50


@dataclass(frozen=True)
class Row:
    """One configuration of the table."""

    label: str
    sampler: str
    steps: int
    guidance: float
    lcm: float = 0.0  # LCM-LoRA weight
    outline: float = 0.0  # outline LoRA weight; > 0 also asks for the outline style in the captions

    @property
    def loras(self):
        return {"lcm": self.lcm, "outline": self.outline}

    def reference(self, teacher_guidance):
        """The row whose images this row is measured against: the teacher (with this row's outline weight)."""
        return Row("reference", "euler", REFERENCE_STEPS, teacher_guidance, 0.0, self.outline)


TEACHER_GUIDANCE = TEACHER_DEFAULTS["guidance"]  # the teacher's CFG
LCM_GUIDANCE = 1.0  # LCM-LoRA rows: no CFG (the guidance is distilled in)


def standard_rows(teacher_guidance=TEACHER_GUIDANCE, lcm_guidance=LCM_GUIDANCE, outline=True):
    """The rows issue 5 asks for, in table order."""
    g = teacher_guidance
    rows = [Row(f"teacher + Euler {s}", "euler", s, g) for s in (1, 2, 4, 8, 25, 50)]
    rows += [Row(f"teacher + LCM sampler {s} (no LoRA)", "lcm", s, g) for s in (1, 2, 4, 8)]
    rows += [Row(f"LCM-LoRA {s}", "lcm", s, lcm_guidance, lcm=1.0) for s in (1, 2, 4, 8)]
    if outline:
        rows += [Row(f"LCM-LoRA 1.0 + outline {w} 4", "lcm", 4, lcm_guidance, lcm=1.0, outline=w) for w in (1.0, 0.8)]
    return rows


def run_table(engine, rows, *, n=200, seed=EVAL_SEED, teacher_guidance=TEACHER_GUIDANCE, batch=100, progress=None):
    """Generate, detect and score every row (plus the references it needs). Returns (results, images).

    engine has the LoRAs "lcm" and (when a row uses it) "outline" loaded; their weights are set per row and left
    at 0 afterwards. progress(k) is called with the number of images each batch made.
    """
    plain, outlined = eval_set(n, seed), eval_set(n, seed, outline=True)
    refs = {r: r.reference(teacher_guidance) for r in rows}
    images, seconds = {}, {}
    for row in sorted(generations(rows, teacher_guidance), key=lambda r: (r.lcm, r.outline)):  # few re-fusions
        key = _key(row)
        engine.set_lora_weights({k: w for k, w in row.loras.items() if w or k in engine.loras})
        attrs, captions, seeds = outlined if row.outline else plain
        t0 = time.perf_counter()
        images[key] = _generate(engine, captions, seeds, batch, progress, sampler=row.sampler, steps=row.steps,
                                guidance=row.guidance)
        seconds[key] = time.perf_counter() - t0
    engine.set_lora_weights({k: 0.0 for k in ("lcm", "outline") if k in engine.loras})
    results = []
    for row in rows:
        attrs = (outlined if row.outline else plain)[0]
        imgs = images[_key(row)]
        metrics = score(attrs, [detect(im) for im in imgs])
        metrics["pixel_distance"] = pixel_distance(imgs, images[_key(refs[row])])
        metrics["seconds_per_image"] = seconds[_key(row)] / n
        results.append({**asdict(row), **metrics})
    return results, images


def generations(rows, teacher_guidance=TEACHER_GUIDANCE):
    """The distinct configurations that rows and their references generate, one Row each (n images per Row)."""
    unique = {}
    for row in rows + [r.reference(teacher_guidance) for r in rows]:
        unique.setdefault(_key(row), row)
    return list(unique.values())


def _key(row):
    return (row.sampler, row.steps, row.guidance, row.lcm, row.outline)


def _generate(engine, captions, seeds, batch, progress, **request):
    out = []
    for i in range(0, len(captions), batch):
        out += generate(engine, captions[i:i + batch], seeds[i:i + batch], batch=batch, **request)
        if progress:
            progress(len(captions[i:i + batch]))
    return out


def pixel_distance(images, references):
    """Mean absolute difference per pixel and channel, on the 0-255 scale."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    b = np.stack([np.asarray(im, dtype=np.float32) for im in references])
    return float(np.abs(a - b).mean())


def targets(results):
    """Issue 5's targets checked against the table: (what, value, goal, met) for each one that the rows allow."""
    by = {r["label"]: r for r in results}
    out = []

    def add(what, value, goal, met):
        out.append({"target": what, "value": round(value, 3), "goal": goal, "met": bool(met)})

    t25, e4, l4 = by.get("teacher + Euler 25"), by.get("teacher + Euler 4"), by.get("LCM-LoRA 4")
    if t25:
        add("teacher + Euler 25 all-correct", t25["all"], ">= 0.85", t25["all"] >= 0.85)
    if t25 and l4:
        ratio = l4["all"] / max(t25["all"], 1e-9)
        add("LCM-LoRA 4 / teacher Euler 25 (all-correct)", ratio, ">= 0.9", ratio >= 0.9)
    if t25 and e4:
        ratio = e4["all"] / max(t25["all"], 1e-9)
        add("teacher Euler 4 / teacher Euler 25 (all-correct)", ratio, "<= 0.6", ratio <= 0.6)
    for r in results:
        if r["outline"] and l4:
            add(f"{r['label']}: outline rate", r["outline_rate"], ">= 0.8", r["outline_rate"] >= 0.8)
            ratio = r["all"] / max(l4["all"], 1e-9)
            add(f"{r['label']}: all-correct / LCM-LoRA 4", ratio, ">= 0.9", ratio >= 0.9)
    return out


# ---- ControlNet rows (issue 12) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ControlRow:
    """A configuration of the ControlNet table: the teacher (lcm 0) or its LCM-LoRA, with the ControlNet at scale 1."""

    label: str
    sampler: str
    steps: int
    guidance: float
    lcm: float = 0.0


def control_rows(teacher_guidance=TEACHER_GUIDANCE, lcm_guidance=LCM_GUIDANCE):
    """The rows issue 12 asks for: the LCM-LoRA at 4 steps (the target) and the teacher at 25 Euler steps."""
    return [ControlRow("ControlNet + teacher Euler 25", "euler", 25, teacher_guidance),
            ControlRow("ControlNet + LCM-LoRA 4", "lcm", 4, lcm_guidance, lcm=1.0)]


def control_set(n=200, seed=EVAL_SEED):
    """(attributes, colours-only prompts, seeds) of the ControlNet cases: the evaluation set's images of the world,
    whose shape and position only the control image tells."""
    attrs, _, seeds = eval_set(n, seed)
    return attrs, [colors_caption(a) for a in attrs], seeds


def run_control_table(engine, rows, *, n=200, seed=EVAL_SEED, batch=100, controlnet=CONTROLNET, progress=None):
    """Generate, detect and score the ControlNet rows. Returns (results, images).

    engine has the LoRA "lcm" and the ControlNet `controlnet` loaded. A request holds one control image, so the
    cases go in groups of the same edge map (15: shape x position), each group in batches, every case with its
    own seed; the images come back in case order."""
    from ...request import ControlUnit

    attrs, prompts, seeds = control_set(n, seed)
    groups = {}
    for i, a in enumerate(attrs):
        groups.setdefault((a.shape, a.position), []).append(i)
    size = engine.native_size
    images, results = {}, []
    for row in rows:
        engine.set_lora_weights({"lcm": row.lcm})
        out = [None] * n
        t0 = time.perf_counter()
        for (shape, position), ids in groups.items():
            unit = ControlUnit(model=controlnet, image=edge_map((shape, position), size))
            for k in range(0, len(ids), batch):
                part = ids[k:k + batch]
                made = generate(engine, [prompts[i] for i in part], [seeds[i] for i in part], batch=batch,
                                sampler=row.sampler, steps=row.steps, guidance=row.guidance, control=(unit,))
                for i, im in zip(part, made):
                    out[i] = im
                if progress:
                    progress(len(part))
        seconds = time.perf_counter() - t0
        images[row.label] = out
        detected = [detect(im) for im in out]
        metrics = score(attrs, detected)
        metrics["shape_position"] = float(np.mean([(d.shape, d.position) == (a.shape, a.position)
                                                   for a, d in zip(attrs, detected)]))
        metrics["seconds_per_image"] = seconds / n
        results.append({**asdict(row), **metrics})
    engine.set_lora_weights({"lcm": 0.0})
    return results, images


def control_targets(results):
    """Issue 12's target against the ControlNet rows."""
    out = []
    for r in results:
        if r["lcm"] and r["sampler"] == "lcm" and r["steps"] == 4:
            v = r["shape_position"]
            out.append({"target": f"{r['label']}: shape and position of the edge map", "value": round(v, 3),
                        "goal": f">= {CONTROL_TARGET}", "met": bool(v >= CONTROL_TARGET)})
    return out


def control_grid(rows, images, n, *, seed=EVAL_SEED, columns=8, scale=2):
    """The first `columns` cases: the world's render, the edge map given as control, then each row's images."""
    attrs = control_set(n, seed)[0][:min(columns, n)]
    size = next(iter(images.values()))[0].size[0]
    lines = [("world (target)", [render(a, size) for a in attrs]),
             ("control: edge map", [edge_map(a, size) for a in attrs])]
    lines += [(r.label, images[r.label][:len(attrs)]) for r in rows]
    return _grid(lines, [f"{a.color[:3]} on {a.background[:3]}" for a in attrs], size * scale)


def _grid(lines, heads, side, label_w=230, head=14):
    """Labelled rows of images, each enlarged to side x side (nearest), with a caption over each column."""
    from PIL import Image, ImageDraw

    columns = len(heads)
    canvas = Image.new("RGB", (label_w + columns * side, head + len(lines) * side), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(heads):
        draw.text((label_w + j * side + 2, 1), text, fill="black")
    for i, (label, imgs) in enumerate(lines):
        y = head + i * side
        draw.text((4, y + side // 2 - 6), label, fill="black")
        for j, im in enumerate(imgs):
            canvas.paste(im.resize((side, side), Image.NEAREST), (label_w + j * side, y))
    return canvas


def markdown(report):
    """The table, the targets and how it was made, as markdown."""
    lines = [f"Shapes world, {report['n']} captions (seed {report['seed']}), image seeds 0..{report['n'] - 1}; "
             f"{report['device']} {report['dtype']}; model {report['model']}.", ""]
    if report["rows"]:
        lines += ["| configuration | steps | guidance | color | shape | position | background | all four | outline "
                  "| pixel dist. | s/image |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report["rows"]:
            lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g} | "
                         + " | ".join(f"{r[k]:.3f}" for k in ATTRIBUTES + ("all", "outline_rate"))
                         + f" | {r['pixel_distance']:.1f} | {r['seconds_per_image']:.4f} |")
        lines += ["", "Pixel distance: mean |difference| per pixel and channel (0-255) to the teacher's own "
                  f"{REFERENCE_STEPS}-step Euler image from the same noise (outline rows: the teacher with the "
                  "outline LoRA at the same weight). Outline: share of images the detector calls outlined.", ""]
    if report["targets"]:
        lines += ["| target | value | goal | met |", "| --- | ---: | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
                  for t in report["targets"]]
        lines.append("")
    if report.get("control_rows"):
        lines += control_markdown(report)
    lines.append(f"Command: `{report['command']}`")
    return "\n".join(lines) + "\n"


def control_markdown(report):
    """The ControlNet rows and their target, as markdown lines."""
    lines = [f"ControlNet ({report.get('controlnet')}): the same {report['n']} images, the prompt naming only the "
             "colours (\"a red shape on a blue background\"), the control image the edge map of the target shape "
             "at its position (scale 1).", "",
             "| configuration | steps | guidance | shape + position | shape | position | color | background | all four "
             "| s/image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["control_rows"]:
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g} | "
                     + " | ".join(f"{r[k]:.3f}" for k in ("shape_position", "shape", "position", "color",
                                                           "background", "all"))
                     + f" | {r['seconds_per_image']:.4f} |")
    lines.append("")
    if report.get("control_targets"):
        lines += ["| target | value | goal | met |", "| --- | ---: | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
                  for t in report["control_targets"]]
        lines.append("")
    return lines


def grid_image(rows, images, n, *, seed=EVAL_SEED, columns=8, scale=2):
    """Rows of the table (top to bottom) over the first `columns` captions, with the world's own render first."""
    columns = min(columns, n)
    attrs = eval_set(n, seed)[0][:columns]  # the set depends on n: take the captions the rows were made from
    size = next(iter(images.values()))[0].size[0]
    lines = [("world (target)", [render(a, size) for a in attrs])]
    lines += [(r.label, images[_key(r)][:columns]) for r in rows]
    return _grid(lines, [f"{a.color[:3]} {a.shape[:3]} {a.background[:3]}" for a in attrs], size * scale)


def write(report, grid, out, control_grid=None):
    """results.json, results.md, grid.png (and control.png) into the folder out (each written whole, then renamed
    into place)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("results.json", json.dumps(report, indent=2) + "\n"), ("results.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(data)
        tmp.replace(out / name)
    paths = [out / "results.json", out / "results.md"]
    for name, image in (("grid.png", grid), ("control.png", control_grid)):
        if image is not None:
            tmp = out / f".{name}.tmp"
            image.save(tmp, format="PNG")
            tmp.replace(out / name)
            paths.append(out / name)
    return paths
