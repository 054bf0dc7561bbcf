"""Attribute accuracy of a model of the shapes world: fixed random captions and seeds, generation, detection."""

import numpy as np

from .detect import detect
from .world import caption, sample_attributes

EVAL_SEED = 5  # captions of the evaluation set (issue 5); image seeds are 0..n-1
ATTRIBUTES = ("color", "shape", "position", "background")


def eval_set(n=200, seed=EVAL_SEED, outline=False):
    """(attributes, captions, seeds) of the fixed evaluation set: the same for every model and every run."""
    attrs = sample_attributes(seed, n, outline=outline)
    return attrs, [caption(a) for a in attrs], list(range(n))


def score(expected, detected):
    """Per-attribute accuracy, all-four-correct rate and outline rate of detected against expected Attributes."""
    n = len(expected)
    out = {k: float(np.mean([getattr(e, k) == getattr(d, k) for e, d in zip(expected, detected)])) for k in ATTRIBUTES}
    out["all"] = float(np.mean([e.content() == d.content() for e, d in zip(expected, detected)]))
    out["outline_rate"] = float(np.mean([d.outline for d in detected]))
    out["n"] = n
    return out


def generate(engine, captions, seeds, *, batch=100, **request):
    """PIL images for captions with one seed each, in batches (request: sampler, steps, guidance, ...)."""
    images = []
    for i in range(0, len(captions), batch):
        gen = engine.generate(list(captions[i:i + batch]), seeds=tuple(seeds[i:i + batch]), **request)
        images.extend(gen.images)
    return images


def evaluate(engine, n=200, *, seed=EVAL_SEED, outline=False, batch=100, **request):
    """(metrics, images, expected, detected) for n fixed captions: generate with `request`, detect, score."""
    attrs, captions, seeds = eval_set(n, seed, outline)
    images = generate(engine, captions, seeds, batch=batch, **request)
    detected = [detect(im) for im in images]
    return score(attrs, detected), images, attrs, detected


def mistakes(expected, detected):
    """A short label per image: "ok", or the attributes it got wrong."""
    labels = []
    for e, d in zip(expected, detected):
        wrong = [k for k in ATTRIBUTES if getattr(e, k) != getattr(d, k)]
        labels.append("ok" if not wrong else ",".join(w[:3] for w in wrong))
    return labels
