"""The shapes world (issue 5): palette, shapes, positions, captions and the anti-aliased renderer.

The world is fixed so that anyone can evaluate against it: one filled (or outlined) shape of one palette colour on a
background of another, at one of five positions, with a fixed size. 8 colours x 7 backgrounds x 3 shapes x
5 positions = 840 images per style, so a renderer only ever needs 30 coverage maps per canvas size.
"""

import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

PALETTE = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
             "center": (0.5, 0.5)}
HALF_SIZE = 0.18  # of the canvas side
STROKE = 0.25 * HALF_SIZE  # outline style: the ring's width, inside the shape's edge
DEFAULT_SIZE = 64
SUPERSAMPLE = 8  # anti-aliasing: coverage is the mean of SUPERSAMPLE^2 point samples per pixel

OUTLINE_SUFFIX = ", outline style"
_CAPTION = re.compile(r"^a (?P<color>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+?) on a (?P<background>\w+) "
                      r"background(?P<outline>, outline style)?$")


@dataclass(frozen=True)
class Attributes:
    """One image of the world. Detected attributes may be None where the detector finds no shape."""

    color: str | None
    shape: str | None
    position: str | None
    background: str | None
    outline: bool = False

    def __post_init__(self):
        for name, value, allowed in (("color", self.color, COLORS), ("shape", self.shape, SHAPES),
                                     ("position", self.position, POSITIONS), ("background", self.background, COLORS)):
            if value is not None and value not in allowed:
                raise ValueError(f"unknown {name} {value!r} (the shapes world has {', '.join(allowed)})")

    @property
    def caption(self):
        return caption(self)

    def content(self):
        """The four content attributes, as a tuple (what 'all four correct' compares)."""
        return (self.color, self.shape, self.position, self.background)

    def check(self):
        """Self, after checking it is a complete, valid image of the world (shape colour differs from background)."""
        if None in self.content():
            raise ValueError(f"incomplete attributes {self}")
        if self.color == self.background:
            raise ValueError(f"the shape colour and the background are both {self.color}")
        return self


def caption(attrs):
    """`a {color} {shape} in the {position} on a {background} background` (+ ", outline style")."""
    a = attrs
    text = f"a {a.color} {a.shape} in the {a.position} on a {a.background} background"
    return text + OUTLINE_SUFFIX if a.outline else text


def colors_caption(attrs):
    """`a {color} shape on a {background} background`: the prompt of the ControlNet rows, which leaves the shape and
    its position to the control image."""
    return f"a {attrs.color} shape on a {attrs.background} background"


def parse_caption(text):
    """Attributes of a caption of the world; ValueError for anything else."""
    m = _CAPTION.match(text.strip())
    if not m:
        raise ValueError(f"not a shapes-world caption: {text!r} (expected 'a red circle in the top left on a blue "
                         "background', optionally followed by ', outline style')")
    return Attributes(m["color"], m["shape"], m["position"], m["background"], bool(m["outline"])).check()


def all_attributes(outline=False):
    """Every image of the world in one style, in a fixed order (840 of them)."""
    return [Attributes(c, s, p, b, outline) for b in COLORS for c in COLORS if c != b for s in SHAPES
            for p in POSITIONS]


