"""ControlNet where users reach it: `fewstep generate --control`, the A1111 ControlNet extension's request shape and
routes on `fewstep serve`, the page's canny preview endpoint, PNG metadata, and batching by ControlNet; every bad
input is one clear error (CLI) or a 422 naming the field (HTTP), before any work."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import fewstep
from fewstep.cli import main, parse_control
from fewstep.images import read_control, read_parameters
from fewstep.request import ControlUnit, GenerateRequest
from fewstep.serve.batcher import Spec
from fewstep.serve.config import ServeConfig
from tests.support.control import edge_image, shapes_controlnet
from tests.support.serve import LiveServer, decode_png, default_engine

TXT2IMG, IMG2IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
ARGS = "alwayson_scripts.controlnet.args.0"


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    return shapes_controlnet(tmp_path_factory.mktemp("cn") / "shapes-edges")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("control-images")
    edge_image().save(root / "edges.png")
    (root / "broken.png").write_text("not an image")
    (root / "a:b").mkdir()
    edge_image().save(root / "a:b" / "edges.png")
    return root


def png_b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- the CLI --------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main(["generate", *map(str, argv), "-q"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parse_control_values_and_colons_in_paths(images, controlnet):
    assert parse_control(f"canny:{images}/edges.png") == dict(kind="canny", source=None,
                                                               image=f"{images}/edges.png", scale=1.0, start=0.0,
                                                               end=1.0)
    c = parse_control(f"{controlnet}:{images}/a:b/edges.png:0.5:0.2:0.8")
    assert (c["source"], c["image"], c["scale"], c["start"], c["end"]) == (
        controlnet, f"{images}/a:b/edges.png", 0.5, 0.2, 0.8)
    assert parse_control("owner/cn-canny:x.png:2")["source"] == "owner/cn-canny"  # a hub id


def test_generate_with_a_controlnet_folder_records_the_unit(capsys, tmp_path, images, controlnet):
    code, out, err = run(capsys, "a red circle", "--control", f"{controlnet}:{images}/edges.png:0.8:0:0.5",
                         "--seed", 3, "--dtype", "fp32", "--out", tmp_path, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["control"] == [dict(model="shapes-edges", source=controlnet, image=f"{images}/edges.png",
                                    preprocess=None, scale=0.8, start=0.0, end=0.5)]
    params = read_parameters(Image.open(data["images"][0]["path"]).text["parameters"])
    assert read_control(params["ControlNet 0"]) == {"Module": "none", "Model": "shapes-edges", "Weight": "0.8",
                                                    "Guidance Start": "0", "Guidance End": "0.5"}


def test_generate_with_a_kind_loads_the_familys_default(capsys, tmp_path, images, controlnet, monkeypatch):
    import fewstep.arch

    monkeypatch.setattr(fewstep.arch, "default_controlnet", lambda family, kind: controlnet)
    code, out, err = run(capsys, "a red circle", "--control", f"canny:{images}/edges.png", "--seed", 3,
                         "--dtype", "fp32", "--out", tmp_path)
    assert code == 0, err
    assert "control shapes-edges (canny of" in out
    params = read_parameters(Image.open(next(tmp_path.glob("*.png"))).text["parameters"])
    assert read_control(params["ControlNet 0"])["Module"] == "canny"


def test_a_kind_without_a_default_controlnet_is_one_error(capsys, images, monkeypatch):
    import fewstep.arch

    monkeypatch.setattr(fewstep.arch, "default_controlnet", lambda family, kind: None)
    code, _, err = run(capsys, "x", "--control", f"canny:{images}/edges.png", "--dtype", "fp32")
    assert code != 0 and err.startswith("fewstep: error: --control canny: fewstep knows no canny ControlNet")


BAD = [
    ("canny:{images}/edges.png:-1", "SCALE must be in 0..10"),
    ("canny:{images}/edges.png:1:0.6:0.4", "0 <= START < END <= 1"),
    ("canny:{images}/edges.png:1:0.5:0.5", "0 <= START < END <= 1"),
    ("canny:{images}/edges.png:0.5:0.9", "SCALE or SCALE:START:END"),
    ("canny:{images}/missing.png", "does not exist"),
    ("canny:{images}/broken.png", "cannot read"),
    ("{images}/no-such-controlnet:{images}/edges.png", "neither a preprocessor"),
    ("{images}/cn.pth:{images}/edges.png", "--allow-pickle"),
    ("canny", "KIND_OR_MODEL:IMAGE"),
]


@pytest.mark.parametrize("value, message", BAD)
def test_bad_control_values_fail_before_the_model_loads(capsys, images, monkeypatch, value, message):
    (images / "cn.pth").write_bytes(b"")
    monkeypatch.setattr(fewstep, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run(capsys, "x", "--control", value.format(images=images))
    assert code != 0 and out == ""
    assert err.startswith("fewstep: error: --control") and message in err and len(err.strip().splitlines()) == 1


# ---- the server -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(controlnet):
    import fewstep.serve.controlnets as module

    engine = default_engine()
    engine.load_controlnet(controlnet, name="shapes-edges")
    real = module.default_controlnet
    module.default_controlnet = lambda family, kind: controlnet  # the "canny" kind's default, loaded on first use
    try:
        with LiveServer(engine, ServeConfig(max_wait=0.0)) as server:
            yield server
    finally:
        module.default_controlnet = real
        for name in list(engine.controlnets):  # the engine is shared with other test modules
            engine.unload_controlnet(name)


def unit(**kw):
    return dict(dict(image=png_b64(edge_image()), module="none", model="shapes-edges", weight=1.0,
                     guidance_start=0.0, guidance_end=1.0), **kw)


def txt2img(served, *units, **kw):
    body = dict(prompt="a red circle", steps=2, seed=4, alwayson_scripts={"controlnet": {"args": list(units)}}, **kw)
    return served.client.post(TXT2IMG, json=body)


def test_model_and_module_lists(served):
    assert served.client.get("/controlnet/model_list").json() == {"model_list": ["shapes-edges"]}
    assert served.client.get("/controlnet/module_list").json() == {"module_list": ["none", "canny"]}
    info = served.client.get("/api/info").json()["controlnet"]
    assert info["modules"] == ["none", "canny"] and info["defaults"] == {"canny": "shapes-edges"}


def test_txt2img_with_a_controlnet_unit_changes_the_image_and_says_so(served):
    plain = served.client.post(TXT2IMG, json=dict(prompt="a red circle", steps=2, seed=4)).json()
    r = txt2img(served, unit(weight=0.9, guidance_end=0.5))
    assert r.status_code == 200, r.text
    body = r.json()
    controlled = decode_png(body["images"][0])
    params = read_parameters(controlled.text["parameters"])
    assert read_control(params["ControlNet 0"]) == {"Module": "none", "Model": "shapes-edges", "Weight": "0.9",
                                                    "Guidance Start": "0", "Guidance End": "0.5"}
    assert "ControlNet 0" in json.loads(body["info"])["extra_generation_params"]
    diff = np.abs(np.asarray(controlled, np.int16) - np.asarray(decode_png(plain["images"][0]), np.int16))
    assert diff.max() > 5
    # nothing of the ControlNet stays on for the next request (a request without units gets the plain image)
    again = served.client.post(TXT2IMG, json=dict(prompt="a red circle", steps=2, seed=4)).json()
    assert np.abs(np.asarray(decode_png(again["images"][0]), np.int16)
                  - np.asarray(decode_png(plain["images"][0]), np.int16)).max() <= 2


def test_a1111_model_names_with_hashes_and_disabled_units(served):
    r = txt2img(served, unit(model="shapes-edges [d14c016b]"), unit(enabled=False, model="nope"))
    assert r.status_code == 200, r.text
    params = read_parameters(decode_png(r.json()["images"][0]).text["parameters"])
    assert "ControlNet 0" in params and "ControlNet 1" not in params


def test_a_module_alone_uses_the_default_controlnet_and_img2img_defaults_to_the_init_image(served):
    r = txt2img(served, unit(model="None", module="canny", input_image=png_b64(edge_image()), image=None))
    assert r.status_code == 200, r.text
    params = read_parameters(decode_png(r.json()["images"][0]).text["parameters"])
    assert read_control(params["ControlNet 0"])["Module"] == "canny"
    body = dict(prompt="a red circle", steps=2, seed=4, init_images=[png_b64(edge_image())],
                denoising_strength=0.5, alwayson_scripts={"controlnet": {"args": [unit(image=None)]}})
    r = served.client.post(IMG2IMG, json=body)
    assert r.status_code == 200, r.text


REFUSED = [
    (unit(model="control_v11p_sd15_depth"), f"{ARGS}.model", "not loaded"),
    (unit(model="None", module="none"), f"{ARGS}.model", "name a ControlNet"),
    (unit(module="openpose"), f"{ARGS}.module", "unknown module"),
    (unit(weight=-0.5), f"{ARGS}.weight", "0..10"),
    (unit(weight="strong"), f"{ARGS}.weight", "a number"),
    (unit(guidance_start=0.6, guidance_end=0.4), f"{ARGS}.guidance_start", "start < end"),
    (unit(guidance_end=1.5), f"{ARGS}.guidance_end", "start < end"),
    (unit(image="bm90IGFuIGltYWdl"), f"{ARGS}.image", "not a readable image"),
    (unit(image="%%%"), f"{ARGS}.image", "not valid base64"),
    (unit(image=None), f"{ARGS}.image", "give the control image"),
]


@pytest.mark.parametrize("arg, param, reason", REFUSED)
def test_bad_controlnet_units_are_422_naming_the_field(served, arg, param, reason):
    queued = served.state.batcher.queued_requests()
    r = txt2img(served, arg)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and reason in error["message"]
    assert served.state.batcher.queued_requests() == queued


def test_bad_script_shapes_are_422(served):
    r = served.client.post(TXT2IMG, json=dict(prompt="x", alwayson_scripts={"controlnet": {"args": "x"}}))
    assert r.status_code == 422 and r.json()["error"]["param"] == "alwayson_scripts.controlnet.args"
    r = served.client.post(TXT2IMG, json=dict(prompt="x", alwayson_scripts={"controlnet": {"args": [5]}}))
    assert r.status_code == 422 and r.json()["error"]["param"] == "alwayson_scripts.controlnet.args.0"


def test_preprocess_endpoint_returns_the_canny_image(served):
    from fewstep.control import preprocess

    buf = io.BytesIO()
    edge_image().save(buf, format="PNG")
    r = served.client.post("/api/preprocess", files={"image": ("edges.png", buf.getvalue(), "image/png")},
                           data={"module": "canny"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert np.array_equal(got, np.asarray(preprocess("canny", edge_image())))
    r = served.client.post("/api/preprocess", files={"image": ("x.png", b"nope", "image/png")})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = served.client.post("/api/preprocess", files={"image": ("edges.png", buf.getvalue(), "image/png")},
                           data={"module": "depth"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "module"


# ---- batching -------------------------------------------------------------------------------------------------
def spec(image, scale=1.0, model="a"):
    req = GenerateRequest(prompt="x", seeds=(1,), control=(ControlUnit(model=model, image=image, scale=scale),))
    return Spec(req)


def test_batch_keys_by_controlnet_not_by_control_image():
    a, b = edge_image(), edge_image()
    assert spec(a).key() == spec(b).key()  # control images are per image of the engine call
    assert spec(a).key() != spec(a, scale=0.5).key()
    assert spec(a).key() != spec(a, model="b").key()


def test_identical_uploads_decode_to_one_object(served):
    data = png_b64(edge_image())
    assert served.state.decode(data, "image") is served.state.decode(data, "image")
