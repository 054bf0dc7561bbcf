"""The ControlNets of a server: those loaded at start (`--controlnet SRC`, named by their file stems) and, for each
built-in preprocessor, the model family's default ControlNet, loaded on its first use and kept.

Requests name a ControlNet (A1111 names like "control_v11p_sd15_canny [d14c016b]" match by stem) or only a module
("canny"); names are resolved on the request's thread, touching no engine state but a read of what is loaded; the
loading itself happens on the batcher's worker thread, between batches, like adapter switches.
"""

import re
import threading

from ..arch import controlnet_name, default_controlnet
from ..control import preprocessors
from ..errors import FewstepError, RequestError

NONE_MODELS = ("", "none", "None")  # what A1111 clients send for "no model chosen"
HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]$")  # A1111's " [d14c016b]" after a model's name


class ControlNets:
    def __init__(self, engine, allow_pickle=False):
        self.engine = engine
        self.allow_pickle = allow_pickle
        self.modules = ("none", *preprocessors())
        # name -> source of every ControlNet a request may name: those the engine holds (`fewstep serve
        # --controlnet`, or loaded by the caller of create_app) and the defaults loaded on first use
        self.sources = {name: name for name in engine.controlnets}
        self.defaults = {}  # preprocessor -> name of the family's ControlNet for it
        self._lock = threading.Lock()
        for kind in self.modules[1:]:
            src = default_controlnet(engine.arch, kind)
            if src is None:
                continue
            name = controlnet_name(src)
            if self.sources.get(name, src) not in (src, name):  # that name is another ControlNet's
                name = f"{name}-{kind}"
            self.sources.setdefault(name, src)  # one loaded under its name already is taken to be it
            self.defaults[kind] = name

    def names(self):
        """The names /controlnet/model_list shows: loaded ones (also those loaded since the server started) and
        the defaults loaded on first use."""
        for name in list(self.engine.controlnets):
            self.sources.setdefault(name, name)
        return sorted(self.sources)

    def resolve(self, model, module, param):
        """(name, preprocess) of one unit from a request's model and module; Invalid-style RequestError naming
        `param` + ".model" / ".module" when neither fits."""
        module = (module or "none").strip().lower()
        if module not in self.modules:
            raise RequestError(f"unknown module {module!r} (this server has {', '.join(self.modules)})",
                               field=f"{param}.module")
        preprocess = None if module == "none" else module
        if model is None or model.strip() in NONE_MODELS:
            if preprocess is None:
                raise RequestError("name a ControlNet (see /controlnet/model_list), or a module such as canny to "
                                   "use this model's default ControlNet for it", field=f"{param}.model")
            if preprocess not in self.defaults:
                raise RequestError(f"fewstep knows no {preprocess} ControlNet for {self.engine.c.preset.title} "
                                   "models: start the server with --controlnet SRC and name it",
                                   field=f"{param}.model")
            return self.defaults[preprocess], preprocess
        return self.match(model, f"{param}.model"), preprocess

    def match(self, model, param):
        """A request's model name -> a known name: exact, then without A1111's hash, then by stem prefix."""
        self.names()
        wanted = HASH.sub("", model.strip())
        by_source = {controlnet_name(s): n for n, s in self.sources.items()}
        for table in (self.sources, by_source):
            if model in table or wanted in table:
                hit = model if model in table else wanted
                return table[hit] if table is by_source else hit
        stem = controlnet_name(wanted)
        hits = sorted({n for n in self.sources if stem.startswith(n) or n.startswith(stem)})
        if len(hits) == 1:
            return hits[0]
        known = ", ".join(self.names()) or "none: start the server with --controlnet SRC"
        what = f"matches {', '.join(hits)}: give the full name" if hits else "is not loaded"
        raise RequestError(f"ControlNet {model!r} {what} (known: {known})", field=param)

    def pending(self, names):
        """The (name, source) pairs among `names` that are not loaded yet."""
        return tuple((n, self.sources[n]) for n in dict.fromkeys(names) if n not in self.engine.controlnets)

    def ensure(self, pending, param="control"):
        """Load what a batch needs (worker thread, between batches); a failure is the request's (422)."""
        with self._lock:
            for name, src in pending:
                if name in self.engine.controlnets:
                    continue
                try:
                    self.engine.load_controlnet(src, name=name, allow_pickle=self.allow_pickle)
                except FewstepError as e:
                    raise RequestError(f"ControlNet {name} ({src}) cannot be loaded: {e}", field=param) from None
