"""The quality table of issue 5: the teacher against its LCM-LoRA, like the LCM paper evaluates LCMs.

For n fixed captions and seeds (evaluate.eval_set), every row generates one image per caption from the same initial
noise and reports attribute accuracy, the all-four-correct rate, the outline rate and the mean pixel distance to the
teacher's own 50-step Euler image of that caption and seed (for outline rows: the teacher with the outline LoRA at
the same weight, 50 Euler steps). One engine serves every row: the LoRAs are fused once and re-weighted per row.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...default_model import TEACHER_DEFAULTS
from .detect import detect
from .evaluate import ATTRIBUTES, EVAL_SEED, eval_set, generate, score
from .world import render

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


def markdown(report):
    """The table, the targets and how it was made, as markdown."""
    lines = [f"Shapes world, {report['n']} captions (seed {report['seed']}), image seeds 0..{report['n'] - 1}; "
             f"{report['device']} {report['dtype']}; model {report['model']}.", "",
             "| configuration | steps | guidance | color | shape | position | background | all four | outline "
             "| pixel dist. | s/image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance']:g} | "
                     + " | ".join(f"{r[k]:.3f}" for k in ATTRIBUTES + ("all", "outline_rate"))
                     + f" | {r['pixel_distance']:.1f} | {r['seconds_per_image']:.4f} |")
    lines += ["", "Pixel distance: mean |difference| per pixel and channel (0-255) to the teacher's own "
              f"{REFERENCE_STEPS}-step Euler image from the same noise (outline rows: the teacher with the outline "
              "LoRA at the same weight). Outline: share of images the detector calls outlined.", ""]
    if report["targets"]:
        lines += ["| target | value | goal | met |", "| --- | ---: | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
                  for t in report["targets"]]
        lines.append("")
    lines.append(f"Command: `{report['command']}`")
    return "\n".join(lines) + "\n"


def grid_image(rows, images, n, *, seed=EVAL_SEED, columns=8, scale=2):
    """Rows of the table (top to bottom) over the first `columns` captions, with the world's own render first."""
    from PIL import Image, ImageDraw

    columns = min(columns, n)
    attrs = eval_set(n, seed)[0][:columns]  # the set depends on n: take the captions the rows were made from
    side = next(iter(images.values()))[0].size[0] * scale
    label_w, head = 230, 14
    canvas = Image.new("RGB", (label_w + columns * side, head + (len(rows) + 1) * side), "white")
    draw = ImageDraw.Draw(canvas)
    for j, a in enumerate(attrs):
        draw.text((label_w + j * side + 2, 1), f"{a.color[:3]} {a.shape[:3]} {a.background[:3]}", fill="black")
    lines = [("world (target)", [render(a, side // scale) for a in attrs])]
    lines += [(r.label, images[_key(r)][:columns]) for r in rows]
    for i, (label, imgs) in enumerate(lines):
        y = head + i * side
        draw.text((4, y + side // 2 - 6), label, fill="black")
        for j, im in enumerate(imgs):
            canvas.paste(im.resize((side, side), Image.NEAREST), (label_w + j * side, y))
    return canvas


def write(report, grid, out):
    """results.json, results.md and grid.png into the folder out (written whole, then renamed into place)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("results.json", json.dumps(report, indent=2) + "\n"), ("results.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(data)
        tmp.replace(out / name)
    tmp = out / ".grid.png.tmp"
    grid.save(tmp, format="PNG")
    tmp.replace(out / "grid.png")
    return [out / "results.json", out / "results.md", out / "grid.png"]