def sample_attributes(rng, n=None, outline=False):
    """Uniformly random images of the world from a numpy Generator or a seed; one, or a list of n.

    `outline` is False, True, or a probability of the outline style per image.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    count = 1 if n is None else n
    bg = rng.integers(0, len(COLORS), count)
    fg = (bg + rng.integers(1, len(COLORS), count)) % len(COLORS)  # never the background's colour
    shape = rng.integers(0, len(SHAPES), count)
    pos = rng.integers(0, len(POSITIONS), count)
    style = rng.random(count) < float(outline)
    names = list(POSITIONS)
    out = [Attributes(COLORS[f], SHAPES[s], names[p], COLORS[b], bool(o))
           for f, s, p, b, o in zip(fg, shape, pos, bg, style)]
    return out[0] if n is None else out


def sample_captions(seed, n, outline=False):
    """n random captions from a seed (the same seed gives the same captions everywhere)."""
    return [caption(a) for a in sample_attributes(seed, n, outline)]


# ---- rendering ------------------------------------------------------------------------------------------------

def signed_distance(shape, center, x, y):
    """<0 inside the shape, in canvas units; an exact inset for every shape (max of half-planes / radial)."""
    cx, cy = center
    h = HALF_SIZE
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - h
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - h
    if shape == "triangle":  # apex (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
        slant = (2 * np.abs(dx) - (dy + h)) / np.sqrt(5.0)
        return np.maximum(dy - h, slant)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape, center, size, outline=False, supersample=SUPERSAMPLE):
    """float32 (size, size) fraction of each pixel the shape covers, by point-sampling a supersampled grid."""
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    y, x = coords[:, None], coords[None, :]
    d = signed_distance(shape, center, x, y)
    inside = d < 0
    if outline:
        inside &= d >= -STROKE
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


@lru_cache(maxsize=256)
def template(shape, position, size, outline=False):
    """The (cached, read-only) coverage map of a shape at a named position."""
    t = coverage(shape, POSITIONS[position], size, outline)
    t.setflags(write=False)
    return t


EDGE_WIDTH = 1.0  # of an edge map's line, in pixels of the canvas (Canny's edges are one pixel wide)


@lru_cache(maxsize=64)
def edge_template(shape, position, size, width=EDGE_WIDTH):
    """The (cached, read-only) edge map of a shape at a named position: 1 on the line along its boundary.

    What Canny finds on a render, drawn exactly and binary like Canny's output: the pixels whose centre lies inside
    the shape within `width` pixels of its boundary. A band one pixel wide across the boundary holds at least one
    pixel centre per row (steep edges) or column (shallow ones), so the line is 8-connected, as Canny's edges are;
    inside rather than centred, so that it lies on the outline style's ring (what the detectors look for)."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    d = signed_distance(shape, POSITIONS[position], coords[None, :], coords[:, None]) * size
    edge = ((d <= 0) & (d > -width)).astype(np.float32)
    edge.setflags(write=False)
    return edge


def edge_map(what, size=DEFAULT_SIZE):
    """The conditioning image of the shapes ControlNet: the shape's outline, white on black, RGB (PIL image).

    `what`: Attributes, a caption, a dict, or a (shape, position) pair; the colours play no part."""
    from PIL import Image

    if isinstance(what, tuple):
        shape, position = what
    else:
        a = what if isinstance(what, Attributes) else to_attributes(what)
        shape, position = a.shape, a.position
    if shape not in SHAPES or position not in POSITIONS:
        raise ValueError(f"edge_map: unknown shape {shape!r} or position {position!r}")
    e = (edge_template(shape, position, size) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(e[..., None], 3, axis=2))


def render_array(attrs, size=DEFAULT_SIZE):
    """uint8 (n, size, size, 3) images for a list of Attributes (vectorised: a blend of cached coverage maps)."""
    n = len(attrs)
    alpha = np.empty((n, size, size, 1), np.float32)
    fg = np.empty((n, 1, 1, 3), np.float32)
    bg = np.empty((n, 1, 1, 3), np.float32)
    for i, a in enumerate(attrs):
        a.check()
        alpha[i, ..., 0] = template(a.shape, a.position, size, a.outline)
        fg[i, 0, 0], bg[i, 0, 0] = PALETTE[a.color], PALETTE[a.background]
    return np.rint(bg + alpha * (fg - bg)).astype(np.uint8)


def to_attributes(what):
    """Attributes from Attributes, a caption string or a dict of fields."""
    if isinstance(what, Attributes):
        return what.check()
    if isinstance(what, str):
        return parse_caption(what)
    if isinstance(what, dict):
        return Attributes(**what).check()
    raise TypeError(f"expected a caption, a dict or Attributes, got {type(what).__name__}")


def render(what, size=DEFAULT_SIZE, *, outline=None):
    """PIL image of a caption (or Attributes / dict); `outline` overrides the style when given."""
    from PIL import Image

    a = to_attributes(what)
    if outline is not None:
        a = replace(a, outline=bool(outline))
    return Image.fromarray(render_array([a], size)[0])
