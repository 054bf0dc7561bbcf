"""Detectors: the four attributes and the outline style of an image of the shapes world.

As issue 5 specifies: background = the border pixels; shape colour = the pixels far from the background; position =
the centroid; shape = the best overlap with the three templates; outline = the inside against the ring. Anti-aliased
edges are blends of the two colours, so colour and coverage come from a blend model, not from nearest colours.
"""

from functools import lru_cache

import numpy as np

from .world import COLORS, PALETTE, POSITIONS, SHAPES, Attributes, coverage

_PALETTE = np.array([PALETTE[c] for c in COLORS], np.float32)
_POS_NAMES = list(POSITIONS)
_POS = np.array([POSITIONS[p] for p in _POS_NAMES], np.float32)
FAR = 30.0  # RGB distance from the background beyond which a pixel belongs to the shape (palette min gap is 71)
MIN_SHAPE_AREA = 0.01  # of the canvas: less coverage than this is "no shape"
TEMPLATE_SUPERSAMPLE = 4


def _array(image):
    if hasattr(image, "convert"):
        image = image.convert("RGB")
        if image.width != image.height:
            side = max(image.width, image.height)
            image = image.resize((side, side))
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] != x.shape[1]:
        raise ValueError(f"expected a square RGB image, got an array of shape {x.shape}")
    return x


def nearest_color(rgb, exclude=None):
    """Name of the palette colour nearest to an RGB triple."""
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, np.float32), axis=1)
    if exclude is not None:
        d[COLORS.index(exclude)] = np.inf
    return COLORS[int(np.argmin(d))]


def _soft_iou(a, b):
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def _centroid(alpha):
    size = alpha.shape[0]
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    total = alpha.sum()
    return np.array([(alpha.sum(0) * c).sum() / total, (alpha.sum(1) * c).sum() / total], np.float32)


@lru_cache(maxsize=64)
def _centroid_offset(shape, size, outline):
    """Where a template's centroid lies relative to the shape's centre (a triangle's is below it)."""
    ref = np.array(POSITIONS["center"], np.float32)
    return _centroid(coverage(shape, ref, size, outline, TEMPLATE_SUPERSAMPLE)) - ref


def detect(image):
    """Attributes of an image (PIL or uint8 HxWx3 array); colour/shape/position are None when no shape is found."""
    x = _array(image)
    size = x.shape[0]
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    b = np.median(border, axis=0)
    background = nearest_color(b)
    diff = x - b
    far = np.linalg.norm(diff, axis=2) > FAR
    if far.mean() < MIN_SHAPE_AREA * 0.25:
        return Attributes(None, None, None, background, False)
    # Each pixel is modelled as bg + alpha (c - bg): the shape colour c is the one whose blend line fits the far
    # pixels best; the nearest pixel colour would call a red-on-blue edge purple.
    px = diff[far]
    best, color = np.inf, None
    for i, name in enumerate(COLORS):
        if name == background:
            continue
        v = _PALETTE[i] - b
        a = np.clip(px @ v / max(float(v @ v), 1e-6), 0.0, 1.0)
        resid = np.linalg.norm(px - a[:, None] * v, axis=1).mean()
        # the farthest pixels must reach c itself, else a colour beyond c on the same line would fit as well
        top = np.linalg.norm(px - v, axis=1)
        score = resid + 0.25 * np.percentile(top, 10)
        if score < best:
            best, color = score, name
    v = _PALETTE[COLORS.index(color)] - b
    alpha = np.clip(diff @ v / max(float(v @ v), 1e-6), 0.0, 1.0)
    alpha[~far & (alpha < 0.5)] = 0.0  # background noise is not shape
    if alpha.mean() < MIN_SHAPE_AREA * 0.25:
        return Attributes(None, None, None, background, False)
    centroid = _centroid(alpha)
    position = _POS_NAMES[int(np.argmin(np.linalg.norm(_POS - centroid, axis=1)))]
    # templates are moved so that their centroid lies on the measured one: generated shapes drift a little
    scores, centers = {}, {}
    for shape in SHAPES:
        for outline in (False, True):
            center = centers[shape, outline] = centroid - _centroid_offset(shape, size, outline)
            scores[shape, outline] = _soft_iou(alpha, coverage(shape, center, size, outline, TEMPLATE_SUPERSAMPLE))
    shape, style = max(scores, key=scores.get)
    center = centers[shape, style]
    filled = coverage(shape, center, size, False, TEMPLATE_SUPERSAMPLE)
    ring = coverage(shape, center, size, True, TEMPLATE_SUPERSAMPLE)
    hole = np.clip(filled - ring, 0.0, 1.0)
    inside = float((alpha * hole).sum() / max(hole.sum(), 1e-6))
    on_ring = float((alpha * ring).sum() / max(ring.sum(), 1e-6))
    return Attributes(color, shape, position, background, inside < 0.5 * on_ring)
