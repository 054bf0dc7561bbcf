"""`fewstep stream`: the stream (fewstep.stream) over a video file or a folder of images, frames in, frames out.

Videos are read and written with PyAV (`pip install 'fewstep[video]'`); image folders need nothing more. Every input
frame gets one output frame: a frame the similarity filter skips shows the output of the last frame that ran, as a
live stream would.
"""

import sys
from pathlib import Path

from .errors import RequestError
from .speed_cli import add_arguments as add_speed_arguments
from .speed_cli import speed_kwargs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_CODECS = {".mp4": ("libx264", "mpeg4"), ".mkv": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"),
                ".avi": ("mpeg4",), ".webm": ("libvpx-vp9", "libvpx")}


def add_parser(sub):
    p = sub.add_parser("stream", help="image-to-image on every frame of a video or an image folder (stream batch)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, metavar="VIDEO_OR_FOLDER",
                   help="a video file (mp4, webm, mkv, mov, avi, gif...) or a folder of images (taken in name order)")
    p.add_argument("--out", required=True, metavar="VIDEO_OR_FOLDER",
                   help="a video file name (.mp4, .webm, .mkv, .mov, .avi) or a folder for PNG frames")
    p.add_argument("--prompt", default="", help="the text prompt")
    p.add_argument("--negative", help="negative prompt (used when guidance > 1)")
    p.add_argument("--strength", type=float, default=0.5, help="img2img strength in (0, 1] (default 0.5)")
    p.add_argument("--steps", type=int, help="the schedule's steps (default: the recipe's; LCM runs them all)")
    p.add_argument("--guidance", type=float, help="<= 1 (default): one UNet pass per frame; > 1: CFG, two")
    p.add_argument("--seed", type=int, default=0, help="the stream's fixed noise (default 0)")
    p.add_argument("--similarity", type=float, default=0.98,
                   help="skip frames this similar to the last one that ran (cosine, stochastic as StreamDiffusion); "
                        ">= 1 turns the filter off (default 0.98)")
    p.add_argument("--width", type=int, help="output width (default: the model's native size)")
    p.add_argument("--height", type=int, help="output height (default: the model's native size)")
    p.add_argument("--tiny-vae", default="auto", metavar="auto|full|tiny|PATH",
                   help="the autoencoder at both ends: auto (the family's tiny one when on this machine, default), "
                        "full, tiny (required), or an AutoencoderTiny folder / hub id")
    p.add_argument("--control", choices=("canny",), help="a ControlNet on each frame's canny edges")
    p.add_argument("--fps", type=float, help="output video frame rate (default: the input video's, or 24)")
    p.add_argument("--max-frames", type=int, help="stop after this many input frames")
    p.add_argument("--model", help="diffusers folder, hub id or single .safetensors checkpoint (default: shapes)")
    p.add_argument("--lcm", nargs="?", const=True, default=True, metavar="PATH",
                   help="attach the LCM-LoRA (default), or the one at PATH / hub id")
    p.add_argument("--no-lcm", dest="lcm", action="store_false", help="no LCM-LoRA")
    p.add_argument("--recipe", help="a few-step recipe (see `fewstep recipes`)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_speed_arguments(p)
    p.set_defaults(func=cmd_stream)


class Frames:
    """The input frames (PIL images) of a video or a folder; opened and checked before any model loads."""

    def __init__(self, src, max_frames=None):
        self.path = Path(src)
        self.max = max_frames
        self.fps = None
        if not self.path.exists():
            raise RequestError(f"--input {src}: no such file or folder")
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise RequestError(f"--input {src}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            self.count = len(self.files)
        else:
            self.files = None
            av = _av(f"--input {src}")
            try:
                with av.open(str(self.path)) as c:
                    if not c.streams.video:
                        raise RequestError(f"--input {src}: the file has no video stream")
                    v = c.streams.video[0]
                    self.fps = float(v.average_rate) if v.average_rate else None
                    self.count = v.frames or None
            except av.error.FFmpegError as e:
                raise RequestError(f"--input {src}: not a readable video or a folder ({_reason(e)})") from None
        if self.max is not None:
            if self.max < 1:
                raise RequestError(f"--max-frames must be at least 1, got {self.max}")
            self.count = min(self.count, self.max) if self.count else self.max

    def __iter__(self):
        import itertools

        return itertools.islice(self._all(), self.max)

    def _all(self):
        from .images import open_image

        if self.files is not None:
            for p in self.files:
                yield open_image(p, "input frame", then=lambda im: im.convert("RGB"))
            return
        av = _av("--input")
        try:
            with av.open(str(self.path)) as c:
                for frame in c.decode(video=0):
                    yield frame.to_image().convert("RGB")
        except av.error.FFmpegError as e:
            raise RequestError(f"--input {self.path}: the video cannot be decoded ({_reason(e)})") from None


class Output:
    """Where the output frames go: PNG files in a folder, or a video file through PyAV."""

    def __init__(self, dest, fps):
        self.path = Path(dest)
        self.fps = fps
        self.n = 0
        self.container = self.stream = None
        suffix = self.path.suffix.lower()
        self.video = suffix in VIDEO_CODECS or suffix == ".gif"
        if self.video:
            av = _av(f"--out {dest}")
            codecs = ("gif",) if suffix == ".gif" else VIDEO_CODECS[suffix]
            self.codec = next((c for c in codecs if _has_codec(av, c)), None)
            if self.codec is None:
                raise RequestError(f"--out {dest}: this PyAV build has no {' or '.join(codecs)} encoder: write a "
                                   "folder of PNG frames instead")
            folder = self.path.parent
        elif suffix in IMAGE_SUFFIXES:
            raise RequestError(f"--out {dest}: give a folder for the frames or a video name "
                               f"({', '.join(list(VIDEO_CODECS) + ['.gif'])})")
        else:
            folder = self.path
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RequestError(f"--out {dest}: cannot make the folder {folder} ({e.strerror or e})") from None

    def write(self, image):
        if not self.video:
            image.save(self.path / f"frame-{self.n:05d}.png")
            self.n += 1
            return
        import av

        if self.container is None:
            from fractions import Fraction

            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self.stream.width, self.stream.height = image.size
            self.stream.pix_fmt = "rgb8" if self.codec == "gif" else "yuv420p"
        for packet in self.stream.encode(av.VideoFrame.from_image(image)):
            self.container.mux(packet)
        self.n += 1

    def close(self):
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()


def cmd_stream(args):
    import fewstep

    frames = Frames(args.input, args.max_frames)
    if args.similarity is not None and not args.similarity >= 0:
        raise RequestError(f"--similarity must be >= 0, got {args.similarity}")
    if not 0 < args.strength <= 1:
        raise RequestError(f"--strength must be in (0, 1], got {args.strength}")
    out = Output(args.out, args.fps or frames.fps or 24.0)
    engine = fewstep.load(args.model, device=args.device, dtype=args.dtype, lcm=args.lcm, recipe=args.recipe,
                          **speed_kwargs(args))
    stream = engine.stream(args.prompt, negative_prompt=args.negative, strength=args.strength, steps=args.steps,
                           guidance=args.guidance, seed=args.seed, width=args.width, height=args.height,
                           similarity=args.similarity, tiny_vae=args.tiny_vae, control=args.control)
    if args.control and not args.quiet:
        print(f"ControlNet: {stream.control}", file=sys.stderr)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=frames.count, unit="frame", file=sys.stderr)
    # shows[i]: the processed frame whose output input frame i shows (itself, or the last one before it that ran);
    # outputs come out in the order the frames ran, the n-th for ran[n]
    shows, ran, results, got, written = [], [], {}, 0, 0
    try:
        for i, frame in enumerate(frames):
            skipped = stream.stats["skipped"]
            done = stream.process(frame)
            if stream.stats["skipped"] > skipped:  # it re-emitted the last output: nothing new
                shows.append(shows[-1])
            else:
                ran.append(i)
                shows.append(i)
                if done is not None:
                    results[ran[got]] = done
                    got += 1
            written = _write_ready(out, shows, results, written)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{1 / max(stream.stats['last_seconds'], 1e-6):.1f} frame/s")
        for done in stream.flush():
            results[ran[got]] = done
            got += 1
        written = _write_ready(out, shows, results, written)
    finally:
        if bar is not None:
            bar.close()
        out.close()
    if not args.quiet:
        st = stream.stats
        print(f"{written} frames -> {args.out} ({st['skipped']} skipped by the similarity filter, "
              f"{st['unet_calls']} UNet calls, {stream.depth} steps per frame)", file=sys.stderr)
    return 0


def _write_ready(out, shows, results, written):
    """Write the frames whose output is ready, in input order; forget the outputs no later frame shows."""
    while written < len(shows) and shows[written] in results:
        out.write(results[shows[written]])
        written += 1
    if written < len(shows):
        for j in [j for j in results if j < shows[written]]:
            del results[j]
    return written


def _av(what):
    try:
        import av
    except ImportError:
        raise RequestError(f"{what}: videos need PyAV (pip install 'fewstep[video]'); image folders work without "
                           "it") from None
    return av


def _has_codec(av, name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - PyAV raises different errors for unknown and unbuilt codecs
        return False


def _reason(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__
