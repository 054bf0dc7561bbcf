"""PIL images: A1111-style PNG metadata (written and read back), grids, output paths."""

import re
from pathlib import Path

from .recipes import SAMPLERS


def parameters_text(params, seed):
    """The A1111 "parameters" text other tools read: prompt, negative prompt, then a key: value line."""
    prompt = params["prompt"] if isinstance(params["prompt"], str) else params["prompt"][0]
    lines = [prompt]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    sampler = SAMPLERS[params["sampler"]].label if params["sampler"] in SAMPLERS else params["sampler"]
    fields = [("Steps", params["steps"]), ("Sampler", sampler),
              ("CFG scale", f"{params['guidance']:g}"), ("Seed", seed),
              ("Size", f"{params['width']}x{params['height']}"), ("Model", params.get("model"))]
    if params.get("spacing"):  # A1111's name for a forced timestep spacing (Lightning, Turbo: trailing)
        fields.append(("Schedule type", params["spacing"].capitalize()))
    if params.get("recipe") not in (None, "standard"):
        fields.append(("Recipe", params["recipe"]))
    if params.get("strength") is not None:
        fields.append(("Denoising strength", f"{params['strength']:g}"))
    if params.get("gamma") is not None:
        fields.append(("TCD gamma", f"{params['gamma']:g}"))
    if params.get("loras"):
        fields.append(("LoRAs", '"' + ", ".join(f"{n}:{w:g}" for n, w in params["loras"].items()) + '"'))
    if params.get("timesteps"):
        fields.append(("Timesteps", '"' + ",".join(str(t) for t in params["timesteps"]) + '"'))
    fields.append(("Version", f"fewstep {params.get('version', '')}".strip()))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def read_parameters(text):
    """Parse an A1111 parameters text back into {"prompt", "negative_prompt", key: value...}."""
    lines = text.strip().split("\n")
    out = {"negative_prompt": None}
    last = lines[-1]
    body = lines[:-1]
    neg = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if neg:
        out["negative_prompt"] = "\n".join(body[neg[0]:])[len("Negative prompt: "):]
        body = body[:neg[0]]
    out["prompt"] = "\n".join(body)
    for key, value in re.findall(r'\s*([\w ]+): ("[^"]*"|[^,]*)(?:,|$)', last):
        out[key.strip()] = value.strip().strip('"')
    return out


def save_png(image, path, parameters):
    """Write a PNG with the parameters text chunk; written to a temporary name first so no half file remains."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def grid(images, labels=None, cols=None):
    """Images side by side (one row unless cols), each with an optional label underneath."""
    from PIL import Image, ImageDraw

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    label_h = 14 if labels else 0
    canvas = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + label_h)
        canvas.paste(im, (x, y))
        if labels:
            draw.text((x + 2, y + h + 1), labels[i], fill="black")
    return canvas
