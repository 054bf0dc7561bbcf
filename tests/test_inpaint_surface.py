"""Inpainting where users reach it: `fewstep generate --mask`, A1111's img2img mask fields and OpenAI's
/v1/images/edits on `fewstep serve`, with PNG metadata; bad inputs are one clear error or a 422 naming the field."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fewstep
from fewstep.cli import main
from fewstep.images import alpha_mask, fill_masked, read_parameters
from fewstep.serve.config import ServeConfig
from tests.support.images import assert_close_images
from tests.support.serve import LiveServer, decode_png, default_engine

IMG2IMG, EDITS = "/sdapi/v1/img2img", "/v1/images/edits"


def picture(size=64):
    image = Image.new("RGB", (size, size), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((8, 8, 28, 28), fill=(220, 30, 30))
    return image


def left_mask(size=64):
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size - 1), fill=255)
    return mask


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(image):
    return base64.b64encode(png(image)).decode()


def engines(mask=None, **kw):
    """The engine's own inpainted image for these settings: what every surface must give."""
    kw = dict(dict(init_image=picture(), mask=left_mask() if mask is None else mask), **kw)
    return default_engine().generate("a red circle", **kw).images[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint")
    picture().save(root / "in.png")
    left_mask().save(root / "mask.png")
    left_mask(32).save(root / "small-mask.png")
    (root / "broken.png").write_text("no")
    return root


# ---- helpers --------------------------------------------------------------------------------------------------
def test_fill_and_alpha_masks():
    filled = np.asarray(fill_masked(picture(), left_mask()))
    assert np.array_equal(filled[:, 32:], np.asarray(picture())[:, 32:])  # kept where black
    assert tuple(filled[20, 20]) != (220, 30, 30)  # the red circle under the mask is painted over
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.eval(left_mask(), lambda v: 255 - v))  # transparent on the left: edit there
    assert np.array_equal(np.asarray(alpha_mask(rgba)), np.asarray(left_mask()))
    assert alpha_mask(picture()) is None


