"""Adapters on an engine: read and check a LoRA, fuse it (fuse.py), change weights, unload; all or nothing."""

import logging
import math
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch

from .. import sources
from ..errors import LoadError, RequestError
from . import fuse as fusing
from .formats import LAYOUTS, check_shapes, conflict, guess_arch, model_arch, module_index, peft_alphas, plan, scale_of

log = logging.getLogger("fewstep")

MIN_MATCH = 0.9  # a file whose tensors match less than this fraction is refused, not applied partly
_uid = count()


@dataclass
class LoraReport:
    """What loading a LoRA did: format, counts per component, the keys that matched nothing, and timings."""

    name: str
    source: str
    modules: int
    tensors: int
    components: dict
    unmatched: list = field(default_factory=list)
    format: str = ""
    arch: str = ""
    ranks: list = field(default_factory=list)
    alphas: list = field(default_factory=list)
    dtype: str = ""
    seconds: dict = field(default_factory=dict)  # read (plan + tensors), fuse

    def summary(self):
        parts = ", ".join(f"{n} in {c}" for c, n in sorted(self.components.items()))
        ranks = "/".join(str(r) for r in self.ranks)
        s = (f"LoRA {self.name}: {self.format}, {self.arch}, rank {ranks}, {self.dtype}: {self.tensors} tensors "
             f"applied to {self.modules} modules ({parts})")
        if self.seconds:
            s += f" in {sum(self.seconds.values()):.2f}s"
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched nothing, e.g. {self.unmatched[:3]}"
        return s

    def as_dict(self):
        return {k: getattr(self, k) for k in ("name", "source", "format", "arch", "modules", "tensors", "components",
                                              "ranks", "alphas", "dtype", "unmatched", "seconds")}


@dataclass
class Factors:
    """One target's low-rank pair, ready for the GEMM (2-d, the weight's compute dtype and device)."""

    down: torch.Tensor  # (rank, in * kh * kw)
    up: torch.Tensor  # (out, rank)
    scale: float  # alpha / rank (or what peft metadata says)
    alpha: float | None

    @property
    def rank(self):
        return self.down.shape[0]


@dataclass
class LoraState:
    """A loaded adapter: its factors per (component, module path), its weight, and the report of its loading."""

    name: str
    source: str
    weight: float
    factors: dict
    report: LoraReport
    recipe: str | None = None  # the few-step recipe this adapter makes (fewstep.recipes): "lcm" for the LCM-LoRA
    uid: int = field(default_factory=lambda: next(_uid))


# ---- reading ---------------------------------------------------------------------------------------------------
class LoraSource:
    """A LoRA's tensor names, header shapes and metadata; tensors are read only when asked for."""

    def __init__(self, label, shapes, metadata=None, path=None, tensors=None):
        self.label, self.shapes, self.metadata, self.path, self._tensors = label, shapes, metadata or {}, path, tensors

    @property
    def keys(self):
        return list(self.shapes)

    def read(self, keys, device):
        """{key: tensor} on the device; safetensors files are read straight to it, key by key."""
        if self._tensors is not None:
            return {k: self._tensors[k].to(device) for k in keys}
        from safetensors import safe_open

        dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
        try:
            with safe_open(str(self.path), framework="pt", device=dev) as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # noqa: BLE001 - a file can change or break between planning and reading
            raise LoadError(f"cannot read LoRA {self.label}: {str(e).splitlines()[0]}") from None

    def state_dict(self):
        return self.read(self.keys, torch.device("cpu"))

    def dtypes(self):
        """The tensors' dtypes as safetensors names them (F16, BF16, F32...)."""
        if self._tensors is not None:
            names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
            return {names.get(t.dtype, str(t.dtype)) for t in self._tensors.values()}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {str(f.get_slice(k).get_dtype()) for k in f.keys()}

    def relabel(self, label):
        self.label = label
        return self


def lora_path(src, weight_name=None):
    """The file of a LoRA given as a file, a folder or a hub id (weight_name picks a file in a folder or repo)."""
    path = sources.resolve(src, what="LoRA", patterns=[weight_name or "*.safetensors"],
                           expect="a .safetensors file, a folder or a hub id")
    if path.is_dir():
        files = sorted(path.glob(weight_name or "*.safetensors"))
        if len(files) != 1:
            names = ", ".join(f.name for f in sorted(path.glob("*.safetensors"))) or "none"
            raise LoadError(f"{src} holds {len(files)} matching LoRA files (.safetensors: {names}): give the file's "
                            "path (on the command line: --lora FOLDER/FILE.safetensors; in Python: weight_name=)")
        path = files[0]
    return path


