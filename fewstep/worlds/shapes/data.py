"""Training data of the shapes world for fewstep's trainers: (PIL image, caption) pairs drawn from a seed, or
(image, caption, edge map) triples for a ControlNet."""

import numpy as np

from .world import DEFAULT_SIZE, caption, colors_caption, edge_map, render_array, sample_attributes


class ShapesData:
    """Random (PIL image, caption) pairs of the shapes world, reproducible from a seed.

    Map-style (item i is the same for the same seed, in any order or process) and iterable (items 0, 1, ...; endless
    when n is None). `outline` is False, True (every caption ends in ", outline style"), or a probability.

    `controlnet` set: items are (image, caption, edge map of the shape) triples for a ControlNet, and `colors` is the
    share of captions that name only the colours ("a red shape on a blue background", what the ControlNet rows of
    the evaluation prompt with); the rest are the full caption.
    """

    def __init__(self, seed=0, *, size=DEFAULT_SIZE, outline=False, n=None, controlnet=False, colors=1.0):
        self.seed, self.size, self.outline, self.n = int(seed), int(size), outline, n
        self.controlnet, self.colors = bool(controlnet), float(colors)

    def __len__(self):
        if self.n is None:
            raise TypeError("this ShapesData is endless (n=None)")
        return self.n

    def attributes(self, i):
        if self.n is not None and not 0 <= i < self.n:
            raise IndexError(i)
        return sample_attributes(np.random.default_rng([self.seed, int(i)]), outline=self.outline)

    def __getitem__(self, i):
        from PIL import Image

        a = self.attributes(i)
        image = Image.fromarray(render_array([a], self.size)[0])
        if not self.controlnet:
            return image, caption(a)
        # a draw of its own (not the attributes' generator), so the images match those of the plain source
        short = np.random.default_rng([self.seed, int(i), 1]).random() < self.colors
        return image, colors_caption(a) if short else caption(a), edge_map(a, self.size)

    def __iter__(self):
        i = 0
        while self.n is None or i < self.n:
            yield self[i]
            i += 1


def shapes_data(seed=0, *, size=DEFAULT_SIZE, outline=False, n=None, controlnet=False, colors=1.0):
    """ShapesData(seed, size=, outline=, n=, controlnet=, colors=): the data source the trainer accepts
    programmatically."""
    return ShapesData(seed, size=size, outline=outline, n=n, controlnet=controlnet, colors=colors)


def training_source(arg=""):
    """The source `fewstep train --data shapes:ARG` reads. ARG: comma-separated; a bare integer is the seed,
    `outline` asks for the outline style, `controlnet` for (image, caption, edge map) triples, and seed=, size=,
    outline= (a probability), n=, colors= (the share of colours-only captions, default 1) set the rest.
    "" -> seed 0, 64 px, filled, endless; "3,outline" -> seed 3, every caption outlined; "2,controlnet" -> seed 2
    with edge maps and colours-only captions."""
    from ...errors import FewstepError

    kw = dict(seed=0, size=DEFAULT_SIZE, outline=False, n=None, controlnet=False, colors=1.0)
    try:
        for part in filter(None, (p.strip() for p in str(arg).split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                if key in ("outline", "controlnet"):
                    kw[key] = True
                else:
                    kw["seed"] = int(key)
            elif key in ("seed", "size", "n"):
                kw[key] = int(value)
            elif key in ("outline", "colors"):
                kw[key] = float(value)
                if not 0 <= kw[key] <= 1:
                    raise ValueError
            else:
                raise ValueError
    except ValueError:
        raise FewstepError(f"shapes:{arg}: expected shapes:SEED[,outline][,controlnet][,size=PX][,n=COUNT]"
                           "[,outline=P][,colors=P] (e.g. shapes:0, shapes:3,outline or shapes:2,controlnet)") from None
    return ShapesData(**kw)
