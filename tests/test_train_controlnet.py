"""`fewstep train controlnet` on tiny models: the result is a diffusers ControlNet folder that starts as the base
UNet's encoder (zero convolutions at zero) and moves with training; a run killed with SIGKILL and resumed ends with
the same weights; control images stay aligned with their images; the shapes world's edge maps are the shape's
outline; bad inputs are one clear error each."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.train import TrainConfig, train
from fewstep.train.config import TrainError
from fewstep.worlds import shapes
from tests.support.images import assert_close_images

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


def draw_pair(i, size=(48, 40)):
    """A captioned image of a filled circle and its control image (the circle's outline on black)."""
    box = (8 + 3 * i, 8, 28 + 3 * i, 28)
    image = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(image).ellipse(box, fill=(220, 40, 40))
    cond = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(cond).ellipse(box, outline=(255, 255, 255))
    return image, cond


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Four 48x40 images with .txt captions and their control images under conditioning/ (the kohya layout)."""
    root = tmp_path_factory.mktemp("cn-images")
    (root / "conditioning").mkdir()
    for i in range(4):
        image, cond = draw_pair(i)
        image.save(root / f"{i}.png")
        cond.save(root / "conditioning" / f"{i}.png")
        (root / f"{i}.txt").write_text("a red circle")
    return root


def config(model, data, out, **kw):
    base = dict(max_steps=2, batch_size=2, resolution=32, quiet=True, validate_every=0, checkpoint_every=100,
                num_workers=1, lr=1e-2)
    base.update(kw)
    return TrainConfig(method="controlnet", model=str(model), data=str(data), out=str(out), **base)


def test_from_unet_starts_as_the_encoder_with_zero_convolutions(models):
    from fewstep.train.controlnet import controlnet_from_unet
    from fewstep.train.models import load_models

    m = load_models(models("sd"))
    net = controlnet_from_unet(m.unet, m.vae_factor)
    unet = m.unet.state_dict()
    own = net.state_dict()
    copied = [k for k in own if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert len(copied) > 20 and all(torch.equal(own[k], unet[k]) for k in copied)
    zero = [k for k in own if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero and all(own[k].abs().max() == 0 for k in zero)
    # the conditioning embedding brings the control image down to the latent size (this tiny VAE: factor 2)
    x = torch.zeros(1, 4, 16, 16)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 77, 32),
                        controlnet_cond=torch.rand(1, 3, 32, 32), return_dict=False)
    assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0  # no effect until trained


def test_the_shapes_teachers_controlnet_keeps_its_text_pooling_heads():
    """diffusers' from_unet drops addition_embed_type_num_heads; the shapes teacher's added text embedding has 4."""
    from fewstep.default_model import default_model_path
    from fewstep.train.controlnet import controlnet_from_unet
    from fewstep.train.models import load_models

    m = load_models(default_model_path())
    net = controlnet_from_unet(m.unet, m.vae_factor)
    assert net.config.addition_embed_type == "text" and net.config.addition_embed_type_num_heads == 4
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96)  # VAE factor 4
    s = torch.randn(2, 77, 64)
    with torch.no_grad():
        assert torch.equal(net.add_embedding(s), m.unet.add_embedding(s))


def test_command_writes_a_controlnet_folder_that_training_moved(models, pairs, tmp_path, capsys):
    from diffusers import ControlNetModel

    out = tmp_path / "cn"
    argv = ["train", "controlnet", "--base", str(models("sd")), "--data", str(pairs), "--out", str(out),
            "--max-steps", "2", "--batch-size", "2", "--resolution", "32", "--lr", "1e-2", "--validate-every", "1",
            "--validation-steps", "2,4", "--num-workers", "1", "-q"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    net = ControlNetModel.from_pretrained(out)
    sd = load_file(str(out / WEIGHTS))
    assert next(iter(sd.values())).dtype == torch.float32  # a model folder: fp32 unless --save-dtype
    unet = load_file(str(models("sd") / "unet" / WEIGHTS))
    moved = [k for k in sd if k.startswith("down_blocks") and not torch.equal(sd[k], unet[k])]
    assert moved  # the copied encoder trained
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.startswith("controlnet_down_blocks"))
    assert net.config.block_out_channels == [32, 64]
    record = json.loads((out / "train_config.json").read_text())
    assert record["config"]["method"] == "controlnet" and record["config"]["lr"] == 1e-2
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(np.isfinite(r["loss"]) for r in lines)
    # validation grids through the engine's ControlNet path: a row per prompt, its control image first
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-00000001.png", "step-00000002.png"]
    grid = Image.open(out / "validation" / grids[-1])
    assert grid.width > grid.height  # 3 columns (control, 2 and 4 steps) by 2 rows


def test_sdxl_base_and_fp16_export(models, pairs, tmp_path):
    out = train(config(models("sdxl"), pairs, tmp_path / "xl", max_steps=1, batch_size=1, save_dtype="fp16",
                       mixed_precision="bf16"))
    sd = load_file(str(out / WEIGHTS))
    assert next(iter(sd.values())).dtype == torch.float16 and all(torch.isfinite(v).all() for v in sd.values())
    assert json.loads((out / "config.json").read_text())["addition_embed_type"] == "text_time"


def test_resume_after_kill_9_is_exact(models, pairs, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, lr=1e-2)
    straight = train(config(models("sd"), pairs, tmp_path / "a", **kw))

    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "fewstep.cli", "train", "controlnet", "--base", str(models("sd")), "--data",
           str(pairs), "--out", str(out), "--max-steps", "4", "--checkpoint-every", "2", "--lr", "1e-2",
           "--batch-size", "2", "--resolution", "32", "--validate-every", "0", "--num-workers", "1", "-q"]
    env = dict(os.environ, FEWSTEP_TRAIN_KILL_AT_STEP="3", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert (out / "checkpoints" / "step-00000002" / "config.json").is_file()  # a checkpoint is a loadable folder
    assert not (out / WEIGHTS).exists()

    resumed = train(config(models("sd"), pairs, out, resume="latest", **kw))
    a, b = load_file(str(straight / WEIGHTS)), load_file(str(resumed / WEIGHTS))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_control_images_follow_the_images_geometry():
    from fewstep.train.data import prepare

    image, cond = draw_pair(0, size=(60, 40))
    for crop, flip in (("center", False), ("random", True)):
        for seed in range(4):
            import random

            p = prepare(image, "x", 32, crop=crop, flip=flip, rng=random.Random(seed), conditioning=cond)
            assert p.conditioning.shape == (3, 32, 32) and 0 <= p.conditioning.min() and p.conditioning.max() <= 1
            # the red disc's bounding box and the outline's agree after resize, crop and flip
            red = (p.pixels[0] > 0.3) & (p.pixels[1] < -0.3)
            ring = p.conditioning[0] > 0.5
            cols_red, cols_ring = red.any(0).nonzero(), ring.any(0).nonzero()
            assert abs(int(cols_red.min()) - int(cols_ring.min())) <= 1
            assert abs(int(cols_red.max()) - int(cols_ring.max())) <= 1


def test_metadata_names_the_conditioning_image(tmp_path):
    from fewstep.train.data import open_source

    (tmp_path / "ctl").mkdir()
    image, cond = draw_pair(1)
    image.save(tmp_path / "a.png")
    cond.save(tmp_path / "ctl" / "a-edges.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red circle",
                                                         "conditioning_image": "ctl/a-edges.png"}) + "\n")
    item = open_source(str(tmp_path), conditioning=True)[0]
    assert len(item) == 3 and item[1] == "a red circle" and np.asarray(item[2]).max() == 255
    assert len(open_source(str(tmp_path))[0]) == 2  # other methods see (image, caption)


def test_shapes_controlnet_source():
    from fewstep.worlds.shapes.data import training_source

    plain, cn = training_source("2"), training_source("2,controlnet")
    for i in range(6):
        image, caption, edges = cn[i]
        a = plain.attributes(i)
        assert np.array_equal(np.asarray(image), np.asarray(plain[i][0]))
        assert caption == f"a {a.color} shape on a {a.background} background"
        assert np.array_equal(np.asarray(edges), np.asarray(shapes.edge_map(a)))
    mixed = training_source("2,controlnet,colors=0.5")
    kinds = {" in the " in mixed[i][1] for i in range(40)}
    assert kinds == {True, False}
    assert all(" in the " in training_source("2,controlnet,colors=0")[i][1] for i in range(5))


@pytest.mark.parametrize("size", [32, 64])
def test_edge_map_is_the_shapes_outline(size):
    """Every edge map is a 1-pixel line on the shape's boundary, white on black, that the detectors read as that
    shape, outlined, at that position."""
    for shape in shapes.SHAPES:
        for position in shapes.POSITIONS:
            im = shapes.edge_map((shape, position), size)
            x = np.asarray(im)
            assert im.mode == "RGB" and set(np.unique(x)) == {0, 255} and (x[..., 0] == x[..., 2]).all()
            d = shapes.detect(im)
            assert (d.shape, d.position, d.background, d.outline) == (shape, position, "black", True), d
            line = x[..., 0] > 0
            cover = shapes.template(shape, position, size)
            assert (cover[line] > 0).all()  # on the shape, never outside it
            near = np.zeros_like(line)  # within a pixel of a pixel the boundary crosses (coverage < 1)
            edge = cover < 1
            near[1:-1, 1:-1] = edge[1:-1, 1:-1] | edge[:-2, 1:-1] | edge[2:, 1:-1] | edge[1:-1, :-2] | edge[1:-1, 2:]
            assert near[line].all()
            h = shapes.HALF_SIZE * size  # as long as the perimeter, in pixels
            perimeter = {"circle": 2 * np.pi * h, "square": 8 * h, "triangle": 2 * h + 2 * np.sqrt(5) * h}[shape]
            assert 0.75 * perimeter <= line.sum() <= 1.25 * perimeter, (line.sum(), perimeter)
            # closed: black pixels reached from the canvas border (4-connected) never reach the shape's centre
            outside = np.zeros_like(line)
            outside[0, :] = outside[-1, :] = outside[:, 0] = outside[:, -1] = True
            outside &= ~line
            for _ in range(2 * size):
                grown = outside.copy()
                grown[1:] |= outside[:-1]
                grown[:-1] |= outside[1:]
                grown[:, 1:] |= outside[:, :-1]
                grown[:, :-1] |= outside[:, 1:]
                outside = grown & ~line
            cx, cy = shapes.POSITIONS[position]
            assert not outside[int(cy * size), int(cx * size)]


def test_a_folder_without_conditioning_images_is_one_error(models, tmp_path):
    for i in range(2):
        draw_pair(i)[0].save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a red circle")
    with pytest.raises(TrainError, match=r"2 of 2 images have no conditioning image .*conditioning/0.png"):
        train(config(models("sd"), tmp_path, tmp_path / "out"))


def test_a_source_without_conditioning_is_one_error(models, tmp_path):
    with pytest.raises(TrainError, match="shapes:SEED,controlnet"):
        train(config(models("sd"), "shapes:0,size=32", tmp_path / "out", max_steps=1))


@pytest.mark.parametrize("what, message", [
    ("no-unet", "has no unet/ folder"),
    ("full-lcm", "is a full LCM"),
    ("shards", "not tar shards"),
])
def test_bad_bases_and_data_are_one_line_errors(models, pairs, tmp_path, capsys, what, message):
    import shutil

    base, data = models("sd"), pairs
    if what == "no-unet":
        base = tmp_path / "no-unet"
        shutil.copytree(models("sd"), base)
        shutil.rmtree(base / "unet")
    elif what == "full-lcm":
        base = models("sd-lcm")
    else:
        import tarfile

        data = tmp_path / "shards"
        data.mkdir()
        with tarfile.open(data / "0.tar", "w") as tar:
            tar.add(pairs / "0.png", arcname="0.png")
            tar.add(pairs / "0.txt", arcname="0.txt")
    code = main(["train", "controlnet", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-steps", "1", "--resolution", "32", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def untrained_shapes_controlnet(tmp_path_factory):
    """The shapes teacher's ControlNet as from_unet makes it (zero convolutions: it changes nothing yet)."""
    from fewstep.default_model import default_model_path
    from fewstep.train.controlnet import controlnet_from_unet, save_controlnet
    from fewstep.train.models import load_models

    m = load_models(default_model_path())
    return save_controlnet(controlnet_from_unet(m.unet, m.vae_factor), tmp_path_factory.mktemp("cn0"),
                           dtype=torch.float16)


def test_eval_shapes_controlnet_rows(untrained_shapes_controlnet, tmp_path):
    """The ControlNet rows run through the engine's ControlNet path; an untrained ControlNet changes no image, so
    they score what the colours-only prompts alone give."""
    import fewstep
    from fewstep.default_model import default_lcm_lora
    from fewstep.worlds.shapes import table

    engine = fewstep.load(device="cpu", dtype="fp32", lcm=False, check_finite=False)
    engine.load_lora(default_lcm_lora(), name="lcm", weight=0.0, lcm=True)
    engine.load_controlnet(str(untrained_shapes_controlnet), name=table.CONTROLNET)
    rows = table.control_rows()
    results, images = table.run_control_table(engine, rows, n=3, batch=2)
    assert [r["label"] for r in results] == ["ControlNet + teacher Euler 25", "ControlNet + LCM-LoRA 4"]
    for r in results:
        assert r["n"] == 3 and 0 <= r["shape_position"] <= min(r["shape"], r["position"]) + 1e-9
    attrs, prompts, seeds = table.control_set(3)
    assert prompts[0] == f"a {attrs[0].color} shape on a {attrs[0].background} background"
    plain = engine.generate(prompts[0], seed=seeds[0], sampler="euler", steps=25, guidance=rows[0].guidance)
    # the table ran it in a batch of 2, this alone: within 1/255 (the batch size moves the last bit on some CPUs)
    assert_close_images(plain.images[0], images[rows[0].label][0])
    (target,) = table.control_targets(results)
    assert target["goal"] == ">= 0.9" and target["target"].startswith("ControlNet + LCM-LoRA 4")
    grid = table.control_grid(rows, images, 3)
    assert grid.size == (230 + 3 * 128, 14 + 4 * 128)


def test_eval_shapes_cli_adds_the_controlnet_rows(untrained_shapes_controlnet, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "shapes", "--n", "2", "--no-outline", "--controlnet", str(untrained_shapes_controlnet),
                 "--controlnet-only", "--out", str(out), "-q"]) == 0
    rep = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rep["control_rows"]] == ["ControlNet + teacher Euler 25", "ControlNet + LCM-LoRA 4"]
    assert rep["rows"] == [] and not (out / "grid.png").exists() and (out / "control.png").is_file()
    md = (out / "results.md").read_text()
    assert "| ControlNet + LCM-LoRA 4 | 4 | 1 |" in md and "| configuration | steps | guidance | color |" not in md
    assert "--controlnet-only" in rep["command"] and rep["control_targets"]
    code = main(["eval", "shapes", "--no-outline", "--no-controlnet", "--controlnet-only", "--out",
                 str(tmp_path / "o"), "-q"])
    assert code == 2 and "--controlnet-only: no ControlNet" in capsys.readouterr().err


