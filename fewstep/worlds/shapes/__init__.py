"""The shapes world: a fixed world of coloured shapes, its renderer, captions and detectors (issue 5).

    from fewstep.worlds import shapes
    img = shapes.render("a red circle in the top left on a blue background", 64)
    shapes.detect(img)  # Attributes(color='red', shape='circle', position='top left', background='blue', ...)

Light: numpy (and PIL for images) only; the teacher's training lives in train_teacher.py.
"""

from .detect import detect, nearest_color
from .world import (COLORS, DEFAULT_SIZE, HALF_SIZE, OUTLINE_SUFFIX, PALETTE, POSITIONS, SHAPES, STROKE, Attributes,
                    all_attributes, caption, colors_caption, coverage, edge_map, parse_caption, render, render_array,
                    sample_attributes, sample_captions, template)

__all__ = ["COLORS", "DEFAULT_SIZE", "HALF_SIZE", "OUTLINE_SUFFIX", "PALETTE", "POSITIONS", "SHAPES", "STROKE",
           "Attributes", "all_attributes", "caption", "colors_caption", "coverage", "detect", "edge_map",
           "nearest_color", "parse_caption", "render", "render_array", "sample_attributes",
           "sample_captions", "template"]
