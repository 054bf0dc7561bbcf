"""`fewstep stream`: image folders and videos (PyAV) in and out, one output per input frame, one-line errors."""

import pytest

import fewstep
from fewstep.cli import main
from tests.support.images import assert_close_images
from tests.test_stream import frame

av = pytest.importorskip("av")

ARGS = ["--prompt", "a red circle", "--steps", "2", "--strength", "0.5", "--seed", "5", "--tiny-vae", "full",
        "--dtype", "fp32", "--device", "cpu", "-q"]


def run(capsys, *argv):
    code = main(["stream", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_in_folder_out_matches_img2img_and_keeps_every_frame(capsys, tmp_path, one_thread):
    src = tmp_path / "in"
    src.mkdir()
    # frames 1 and 2 are the same picture: the filter skips the second, which shows frame 1's output
    clip = [frame(0), frame(3), frame(3), frame(6)]
    for i, f in enumerate(clip):
        f.save(src / f"{i:03d}.png")
    code, _, err = run(capsys, "--input", str(src), "--out", str(tmp_path / "out"), *ARGS)
    assert code == 0, err
    outs = sorted((tmp_path / "out").glob("frame-*.png"))
    assert len(outs) == 4
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in outs]
    engine = fewstep.load(device="cpu", dtype="fp32")
    for i in (0, 1, 3):
        ref = engine.generate("a red circle", init_image=clip[i], strength=0.5, steps=2, seed=5).images[0]
        assert_close_images(images[i], ref)
    assert_close_images(images[2], images[1], tol=0)  # the skipped frame shows the last output


def _write_video(path, frames, fps=12):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_image(f)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_in_video_out(capsys, tmp_path, one_thread):
    src = tmp_path / "clip.mp4"
    _write_video(src, [frame(i) for i in range(5)])
    code, _, err = run(capsys, "--input", str(src), "--out", str(tmp_path / "out.mp4"), "--max-frames", "4", *ARGS)
    assert code == 0, err
    with av.open(str(tmp_path / "out.mp4")) as c:
        got = [f.to_image() for f in c.decode(video=0)]
        rate = c.streams.video[0].average_rate
    assert len(got) == 4 and got[0].size == (64, 64) and float(rate) == 12


@pytest.mark.parametrize("make, argv, says", [
    (None, ["--input", "{tmp}/nothing", "--out", "{tmp}/o"], "no such file or folder"),
    ("empty", ["--input", "{tmp}/empty", "--out", "{tmp}/o"], "has no images"),
    ("text", ["--input", "{tmp}/notes.mp4", "--out", "{tmp}/o"], "not a readable video"),
    ("frames", ["--input", "{tmp}/frames", "--out", "{tmp}/o.png"], "give a folder for the frames or a video"),
    ("frames", ["--input", "{tmp}/frames", "--out", "{tmp}/o", "--strength", "2"], "--strength must be in (0, 1]"),
    ("frames", ["--input", "{tmp}/frames", "--out", "{tmp}/o", "--max-frames", "0"], "--max-frames"),
])
def test_bad_input_is_one_line(capsys, tmp_path, make, argv, says):
    if make == "empty":
        (tmp_path / "empty").mkdir()
    elif make == "text":
        (tmp_path / "notes.mp4").write_text("not a video")
    elif make == "frames":
        (tmp_path / "frames").mkdir()
        frame(0).save(tmp_path / "frames" / "a.png")
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep: error:") and says in lines[0], err
