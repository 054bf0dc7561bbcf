"""Fuse LoRAs into the model weights (no per-step cost) and restore the base weights bit-exactly."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LoadError
from .formats import normalize

MIN_MATCH = 0.9  # a file whose keys match less than this fraction is refused, not applied partly


@dataclass
class LoraReport:
    """What loading a LoRA did: counts per component and the keys that matched nothing."""

    name: str
    source: str
    modules: int
    tensors: int
    components: dict
    unmatched: list = field(default_factory=list)

    def summary(self):
        parts = ", ".join(f"{n} in {c}" for c, n in sorted(self.components.items()))
        s = f"LoRA {self.name}: {self.tensors} tensors applied to {self.modules} modules ({parts})"
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched nothing, e.g. {self.unmatched[:3]}"
        return s


@dataclass
class LoraState:
    name: str
    source: str
    weight: float
    deltas: dict  # (component, module path) -> (down, up, scale), on CPU in the file's dtype
    report: LoraReport


def read_lora(src, *, allow_pickle=False, weight_name=None):
    """The LoRA state dict from a file, a folder or a hub id (weight_name picks a file in a folder or repo)."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(src)))
    if not path.exists():
        from ..loading import HUB_ID, hub_snapshot

        if not HUB_ID.match(str(src)):
            raise LoadError(f"LoRA {src} not found: give a .safetensors file, a folder or a hub id")
        path = hub_snapshot(str(src), patterns=[weight_name or "*.safetensors"])
    if path.is_dir():
        files = sorted(path.glob(weight_name or "*.safetensors"))
        if len(files) != 1:
            names = ", ".join(f.name for f in sorted(path.glob("*.safetensors"))) or "none"
            raise LoadError(f"{src} holds {len(files)} matching LoRA files (.safetensors: {names}): pick one with "
                            "weight_name or give the file")
        path = files[0]
    if path.suffix != ".safetensors":
        if not allow_pickle:
            raise LoadError(f"{path.name} is a pickle file, which can run code when loaded: pass --allow-pickle "
                            "(allow_pickle=True) if you trust it")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise LoadError(f"cannot read LoRA {path}: {type(e).__name__}") from None
        return sd.get("state_dict", sd)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise LoadError(f"cannot read LoRA {path}: {str(e).splitlines()[0]}") from None


def module_index(engine):
    """{component: {kohya flat name: dotted path}} of the Linear/Conv2d modules a LoRA can target."""
    comps = {"unet": engine.c.unet}
    for i, enc in enumerate(engine.c.text_encoders):
        comps["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = enc
    index = {}
    for cname, model in comps.items():
        index[cname] = {n.replace(".", "_"): n for n, m in model.named_modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return comps, index


def _delta(down, up, scale, shape):
    """scale * up @ down, shaped like the target weight (conv LoRAs: 3x3 down, 1x1 up), in float32."""
    d = (up.float().flatten(1) @ down.float().flatten(1)) * scale
    if d.numel() != torch.Size(shape).numel():
        raise ValueError
    return d.reshape(shape)


def load_lora(engine, src, *, name=None, weight=1.0, allow_pickle=False, weight_name=None, min_match=MIN_MATCH):
    """Read, check and fuse a LoRA into the engine; all or nothing. Returns a LoraReport."""
    name = name or Path(str(src)).stem
    if name in engine.loras:
        raise LoadError(f"a LoRA named {name!r} is already loaded: unload it first or pick another name")
    sd = read_lora(src, allow_pickle=allow_pickle, weight_name=weight_name)
    comps, index = module_index(engine)
    entries, unmatched = normalize(sd, index)
    title = engine.c.preset.title
    if not entries:
        raise LoadError(f"LoRA {src} matches none of this {title} model's modules: it is for another architecture "
                        "or not a LoRA file")
    matched = len(sd) - len(unmatched)
    if matched / len(sd) < min_match:
        raise LoadError(f"LoRA {src} matches only {matched} of its {len(sd)} tensors in this {title} model (e.g. "
                        f"{unmatched[:2]}): refusing to apply it partly; is it for another architecture?")
    deltas, counts = {}, {}
    for (component, path), (down, up, alpha) in entries.items():
        module = comps[component].get_submodule(path)
        rank = down.shape[0]
        scale = 1.0 if alpha is None else alpha / rank
        fits = (up.shape[1] == rank and up.shape[0] == module.weight.shape[0]
                and up.shape[0] * down[0].numel() == module.weight.numel())
        if not fits:
            raise LoadError(f"LoRA {src} does not fit this {title} model: {component} {path} has weight "
                            f"{tuple(module.weight.shape)}, the LoRA gives {(up.shape[0], *down.shape[1:])}; it is "
                            "probably for another architecture")
        deltas[(component, path)] = (down, up, scale)
        counts[component] = counts.get(component, 0) + 1
    report = LoraReport(name, str(src), len(deltas), matched, counts, unmatched)
    state = LoraState(name, str(src), float(weight), deltas, report)
    engine.loras[name] = state
    try:
        refuse_nonfinite(state)
        fuse(engine, set(deltas))
    except BaseException:
        del engine.loras[name]
        fuse(engine, set(deltas))
        raise
    return report


def refuse_nonfinite(state):
    for (component, path), (down, up, _) in state.deltas.items():
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoadError(f"LoRA {state.source} has NaN/inf values at {component} {path}: the file is damaged")


def base_weights(engine):
    if not hasattr(engine, "_base_weights"):
        engine._base_weights = {}
    return engine._base_weights


def fuse(engine, targets):
    """Set each target weight to base + sum of active LoRAs; the base copy is what makes restore exact."""
    comps, _ = module_index(engine)
    saved = base_weights(engine)
    for component, path in targets:
        weight = comps[component].get_submodule(path).weight
        key = (component, path)
        if key not in saved:
            saved[key] = weight.detach().to("cpu", copy=True)
        total = None
        for state in engine.loras.values():
            if key in state.deltas and state.weight != 0:
                down, up, scale = state.deltas[key]
                d = _delta(down, up, scale * state.weight, weight.shape)
                total = d if total is None else total + d
        base = saved[key]
        with torch.no_grad():
            if total is None:
                weight.copy_(base.to(weight.device))
                del saved[key]
            else:
                weight.copy_((base.float() + total).to(weight.device, weight.dtype))


def set_lora_weights(engine, weights):
    """Change adapter weights; only the tensors those adapters touch are re-fused."""
    for name in weights:
        if name not in engine.loras:
            raise LoadError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(engine.loras) or 'none'})")
    touched = set()
    for name, w in weights.items():
        engine.loras[name].weight = float(w)
        touched |= set(engine.loras[name].deltas)
    fuse(engine, touched)


def unload_lora(engine, name):
    """Remove one adapter; its tensors get back their base values (bit-exact when no other adapter touches them)."""
    if name not in engine.loras:
        raise LoadError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(engine.loras) or 'none'})")
    state = engine.loras.pop(name)
    if engine.lcm_lora == name:
        engine.lcm_lora = None
    fuse(engine, set(state.deltas))


def unload_loras(engine):
    for name in list(engine.loras):
        unload_lora(engine, name)
