"""A1111's prompt syntax for LoRAs: `<lora:NAME:WEIGHT>` tags, resolved against a LoRA folder."""

import os
import re
from pathlib import Path

from ..errors import RequestError
from ..request import split_lora_tags as split_tags

SUFFIXES = (".safetensors",)


def resolve(name, lora_dir, offer=None):
    """The file for a LoRA name inside lora_dir; names are plain file stems, never paths (no traversal).

    Errors name the LoRA and the usable names (offer(): those to list; default: available()), never the folder's
    path or its other files (a server sends them to clients)."""
    if lora_dir is None:
        raise RequestError(f"<lora:{name}> needs a LoRA folder (--lora-dir)")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.\- ]+", name) or name.startswith(".") or ".." in name:
        raise RequestError(f"LoRA name {name!r} is not a plain name (letters, digits, _ - . and spaces only)")
    root = Path(lora_dir).resolve()
    for suffix in SUFFIXES:
        path = usable(root, f"{name}{suffix}")
        if path is not None:
            return path
        if os.path.lexists(root / f"{name}{suffix}"):
            raise RequestError(f"LoRA {name!r} cannot be used: its file is not a readable file inside the LoRA "
                               "folder (a broken link, a link loop, a link out of the folder or not a regular file)")
    names = offer() if offer is not None else available(root)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    raise RequestError(f"no LoRA named {name!r} in the LoRA folder (available: {shown or 'none'})")


def usable(root, filename):
    """root/filename resolved, when it is a readable regular file inside root (a link may point to another file
    of the folder; a link loop, a broken link, a link out of the folder, a FIFO or a folder are not); else None."""
    try:
        path = (root / filename).resolve(strict=True)
        ok = path.parent == root and path.is_file() and os.access(path, os.R_OK)
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop" from resolve()
        return None
    return path if ok else None


def available(lora_dir):
    """The names of the usable LoRA files in lora_dir, sorted."""
    if lora_dir is None:
        return []
    root = Path(lora_dir).resolve()
    try:
        entries = sorted(p.name for p in root.iterdir())
    except OSError:
        return []
    return [Path(n).stem for n in entries if n.endswith(SUFFIXES) and not n.startswith(".")
            and usable(root, n) is not None]


def adapters_for(prompt, loras, lora_dir=None):
    """(prompt without tags, [(src, weight, name)]) from --lora (src, weight) pairs and the prompt's tags.

    Tags resolve inside lora_dir (or $FEWSTEP_LORA_DIR); the same adapter named twice adds up its weights.
    """
    cleaned, tags = split_tags(prompt)
    lora_dir = lora_dir or os.environ.get("FEWSTEP_LORA_DIR") or None
    found = {}  # name -> [src, weight, identity]
    pairs = [(src, w, Path(str(src).rstrip("/")).stem) for src, w in loras]
    pairs += [(resolve(name, lora_dir), w, name) for name, w in tags.items()]
    for src, weight, name in pairs:
        identity = str(Path(src).expanduser().resolve()) if Path(str(src)).expanduser().exists() else str(src)
        if name in found:
            if found[name][2] != identity:
                raise RequestError(f"two different LoRAs are named {name!r} ({found[name][0]} and {src}): rename one")
            found[name][1] += weight
        else:
            found[name] = [str(src), float(weight), identity]
    return cleaned, [(src, weight, name) for name, (src, weight, _) in found.items()]
