"""The official openai SDK against a live `fewstep serve` on loopback: generations (b64_json, url, extra_body),
models list/retrieve, edits with and without a mask, variations, streaming with partial images; and browser clients
on another origin (CORS). Images are checked against the engine's own for the same request."""

import base64
import io
import time

import httpx
import pytest
from PIL import Image
from safetensors.torch import save_file

from fewstep.images import alpha_mask, read_parameters
from fewstep.serve.config import ConfigError, ServeConfig
from tests.support.images import assert_close_images, max_diff
from tests.support.serve import LiveServer, default_engine

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
SMALL = 32  # pixels: a multiple of the default model's latent factor (4), and quick
ORIGIN = "http://localhost:5173"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.support.loras import random_lora

    engine = default_engine()
    root = tmp_path_factory.mktemp("sdk-loras")
    save_file(random_lora(engine.c.unet, seed=3, scale=0.1), str(root / "style.safetensors"))
    config = ServeConfig(lora_dir=str(root), max_wait=0.0, api_key=KEY, cors_origins=(ORIGIN,))
    with LiveServer(engine, config) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def png_file(image, name="in.png"):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return (name, buf.getvalue(), "image/png")


def decoded(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def init_image():
    image = Image.new("RGB", (SMALL, SMALL), (30, 40, 200))
    image.paste((220, 30, 30), (8, 8, 24, 24))
    return image


def test_generate_b64_json_with_extra_body_equals_the_engines_image(client):
    r = client.images.generate(model="dall-e-3", prompt="a red circle", n=2, size=f"{SMALL}x{SMALL}",
                               response_format="b64_json", extra_body={"steps": 2, "seed": 11, "guidance_scale": 1.5,
                                                                        "negative_prompt": "green"})
    assert len(r.data) == 2 and isinstance(r.created, int)
    images = [decoded(d.b64_json) for d in r.data]
    params = read_parameters(images[1].text["parameters"])
    assert params["Seed"] == "12" and params["Steps"] == "2" and params["CFG scale"] == "1.5"
    ref = default_engine().generate("a red circle", seed=11, steps=2, guidance=1.5, negative_prompt="green",
                                    width=SMALL, height=SMALL).images[0]
    assert_close_images(images[0], ref)


def test_generate_url_and_loras_in_extra_body(client, served):
    base = dict(prompt="a blue square", size=f"{SMALL}x{SMALL}", response_format="url")
    plain = client.images.generate(**base, extra_body={"seed": 4, "steps": 2})
    styled = client.images.generate(**base, extra_body={"seed": 4, "steps": 2, "loras": {"style": 1.0}})
    got = []
    for r in (plain, styled):
        assert r.data[0].b64_json is None and r.data[0].url.startswith(served.url + "/v1/images/files/")
        file = httpx.get(r.data[0].url, headers={"Authorization": f"Bearer {KEY}"})
        assert file.status_code == 200 and file.headers["content-type"] == "image/png"
        got.append(Image.open(io.BytesIO(file.content)))
    assert max_diff(got[0], got[1]) > 5  # the LoRA named in extra_body changed the image
    assert "style:1" in got[1].text["parameters"] and "style" not in got[0].text["parameters"]  # in the metadata


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids and all(isinstance(i, str) for i in ids)
    model = client.models.retrieve(ids[0])
    assert model.id == ids[0] and model.object == "model" and model.owned_by == "fewstep"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert "dall-e-3" in str(e.value)


def test_wrong_key_is_refused_by_the_sdk(served):
    with openai.OpenAI(base_url=served.url + "/v1", api_key="not-the-key", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_edit_without_mask_is_img2img_of_the_image(client):
    init = init_image()
    r = client.images.edit(image=png_file(init), prompt="a red square", extra_body={"seed": 3, "steps": 4,
                                                                                   "strength": 0.5})
    ours = decoded(r.data[0].b64_json)
    assert ours.size == init.size
    ref = default_engine().generate("a red square", init_image=init, strength=0.5, steps=4, seed=3).images[0]
    assert_close_images(ours, ref)
    listed = client.images.edit(image=[png_file(init)], prompt="a red square",  # sent as image[] (gpt-image style)
                                extra_body={"seed": 3, "steps": 4, "strength": 0.5})
    assert_close_images(decoded(listed.data[0].b64_json), ref)
    styled = client.images.edit(image=png_file(init), prompt="a red square",  # a form field loras[style]=1.0
                                extra_body={"seed": 3, "steps": 4, "strength": 0.5, "loras": {"style": 1.0}})
    styled = decoded(styled.data[0].b64_json)
    assert max_diff(styled, ours) > 5 and "style:1" in styled.text["parameters"]


def test_edit_with_mask_inpaints_the_transparent_area(client):
    init = init_image()
    mask = Image.new("RGBA", init.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, SMALL // 2, SMALL))  # transparent = edit (OpenAI's rule): the left half
    r = client.images.edit(image=png_file(init), mask=png_file(mask, "mask.png"), prompt="a green circle",
                           extra_body={"seed": 5, "steps": 4})
    ours = decoded(r.data[0].b64_json)
    ref = default_engine().generate("a green circle", init_image=init, mask=alpha_mask(mask, transparent_only=False),
                                    strength=1.0, steps=4, seed=5).images[0]
    assert_close_images(ours, ref)
    plain = client.images.edit(image=png_file(init), prompt="a green circle", extra_body={"seed": 5, "steps": 4})
    assert max_diff(ours, decoded(plain.data[0].b64_json)) > 5  # the mask made it an inpainting


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks variations deprecated (OpenAI retired it)
def test_create_variation_is_img2img_of_the_image(client):
    init = init_image()
    r = client.images.create_variation(image=png_file(init), n=2, extra_body={"seed": 8, "steps": 4})
    assert len(r.data) == 2
    ours = [decoded(d.b64_json) for d in r.data]
    assert ours[0].size == init.size and max_diff(ours[0], ours[1]) > 0
    ref = default_engine().generate("", init_image=init, strength=0.6, steps=4, seed=8).images[0]
    assert_close_images(ours[0], ref)
    params = read_parameters(ours[0].text["parameters"])
    assert params["Denoising strength"] == "0.6"


def test_stream_sends_partial_images_then_the_image(client):
    events = list(client.images.generate(prompt="a red circle", size=f"{SMALL}x{SMALL}", stream=True,
                                         partial_images=2, extra_body={"seed": 7, "steps": 4}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partials = [decoded(e.b64_json) for e in events[:2]]
    final = decoded(events[-1].b64_json)
    assert all(p.size == (SMALL, SMALL) for p in partials) and events[-1].size == f"{SMALL}x{SMALL}"
    assert max_diff(partials[0], final) > 0  # a preview of an earlier step, not the final image
    ref = client.images.generate(prompt="a red circle", size=f"{SMALL}x{SMALL}", extra_body={"seed": 7, "steps": 4})
    assert_close_images(final, decoded(ref.data[0].b64_json))
    assert read_parameters(final.text["parameters"])["Seed"] == "7"


def test_a_streamed_image_carries_the_same_metadata_as_a_plain_one(client):
    kw = dict(prompt="a blue square", size=f"{SMALL}x{SMALL}", extra_body={"seed": 5, "steps": 2,
                                                                            "loras": {"style": 0.5}})
    streamed = decoded(list(client.images.generate(**kw, stream=True))[-1].b64_json)
    plain = decoded(client.images.generate(**kw).data[0].b64_json)
    got, want = read_parameters(streamed.text["parameters"]), read_parameters(plain.text["parameters"])
    assert "Lora hashes" in want and got == want


def test_a_stream_its_client_drops_stops_the_engine(client, served):
    before = served.metric("fewstep_unet_steps_total")
    stream = client.images.generate(prompt="a star", size=f"{SMALL}x{SMALL}", n=8, stream=True, partial_images=3,
                                    extra_body={"steps": 50, "sampler": "euler"})
    assert next(iter(stream)).type == "image_generation.partial_image"  # sent after step 13 of 50
    stream.close()
    steps, deadline = None, time.monotonic() + 30
    while steps != served.metric("fewstep_unet_steps_total"):  # until no step has run for half a second
        assert time.monotonic() < deadline
        steps = served.metric("fewstep_unet_steps_total")
        time.sleep(0.5)
    assert 13 <= steps - before < 50


def test_stream_edit_and_bad_partial_images(client):
    events = list(client.images.edit(image=png_file(init_image()), prompt="a red square", stream=True,
                                     partial_images=1, extra_body={"seed": 1, "steps": 4, "strength": 1.0}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.images.generate(prompt="x", stream=True, partial_images=7)
    assert e.value.body["param"] == "partial_images"


# ---- browser clients on another origin ---------------------------------------------------------------------------
def test_cors_preflight_and_headers_for_the_allowed_origin_only(served):
    pre = httpx.options(served.url + "/v1/images/generations", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = httpx.get(served.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(served.url + "/v1/models", headers={"Origin": ORIGIN})  # no key: 401, still readable
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(served.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                              "Access-Control-Request-Method": "GET"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_no_cors_by_default_and_bad_origins_refused():
    from starlette.testclient import TestClient

    from fewstep.serve.app import create_app

    app = create_app(default_engine(), ServeConfig())  # no lifespan: no worker thread is started
    r = TestClient(app).get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in r.headers
    for bad in ("localhost:3000", "http://localhost:3000/app", "ftp://x"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            ServeConfig(cors_origins=(bad,))
    assert ServeConfig(cors_origins=("*", "https://a.example:8443")).cors_origins[0] == "*"


def test_cors_origin_flag_is_repeatable():
    from fewstep.cli import build_parser
    from fewstep.serve.cli import config_from

    args = build_parser().parse_args(["serve", "--cors-origin", ORIGIN, "--cors-origin", "https://b.example"])
    assert config_from(args).cors_origins == (ORIGIN, "https://b.example")
    assert config_from(build_parser().parse_args(["serve"])).cors_origins == ()


def test_multipart_mistakes_name_their_field(served):
    auth = {"Authorization": f"Bearer {KEY}"}
    image = png_file(init_image())
    cases = [("/v1/images/variations", {"image": image, "mask": png_file(init_image(), "m.png")}, {}, "mask"),
             ("/v1/images/variations", {}, {"n": "1"}, "image"),
             ("/v1/images/edits", {"image": image}, {"prompt": "x", "partial_images": "2"}, "partial_images"),
             ("/v1/images/edits", {"image": image}, {"prompt": "x", "loras[style]": "heavy"}, "loras.style")]
    for path, files, data, param in cases:
        r = httpx.post(served.url + path, files=files, data=data, headers=auth)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (path, r.text)
    r = httpx.post(served.url + "/v1/images/variations", json={"image": "x"}, headers=auth)
    assert r.status_code == 422 and "multipart" in r.json()["error"]["message"]
