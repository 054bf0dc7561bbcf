"""Training data: image folders with captions, webdataset tar shards and programmatic sources, read in a fixed,
seeded order so that a run can be resumed at an exact position and split across processes.

A source is any object with `source[i] -> (PIL image, caption)`, deterministic in i, and optionally `len(source)`
(no len: an endless source, read in index order); a ControlNet's gives (image, caption, control image) triples.
Finite sources are shuffled once per epoch from the seed. The order of examples is global: step s of a run reads
the same examples whatever the number of processes, and each process loads only its own slice of the global batch.
"""

import importlib
import io
import json
import os
import random
import re
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TrainError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption", ".json")

# Programmatic sources by name: `--data NAME:ARG` calls the factory with ARG (a string, maybe empty).
# Entries are "module:function" so that nothing is imported until a source is asked for.
SOURCES = {"shapes": "fewstep.worlds.shapes.data:training_source"}


def register_source(name, factory):
    """Make `--data NAME:ARG` call factory(ARG) -> source (an object or a "module:function" string)."""
    SOURCES[name] = factory


# ---- sources ------------------------------------------------------------------------------------------------
CONDITIONING_DIR = "conditioning"  # an image folder's control images: conditioning/<the image's path>
CONDITIONING_KEY = "conditioning_image"  # ... or this metadata.jsonl field (diffusers' train_controlnet column)


class ImageFolder:
    """Images under a folder with captions from metadata.jsonl ({"file_name", "text"} per line, the Hugging Face
    imagefolder convention) or, without it, from a .txt file next to each image (the kohya convention).

    conditioning=True (ControlNet training): each image also needs its control image, named by the metadata line's
    "conditioning_image" field or found at conditioning/<the image's path> (any image extension)."""

    def __init__(self, root, *, conditioning=False):
        self.root = Path(root)
        meta = self.root / "metadata.jsonl"
        items, named = [], {}
        if meta.is_file():
            for n, line in enumerate(read_caption(meta).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    name, text = rec["file_name"], rec.get("text", rec.get("caption"))
                except (ValueError, KeyError, TypeError):
                    raise TrainError(f"{meta}:{n}: each line needs a JSON object with file_name and text") from None
                if text is None:
                    raise TrainError(f"{meta}:{n}: no text (caption) for {name}")
                path = self._inside(name, f"{meta}:{n}: image")
                if conditioning and rec.get(CONDITIONING_KEY):
                    named[path] = self._inside(rec[CONDITIONING_KEY], f"{meta}:{n}: conditioning image")
                items.append((path, str(text)))
        else:
            cond_dir = self.root / CONDITIONING_DIR
            for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
                txt = path.with_suffix(".txt")
                if txt.is_file() and cond_dir not in path.parents:
                    items.append((path, read_caption(txt).strip()))
        if not items:
            raise TrainError(f"{root} has no training images: add metadata.jsonl lines {{\"file_name\": ..., "
                             "\"text\": ...}} or a .txt caption next to each image")
        self.items = items
        self.conditions = [named.get(p) or self._conditioning(p) for p, _ in items] if conditioning else None
        if conditioning:
            missing = [p for (p, _), c in zip(items, self.conditions) if c is None]
            if missing:
                first = missing[0].relative_to(self.root.resolve())
                raise TrainError(f"{root}: {len(missing)} of {len(items)} images have no conditioning image (e.g. "
                                 f"{first}): put it at {CONDITIONING_DIR}/{first} or name it in metadata.jsonl's "
                                 f"\"{CONDITIONING_KEY}\" field")

    def _inside(self, name, what):
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            raise TrainError(f"{what} {name} not found inside {self.root}")
        return path

    def _conditioning(self, image):
        """conditioning/<image's path>, with any image extension."""
        rel = image.resolve().relative_to(self.root.resolve())
        base = self.root.resolve() / CONDITIONING_DIR / rel
        for ext in (rel.suffix,) + IMAGE_EXTS:
            for cand in (base.with_suffix(ext), base.with_suffix(ext.upper())):
                if cand.is_file():
                    return cand
        return None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, text = self.items[i]
        image = read_image(path.read_bytes(), path)
        if self.conditions is None:
            return image, text
        cond = self.conditions[i]
        return image, text, read_image(cond.read_bytes(), cond)


class TarShards:
    """webdataset shards (samples grouped by key: key.jpg + key.txt/.json), indexed once so that any sample can be
    read with one seek: exact resume and per-process slices without replaying the stream."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]
        index = []  # (shard, image offset, image size, caption offset, caption size, caption is json)
        for s, path in enumerate(self.paths):
            groups = {}
            try:
                with tarfile.open(path, "r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        base = os.path.basename(m.name)
                        dot = base.find(".")
                        if dot <= 0:
                            continue
                        key = os.path.join(os.path.dirname(m.name), base[:dot])
                        groups.setdefault(key, {})[base[dot:].lower()] = (m.offset_data, m.size)
            except (OSError, tarfile.TarError) as e:
                raise TrainError(f"cannot read tar shard {path}: {e} (shards must be uncompressed .tar files)") \
                    from None
            for key, parts in groups.items():
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                cap_ext = next((e for e in CAPTION_EXTS if e in parts), None)
                if img is None or cap_ext is None:
                    continue
                cap = parts[cap_ext]
                index.append((s, img[0], img[1], cap[0], cap[1], cap_ext == ".json"))
        if not index:
            raise TrainError(f"no samples with an image and a caption (.txt or .json) in {len(self.paths)} tar "
                             "shard(s)")
        self.index = np.array(index, dtype=np.int64)

    def __len__(self):
        return len(self.index)

    def _read(self, shard, offset, size):
        fd = os.open(self.paths[shard], os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def __getitem__(self, i):
        s, io_, isz, co, csz, is_json = (int(v) for v in self.index[i])
        caption = self._read(s, co, csz).decode("utf-8-sig", errors="replace")
        if is_json:
            rec = json.loads(caption)
            caption = rec.get("caption", rec.get("text", ""))
        return read_image(self._read(s, io_, isz), f"{self.paths[s]}#{i}"), caption.strip()


def read_caption(path):
    """A caption file's text (a .txt caption, metadata.jsonl) as UTF-8, a byte-order mark accepted (Windows editors
    write one); a file that is not UTF-8 is refused in one line naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TrainError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}): save the captions as "
                         "UTF-8") from None


