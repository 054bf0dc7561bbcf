"""Token merging for the UNet's self-attention (ToMe for SD, Bolya & Hoffman 2023), at the first level only.

Before each self-attention of the full-resolution level, `ratio` of the tokens are averaged into their most similar
neighbour: the tokens are split into the top-left token of every 2x2 window (destinations) and the other three
(sources); the r sources most similar (cosine) to their best destination are merged into it. Attention runs on the
remaining tokens; after it, each merged source takes its destination's output. Cross-attention and the MLP are
untouched (ToMe for SD's default). The processors wrap the ones already set (fused q/k/v included); the latent
size comes from a forward pre-hook on the UNet, so any aspect ratio works.
"""

import torch

from .errors import LoadError


def check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 0.75:
        raise LoadError(f"--tome takes the share of tokens merged, from 0 (off) to under 0.75, got {ratio!r}")
    return float(ratio)


def merge_fns(x, h, w, r):
    """(merge, unmerge) for tokens x (B, h*w, C) of an h x w grid, merging r of them."""
    b, n, _ = x.shape
    grid = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    grid[::2, ::2] = True
    dst_idx, src_idx = grid.flatten().nonzero()[:, 0], (~grid.flatten()).nonzero()[:, 0]
    metric = x / x.norm(dim=-1, keepdim=True)
    best, best_dst = (metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)).max(-1)
    order = best.argsort(-1, descending=True)
    moved, kept = order[:, :r], order[:, r:]
    into = best_dst.gather(1, moved)

    def ex(i, ch):
        return i[..., None].expand(-1, -1, ch)

    def merge(t):
        ch = t.shape[-1]
        src, dst = t[:, src_idx], t[:, dst_idx]
        dst = dst.scatter_reduce(1, ex(into, ch), src.gather(1, ex(moved, ch)), reduce="mean", include_self=True)
        return torch.cat([src.gather(1, ex(kept, ch)), dst], 1)

    def unmerge(y):
        ch, nk = y.shape[-1], kept.shape[1]
        y_kept, y_dst = y[:, :nk], y[:, nk:]
        src = y.new_empty(b, len(src_idx), ch)
        src.scatter_(1, ex(kept, ch), y_kept)
        src.scatter_(1, ex(moved, ch), y_dst.gather(1, ex(into, ch)))
        out = y.new_empty(b, n, ch)
        out[:, dst_idx], out[:, src_idx] = y_dst, src
        return out

    return merge, unmerge


class _Size:
    """The latent (h, w) of the running UNet call, written by a forward pre-hook."""

    hw = None

    def __call__(self, _module, args, kwargs):
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        self.hw = tuple(sample.shape[-2:])


class ToMeProcessor:
    """A self-attention processor that merges tokens around `base` at the first level (h*w tokens)."""

    def __init__(self, base, size, ratio):
        self.base, self.size, self.ratio = base, size, ratio
        self.merged = 0  # calls that merged (tests)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        x, hw = hidden_states, self.size.hw
        if encoder_hidden_states is not None or x.ndim != 3 or hw is None or x.shape[1] != hw[0] * hw[1]:
            return self.base(attn, x, encoder_hidden_states, attention_mask, temb, **kw)
        merge, unmerge = merge_fns(x, hw[0], hw[1], int(x.shape[1] * self.ratio))
        self.merged += 1
        return unmerge(self.base(attn, merge(x), None, attention_mask, temb, **kw))


def apply(unet, ratio):
    """ToMe processors on unet's self-attentions (attn1); returns how many were wrapped."""
    size = _Size()
    unet.register_forward_pre_hook(size, with_kwargs=True)
    procs = dict(unet.attn_processors)
    wrapped = {k: ToMeProcessor(v, size, ratio) if k.endswith("attn1.processor") else v for k, v in procs.items()}
    count = sum(isinstance(p, ToMeProcessor) for p in wrapped.values())
    unet.set_attn_processor(wrapped)  # (diffusers empties the dict it is given)
    return count
