""""Local path or hub id": the one place a source string becomes a local file or folder (hub cache, offline errors).

Everything that takes a model, a LoRA, a UNet or a decoder source resolves it here, so the rules (a path that exists
wins; `./x`, `/x`, `~/x` are never hub ids; HF_HUB_OFFLINE means the cache only) are written once.
"""

import os
import re
from pathlib import Path

from .errors import LoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that can run code when loaded (Python pickles); refused unless the user opts in with --allow-pickle.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def is_hub_id(source):
    """True for "owner/name" strings that are not written as local paths."""
    s = str(source)
    return bool(HUB_ID.match(s)) and not s.startswith((".", "/", "~"))


def is_pickle(path):
    return Path(str(path)).suffix.lower() in PICKLE_SUFFIXES


def local_path(source):
    """The source as a local Path (user home expanded), whether or not it exists."""
    return Path(os.path.expanduser(str(source)))


def hub_snapshot(repo_id, patterns=None):
    """Local folder of a hub repo: the cache when it has it, else a download; a clear error offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "try the network"
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise LoadError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        "download it first or pass a local path")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all mean "cannot get it"
        raise LoadError(f"{repo_id} is not a local path, not in the Hugging Face cache, and could not be downloaded "
                        f"({type(e).__name__}): check the name or your connection, or pass a local path") from None


def resolve(source, *, what, patterns=None, expect="a file, a folder or a hub id"):
    """A local Path for `source`: the path itself when it exists, else the hub snapshot of a hub id.

    what: how the error names the source ("LoRA", "model", "tiny decoder"...); patterns: the hub files to fetch.
    """
    path = local_path(source)
    if path.exists():
        return path
    if not is_hub_id(source):
        raise LoadError(f"{what} {source} not found: give {expect}")
    return hub_snapshot(str(source), patterns)
