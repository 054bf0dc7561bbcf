"""The adapter set an Engine owns: the loaded adapters, the saved base copies of the weights they touch, and the
signature that prompt embeddings depend on. Everything that changes fused weights goes through it."""

from ..errors import RequestError, ResourceError
from . import fuse as fusing


class AdapterSet:
    """The adapters fused into one model's weights (components: a fewstep.loading.Components)."""

    def __init__(self, components):
        self.c = components
        self.states = {}  # name -> LoraState (fewstep.lora.apply), in load order
        self.base = fusing.BaseStore()

    def modules(self):
        """{component name: module} an adapter can target: the UNet and the text encoder(s)."""
        comps = {"unet": self.c.unet}
        for i, enc in enumerate(self.c.text_encoders):
            comps["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = enc
        return comps

    def fuse(self, targets):
        """Re-fuse the (component, path) targets from their saved bases and the active adapters."""
        active = [s for s in self.states.values() if s.weight != 0]
        fusing.fuse(self.base, active, targets, self.modules())

    @property
    def recipe_adapter(self):
        """The active adapter that sets the few-step recipe (the LCM-LoRA, a Lightning LoRA...), or None.

        An adapter with weight 0 is off: set_weights({"lcm": 0}) gives the model's standard defaults back.
        A server reads this on request threads while its worker changes adapters: the tuple is taken atomically.
        """
        for s in tuple(self.states.values()):
            if s.recipe is not None and s.weight != 0:
                return s
        return None

    def nonfinite_error(self, dtype):
        """The error for an image that decoded to NaN/inf. With style LoRAs active (not a recipe's adapter) it is a
        request-side problem, theirs: a RequestError naming them (a name's namespace prefix, the server's "serve:",
        left out); otherwise the dtype's overflow, a ResourceError."""
        active = [s for s in tuple(self.states.values()) if s.weight != 0 and s.recipe is None]
        if active:
            names = ", ".join(f"{s.name.rpartition(':')[2]} ({s.weight:g})" for s in active)
            return RequestError(f"the decoded image has NaN/inf values with the LoRA(s) {names} active: a LoRA with "
                                "extreme values, or one used at too high a weight; lower its weight or leave it out",
                                field="loras")
        return ResourceError(f"the decoded image has NaN/inf values (VAE overflow in {dtype}): try --dtype fp32 or "
                             "bf16")

    def text_signature(self):
        """What prompt embeddings may depend on: the active adapters, by load identity (not name) and weight.

        A file reloaded under the same name is a new identity, so it never meets embeddings cached for the old one.
        (UNet-only adapters could be left out for more cache hits; kept in, conservatively.)
        """
        return tuple(sorted((s.uid, s.weight) for s in self.states.values() if s.weight != 0))

    # ---- changes (all or nothing; see fewstep.lora.apply) ----------------------------------------------------
    def load(self, src, **kw):
        from .apply import load_lora

        return load_lora(self, src, **kw)

    def set_weights(self, weights):
        from .apply import set_lora_weights

        set_lora_weights(self, weights)

    def unload(self, name):
        from .apply import unload_lora

        unload_lora(self, name)

    def unload_all(self):
        from .apply import unload_loras

        unload_loras(self)

    def release(self):
        """Free the spare base-copy buffers kept for reuse after unloading (see fuse.BaseStore)."""
        self.base.release()
