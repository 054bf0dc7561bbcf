"""Bad inputs that once got a 500, a traceback, a hang or a leak: each is refused in one clear line (CLI) or a 422
naming the field (HTTP), before any work, and the server keeps serving the same images after them."""

import base64
import io
import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fewstep.cli import main
from fewstep.errors import LoadError, RequestError
from fewstep.lora.apply import open_lora
from fewstep.request import GenerateRequest
from fewstep.serve.config import ServeConfig
from fewstep.train.config import TrainError
from fewstep.train.data import ImageFolder
from tests.support.images import assert_close_images
from tests.support.loras import random_lora
from tests.support.serve import LiveServer, decode_png, default_engine

SMALL = 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = default_engine()
    root = tmp_path_factory.mktemp("bad-loras")
    lora = random_lora(engine.c.unet, seed=3, scale=0.1)
    save_file(lora, str(root / "style.safetensors"))
    # finite, but fused they overflow: the UNet's output, then the decoded image, is NaN
    save_file({k: v * 1e30 if k.endswith("weight") else v for k, v in lora.items()}, str(root / "huge.safetensors"))
    save_file({k: (v * 100).to(torch.int64) for k, v in lora.items()}, str(root / "ints.safetensors"))
    os.symlink("loop.safetensors", root / "loop.safetensors")
    os.symlink("/etc/hostname", root / "outside.safetensors")
    with LiveServer(engine, ServeConfig(lora_dir=str(root), max_wait=0.0, max_size=64)) as server:
        server.root = root
        yield server


def post(server, path, body):
    """A JSON body sent as raw bytes: json.dumps writes a lone surrogate as the escape "\\ud800", as clients do."""
    return server.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def refused(r, param, *words):
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words), err
    return err["message"]


def fixed_image(server):
    r = post(server, "/v1/images/generations", {"prompt": "a red circle", "size": f"{SMALL}x{SMALL}", "seed": 3,
                                               "steps": 2})
    assert r.status_code == 200, r.text
    return decode_png(r.json()["data"][0]["b64_json"])


def test_lone_surrogates_are_422_in_both_dialects_and_spare_batch_mates(served):
    before = fixed_image(served)
    results = {}

    def good(i):  # sent at the same time as the bad ones: their batches must not be broken by them
        results[i] = post(served, "/v1/images/generations", {"prompt": f"a shape {i}", "size": f"{SMALL}x{SMALL}",
                                                              "seed": i, "steps": 2})

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    refused(post(served, "/v1/images/generations", {"prompt": "a red circle \ud800", "size": f"{SMALL}x{SMALL}"}),
            "prompt", "not valid Unicode")
    refused(post(served, "/v1/images/generations", {"prompt": "a", "negative_prompt": "\udfff x"}),
            "negative_prompt", "not valid Unicode")
    refused(post(served, "/sdapi/v1/txt2img", {"prompt": "a \udc80", "width": SMALL, "height": SMALL}), "prompt")
    refused(post(served, "/sdapi/v1/txt2img", {"prompt": "a", "negative_prompt": "\ud800"}), "negative_prompt")
    for t in threads:
        t.join(60)
    assert all(r.status_code == 200 for r in results.values()) and len(results) == 3
    assert served.metric("fewstep_requests_total", route="/v1/images/generations", status="500") == 0
    assert_close_images(fixed_image(served), before)
    with pytest.raises(RequestError, match="not valid Unicode") as e:
        GenerateRequest(prompt="a \udcff b")
    assert e.value.field == "prompt"


def test_unusable_lora_files_are_422_naming_the_lora_never_the_folder(served):
    root = str(served.root)
    assert [d["name"] for d in served.client.get("/sdapi/v1/loras").json()] == ["huge", "style"]
    messages = [
        refused(post(served, "/v1/images/generations", {"prompt": "a", "loras": {"loop": 1}}), "loras", "'loop'"),
        refused(post(served, "/sdapi/v1/txt2img", {"prompt": "a <lora:outside:1>"}), "prompt", "'outside'"),
        refused(post(served, "/v1/images/generations", {"prompt": "a", "loras": {"nope": 1}}), "loras", "'nope'",
                "available: huge, style"),
        refused(post(served, "/v1/images/generations", {"prompt": "a", "loras": {"ints": 1}}), "loras", "'ints'",
                "I64", "lora_down.weight"),
    ]
    assert not any(root in m or "hostname" in m or "loop.safetensors" in m for m in messages)


def test_a_lora_that_overflows_is_the_requests_fault_and_named(served):
    before = fixed_image(served)
    r = post(served, "/v1/images/generations", {"prompt": "a", "loras": {"huge": 1}, "size": f"{SMALL}x{SMALL}",
                                               "steps": 1})
    message = refused(r, "loras", "huge", "NaN")
    assert "--dtype" not in message and str(served.root) not in message
    assert_close_images(fixed_image(served), before)  # its weights left the engine exactly as it was


def test_loras_field_and_a_tag_for_the_same_lora_are_refused(served):
    r = post(served, "/v1/images/generations", {"prompt": "a <lora:style:0.5>", "loras": {"style": 1.0}})
    refused(r, "loras", "'style'", "given twice", "give it once")


