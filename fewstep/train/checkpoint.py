"""Checkpoints that survive kill -9: written to a temporary folder and renamed into place, so a checkpoint either
exists whole or not at all. They hold what the run needs to continue exactly: the trainable parameters, the
optimizer, the generator of the random draws, the grad scaler, the step and the data position. Nothing in them is a
pickle: tensors are safetensors, the optimizer state is read with torch.load(weights_only=True), the rest is JSON.
Every fewstep trainer writes these (the distillation and LoRA methods, the shapes teacher)."""

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainError

NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Resumed:
    step: int
    position: int
    path: Path
    extra: dict = field(default_factory=dict)  # the extra tensors (an EMA network...)
    info: dict | None = None  # the JSON progress state a trainer saved besides step and position


def folder(out):
    return Path(out) / "checkpoints"


def save(out, *, step, position, params, optimizer, generator, scaler=None, extra=None, record=None, info=None,
         keep=3, also=None):
    """Write checkpoint `step` atomically and keep the newest `keep`; returns its path.

    optimizer: None between stages that own their optimizers; info: JSON-able progress of the trainer (kept as is);
    also: a callable(folder) that adds files (the LoRA methods put a loadable LoRA file there)."""
    root = folder(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in params.items()}, str(tmp / "trainable.safetensors"))
    if extra:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"generator": generator.get_state()}, str(tmp / "rng.safetensors"))
    state = dict(step=step, position=position, scaler=scaler.state_dict() if scaler is not None else None,
                 config=record or {})
    if info is not None:
        state["info"] = info
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if also is not None:
        also(tmp)
    _fsync_tree(tmp)
    if final.exists():  # a re-run of the same step (after a resume): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    prune(root, keep)
    return final


def _fsync_tree(path):
    # the rename is what makes a checkpoint visible: its files must be on disk before it
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def prune(root, keep):
    for path in checkpoints(root.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".step-*.part-*"):  # left by a process killed while writing
        if stale.name.split("-")[-1] != str(os.getpid()):
            shutil.rmtree(stale, ignore_errors=True)


def checkpoints(out):
    """Complete checkpoints of a run, oldest first."""
    root = folder(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def find(out, resume):
    """The checkpoint --resume names: "latest" (None when the run has none yet) or a checkpoint folder."""
    if resume in (None, ""):
        return None
    if resume == "latest":
        found = checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainError(f"--resume {resume}: not a checkpoint folder (expected {folder(out)}/step-NNNNNNNN)")
    return path


def read_record(path):
    """The settings a checkpoint was written with."""
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("config", {})
    except (OSError, ValueError) as e:
        raise TrainError(f"checkpoint {path} is unreadable: {e}") from None


def _unreadable(path, e):
    return TrainError(f"checkpoint {path} is unreadable: {str(e).splitlines()[0]}")


def optimizer_state(path):
    """The optimizer state a checkpoint holds (weights only: no pickled objects), or None when it has none."""
    file = Path(path) / "optimizer.pt"
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def load(path, *, params, optimizer, generator, scaler=None):
    """Restore a checkpoint into live objects; returns Resumed. optimizer None: restore it later (optimizer_state)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "trainable.safetensors"))
        gen_state = load_file(str(path / "rng.safetensors"))["generator"]
        extra = path / "extra.safetensors"
        extra = load_file(str(extra)) if extra.is_file() else {}
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    opt_state = optimizer_state(path) if optimizer is not None else None
    if optimizer is not None and opt_state is None:
        raise TrainError(f"checkpoint {path} is unreadable: it has no optimizer.pt")
    missing = set(params) - set(tensors)
    unexpected = set(tensors) - set(params)
    if missing or unexpected:
        raise TrainError(f"checkpoint {path} does not fit this run ({len(missing)} parameters missing, "
                         f"{len(unexpected)} unexpected, e.g. {sorted(missing | unexpected)[:2]}): was it written "
                         "with other --rank/--targets or another model?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    generator.set_state(gen_state)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return Resumed(int(state["step"]), int(state["position"]), path, extra, state.get("info"))