# ---- the CLI --------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main(["generate", *map(str, argv), "-q"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_inpaints_and_records_the_mask_blur(capsys, tmp_path, files):
    code, out, err = run(capsys, "a red circle", "--init-image", files / "in.png", "--mask", files / "mask.png",
                         "--mask-blur", 3, "--strength", 1.0, "--seed", 1, "--dtype", "fp32", "--out", tmp_path,
                         "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["mask"] == str(files / "mask.png") and data["mask_blur"] == 3 and data["padding_mask_crop"] is None
    image = Image.open(data["images"][0]["path"])
    params = read_parameters(image.text["parameters"])
    assert params["Mask blur"] == "3" and params["Denoising strength"] == "1"
    assert_close_images(image.convert("RGB"), engines(mask_blur=3, strength=1.0, seed=1))


def test_padding_mask_crop_and_a_mask_of_another_size(capsys, tmp_path, files):
    code, out, err = run(capsys, "a red circle", "--init-image", files / "in.png", "--mask", files / "small-mask.png",
                         "--padding-mask-crop", 4, "--seed", 1, "--dtype", "fp32", "--out", tmp_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert any("resized" in w for w in data["warnings"])
    params = read_parameters(Image.open(data["images"][0]["path"]).text["parameters"])
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "4"


@pytest.mark.parametrize("argv, message", [
    (["--mask", "{f}/mask.png"], "--mask needs --init-image"),
    (["--init-image", "{f}/in.png", "--mask-blur", "4"], "only apply with --mask"),
    (["--init-image", "{f}/in.png", "--mask", "{f}/mask.png", "--mask-blur", "-1"], "--mask-blur takes 0..256"),
    (["--init-image", "{f}/in.png", "--mask", "{f}/mask.png", "--padding-mask-crop", "-2"], "pixels >= 0"),
    (["--init-image", "{f}/in.png", "--mask", "{f}/missing.png"], "--mask: "),
    (["--init-image", "{f}/in.png", "--mask", "{f}/broken.png"], "cannot read"),
    (["--init-image", "{f}/broken.png"], "--init-image: cannot read"),
])
def test_bad_mask_flags_fail_before_the_model_loads(capsys, files, monkeypatch, argv, message):
    monkeypatch.setattr(fewstep, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run(capsys, "x", *[a.format(f=files) for a in argv])
    assert code != 0 and out == "" and err.startswith("fewstep: error: ") and message in err


# ---- the server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served():
    with LiveServer(default_engine(), ServeConfig(max_wait=0.0, max_image_pixels=128 * 128)) as server:
        yield server


def img2img(served, **kw):
    body = dict(prompt="a red circle", steps=2, seed=2, init_images=[b64(picture())], mask=b64(left_mask()),
                denoising_strength=0.9)
    return served.client.post(IMG2IMG, json=dict(body, **kw))


def test_a1111_inpaint_keeps_the_unmasked_area_and_records_it(served):
    r = img2img(served, inpainting_fill=1, inpaint_full_res=False, mask_blur=2)
    assert r.status_code == 200, r.text
    out = decode_png(r.json()["images"][0])
    params = read_parameters(out.text["parameters"])
    assert params["Mask blur"] == "2" and "Inpaint area" not in params
    assert json.loads(r.json()["info"])["extra_generation_params"]["Mask blur"] == 2
    assert_close_images(out.convert("RGB"), engines(mask_blur=2, strength=0.9, steps=2, seed=2))


def test_a1111_defaults_fill_only_masked_and_invert(served):
    r = img2img(served)  # A1111's defaults: fill, only masked (padding 0), blur 4
    assert r.status_code == 200, r.text
    params = read_parameters(decode_png(r.json()["images"][0]).text["parameters"])
    assert params["Mask blur"] == "4" and params["Masked area padding"] == "0"
    inverted = img2img(served, inpainting_mask_invert=1, inpainting_fill=1, inpaint_full_res=False)
    assert inverted.status_code == 200, inverted.text
    from PIL import ImageOps

    assert_close_images(decode_png(inverted.json()["images"][0]).convert("RGB"),
                        engines(mask=ImageOps.invert(left_mask()), mask_blur=4, strength=0.9, steps=2, seed=2))
    noise = img2img(served, inpainting_fill=2, inpaint_full_res=False)
    assert noise.status_code == 200 and any("latent noise" in w for w in json.loads(noise.json()["info"])["warnings"])


def test_a1111_mask_of_another_size_is_resized_and_said(served):
    r = img2img(served, mask=b64(left_mask(32)), inpainting_fill=1, inpaint_full_res=False)
    assert r.status_code == 200, r.text
    assert any("resized" in w for w in json.loads(r.json()["info"])["warnings"])


@pytest.mark.parametrize("fields, param", [
    (dict(inpainting_fill=3), "inpainting_fill"),
    (dict(inpainting_fill=7), "inpainting_fill"),
    (dict(inpainting_mask_invert=2), "inpainting_mask_invert"),
    (dict(mask_blur=-1), "mask_blur"),
    (dict(inpaint_full_res_padding=-4), "inpaint_full_res_padding"),
    (dict(mask="bm90IGFuIGltYWdl"), "mask"),
    (dict(mask=b64(Image.new("L", (256, 256)))), "mask"),  # more pixels than --max-image-pixels
])
def test_bad_inpainting_fields_are_422(served, fields, param):
    r = img2img(served, **fields)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def edit(served, image=None, mask=None, **data):
    files = {"image": ("in.png", png(image or picture()), "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", png(mask), "image/png")
    return served.client.post(EDITS, files=files, data=dict(dict(prompt="a red circle", steps="2", seed="3"), **data))


def openai_mask():
    """OpenAI's convention: transparent where to edit (the left half)."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.putalpha(Image.eval(left_mask(), lambda v: 255 - v))
    return mask


def test_openai_edits_with_a_mask_inpaint_where_transparent(served):
    r = edit(served, mask=openai_mask(), n="2", response_format="b64_json")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [3, 4]
    out = decode_png(data[0]["b64_json"])
    assert out.size == (64, 64) and read_parameters(out.text["parameters"])["Denoising strength"] == "1"
    assert_close_images(out.convert("RGB"), engines(strength=1.0, steps=2, seed=3))


def test_openai_edits_without_a_mask_is_image_to_image(served):
    r = edit(served, strength="0.5", size="32x32", loras="{}")
    assert r.status_code == 200, r.text
    out = decode_png(r.json()["data"][0]["b64_json"])
    params = read_parameters(out.text["parameters"])
    assert out.size == (32, 32) and params["Denoising strength"] == "0.5" and "Mask blur" not in params
    # DALL-E 2's rule: an image with transparent pixels and no mask is edited where transparent
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.eval(left_mask(), lambda v: 255 - v))
    r = edit(served, image=rgba)
    assert r.status_code == 200 and "Mask blur" in read_parameters(
        decode_png(r.json()["data"][0]["b64_json"]).text["parameters"])
    r = edit(served, mask=left_mask(32).convert("RGBA"))  # opaque: nothing to edit, said by the engine
    assert r.status_code == 200 and any("resized" in w for w in r.json()["warnings"])


def test_bad_edits_are_422_naming_the_field(served):
    r = served.client.post(EDITS, json={"prompt": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = served.client.post(EDITS, data={"prompt": "x"}, files={"other": ("x", b"x")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = served.client.post(EDITS, data={"prompt": "x"}, files={"image": ("x.png", b"nope", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = edit(served, n="many")
    assert r.status_code == 422 and r.json()["error"]["param"] == "n"
    r = edit(served, loras="{bad")
    assert r.status_code == 422 and r.json()["error"]["param"] == "loras"
    r = edit(served, strength="2")
    assert r.status_code == 422 and r.json()["error"]["param"] == "strength"
    r = served.client.post(EDITS, data={"prompt": "x"}, files={"image": ("in.png", png(picture()), "image/png"),
                                                               "mask": ("m.png", b"nope", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "mask"
