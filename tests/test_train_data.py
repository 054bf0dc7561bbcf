"""Training data: image folders, tar shards, programmatic sources, the seeded global order and per-process slices,
preprocessing with SDXL's size/crop conditioning, and the config file / flag plumbing."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from fewstep.train import data
from fewstep.train.config import TrainConfig, TrainError, read_config_file


def image(w=48, h=40, color=(200, 30, 30)):
    return Image.new("RGB", (w, h), color)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    lines = []
    for i in range(5):
        name = f"sub/{i}.png" if i % 2 else f"{i}.png"
        image(color=(i * 40, 0, 0)).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"caption {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_with_metadata(folder):
    src = data.open_source(str(folder))
    assert len(src) == 5
    im, text = src[3]
    assert text == "caption 3" and im.size == (48, 40) and im.getpixel((0, 0)) == (120, 0, 0)


def test_image_folder_with_sidecar_captions(tmp_path):
    for i in range(3):
        image().save(tmp_path / f"{i}.jpg")
        (tmp_path / f"{i}.txt").write_text(f" cap {i}\n")
    image().save(tmp_path / "uncaptioned.png")
    src = data.open_source(str(tmp_path))
    assert len(src) == 3 and src[2][1] == "cap 2"


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(TrainError, match="no training images"):
        data.open_source(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(TrainError, match="missing.png not found"):
        data.open_source(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "../escape.png", "text": "x"}\n')
    with pytest.raises(TrainError, match="not found inside"):
        data.open_source(str(tmp_path))
    with pytest.raises(TrainError, match="not a folder"):
        data.open_source(str(tmp_path / "nope"))


def write_shard(path, start, n, json_caption=False):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            image(color=(i, 2 * i, 0)).save(buf, format="PNG")
            cap = json.dumps({"caption": f"shard caption {i}"}) if json_caption else f"shard caption {i}"
            for name, payload in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.{'json' if json_caption else 'txt'}",
                                                                     cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("lonely.txt")  # a caption without an image is skipped
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))


def test_tar_shards_by_pattern_folder_and_glob(tmp_path):
    write_shard(tmp_path / "train-000.tar", 0, 3)
    write_shard(tmp_path / "train-001.tar", 3, 2, json_caption=True)
    for spec in (str(tmp_path / "train-{000..001}.tar"), str(tmp_path), str(tmp_path / "train-*.tar")):
        src = data.open_source(spec)
        assert len(src) == 5
        im, text = src[4]
        assert text == "shard caption 4" and im.getpixel((0, 0)) == (4, 8, 0)
    assert data.expand_braces("a{1..3}b{x,y}") == ["a1bx", "a1by", "a2bx", "a2by", "a3bx", "a3by"]
    assert data.expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    with pytest.raises(TrainError, match="no tar shards"):
        data.open_source(str(tmp_path / "other-{0..1}.tar"))


class Counter:
    """An endless programmatic source: example i is a grey level and a caption naming it."""

    def __getitem__(self, i):
        return image(32, 32, (i % 256,) * 3), f"grey {i}"


def test_programmatic_sources_by_name():
    data.register_source("counter", lambda arg: Counter())
    try:
        src = data.open_source("counter:7")
        assert src[3][1] == "grey 3"
        order = data.Order(src, seed=0)
        assert [order(g) for g in range(4)] == [0, 1, 2, 3]  # endless: read in index order
    finally:
        del data.SOURCES["counter"]
    with pytest.raises(TrainError, match="not available"):
        data.register_source("gone", "fewstep.no_such_module:f")
        try:
            data.open_source("gone:1")
        finally:
            del data.SOURCES["gone"]


def test_order_is_a_seeded_permutation_per_epoch(folder):
    src = data.open_source(str(folder))
    a, b = data.Order(src, 3), data.Order(src, 3)
    first = [a(g) for g in range(5)]
    assert sorted(first) == list(range(5))
    assert [b(g) for g in range(10)][:5] == first  # deterministic
    assert sorted(a(g) for g in range(5, 10)) == list(range(5))  # each epoch covers the data once
    assert any([data.Order(src, seed)(g) for g in range(5)] != first for seed in range(4, 8))  # seeds differ


def test_process_slices_make_up_the_global_batch(folder):
    src = data.open_source(str(folder))
    one = data.Loader(src, seed=1, resolution=16, per_process=4, workers=0)
    parts = [data.Loader(src, seed=1, resolution=16, per_process=2, processes=2, rank=r, workers=2) for r in (0, 1)]
    for position in (0, 4, 8):  # crosses an epoch boundary (5 examples)
        whole = one.batch(position)
        halves = [p.batch(position) for p in parts]
        assert whole.captions == halves[0].captions + halves[1].captions
        assert torch.equal(whole.pixels, torch.cat([h.pixels for h in halves]))
        assert torch.equal(whole.time_ids, torch.cat([h.time_ids for h in halves]))
    for p in parts:
        p.close()


def test_prepare_resizes_crops_and_records_sdxl_conditioning():
    im = Image.new("RGB", (100, 50), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 50, 50))  # left half white
    p = data.prepare(im, "x", 32, crop="center")
    assert p.pixels.shape == (3, 32, 32) and p.original_size == (50, 100) and p.crop_top_left == (0, 16)
    assert p.pixels.min() >= -1 and p.pixels.max() <= 1
    r = data.prepare(im, "x", 32, crop="random", rng=__import__("random").Random(5))
    assert r.crop_top_left[0] == 0 and 0 <= r.crop_top_left[1] <= 32
    d = data.prepare(im, "x", 32, caption_dropout=1.0)
    assert d.caption == ""
    loader = data.Loader([(im, "x")], seed=0, resolution=32, per_process=1, workers=0)
    assert loader.batch(0).time_ids.tolist() == [[50, 100, 0, 16, 32, 32]]


def test_config_file_and_flags(tmp_path):
    import argparse

    from fewstep.train.cli import add_parser, config_from_args

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    add_parser(sub)
    parser = sub._name_parser_map["train"]
    cfg_file = tmp_path / "c.json"
    settings = {"teacher": "m", "data": "d", "batch-size": 3, "lr": 0.5, "validation_steps": [1, 4]}
    cfg_file.write_text(json.dumps(settings))
    args = parser.parse_args(["lcm-lora", "--config", str(cfg_file), "--out", "o", "--lr", "0.25"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.data, cfg.out, cfg.batch_size, cfg.lr) == ("m", "d", "o", 3, 0.25)
    assert cfg.validation_steps == (1, 4) and cfg.method == "lcm-lora"
    # a run's record repeats it
    (tmp_path / "train_config.json").write_text(json.dumps({"fewstep_version": "x", "config": cfg.record()}))
    assert read_config_file(tmp_path / "train_config.json")["batch_size"] == 3
    with pytest.raises(TrainError, match="needs --teacher"):
        config_from_args(parser.parse_args(["lcm-lora", "--data", "d", "--out", "o"]))
    with pytest.raises(TrainError, match="unknown setting 'bogus'"):
        cfg_file.write_text('{"bogus": 1}')
        config_from_args(parser.parse_args(["lora", "--config", str(cfg_file)]))
    with pytest.raises(TrainError, match="--batch-size must be at least 1"):
        TrainConfig("lora", "m", "d", "o", batch_size=0)
    with pytest.raises(TrainError, match="guidance range"):
        TrainConfig("lcm", "m", "d", "o", w_min=9, w_max=3)


def test_train_cli_is_light_and_reports_user_errors(capsys):
    import subprocess
    import sys

    code = ("import sys, fewstep.train.cli; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    from fewstep.cli import main

    assert main(["train", "lcm-lora", "--data", "d", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == "fewstep: error: train lcm-lora needs --teacher (as flags or in --config)"
