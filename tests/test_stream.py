"""The stream (fewstep.stream): each frame's output equals the sequential engine img2img of that frame with the same
seed (the stream batch only regroups the UNet calls), the similarity filter, update() mid-stream, and the errors."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fewstep
from fewstep.errors import RequestError
from fewstep.request import ControlUnit
from fewstep.stream import MAX_SKIPS
from tests.support.images import assert_close_images, max_diff, pixels

PROMPT = "a red circle on a blue background"


def frame(i, size=64):
    """A moving shape: every frame differs from the last."""
    img = Image.new("RGB", (size, size), (30, 40, 160))
    d = ImageDraw.Draw(img)
    s = size // 64
    x = (6 + 7 * i) * s
    d.ellipse((x, 12 * s, x + 26 * s, 38 * s), fill=(220, 40, 40))
    d.rectangle((40 * s, (30 + 3 * i) * s, 58 * s, (48 + 3 * i) * s), fill=(240, 220, 60))
    return img


def run(stream, frames):
    """(outputs per input frame, oldest first, with the flush) and the None count while filling."""
    outs = [stream.process(f) for f in frames]
    filling = 0
    while filling < len(outs) and outs[filling] is None:
        filling += 1
    return outs[filling:] + stream.flush(), filling


@pytest.fixture(scope="module")
def shapes(one_thread):
    return fewstep.load(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def tiny(models, one_thread):
    return fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)


@pytest.mark.parametrize("steps", [2, 3])
def test_stream_equals_sequential_img2img_on_the_shapes_model(shapes, steps):
    s = shapes.stream(PROMPT, strength=0.5, steps=steps, seed=7, similarity=None, tiny_vae="full")
    assert s.depth == steps and s.size == (64, 64)
    frames = [frame(i) for i in range(3)]
    outs, filling = run(s, frames)
    assert filling == steps - 1 and len(outs) == len(frames)
    # one UNet call per frame, plus the flush's for the frames still in flight
    assert s.stats["unet_calls"] == len(frames) + steps - 1 and s.stats["frames_out"] == len(frames)
    for f, out in zip(frames, outs):
        ref = shapes.generate(PROMPT, init_image=f, strength=0.5, steps=steps, seed=7).images[0]
        assert_close_images(out, ref)
    assert max_diff(outs[0], outs[-1]) > 10  # the frames differ, so the check above compares something


@pytest.mark.parametrize("recipe, steps, strength, guidance", [
    ("lcm", 2, 0.5, None),  # consistency (all steps run, on a grid shrunk by the strength): the per-step noise from the stream's fixed draws
    ("turbo", 4, 0.5, None),  # Euler ancestral in sigma space: noise on every step
    ("standard", 4, 0.5, 3.0),  # Euler with CFG: both halves of the batch get each frame's timestep
])
def test_stream_equals_sequential_img2img_per_sampler(tiny, recipe, steps, strength, guidance):
    kw = dict(recipe=recipe, steps=steps, strength=strength, guidance=guidance, seed=3, negative_prompt="blurry")
    s = tiny.stream(PROMPT, similarity=None, tiny_vae="full", **kw)
    frames = [frame(i) for i in range(2)]  # frame 0 runs alone then batched, frame 1 batched then alone (flush)
    outs, _ = run(s, frames)
    assert len(outs) == 2 and s.depth == 2
    for f, out in zip(frames, outs):
        assert_close_images(out, tiny.generate(PROMPT, init_image=f, **kw).images[0])


def test_frames_of_another_size_are_cropped_and_resized(tiny):
    s = tiny.stream(PROMPT, recipe="lcm", steps=1, strength=0.5, similarity=None, tiny_vae="full")
    wide = frame(2, 128).resize((192, 128))
    out = s.process(wide)
    assert out.size == (64, 64)
    assert_close_images(out, tiny.generate(PROMPT, recipe="lcm", steps=1, strength=0.5, seed=0,
                                           init_image=s.fit(wide)).images[0])
    assert s.fit(wide).size == (64, 64)


def test_the_filter_skips_identical_frames_and_not_changed_ones(tiny):
    s = tiny.stream(PROMPT, recipe="lcm", steps=1, strength=0.5, similarity=0.98, tiny_vae="full")
    a, b = frame(0), frame(5)
    first = s.process(a)
    again = [s.process(a) for _ in range(5)]
    assert s.stats["skipped"] == 5 and s.stats["unet_calls"] == 1
    assert all(x is first for x in again)  # the last output, re-emitted
    changed = s.process(b)
    assert s.stats["skipped"] == 5 and s.stats["unet_calls"] == 2
    assert max_diff(changed, first) > 10
    # the cap (StreamDiffusion's max_skip_frame): after more than MAX_SKIPS skips, one identical frame runs anyway
    capped = tiny.stream(PROMPT, recipe="lcm", steps=1, strength=0.5, similarity=0.98, tiny_vae="full")
    for _ in range(MAX_SKIPS + 3):
        capped.process(a)
    assert capped.stats["skipped"] == MAX_SKIPS + 1 and capped.stats["unet_calls"] == 2
    off = tiny.stream(PROMPT, recipe="lcm", steps=1, strength=0.5, similarity=None, tiny_vae="full")
    for _ in range(3):
        off.process(a)
    assert off.stats["skipped"] == 0 and off.stats["unet_calls"] == 3


def test_update_mid_stream(shapes):
    s = shapes.stream(PROMPT, strength=0.5, steps=2, seed=1, similarity=None, tiny_vae="full")
    assert s.process(frame(0)) is None
    s.update(prompt="a yellow square")
    out = s.process(frame(1))  # the pipeline kept running: frame 0 comes out, finished under the new prompt
    assert out is not None
    out2 = s.process(frame(2))  # frame 1 ran both steps under the new prompt
    assert_close_images(out2, shapes.generate("a yellow square", init_image=frame(1), strength=0.5, steps=2,
                                              seed=1).images[0])
    s.update(steps=3, seed=2)  # a new schedule and noise: the pipeline refills
    assert s.depth == 3
    assert s.process(frame(3)) is None and s.process(frame(4)) is None
    out5 = s.process(frame(5))
    assert_close_images(out5, shapes.generate("a yellow square", init_image=frame(3), strength=0.5, steps=3,
                                              seed=2).images[0])


@pytest.mark.parametrize("kw, field", [
    (dict(strength=0), "strength"), (dict(strength=1.5), "strength"), (dict(strength="x"), "strength"),
    (dict(steps=0), "steps"), (dict(prompt=3), "prompt"), (dict(similarity=-1), "similarity"),
    (dict(similarity="x"), "similarity"), (dict(seed=-1), "seed"), (dict(tiny_vae="/no/such/taesd"), "tiny_vae"),
    (dict(control="depth"), "control"), (dict(width=61), "width"), (dict(height="x"), "height"),
])
def test_errors_name_their_field(tiny, kw, field):
    kw = dict(dict(prompt=PROMPT, recipe="lcm", steps=2), **kw)
    with pytest.raises(RequestError) as e:
        tiny.stream(kw.pop("prompt"), **kw)
    assert e.value.field == field


def test_a_bad_update_changes_nothing(tiny):
    s = tiny.stream(PROMPT, recipe="lcm", steps=2, strength=0.5, similarity=None, tiny_vae="full")
    s.process(frame(0))
    for kw, field in ((dict(steps=0), "steps"), (dict(strength=2), "strength"), (dict(similarity=-1), "similarity"),
                      (dict(width=32), "width"), (dict(prompt=None), "prompt")):
        with pytest.raises(RequestError) as e:
            s.update(**kw)
        assert e.value.field == field
    out = s.process(frame(1))  # still the same pipeline: frame 0 comes out as if nothing happened
    assert_close_images(out, tiny.generate(PROMPT, recipe="lcm", steps=2, strength=0.5, seed=0,
                                           init_image=frame(0)).images[0])


def test_process_on_another_thread(tiny):
    kw = dict(recipe="lcm", steps=2, strength=0.5, similarity=None, tiny_vae="full")
    here = run(tiny.stream(PROMPT, **kw), [frame(i) for i in range(2)])[0]
    s = tiny.stream(PROMPT, **kw)  # built here, run there (as the server's engine thread runs it)
    there = []
    t = threading.Thread(target=lambda: there.extend(run(s, [frame(i) for i in range(2)])[0]))
    t.start()
    t.join()
    assert len(there) == 2
    for a, b in zip(here, there):
        assert_close_images(a, b)


def test_tiny_autoencoder_encodes_and_decodes(tiny, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    # the tiny model's VAE has a latent factor of 2: one downsampling block
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1)).save_pretrained(tmp_path)
    kw = dict(recipe="lcm", steps=2, strength=0.5, similarity=None)
    s = tiny.stream(PROMPT, tiny_vae=str(tmp_path), **kw)
    assert isinstance(s.vae, AutoencoderTiny)
    frames = [frame(i) for i in range(3)]
    outs, _ = run(s, frames)
    full = run(tiny.stream(PROMPT, tiny_vae="full", **kw), frames)[0]
    assert all(o.size == (64, 64) for o in outs)
    assert max_diff(outs[1], full[1]) > 10  # the tiny autoencoder ran, not the full VAE
    # batched with the frames around it or alone, a frame comes out the same
    alone = tiny.stream(PROMPT, tiny_vae=str(tmp_path), **kw)
    assert alone.process(frames[1]) is None
    assert_close_images(alone.flush()[0], outs[1])
    # "auto" without a TAESD in the (offline) hub cache is the full VAE
    assert tiny.stream(PROMPT, **kw).vae is None


def test_canny_control_equals_the_engine_controlnet_img2img(shapes):
    s = shapes.stream(PROMPT, strength=0.5, steps=2, seed=4, similarity=None, tiny_vae="full", control="canny")
    assert s.control in shapes.controlnets
    frames = [frame(i) for i in range(2)]
    outs, _ = run(s, frames)
    for f, out in zip(frames, outs):
        unit = ControlUnit(model=s.control, image=f, preprocess="canny")
        assert_close_images(out, shapes.generate(PROMPT, init_image=f, strength=0.5, steps=2, seed=4,
                                                 control=(unit,)).images[0])
    plain = shapes.generate(PROMPT, init_image=frames[0], strength=0.5, steps=2, seed=4).images[0]
    assert max_diff(outs[0], plain) > 3  # the ControlNet changed the image


def test_the_shapes_tiny_autoencoder_is_auto_and_close_to_the_full_vae(shapes):
    from diffusers import AutoencoderTiny

    from fewstep.stream import SHAPES_TINY_VAE

    assert (SHAPES_TINY_VAE / "config.json").exists()
    kw = dict(strength=0.5, steps=2, seed=0, similarity=None)
    s = shapes.stream(PROMPT, **kw)
    assert isinstance(s.vae, AutoencoderTiny)
    frames = [frame(i) for i in range(2)]
    tiny_outs = run(s, frames)[0]
    full_outs = run(shapes.stream(PROMPT, tiny_vae="full", **kw), frames)[0]
    for a, b in zip(tiny_outs, full_outs):
        err = (pixels(a).astype(float) - pixels(b)) / 255
        assert 10 * np.log10(1 / (err**2).mean()) > 20  # PSNR against the full VAE's frame, dB


def test_the_tiny_autoencoder_trainer_writes_one_the_stream_takes(shapes, tmp_path):
    from fewstep.worlds.shapes.tiny_vae import train

    report = train(tmp_path, minutes=0.02, n_world=16, n_scenes=16, batch=4, log=lambda m: None)
    assert report["steps"] >= 1 and set(report["held_out"]) >= {"decoder_psnr_vs_full_decoder"}
    s = shapes.stream(PROMPT, strength=0.5, steps=1, similarity=None, tiny_vae=str(tmp_path))
    assert s.vae is not None and s.process(frame(0)).size == (64, 64)