def open_lora(src, *, allow_pickle=False, weight_name=None):
    """A LoraSource from a file, folder or hub id, or from a {name: tensor} dict; header only for safetensors."""
    if isinstance(src, dict):
        tensors = {k: v for k, v in src.items() if isinstance(v, torch.Tensor)}
        check_dtypes("(state dict)", {k: "F32" if v.is_floating_point() else str(v.dtype).removeprefix("torch.")
                                      for k, v in tensors.items()})
        return LoraSource("(state dict)", {k: tuple(v.shape) for k, v in tensors.items()}, tensors=tensors)
    path = lora_path(src, weight_name)
    if path.suffix.lower() != ".safetensors":
        if not allow_pickle:
            raise LoadError(f"{path.name} is a pickle file, which can run code when loaded: pass --allow-pickle "
                            "(allow_pickle=True) if you trust it, or convert it to .safetensors")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise LoadError(f"cannot read LoRA {path}: {type(e).__name__}") from None
        if not isinstance(sd, dict):
            raise LoadError(f"LoRA {path} holds a {type(sd).__name__}, not a dict of tensors")
        return open_lora(sd.get("state_dict", sd)).relabel(str(path))
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            kinds = {k: str(v.get_dtype()) for k, v in slices.items()}
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"cannot read LoRA {path}: not a complete .safetensors file ({why}); the download may be "
                        "truncated") from None
    source = LoraSource(str(path), shapes, metadata, path=path)
    check_dtypes(source.label, kinds)
    return source


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names of floating-point types


def check_dtypes(label, dtypes):
    """Refuse a LoRA holding tensors that are not floating point ({key: safetensors dtype name}): integer or bool
    weights are not a LoRA's (and would fuse as garbage). An integer network alpha (a count) is accepted."""
    for key, dtype in dtypes.items():
        if dtype not in FLOAT_DTYPES and not (key.endswith(".alpha") and dtype.startswith(("I", "U"))):
            raise LoadError(f"LoRA {label}: tensor {key} holds {dtype} values, not floating point: this is not a "
                            "LoRA's weights (the file is damaged or not a LoRA)")


def lora_hash(path):
    """A1111's short hash of a LoRA file (its extensions-builtin/Lora network.py): the metadata's sshs_model_hash,
    else the sha256 of the tensor data after the safetensors header (kohya's "addnet" hash), 12 hex digits."""
    import hashlib
    import json

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):  # other files: the whole file's sha256, as A1111
            n = int.from_bytes(f.read(8), "little")
            try:
                given = (json.loads(f.read(n)).get("__metadata__") or {}).get("sshs_model_hash")
            except (ValueError, AttributeError):
                given = None
            if given:
                return str(given)[:12]
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def read_lora(src, *, allow_pickle=False, weight_name=None):
    """The LoRA state dict (all tensors, on CPU) from a file, a folder or a hub id."""
    return open_lora(src, allow_pickle=allow_pickle, weight_name=weight_name).state_dict()


# ---- the adapter set's side (an Engine's AdapterSet, fewstep.lora.adapters) -------------------------------------
def _adapters(owner):
    """The AdapterSet of an Engine, or the set itself."""
    return getattr(owner, "adapters", owner)


def base_weights(owner):
    """(component, path) -> the saved base copy, for every tensor that holds adapters now."""
    return _adapters(owner).base.saved


def release_buffers(owner):
    """Free the spare base-copy buffers kept for reuse after unloading (see fuse.BaseStore)."""
    _adapters(owner).release()


def _default_name(src):
    if isinstance(src, dict):
        raise LoadError("a LoRA given as a state dict needs a name")
    return Path(str(src).rstrip("/")).stem


def load_lora(adapters, src, *, name=None, weight=1.0, allow_pickle=False, weight_name=None, min_match=None,
              lcm=False, recipe=None):
    """Read, check and fuse a LoRA into an AdapterSet (or an Engine's); all or nothing. Returns a LoraReport.

    Refused, with the weights unchanged: an unsupported adapter kind, a LoRA for another architecture, one whose
    tensors match under min_match (default MIN_MATCH) of this model's modules, a shape misfit, NaN/inf values.
    recipe: the few-step recipe it makes (its defaults apply while it is active); lcm=True means recipe="lcm".
    """
    t0 = time.perf_counter()
    adapters = _adapters(adapters)
    recipe = "lcm" if lcm and recipe is None else recipe
    if recipe is not None:
        from ..recipes import get_recipe

        get_recipe(recipe)  # an unknown name is refused before any work
    name = name or _default_name(src)
    if name in adapters.states:
        raise LoadError(f"a LoRA named {name!r} is already loaded: unload it first or pick another name")
    weight = _check_weight(name, weight)
    source = open_lora(src, allow_pickle=allow_pickle, weight_name=weight_name)
    label, title = source.label, adapters.c.preset.title
    if not source.shapes:
        raise LoadError(f"LoRA {label} holds no tensors: the file is empty")
    comps = adapters.modules()
    p = plan(source.keys, module_index(comps))
    theirs, ours = guess_arch(source.keys, source.shapes), model_arch(adapters.c.unet, adapters.c.text_encoders)
    if conflict(theirs, ours):
        width = f" ({ours.cross}-wide cross-attention)" if theirs.cross and ours.cross != theirs.cross else ""
        raise LoadError(f"LoRA {label} is for another architecture, {theirs.label}, and this model is {title}{width}: "
                        f"use a LoRA made for {title}")
    if not p.groups:
        raise LoadError(f"LoRA {label} matches none of this {title} model's modules: it is for another architecture "
                        f"or not a LoRA file (keys like {source.keys[:2]})")
    min_match = MIN_MATCH if min_match is None else min_match
    if p.matched_keys / len(source.keys) < min_match:
        raise LoadError(f"LoRA {label} matches only {p.matched_keys} of its {len(source.keys)} tensors in this {title} "
                        f"model (e.g. unmatched {p.unmatched[:2]}): refusing to apply it partly; is it for another "
                        "architecture?")
    targets = {t: comps[t[0]].get_submodule(t[1]).weight for t in p.groups}
    misfit = check_shapes(p.groups, source.shapes, {t: w.shape for t, w in targets.items()})
    if misfit:
        raise LoadError(f"LoRA {label} does not fit this {title} model: {misfit}; it is for another architecture or "
                        "a model of another size")
    # straight onto the weights' device (with offloading that is the host, not engine.device)
    factors, dtype = _read_factors(source, p, targets, next(iter(targets.values())).device)
    t1 = time.perf_counter()
    report = _report(name, label, p, factors, theirs.label if theirs.family or theirs.cross else title, dtype,
                     locon=any(len(source.shapes[g["down"]]) == 4 and source.shapes[g["down"]][-1] > 1
                               for g in p.groups.values()))
    state = LoraState(name, label, weight, factors, report, recipe=recipe)
    adapters.states[name] = state
    try:
        adapters.fuse(set(factors))
    except BaseException:
        del adapters.states[name]
        adapters.fuse(set(factors))
        raise
    report.seconds = dict(read=round(t1 - t0, 4), fuse=round(time.perf_counter() - t1, 4))
    if p.unmatched:
        log.warning("LoRA %s: %d of %d tensors matched nothing in this %s model and were not applied, e.g. %s", name,
                    len(p.unmatched), len(source.keys), title, p.unmatched[:3])
    return report


