"""A1111's prompt syntax for LoRAs: `<lora:NAME:WEIGHT>` tags, resolved against a LoRA folder."""

import re
from pathlib import Path

from ..errors import RequestError

TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?(?::[^<>]*)?>")
SUFFIXES = (".safetensors",)


def split_tags(prompt):
    """(prompt without tags, {name: weight}); a tag without a weight means 1.0, repeated names add up."""
    loras = {}
    for name, weight in TAG.findall(prompt):
        try:
            w = 1.0 if weight in ("", None) else float(weight)
        except ValueError:
            raise RequestError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        loras[name.strip()] = loras.get(name.strip(), 0.0) + w
    cleaned = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", TAG.sub("", prompt))).strip(" ,")
    return cleaned, loras


def resolve(name, lora_dir):
    """The file for a LoRA name inside lora_dir; names are plain file stems, never paths (no traversal)."""
    if lora_dir is None:
        raise RequestError(f"<lora:{name}> needs a LoRA folder (--lora-dir)")
    if not re.fullmatch(r"[\w.\- ]+", name) or name.startswith(".") or ".." in name:
        raise RequestError(f"LoRA name {name!r} is not a plain name (letters, digits, _ - . and spaces only)")
    root = Path(lora_dir).resolve()
    for suffix in SUFFIXES:
        path = (root / f"{name}{suffix}").resolve()
        if path.parent == root and path.is_file():
            return path
    available = ", ".join(sorted(p.stem for p in root.glob("*.safetensors"))) or "none"
    raise RequestError(f"no LoRA named {name!r} in {root} (available: {available})")


def adapters_for(prompt, loras, lora_dir=None):
    """(prompt without tags, [(src, weight, name)]) from --lora (src, weight) pairs and the prompt's tags.

    Tags resolve inside lora_dir (or $FEWSTEP_LORA_DIR); the same adapter named twice adds up its weights.
    """
    import os

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