def read_image(data, name):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise TrainError(f"cannot decode training image {name}: {e}") from None


def expand_braces(pattern):
    """webdataset shard patterns: "a-{000..012}.tar" (zero-padded ranges) and "{x,y}" alternatives."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        options = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [p for o in options for p in expand_braces(head + o + tail)]


def open_source(spec, *, conditioning=False):
    """The data source a --data value names: a folder (images or .tar shards), tar patterns, or NAME:ARG.
    conditioning: the run trains a ControlNet, so image folders must hold a control image per image."""
    if not isinstance(spec, str):
        return spec
    name, sep, arg = spec.partition(":")
    if sep and name in SOURCES and not Path(spec).exists():
        factory = SOURCES[name]
        if isinstance(factory, str):
            module, _, fn = factory.partition(":")
            try:
                factory = getattr(importlib.import_module(module), fn)
            except (ImportError, AttributeError):
                raise TrainError(f"data source {name!r} is not available in this installation ({factory})") from None
        return factory(arg)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not (path / "metadata.jsonl").exists():
            return _shards(shards, conditioning)
        return ImageFolder(path, conditioning=conditioning)
    if spec.endswith(".tar") or "{" in spec or "*" in spec:
        import glob

        paths = [p for pat in expand_braces(os.path.expanduser(spec)) for p in sorted(glob.glob(pat))]
        if not paths:
            raise TrainError(f"no tar shards match {spec}")
        return _shards(paths, conditioning)
    known = ", ".join(f"{n}:ARG" for n in SOURCES)
    raise TrainError(f"--data {spec}: not a folder, tar shards or a programmatic source ({known})")


def _shards(paths, conditioning):
    if conditioning:
        raise TrainError("ControlNet training reads image folders (a control image per image: conditioning/<path>, "
                         "or metadata.jsonl's \"conditioning_image\") and programmatic sources, not tar shards")
    return TarShards(paths)


# ---- preprocessing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    pixels: "object"  # float32 tensor (3, H, W) in [-1, 1]
    caption: str
    original_size: tuple  # (height, width) before resizing: SDXL's size conditioning
    crop_top_left: tuple  # (top, left) of the crop in the resized image: SDXL's crop conditioning
    conditioning: "object" = None  # ControlNet: float32 (3, H, W) in [0, 1], resized and cropped like the image


def prepare(image, caption, size, *, crop="center", flip=False, caption_dropout=0.0, rng=None, conditioning=None):
    """Resize the shorter side to `size`, crop a size x size square, maybe flip; record SDXL's conditioning. A
    ControlNet's conditioning image goes through the same geometry, so that it stays aligned with the image."""
    import torch
    from PIL import Image

    rng = rng or random.Random(0)
    w, h = image.size
    if conditioning is not None and conditioning.size != image.size:
        conditioning = conditioning.resize(image.size, resample=Image.Resampling.BILINEAR)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if crop == "center":
        top, left = (nh - size) // 2, (nw - size) // 2
    else:
        top, left = rng.randint(0, nh - size), rng.randint(0, nw - size)
    flipped = flip and rng.random() < 0.5
    box = (left, top, left + size, top + size)

    def geometry(im, resample):
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), resample=resample)
        im = im.crop(box)
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else im

    image = geometry(image, Image.Resampling.LANCZOS)
    if flipped:
        left = nw - size - left  # the crop as seen in the flipped image
    if caption_dropout and rng.random() < caption_dropout:
        caption = ""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    cond = None
    if conditioning is not None:  # diffusers' ControlNet scripts and pipelines feed control images in [0, 1]
        c = np.asarray(geometry(conditioning.convert("RGB"), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        cond = torch.from_numpy(c).permute(2, 0, 1).contiguous()
    return Prepared(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), caption, (h, w), (top, left), cond)


# ---- order and batches --------------------------------------------------------------------------------------
class Order:
    """Global example number g -> source index: a fresh seeded permutation per epoch (endless sources: g).
    Called from the loading threads: a batch can straddle two epochs while the next one is being loaded."""

    def __init__(self, source, seed):
        try:
            self.n = len(source)
        except TypeError:
            self.n = None
        self.seed = seed
        self._perms = {}  # epoch -> permutation; the two newest are kept
        self._lock = threading.Lock()

    def __call__(self, g):
        if self.n is None:
            return g
        epoch, i = divmod(g, self.n)
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                for old in sorted(self._perms)[:-2]:
                    del self._perms[old]
        return int(perm[i])


@dataclass
class Batch:
    pixels: "object"  # (B, 3, H, W) float32
    captions: list
    time_ids: "object"  # (B, 6) float32: original h, w, crop top, left, target h, w (SDXL)
    conditioning: "object" = None  # (B, 3, H, W) float32 in [0, 1]: a ControlNet's control images


class Loader:
    """Loads this process's slice of the global micro-batch starting at a global example number, one batch ahead
    on worker threads (image decoding releases the GIL)."""

    def __init__(self, source, *, seed, resolution, per_process, processes=1, rank=0, crop="center", flip=False,
                 caption_dropout=0.0, workers=2, conditioning=False):
        self.source, self.order = source, Order(source, seed)
        self.conditioning = conditioning  # the examples must carry a control image (ControlNet training)
        self.seed, self.size = seed, resolution
        self.per_process, self.processes, self.rank = per_process, processes, rank
        self.kw = dict(crop=crop, flip=flip, caption_dropout=caption_dropout)
        self.pool = ThreadPoolExecutor(workers) if workers else None
        self._ahead = None  # (position, futures)

    @property
    def global_batch(self):
        return self.per_process * self.processes

    def example(self, g):
        try:
            item = self.source[self.order(g)]
        except (IndexError, KeyError, ValueError, OSError) as e:
            raise TrainError(f"data source failed on example {g}: {type(e).__name__}: {e}") from None
        image, caption, cond = (*item, None)[:3]
        if self.conditioning and cond is None:
            raise TrainError("this data source gives no conditioning images, which a ControlNet trains on: give an "
                             f"image folder with {CONDITIONING_DIR}/ (or \"{CONDITIONING_KEY}\" in metadata.jsonl), "
                             "or a source of (image, caption, conditioning) triples such as shapes:SEED,controlnet")
        # per-example randomness (crop, flip, caption dropout) from (seed, g): the same on any process or resume
        rng = random.Random(f"{self.seed}:{g}")
        return prepare(image, caption, self.size, rng=rng, conditioning=cond if self.conditioning else None,
                       **self.kw)

    def _submit(self, position):
        first = position + self.rank * self.per_process
        ids = range(first, first + self.per_process)
        if self.pool is None:
            return [self.example(g) for g in ids]
        return [self.pool.submit(self.example, g) for g in ids]

    def batch(self, position):
        """The local batch at global position `position`; starts loading the one after it."""
        import torch

        if self._ahead is not None and self._ahead[0] == position:
            items = self._ahead[1]
        else:
            items = self._submit(position)
        if self.pool is not None:
            self._ahead = (position + self.global_batch, self._submit(position + self.global_batch))
            items = [f.result() for f in items]
        ids = [[*p.original_size, *p.crop_top_left, self.size, self.size] for p in items]
        cond = torch.stack([p.conditioning for p in items]) if self.conditioning else None
        return Batch(torch.stack([p.pixels for p in items]), [p.caption for p in items],
                     torch.tensor(ids, dtype=torch.float32), cond)

    def conditionings(self, n):
        """The first n control images in the source's own order (the ControlNet's default validation images)."""
        out = []
        for i in range(n):
            try:
                item = self.source[i]
            except (IndexError, KeyError):
                break
            if len(item) > 2:
                out.append(item[2])
        return out

    def captions(self, n):
        """The first n captions in the source's own order (default validation prompts)."""
        out = []
        for i in range(n):
            try:
                out.append(self.source[i][1])
            except (IndexError, KeyError):
                break
        return out

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
