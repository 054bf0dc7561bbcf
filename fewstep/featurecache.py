"""Feature caching across steps (DeepCache, Ma et al. 2023): the deep features of a full UNet call are reused by
the next calls of the same run, which recompute only the outermost level.

A full call runs the UNet as it is and keeps the input of its last up block (everything below the first level,
upsampled). A cached call runs the time embedding, conv_in, the first down block, the last up block with the kept
features in place of the deep path, and conv_out: the skip connections of the first level are fresh, the rest is
the previous step's. Every `interval`-th call of a run is a full one. The sampling loop stays as it is: the engine
starts a run at each request (FastPath.prepare, before the steps); for callers that drive the UNet themselves
(streams), a call whose timestep is not below the previous call's, or whose input shapes differ, starts one.
Anything unusual (ControlNet residuals, attention kwargs) runs the plain UNet.
"""

import threading

import torch

from .errors import LoadError


def check_interval(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LoadError(f"--deep-cache takes a whole number of calls >= 1 (1: off, 2: every other step cached), "
                        f"got {n!r}")
    return n


def supported(unet):
    """Why this UNet cannot cache features (a message), or None."""
    cfg = unet.config
    if not hasattr(unet, "up_blocks") or len(unet.up_blocks) < 2:
        return "the UNet has fewer than two levels"
    if cfg.get("class_embed_type") or cfg.get("addition_embed_type") == "image_hint" or cfg.get("center_input_sample"):
        return "class embeddings, image hints and centred inputs are not supported"
    return None


class FeatureCacheUNet:
    """A UNet callable (the signature diffusers' UNet2DConditionModel.__call__ has) that caches its deep features.

    One engine runs one batch at a time; the cache belongs to that run (a lock keeps concurrent callers apart,
    each then sees a consistent run state but they would share the cadence).
    """

    runs_eager_blocks = True  # the engine's stop hooks on the UNet's blocks still run (fewstep.engine.StopHooks)

    def __init__(self, unet, interval):
        self.unet, self.interval = unet, check_interval(interval)
        self._lock = threading.Lock()
        self.full_calls = self.cached_calls = 0  # counters for tests and reports
        self.reset()

    @property
    def dtype(self):
        return self.unet.dtype

    def reset(self):
        self.calls, self.last_t, self.key, self.features = 0, None, None, None

    def prepare(self, engine, req):
        """A new request starts a new run (fewstep.speed.FastPath.prepare, before its steps)."""
        with self._lock:
            self.reset()

    def __call__(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                 return_dict=True, **kw):
        plain = any(v is not None for v in kw.values()) or self.interval == 1
        if plain:
            return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                             added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kw)
        t = float(torch.as_tensor(timestep).float().max())
        key = (tuple(sample.shape), sample.dtype, None if encoder_hidden_states is None
               else tuple(encoder_hidden_states.shape))
        with self._lock:
            if self.last_t is None or t >= self.last_t or key != self.key:
                self.calls, self.features = 0, None  # a new run
            full = self.features is None or self.calls % self.interval == 0
            self.calls, self.last_t, self.key = self.calls + 1, t, key
            if full:
                out = self._full(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
            else:
                out = self._shallow(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _full(self, sample, timestep, states, tcond, added):
        kept = {}

        def keep(_module, args, kwargs):
            kept["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = self.unet(sample, timestep, states, timestep_cond=tcond, added_cond_kwargs=added,
                            return_dict=False)[0]
        finally:
            handle.remove()
        self.features = kept["h"]
        self.full_calls += 1
        return out

    def _shallow(self, sample, timestep, states, tcond, added):
        """The first level only, the kept deep features in place of the rest (diffusers' forward, cut short)."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), tcond)
        aug = u.get_aug_embed(emb=emb, encoder_hidden_states=states, added_cond_kwargs=added or {})
        emb = emb + aug if aug is not None else emb
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        states = u.process_encoder_hidden_states(encoder_hidden_states=states, added_cond_kwargs=added or {})
        h = u.conv_in(sample)
        first, last = u.down_blocks[0], u.up_blocks[-1]
        skips = (h,)
        for i, resnet in enumerate(first.resnets):  # the first down block without its downsampler (unused here)
            h = resnet(h, emb)
            if getattr(first, "attentions", None) is not None and first.has_cross_attention:
                h = first.attentions[i](h, encoder_hidden_states=states, return_dict=False)[0]
            skips += (h,)
        skips = skips[-len(last.resnets):]
        if getattr(last, "has_cross_attention", False):
            h = last(hidden_states=self.features, temb=emb, res_hidden_states_tuple=skips,
                     encoder_hidden_states=states)
        else:
            h = last(hidden_states=self.features, temb=emb, res_hidden_states_tuple=skips)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        self.cached_calls += 1
        return u.conv_out(h)


def wrap(unet, interval):
    """unet as a FeatureCacheUNet (LoadError where its architecture does not allow it)."""
    why = supported(unet)
    if why:
        raise LoadError(f"--deep-cache: {why}")
    return FeatureCacheUNet(unet, interval)