def png_header_only(width, height):
    """A PNG that claims width x height and holds no pixel data: only a decoder that reads the header first refuses
    it for its size; one that decodes first fails on the data, or allocates width x height."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_uploads_are_checked_against_a_limit_that_follows_max_size(served):
    assert served.state.config.max_image_pixels == 128 * 128  # (2 x --max-size 64)^2
    assert ServeConfig(max_size=1024).max_image_pixels == 2048 * 2048
    buf = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buf, format="PNG")
    for raw, size in ((buf.getvalue(), "200x100"), (png_header_only(4096, 4096), "4096x4096"),
                      (png_header_only(60000, 60000), "decompression bomb")):
        r = post(served, "/sdapi/v1/img2img", {"prompt": "a", "init_images": [base64.b64encode(raw).decode()]})
        refused(r, "init_images", size, "limit of 16384 pixels")
    r = served.client.post("/v1/images/edits", data={"prompt": "a"},
                           files={"image": ("x.png", png_header_only(4096, 4096), "image/png")})
    refused(r, "image", "4096x4096", "limit of 16384")


# ---- the CLI ----------------------------------------------------------------------------------------------------
def run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_bad_text_out_and_steps_before_any_work(capsys, tmp_path, monkeypatch):
    import fewstep

    def no_load(*a, **k):
        raise AssertionError("the model was loaded for a request that was going to be refused")

    monkeypatch.setattr(fewstep, "load", no_load)
    (tmp_path / "file").write_text("x")
    cases = [
        (["a \udcff circle"], "prompt is not valid Unicode"),  # argv bytes that are not UTF-8, as Python keeps them
        (["a", "--negative", "\udce9"], "negative_prompt is not valid Unicode"),
        (["a", "--out", "/proc/x"], "--out /proc/x: cannot make the folder"),
        (["a", "--out", tmp_path / "file"], "is a file, not a folder"),
        (["a", "--out", tmp_path / "file" / "x.png"], "is a file, not a folder"),
        (["a", "--steps", "1-100"], "at most 1000 steps and 64 counts"),
        (["a", "--steps", "2000"], "at most 1000 steps"),
    ]
    for argv, words in cases:
        code, _, err = run(capsys, *argv, "-q", "--out" if "--out" not in argv else "--quiet",
                             *([tmp_path / "o"] if "--out" not in argv else []))
        assert code == 2 and words in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err


def test_cli_checks_every_step_count_before_the_first_image(capsys, tmp_path):
    code, _, err = run(capsys, "a", "--steps", "49-52", "--out", tmp_path, "-q", "--width", SMALL, "--height",
                         SMALL)
    assert code == 2 and "--steps 51:" in err and "1-50" in err
    assert list(tmp_path.iterdir()) == []  # not one image made (or lost) before the refusal


def test_cli_refuses_a_fifo_image_instead_of_waiting(capsys, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = {}

    def go():
        outcome["result"] = run(capsys, "a", "--init-image", fifo, "--out", tmp_path, "-q")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("--init-image on a FIFO waited for a writer")
    code, _, err = outcome["result"]
    assert code == 2 and "FIFO" in err and "--init-image" in err


def test_lora_folder_errors_name_no_missing_flag(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a", "b"):
        save_file({"x.lora_down.weight": torch.zeros(2, 2)}, str(folder / f"{name}.safetensors"))
    with pytest.raises(LoadError, match="holds 2 matching LoRA files") as e:
        open_lora(str(folder))
    assert "--weight-name" not in str(e.value) and "FOLDER/FILE.safetensors" in str(e.value)
    save_file({"x.lora_down.weight": torch.zeros(2, 2, dtype=torch.int64)}, str(tmp_path / "ints.safetensors"))
    with pytest.raises(LoadError, match=r"ints.safetensors: tensor x.lora_down.weight holds I64 values"):
        open_lora(str(tmp_path / "ints.safetensors"))


# ---- the trainer's captions -------------------------------------------------------------------------------------
def test_captions_are_utf8_with_a_bom_accepted_and_bad_bytes_named(tmp_path):
    for name in ("txt", "jsonl", "latin"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    (tmp_path / "txt" / "x.txt").write_bytes("\ufeffcafé au lait".encode())
    lines = [json.dumps({"file_name": "x.png", "text": "un café"}, ensure_ascii=False)]
    (tmp_path / "jsonl" / "metadata.jsonl").write_bytes("\ufeff".encode() + "\n".join(lines).encode())
    assert ImageFolder(tmp_path / "txt").items[0][1] == "café au lait"
    assert ImageFolder(tmp_path / "jsonl").items[0][1] == "un café"
    (tmp_path / "latin" / "x.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TrainError, match=r"latin/x.txt:1: not UTF-8 text \(byte 0xe9\)"):
        ImageFolder(tmp_path / "latin")
    good = json.dumps({"file_name": "x.png", "text": "ok"})
    (tmp_path / "latin" / "metadata.jsonl").write_bytes(f"{good}\n{good}\n".encode() + b'{"text": "\xe9"}\n')
    with pytest.raises(TrainError, match=r"metadata.jsonl:3: not UTF-8"):
        ImageFolder(tmp_path / "latin")


def test_a_fixed_seed_image_is_the_same_after_all_of_it(served):
    """The engine behind the server after every refusal above gives the image the engine gives alone."""
    ref = default_engine().generate("a red circle", seed=3, steps=2, width=SMALL, height=SMALL).images[0]
    assert_close_images(fixed_image(served), ref)
    assert np.asarray(ref).std() > 1  # an image, not a blank
