"""The shapes world: its fixed definition, the renderer, captions, the detectors and the trainer's data source."""

import hashlib

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewstep.worlds import shapes
from fewstep.worlds.shapes.data import ShapesData, shapes_data


def test_world_is_the_one_issue_5_fixes():
    assert shapes.PALETTE == {
        "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
        "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20)}
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.POSITIONS == {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
                                "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
    assert shapes.HALF_SIZE == 0.18 and shapes.STROKE == pytest.approx(0.045)
    assert len(shapes.all_attributes()) == 8 * 7 * 3 * 5


def test_captions_round_trip():
    a = shapes.Attributes("red", "circle", "top left", "blue")
    assert a.caption == "a red circle in the top left on a blue background"
    assert shapes.parse_caption(a.caption) == a
    o = shapes.parse_caption("a orange triangle in the center on a white background, outline style")
    assert o == shapes.Attributes("orange", "triangle", "center", "white", outline=True)
    assert o.caption.endswith(shapes.OUTLINE_SUFFIX)
    for a in shapes.all_attributes(True)[::37]:
        assert shapes.parse_caption(a.caption) == a


@pytest.mark.parametrize("bad", ["a red circle", "a pink circle in the top left on a blue background",
                                 "a red circle in the top left on a red background",
                                 "a red star in the center on a blue background"])
def test_bad_captions_raise(bad):
    with pytest.raises(ValueError):
        shapes.parse_caption(bad)


def test_sampling_is_seeded_and_covers_the_world():
    a = shapes.sample_captions(3, 50)
    assert a == shapes.sample_captions(3, 50) and a != shapes.sample_captions(4, 50)
    attrs = shapes.sample_attributes(0, 3000)
    assert all(x.color != x.background for x in attrs)
    assert {x.color for x in attrs} == set(shapes.COLORS) == {x.background for x in attrs}
    assert {x.shape for x in attrs} == set(shapes.SHAPES) and {x.position for x in attrs} == set(shapes.POSITIONS)
    assert not any(x.outline for x in attrs)
    mixed = shapes.sample_attributes(0, 1000, outline=0.5)
    assert 400 < sum(x.outline for x in mixed) < 600
    assert all(x.outline for x in shapes.sample_attributes(1, 20, outline=True))


def test_renderer_is_deterministic_and_fixed():
    attrs = shapes.all_attributes()[::97] + shapes.all_attributes(True)[::97]
    first = shapes.render_array(attrs, 64)
    shapes.template.cache_clear()
    again = shapes.render_array(attrs, 64)
    assert first.dtype == np.uint8 and first.shape == (len(attrs), 64, 64, 3)
    assert np.array_equal(first, again)
    text = "a red circle in the top left on a blue background"
    img = shapes.render(text, 64)
    assert np.array_equal(np.asarray(img), np.asarray(shapes.render(shapes.parse_caption(text), 64)))
    assert np.array_equal(np.asarray(shapes.render(text, 64, outline=True)),
                          np.asarray(shapes.render(text + ", outline style", 64)))
    # the world is fixed: these bytes may only change with a new version of the world
    digest = hashlib.sha256(first.tobytes() + shapes.render_array(attrs, 32).tobytes()).hexdigest()
    assert digest == GOLDEN


GOLDEN = "7eca3dcbf2b25d4a9673978c1e4ed134f5ef97ff163bb9ce11230355f167fc3f"


def test_render_geometry():
    img = np.asarray(shapes.render("a red square in the center on a blue background", 100))
    red, blue = np.array(shapes.PALETTE["red"]), np.array(shapes.PALETTE["blue"])
    assert (img[50, 50] == red).all() and (img[0, 0] == blue).all()
    rows = np.where((img[:, 50] == red).all(1))[0]
    assert rows.min() == 32 and rows.max() == 67  # half-size 18 px of 100, centred at 50
    assert len({tuple(p) for p in img.reshape(-1, 3)}) == 2  # on the pixel grid at 100 px: no partial pixels
    circle = np.asarray(shapes.render("a red circle in the center on a blue background", 64)).reshape(-1, 3)
    assert len({tuple(p) for p in circle}) > 8  # anti-aliased edges: blends of the two colours
    ring = np.asarray(shapes.render("a red square in the center on a blue background, outline style", 100))
    assert (ring[50, 50] == blue).all() and (ring[50, 33] == red).all()  # the inside shows the background
    tri = shapes.template("triangle", "center", 64)
    assert tri[:, 32].sum() > tri[32, :].sum() * 0.9  # apex up: tall as wide
    assert tri[14:20].sum() < tri[40:46].sum()  # narrow at the top, wide at the base


@pytest.mark.parametrize("size", [64, 32])
def test_detectors_recover_every_attribute(size):
    attrs = shapes.sample_attributes(size, 500, outline=0.5)
    images = shapes.render_array(attrs, size)
    wrong = [(a, shapes.detect(im)) for a, im in zip(attrs, images) if shapes.detect(im) != a]
    assert not wrong, wrong[:3]


def test_detectors_tolerate_blur_noise_and_drift():
    rng = np.random.default_rng(0)
    attrs = shapes.sample_attributes(7, 120, outline=0.5)
    for a, im in zip(attrs, shapes.render_array(attrs, 64)):
        x = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.8)), np.float32)
        x = np.roll(x, (1, -2), (0, 1)) + rng.normal(0, 5, x.shape)
        assert shapes.detect(np.clip(x, 0, 255).astype(np.uint8)) == a


def test_detector_on_odd_inputs():
    blank = Image.new("RGB", (64, 64), shapes.PALETTE["green"])
    d = shapes.detect(blank)
    assert d.background == "green" and d.color is None and d.shape is None and d.position is None
    big = shapes.render("a white triangle in the bottom right on a black background", 128)
    assert shapes.detect(big.resize((96, 96), Image.Resampling.BILINEAR)) == shapes.parse_caption(
        "a white triangle in the bottom right on a black background")
    with pytest.raises(ValueError):
        shapes.detect(np.zeros((10, 12, 3), np.uint8))


def test_data_source():
    data = shapes_data(11, size=32, n=5)
    items = list(data)
    assert len(items) == len(data) == 5
    img, cap = items[2]
    assert isinstance(img, Image.Image) and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), np.asarray(ShapesData(11, size=32)[2][0])) and cap == data[2][1]
    assert shapes.detect(img) == shapes.parse_caption(cap)
    styled = ShapesData(0, outline=True)
    for i in range(4):
        img, cap = styled[i]
        assert cap.endswith(", outline style") and shapes.detect(img).outline
    with pytest.raises(IndexError):
        data[5]


def test_training_source_spec():
    from fewstep.errors import FewstepError
    from fewstep.worlds.shapes.data import training_source

    s = training_source("")
    assert (s.seed, s.size, s.outline, s.n) == (0, 64, False, None)
    with pytest.raises(TypeError):
        len(s)  # endless: the trainer reads it in index order
    s = training_source("3,outline,size=32,n=100")
    assert (s.seed, s.size, s.outline, len(s)) == (3, 32, True, 100)
    assert training_source("outline=0.25").outline == 0.25
    for bad in ("x", "size=big", "outline=2", "colour=red"):
        with pytest.raises(FewstepError):
            training_source(bad)