def _shipped_controlnet():
    from fewstep.worlds.shapes.table import shipped_controlnet

    return shipped_controlnet()


@pytest.mark.skipif(_shipped_controlnet() is None, reason="the shapes ControlNet is not shipped")
def test_shipped_controlnet_puts_the_edge_maps_shape_in_place():
    # a regression guard on the shipped weights (the quality claim is `fewstep eval shapes`' ControlNet rows)
    import fewstep
    from fewstep.request import ControlUnit

    folder = _shipped_controlnet()
    assert sum(f.stat().st_size for f in folder.iterdir()) < 6 * 2**20  # fp16, beside 27 MB of package data
    assert next(iter(load_file(str(folder / WEIGHTS)).values())).dtype == torch.float16
    engine = fewstep.load(device="cpu")  # the teacher + its LCM-LoRA, 4 steps
    engine.load_controlnet(str(folder), name="edges")
    right = 0
    for i, (shape, position) in enumerate([("circle", "top left"), ("square", "bottom right"),
                                           ("triangle", "center"), ("circle", "bottom left"),
                                           ("square", "top right"), ("triangle", "top left")]):
        unit = ControlUnit(model="edges", image=shapes.edge_map((shape, position)))
        image = engine.generate("a yellow shape on a purple background", seed=i, control=(unit,)).images[0]
        d = shapes.detect(image)
        right += (d.shape, d.position) == (shape, position)
    assert right >= 5, f"{right}/6 images have the edge map's shape at its position"
