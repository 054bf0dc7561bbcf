"""Training data of the shapes world for fewstep's trainers: (PIL image, caption) pairs drawn from a seed."""

import numpy as np

from .world import DEFAULT_SIZE, caption, render_array, sample_attributes


class ShapesData:
    """Random (PIL image, caption) pairs of the shapes world, reproducible from a seed.

    Map-style (item i is the same for the same seed, in any order or process) and iterable (items 0, 1, ...; endless
    when n is None). `outline` is False, True (every caption ends in ", outline style"), or a probability.
    """

    def __init__(self, seed=0, *, size=DEFAULT_SIZE, outline=False, n=None):
        self.seed, self.size, self.outline, self.n = int(seed), int(size), outline, n

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
        return Image.fromarray(render_array([a], self.size)[0]), caption(a)

    def __iter__(self):
        i = 0
        while self.n is None or i < self.n:
            yield self[i]
            i += 1


def shapes_data(seed=0, *, size=DEFAULT_SIZE, outline=False, n=None):
    """ShapesData(seed, size=, outline=, n=): the data source the trainer accepts programmatically."""
    return ShapesData(seed, size=size, outline=outline, n=n)


def training_source(arg=""):
    """The source `fewstep train --data shapes:ARG` reads. ARG: comma-separated; a bare integer is the seed,
    `outline` asks for the outline style, and seed=, size=, outline= (a probability), n= set the rest.
    "" -> seed 0, 64 px, filled, endless; "3,outline" -> seed 3, every caption outlined."""
    from ...errors import FewstepError

    kw = dict(seed=0, size=DEFAULT_SIZE, outline=False, n=None)
    try:
        for part in filter(None, (p.strip() for p in str(arg).split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                if key == "outline":
                    kw["outline"] = True
                else:
                    kw["seed"] = int(key)
            elif key in ("seed", "size", "n"):
                kw[key] = int(value)
            elif key == "outline":
                kw["outline"] = float(value)
                if not 0 <= kw["outline"] <= 1:
                    raise ValueError
            else:
                raise ValueError
    except ValueError:
        raise FewstepError(f"shapes:{arg}: expected shapes:SEED[,outline][,size=PX][,n=COUNT][,outline=P] "
                           "(e.g. shapes:0 or shapes:3,outline)") from None
    return ShapesData(kw["seed"], size=kw["size"], outline=kw["outline"], n=kw["n"])
