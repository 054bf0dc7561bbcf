"""The models a server was started with (`--model`, repeatable): loaded on demand within a memory budget, the least
recently used unloaded first; one is current (A1111's sd_model_checkpoint), the one new requests run on."""

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("fewstep")


def model_name(source):
    """The name clients see: the folder or file name, the hub id, or the embedded default's name."""
    if source is None:
        from ..default_model import NAME

        return NAME
    path = Path(str(source))
    return path.name if path.exists() else str(source)


def footprint(engine):
    """Bytes of an engine's weights (parameters and buffers of its modules and ControlNets)."""
    c = engine.c
    modules = [c.unet, c.vae, *c.text_encoders, *engine.controlnets.values()]
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def disk_size(source):
    """Bytes of a model's weight files on disk (a guess of its footprint before it loads; 0 when unknown)."""
    if source is None:
        return 0
    path = Path(str(source))
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    return 0


class Models:
    """Sources by name, the loaded ones (name -> whatever `build(name, engine)` makes of an engine: the server's
    Target), most recently used last. load(source) -> Engine runs off the event loop (it takes seconds)."""

    def __init__(self, sources, load, *, budget=None, on_stage=None):
        self.sources = OrderedDict((model_name(s), s) for s in sources or [None])
        self.load = load
        self.budget = budget  # bytes that loaded models may take together; None: no limit
        self.on_stage = on_stage or (lambda text: None)  # progress while loading, for the log and /health
        self.loaded = OrderedDict()  # name -> (target, bytes)
        self.current = next(iter(self.sources))
        self._lock = threading.Lock()  # one load at a time

    def names(self):
        return list(self.sources)

    def find(self, wanted):
        """The name a client means: a model name or an A1111 title ("name [hash]"), case-insensitive; None."""
        w = str(wanted).strip().lower()
        for name in self.sources:
            if w in (name.lower(), title(name).lower()) or w.split(" [")[0] == name.lower():
                return name
        return None

    def get(self, name, build):
        """The loaded target of `name`, loading it (and unloading the least recently used others past the budget)
        when it is not loaded; it becomes the most recently used."""
        with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name][0]
            self._make_room(disk_size(self.sources[name]), keep=name)
            t0 = time.perf_counter()
            self.on_stage(f"loading model {name}")
            engine = self.load(self.sources[name])
            target = build(name, engine)
            size = footprint(engine)
            self.loaded[name] = (target, size)
            log.info(f"model {name} loaded in {time.perf_counter() - t0:.1f} s ({size / 2**30:.2f} GiB)")
            self._make_room(0, keep=name)
            return target

    def _make_room(self, need, keep):
        if self.budget is None:
            return
        while self.loaded:
            used = sum(size for _, size in self.loaded.values())
            if used + need <= self.budget:
                return
            # the current model may go too when another one is coming in: a switch is under way (jobs that run
            # on it keep it alive until they finish)
            victim = next((n for n in self.loaded if n != keep), None)
            if victim is None:
                return
            self.loaded.pop(victim)
            log.info(f"model {victim} unloaded (--model-memory {self.budget / 2**30:g} GiB)")

    def listing(self):
        """A1111's /sdapi/v1/sd-models entries."""
        return [{"title": title(n), "model_name": n, "hash": None, "sha256": None,
                 "filename": str(s) if s is not None else n, "config": None} for n, s in self.sources.items()]


def title(name):
    """A1111's checkpoint title; fewstep computes no hash, so it is the name alone."""
    return name
