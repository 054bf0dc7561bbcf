"""The LoRA folder of a server and the one adapter set fused into the engine at a time.

Weights are fused in place, so the engine holds one set; the batcher's worker thread switches sets only between
batches. Adapters stay loaded (at weight 0 when unused) so a switch only re-fuses the tensors they touch.
"""

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import FewstepError, RequestError
from ..lora.prompt import available, resolve

PREFIX = "serve:"  # engine-side names, apart from the LCM-LoRA ("lcm") and anything loaded by library users


class Adapters:
    def __init__(self, engine, lora_dir=None, *, max_weight=5.0, max_per_request=4, max_loaded=8):
        self.engine = engine
        self.lora_dir = None if lora_dir is None else str(Path(lora_dir).resolve())
        self.max_weight = max_weight
        self.max_per_request = max_per_request
        self.max_loaded = max_loaded
        self.loaded = OrderedDict()  # name -> (path, mtime) of the file loaded; least recently used first
        self.current = ()  # the set fused now; None after a failed switch (re-applied in full next time)
        self.switches = 0
        self._hashes = {}  # file stamp -> A1111's short hash
        self._checked = {}  # file stamp -> None (its header is a LoRA's) or the error refusing it
        self._lock = threading.Lock()

    def available(self):
        """Names of the usable LoRA files in the folder: links that cannot be read and files whose header is not a
        LoRA's are left out (headers are read once per file version)."""
        out = []
        for name in available(self.lora_dir):
            try:
                self._inspect(name, resolve(name, self.lora_dir))
            except (OSError, FewstepError):
                continue
            out.append(name)
        return out

    def check(self, loras):
        """A request's {name: weight} as a canonical adapter set (sorted (name, weight) pairs, zeros dropped).

        Names resolve only inside the LoRA folder; runs on the request's thread, touching no engine state.
        """
        out = {}
        for name, weight in loras.items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or abs(weight) > self.max_weight:
                raise RequestError(f"LoRA {name!r}: the weight must be a number in [-{self.max_weight:g}, "
                                   f"{self.max_weight:g}], got {weight!r}")
            # plain names of readable LoRA files, nothing else; a missing one is told the names the listing has
            self._inspect(name, resolve(name, self.lora_dir, offer=self.available))
            if weight != 0:
                out[name] = float(weight)
        if len(out) > self.max_per_request:
            raise RequestError(f"at most {self.max_per_request} LoRAs per request, got {len(out)}")
        return tuple(sorted(out.items()))

    def apply(self, target):
        """Make `target` (from check) the fused set. Worker thread only, never while a batch runs."""
        if target == self.current:
            return
        self.current = None  # until the switch completes: a failure part way makes the next batch redo it all
        wanted = dict(target)
        for name in wanted:  # a file replaced on disk since it was loaded is read again
            if name in self.loaded and self.loaded[name] != _stamp(resolve(name, self.lora_dir)):
                self._unload(name)
        changes = {PREFIX + n: wanted.get(n, 0.0) for n in self.loaded
                   if self.engine.loras[PREFIX + n].weight != wanted.get(n, 0.0)}
        if changes:
            self.engine.set_lora_weights(changes)
        for name, weight in target:
            if name not in self.loaded:
                while len(self.loaded) >= self.max_loaded:
                    self._unload(next(n for n in self.loaded if n not in wanted))
                path = resolve(name, self.lora_dir)
                stamp = _stamp(path)
                try:
                    self.engine.load_lora(str(path), name=PREFIX + name, weight=weight)
                except FewstepError as e:  # clients see the LoRA's name, never the server's paths
                    raise self._named(e, name, path) from None
                self.loaded[name] = stamp
            self.loaded.move_to_end(name)
        self.current = target
        self.switches += 1

    def _inspect(self, name, path):
        """Refuse a file whose header is not a LoRA's (truncated, integer tensors) on the request's thread, before
        it queues; cached per file version (a header read costs milliseconds, the cache makes it free)."""
        from ..lora.apply import open_lora

        stamp = _stamp(path)
        with self._lock:  # request threads share the cache
            known = stamp in self._checked
            refusal = self._checked.get(stamp)
        if not known:
            try:
                open_lora(str(path))
            except FewstepError as e:
                refusal = self._named(e, name, path)
            with self._lock:
                self._checked[stamp] = refusal
                while len(self._checked) > 1024:  # versions of files long replaced
                    del self._checked[next(iter(self._checked))]
        if refusal is not None:
            raise refusal

    def hashes(self, names):
        """{name: A1111's short hash} of the named LoRA files (cached per file version); for PNG metadata."""
        from ..lora.apply import lora_hash

        out = {}
        for name in names:
            try:
                stamp = _stamp(resolve(name, self.lora_dir))
                if stamp not in self._hashes:
                    self._hashes[stamp] = lora_hash(stamp[0])
                out[name] = self._hashes[stamp]
            except (OSError, FewstepError):  # removed since it ran: the metadata goes without its hash
                continue
        return out

    def _named(self, error, name, path):
        """The error with the file's path (and the folder's) replaced by the LoRA's name."""
        message = str(error).replace(str(path), repr(name)).replace(self.lora_dir, "the LoRA folder")
        out = type(error)(message)
        if isinstance(error, RequestError):
            out.field = error.field
        return out

    def unload_all(self):
        """Take every adapter this server loaded out of the engine (weights restored exactly)."""
        for name in list(self.loaded):
            self._unload(name)
        self.current = ()

    def _unload(self, name):
        del self.loaded[name]
        self.engine.unload_lora(PREFIX + name)


def _stamp(path):
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)