def _check_weight(name, weight):
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w):
        raise RequestError(f"LoRA {name!r}: the weight must be a finite number, got {weight!r}")
    return w


def _read_factors(source, p, targets, device):
    """Factors for every planned target, read on the device; NaN/inf refuses the file."""
    keys = [k for g in p.groups.values() for k in g.values()]
    tensors = source.read(keys, device)
    for key, t in tensors.items():
        # an fp32 sum is far cheaper than isfinite over every element; NaN/inf always reach it (overflow is checked)
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)) and not torch.isfinite(t).all():
            raise LoadError(f"LoRA {source.label} has NaN/inf values in {key}: the file is damaged")
    meta = peft_alphas(source.metadata)
    factors, dtypes = {}, set()
    for (component, path), g in p.groups.items():
        down, up = tensors.pop(g["down"]), tensors.pop(g["up"])
        dtypes.add(str(down.dtype).removeprefix("torch."))
        alpha = float(tensors[g["alpha"]].float().reshape(())) if "alpha" in g else None
        scale = scale_of(component, path, down.shape[0], alpha, meta)
        factors[(component, path)] = Factors(*fusing.prepare(down, up, targets[(component, path)]), scale, alpha)
    return factors, "/".join(sorted(dtypes))


def _report(name, label, p, factors, arch, dtype, locon):
    counts = {}
    for component, _ in factors:
        counts[component] = counts.get(component, 0) + 1
    fmt = " + ".join(LAYOUTS[k] for k in sorted(p.layouts, key=lambda k: -p.layouts[k])) + (", LoCon" if locon else "")
    return LoraReport(name, label, len(factors), p.matched_keys, counts, list(p.unmatched), fmt, arch,
                      sorted({f.rank for f in factors.values()}),
                      sorted({f.alpha for f in factors.values() if f.alpha is not None}), dtype)


# ---- weights and unloading -----------------------------------------------------------------------------------
def _check_loaded(adapters, name):
    if name not in adapters.states:
        raise LoadError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(adapters.states) or 'none'})")


def set_lora_weights(adapters, weights):
    """Change adapter weights; only the tensors those adapters touch are re-fused. All or nothing."""
    adapters = _adapters(adapters)
    states = adapters.states
    for name in weights:
        _check_loaded(adapters, name)
    new = {name: _check_weight(name, w) for name, w in weights.items()}
    old = {name: states[name].weight for name in new}
    touched = set()
    for name, w in new.items():
        if w != old[name]:
            touched |= set(states[name].factors)
        states[name].weight = w
    try:
        adapters.fuse(touched)
    except BaseException:
        for name, w in old.items():
            states[name].weight = w
        adapters.fuse(touched)
        raise


def unload_lora(adapters, name):
    """Remove one adapter; the tensors it touched get base + the other adapters, from the saved base (exact)."""
    adapters = _adapters(adapters)
    _check_loaded(adapters, name)
    state = adapters.states.pop(name)
    adapters.fuse(set(state.factors))


def unload_loras(adapters):
    """Remove every adapter; every touched tensor gets its base value back, bit for bit."""
    adapters = _adapters(adapters)
    touched = set()
    for state in adapters.states.values():
        touched |= set(state.factors)
    adapters.states.clear()
    adapters.fuse(touched)
