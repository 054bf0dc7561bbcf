# A probe, not fewstep code: it runs diffusers.models.{transformers,autoencoders,unets,controlnets} without their
# eager __init__ (each runs on first attribute access), to measure what that hack would save.
# docs/performance.md (fifth session, "Time to the first image") gives what it measured.
# measurement only: run diffusers' model subpackages without their eager __init__ (what would it save?)
import importlib.abc, importlib.machinery, importlib.util, sys, types
LAZY = {"diffusers.models.transformers", "diffusers.models.autoencoders", "diffusers.models.unets",
        "diffusers.models.controlnets"}
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in LAZY:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, s): return None
            def exec_module(self, module):
                def __getattr__(attr, module=module, real=real):
                    del module.__getattr__
                    real.exec_module(module)
                    return getattr(module, attr)
                module.__getattr__ = __getattr__
        spec.loader = Loader()
        return spec
sys.meta_path.insert(0, Finder())
