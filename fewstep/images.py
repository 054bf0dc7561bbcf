"""PIL images: A1111-style PNG metadata (written and read back), grids, output paths."""

import re
from pathlib import Path

from .errors import RequestError
from .recipes import SAMPLERS


def open_image(src, label, *, field=None, then=lambda im: im.copy()):
    """then(PIL image) of the image file at src, with the file still open (decoding errors surface here); a
    RequestError "cannot read {label} {src}: why" naming `field` when the file is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    from .sources import local_path

    try:
        with Image.open(regular_file(local_path(src))) as im:  # reads the header only: the size is known first
            return then(im)
    except FileNotFoundError:
        raise RequestError(f"cannot read {label} {src}: it does not exist", field=field) from None
    except Image.DecompressionBombError:
        raise RequestError(f"cannot read {label} {src}: {bomb_reason()}", field=field) from None
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RequestError(f"cannot read {label} {src}: {reason}", field=field) from None


def bomb_reason():
    """Why PIL refused an image for its size (a decompression bomb), with the limit."""
    from PIL import Image

    return (f"it has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, PIL's limit for an image (a decompression bomb "
            "or an image far too large to generate from)")


def regular_file(path):
    """path, when it names a regular file (links followed): opening a FIFO or a character device would wait for a
    writer forever or read without end, so they are refused (OSError) before they are opened."""
    import os
    import stat

    mode = os.stat(path).st_mode  # FileNotFoundError for a missing file, as open() would raise
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
            "a device or socket"
        raise OSError(f"it is {kind}, not a regular file")
    return path


def parameters_text(params, seed):
    """The A1111 "parameters" text other tools read: prompt, negative prompt, then a key: value line."""
    prompt = params["prompt"] if isinstance(params["prompt"], str) else params["prompt"][0]
    lines = [one_line(lora_prompt(prompt, params.get("loras") or {}))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {one_line(params['negative_prompt'])}")
    sampler = SAMPLERS[params["sampler"]].label if params["sampler"] in SAMPLERS else params["sampler"]
    fields = [("Steps", params["steps"]), ("Sampler", sampler),
              ("CFG scale", f"{params['guidance']:g}"), ("Seed", seed),
              ("Size", f"{params['width']}x{params['height']}"),
              ("Model", None if params.get("model") is None else quote(str(params["model"])))]
    if params.get("spacing"):  # A1111's name for a forced timestep spacing (Lightning, Turbo: trailing)
        fields.append(("Schedule type", params["spacing"].capitalize()))
    if params.get("recipe") not in (None, "standard"):
        fields.append(("Recipe", params["recipe"]))
    if params.get("strength") is not None:
        fields.append(("Denoising strength", f"{params['strength']:g}"))
    if params.get("mask_blur") is not None:  # A1111 writes it for inpainting
        fields.append(("Mask blur", params["mask_blur"]))
    if params.get("padding_mask_crop") is not None:  # A1111's "Only masked" inpaint area with its padding
        fields.extend([("Inpaint area", "Only masked"), ("Masked area padding", params["padding_mask_crop"])])
    for i, unit in enumerate(params.get("control") or ()):
        fields.append((f"ControlNet {i}", control_text(unit)))
    if params.get("gamma") is not None:
        fields.append(("TCD gamma", f"{params['gamma']:g}"))
    if params.get("lora_hashes"):  # as A1111's Lora extension writes them; the weights are the prompt's tags
        fields.append(("Lora hashes", quote(lora_hashes_text(params["lora_hashes"]))))
    if params.get("timesteps"):
        fields.append(("Timesteps", '"' + ",".join(str(t) for t in params["timesteps"]) + '"'))
    fields.append(("Version", f"fewstep {params.get('version', '')}".strip()))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def lora_prompt(prompt, loras):
    """The prompt as A1111 writes it: its <lora:NAME:WEIGHT> tags stay, and an adapter given another way (a --lora
    file, the server's loras field) gets its tag appended, so that tools reading the prompt see every LoRA and
    its weight."""
    from .request import split_lora_tags

    tagged = split_lora_tags(prompt)[1]  # a name's tags add up (fewstep's rule): a missing part gets its own tag
    extra = "".join(f" <lora:{n}:{w - tagged.get(n, 0.0):g}>" for n, w in loras.items()
                    if abs(w - tagged.get(n, 0.0)) > 1e-6)
    return (prompt + extra).strip() if extra else prompt


def lora_hashes_text(hashes):
    """A1111's "Lora hashes" value: "name: hash" pairs, ", "-joined; the names lose ':' and ',' as A1111's do."""
    return ", ".join(f"{str(n).replace(':', '').replace(',', '')}: {h}" for n, h in hashes.items())


def one_line(text):
    """A prompt as one line of the parameters text that no reader takes for another field. A1111 writes prompts
    as they are, so a line break followed by "Negative prompt:" or "Steps: ..." is read back as those fields (by
    A1111 itself, sd-parsers and tools that look for "\nSteps:"), and sd-parsers splits at "Negative prompt:"
    anywhere. Line breaks become spaces and that label gets a space before its colon: CLIP's tokenizer reads both
    the same way (whitespace is collapsed, ":" is a token of its own), so the conditioning the text describes is
    unchanged."""
    text = re.sub(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*", " ", text)
    # other control characters (NUL ends a PNG text for many readers) go: CLIP's tokenizer drops them too
    text = re.sub(r"[\x00-\x08\x0e-\x1b\x1f\x7f]", "", text)
    return text.replace("Negative prompt:", "Negative prompt :")


def quote(value):
    """A1111's infotext quoting of a value (its infotext_utils.quote): JSON-quoted when it holds ',', ':' or a line
    break, else as it is."""
    import json

    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def control_text(unit):
    """One ControlNet unit as A1111's ControlNet extension writes it (its infotext.serialize_unit: "Field Name:
    value" pairs joined by ", ", the whole quoted); the fields fewstep has, in the extension's order."""
    model = re.sub(r"[,:\"]", "_", str(unit["model"]))  # the extension's format has no escape for these
    return '"' + ", ".join([f"Module: {unit.get('preprocess') or 'none'}", f"Model: {model}",
                            f"Weight: {unit.get('scale', 1.0):g}", f"Guidance Start: {unit.get('start', 0.0):g}",
                            f"Guidance End: {unit.get('end', 1.0):g}"]) + '"'


def read_control(value):
    """{"Module": ..., "Model": ..., ...} of a "ControlNet N" value (read_parameters strips its quotes)."""
    return dict(item.split(": ", 1) for item in value.split(", ") if ": " in item)


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


def fit_mask(mask, size):
    """An inpainting mask (PIL, any mode) as a one-channel image of `size` (white = repaint), and a warning when it
    had to be resized (nearest neighbour: a hard mask stays hard; mask_blur softens it after)."""
    from PIL import Image

    mask = mask.convert("L")
    if mask.size == tuple(size):
        return mask, None
    warning = f"the mask is {mask.size[0]}x{mask.size[1]}, the image {size[0]}x{size[1]}: the mask was resized"
    return mask.resize(tuple(size), resample=Image.Resampling.NEAREST), warning


def alpha_mask(image, transparent_only=True):
    """OpenAI's mask convention (transparent = edit) as fewstep's (white = repaint): an image's alpha channel ->
    L mask, white where fully transparent. None when the image has no alpha channel, or (transparent_only) no
    fully transparent pixel."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    if transparent_only and alpha.getextrema()[0] > 0:
        return None
    return alpha.point(lambda a: 255 if a == 0 else 0)


def fill_masked(image, mask):
    """A1111's inpainting_fill 0 ("fill"): the area to repaint (white in the mask) painted with the colours around
    it, the rest kept. Normalized Gaussian blurs of the kept pixels (a premultiplied-alpha blur, un-premultiplied),
    coarse to fine: each finer one wins where it has support, so colours come from the nearest kept pixels."""
    from PIL import Image, ImageFilter

    image = image.convert("RGB")
    keep = mask.convert("L").point(lambda v: 255 if v < 128 else 0)
    if keep.getextrema()[1] == 0:
        return image  # nothing kept to take colours from
    layer = image.copy()
    layer.putalpha(keep)
    premultiplied = layer.convert("RGBa")
    out = Image.new("RGB", image.size, tuple(int(v) for v in _mean(image, keep)))
    for radius in (64, 16, 4, 1):
        blurred = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        support = blurred.getchannel("A").point(lambda v: 255 if v > 0 else 0)
        out.paste(blurred.convert("RGB"), mask=support)
    out.paste(image, mask=keep)
    return out


def _mean(image, mask):
    from PIL import ImageStat

    return ImageStat.Stat(image, mask).mean


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
