"""The bad-input battery: hundreds of malformed requests against `fewstep serve` (both HTTP dialects) and
`fewstep generate`, each of which must be refused cleanly.

Starts a server (the embedded shapes model unless --model) on a free loopback port with a LoRA folder holding
good, broken and hostile files; sends fuzzed types, ranges, encodings, sizes, files, LoRA names, images and
headers; then runs the CLI with bad flags. A problem is a 5xx, a traceback in the server log or the CLI's stderr, a
hang (no answer within --hang-s), a body that leaks a path of this machine, or a CLI failure that is not one
line. A fixed-seed image is generated before and after the battery: it must be unchanged (within 1/255).
Prints tried / clean / problems, each problem on its own line. Loopback only; nothing else is contacted.

    nice -n 10 .venv/bin/python benchmarks/bad_inputs.py
"""

import argparse
import base64
import http.client
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from serve_load import HOST, commit, free_port, launch, stop

SIZE = 32  # pixels of the images the battery asks for (quick on a CPU)


# ---- the server and its LoRA folder ---------------------------------------------------------------------------
def lora_folder(root, model):
    """good.safetensors and the hostile files next to it; returns the folder."""
    import torch
    from safetensors.torch import save_file

    import fewstep
    from fewstep.lora.reference import random_lora

    engine = fewstep.load(model, device="cpu", dtype="fp32", lcm=False)
    good = random_lora(engine.c.unet, ("to_q", "to_k", "to_v"), rank=4, seed=1, scale=0.1, dtype=torch.float32)
    folder = Path(root) / "loras"
    folder.mkdir()
    save_file(good, str(folder / "good.safetensors"))
    save_file({k: v * 1e30 if k.endswith("weight") else v for k, v in good.items()}, str(folder / "huge.safetensors"))
    save_file({k: (v * 100).to(torch.int64) for k, v in good.items()}, str(folder / "ints.safetensors"))
    save_file({k: v.half() for k, v in good.items()}, str(folder / "half.safetensors"))
    save_file({"some.other.tensor": torch.zeros(3)}, str(folder / "notlora.safetensors"))
    save_file({k.replace("lora_unet_", "lora_unet_x"): v for k, v in good.items()}, str(folder / "nomatch.safetensors"))
    data = (folder / "good.safetensors").read_bytes()
    (folder / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "garbage.safetensors").write_bytes(os.urandom(4096))
    (folder / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    os.symlink("loop.safetensors", folder / "loop.safetensors")
    os.symlink("missing.safetensors", folder / "dangling.safetensors")
    os.symlink("/etc/hostname", folder / "outside.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "dir.safetensors").mkdir()
    return folder


def start_server(args, folder, log):
    port = free_port()
    cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--host", HOST, "--port", str(port), "--device", "cpu",
           "--dtype", "fp32", "--lora-dir", str(folder), "--max-size", str(args.max_size), "--timeout", "60",
           "--max-wait-ms", "5"]
    if args.model:
        cmd += ["--model", args.model]
    return launch(cmd, port, log=log), port


# ---- images for uploads ----------------------------------------------------------------------------------------
def png(w, h, mode="RGB", **kw):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), **kw).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(w, h, depth=8, color=2):
    """A PNG that claims w x h and has no pixel data: refused for its size only when the header is read first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + chunk(b"IEND", b""))


def image_bytes():
    """name -> bytes of images good and bad."""
    from PIL import Image

    out = {"ok": png(SIZE, SIZE, color=(200, 30, 30)), "rgba": png(SIZE, SIZE, "RGBA", color=(0, 0, 0, 0)),
           "gray16": png(SIZE, SIZE, "I;16"), "big": png(1024, 1024), "wide": png(4000, 8),
           "hdr4096": png_header_only(4096, 4096, 16, 6), "bomb": png_header_only(60000, 60000),
           "zero": png_header_only(0, 0), "garbage": os.urandom(2000), "empty": b"",
           "text": b"hello, not an image", "trunc": png(SIZE, SIZE, color=(1, 2, 3))[:60]}
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(buf, format="GIF")
    out["gif"] = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buf, format="JPEG")
    out["jpeg_trunc"] = buf.getvalue()[:200]
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(buf, format="TIFF")
    out["tiff"] = buf.getvalue()
    return out


# ---- the HTTP cases --------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


def http_cases(images):
    """(label, method, path, body bytes or None, headers) for every HTTP case."""
    cases = []

    def js(label, path, body, **headers):
        raw = json.dumps(body, allow_nan=True).encode() if not isinstance(body, bytes) else body
        cases.append((label, "POST", path, raw, {"Content-Type": "application/json", **headers}))

    gen, t2i, i2i = "/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
    base_o = {"prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "steps": 1}
    base_a = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": 1}
    texts = {"surrogate": "a red circle \ud800", "low surrogate": "\udfff", "nul": "a\x00b", "long": "x" * 5000,
             "emoji": "a 🟥 circle", "rtl": "\u202ecircle", "newline fake": "a\nNegative prompt: x\nSteps: 99",
             "empty": "", "tags only": "<lora:good:1>", "bad tag": "<lora:good:abc>", "tag path": "<lora:../x:1>",
             "tag loop": "<lora:loop:1>", "control chars": "\x1b[31mred\x07"}
    wrong_types = {"null": None, "int": 5, "list": ["a"], "dict": {"a": 1}, "bool": True, "float": 1.5}
    # OpenAI dialect: each field with wrong types, out-of-range values and odd encodings
    for name, v in {**texts, **wrong_types}.items():
        js(f"openai prompt {name}", gen, dict(base_o, prompt=v))
    for name, v in {"surrogate": "\ud800", "long": "y" * 5000, **wrong_types}.items():
        js(f"openai negative_prompt {name}", gen, dict(base_o, negative_prompt=v, guidance_scale=2))
    for v in (-1, 0, 9, 10**9, "2", 1.5, None, True, [1]):
        js(f"openai n={v!r}", gen, dict(base_o, n=v))
    for v in ("0x0", "99999x99999", "64x", "abc", "64x64x64", 123, "-64x64", "7x7", "33x33", "4096x4096",
              "256x256", "", " 32 x 32 ", "32X32", "auto", "1e3x1e3", "３２x３２"):
        js(f"openai size={v!r}", gen, dict(base_o, size=v))
    for v in (-1, 0, 51, 10**6, "4", 4.5, True, [2], 2**70):
        js(f"openai steps={v!r}", gen, dict(base_o, steps=v))
    for v in (-1, NAN, INF, -INF, 1e308, "x", 31, [1]):
        js(f"openai guidance_scale={v!r}", gen, dict(base_o, guidance_scale=v))
    for v in (-1, 2**63, 2**64, -(2**63), "x", 1.5, 2**63 - 1):
        js(f"openai seed={v!r}", gen, dict(base_o, seed=v))
    for v in ("x", "", "Euler a", "EULER", 5, "lcm\x00", "../lcm"):
        js(f"openai sampler={v!r}", gen, dict(base_o, sampler=v))
    for v in ("x", "", 7, "LCM"):
        js(f"openai recipe={v!r}", gen, dict(base_o, recipe=v))
    for v in ("x", 5, "URL"):
        js(f"openai response_format={v!r}", gen, dict(base_o, response_format=v))
    lora_values = {"loop": {"loop": 1}, "dangling": {"dangling": 1}, "outside": {"outside": 1}, "fifo": {"fifo": 1},
                   "dir": {"dir": 1}, "nope": {"nope": 1}, "traversal": {"../../etc/passwd": 1},
                   "absolute": {"/etc/hostname": 1}, "dotfile": {".hidden": 1}, "huge": {"huge": 1},
                   "ints": {"ints": 1}, "trunc": {"trunc": 1}, "empty": {"empty": 1}, "garbage": {"garbage": 1},
                   "hugeheader": {"hugeheader": 1}, "notlora": {"notlora": 1}, "nomatch": {"nomatch": 1},
                   "weight str": {"good": "x"}, "weight big": {"good": 1e9}, "weight nan": {"good": NAN},
                   "weight inf": {"good": INF}, "weight null": {"good": None}, "list": ["good"], "str": "good",
                   "five": {"good": 1, "half": 1, "huge": 1, "ints": 1, "nope": 1}, "surrogate name": {"\ud800": 1},
                   "empty name": {"": 1}, "long name": {"a" * 5000: 1}, "nul name": {"go\x00od": 1}}
    for name, v in lora_values.items():
        js(f"openai loras {name}", gen, dict(base_o, loras=v))
    js("openai loras and tag for one name", gen, dict(base_o, prompt="a <lora:good:0.5>", loras={"good": 1}))
    js("openai unknown fields", gen, dict(base_o, foo=1, quality="hd", style={"x": [1] * 100}))
    # A1111 dialect
    for name, v in {**texts, **wrong_types}.items():
        js(f"a1111 prompt {name}", t2i, dict(base_a, prompt=v))
    for name, v in {"surrogate": "\ud800", **wrong_types}.items():
        js(f"a1111 negative_prompt {name}", t2i, dict(base_a, negative_prompt=v, cfg_scale=2))
    for field, values in {"width": (-1, 0, 7, 33, 65, 4096, "x", 1.5, None), "height": (0, 10**9, "64"),
                          "batch_size": (0, -1, 9, 10**9, "x"), "n_iter": (0, 100, "x"),
                          "steps": (0, 51, -5, "x", 10**9), "cfg_scale": (-1, 1e308, "x", NAN, INF),
                          "seed": (-2, 2**63, 2**64, "x", 1.5),
                          "sampler_name": ("nope", "", 5, "Euler a", "DPM++ 2M Karras"),
                          "sampler_index": ("nope", 3)}.items():
        for v in values:
            js(f"a1111 {field}={v!r}", t2i, dict(base_a, **{field: v}))
    for name, v in {"not a dict": "x", "list": [1], "args not list": {"controlnet": {"args": "x"}},
                    "unit not dict": {"controlnet": {"args": [5]}},
                    "bad image": {"controlnet": {"args": [{"image": "!!!", "module": "canny"}]}},
                    "bad weight": {"controlnet": {"args": [{"image": "", "weight": NAN}]}},
                    "bad window": {"controlnet": {"args": [{"guidance_start": 0.9, "guidance_end": 0.1}]}},
                    "unknown model": {"controlnet": {"args": [{"model": "../../x", "module": "none"}]}},
                    "too many": {"controlnet": {"args": [{"module": "canny"}] * 9}}}.items():
        js(f"a1111 alwayson_scripts {name}", t2i, dict(base_a, alwayson_scripts=v))
    # A1111 img2img: uploads
    b64 = {k: base64.b64encode(v).decode() for k, v in images.items()}
    for name in images:
        js(f"a1111 img2img init {name}", i2i, dict(base_a, init_images=[b64[name]]))
    for name, v in {"none": [], "two": [b64["ok"], b64["ok"]], "not base64": ["!!!not base64!!!"],
                    "data url": ["data:image/png;base64," + b64["ok"]], "data url garbage": ["data:,xyz"],
                    "number": [5], "null": None, "nested": [[b64["ok"]]], "surrogate": ["\ud800"]}.items():
        js(f"a1111 img2img init_images {name}", i2i, dict(base_a, init_images=v))
    for name, v in {"strength 0": {"denoising_strength": 0}, "strength 2": {"denoising_strength": 2},
                    "strength nan": {"denoising_strength": NAN}, "fill 7": {"mask": b64["ok"], "inpainting_fill": 7},
                    "fill 3": {"mask": b64["ok"], "inpainting_fill": 3}, "blur -1": {"mask": b64["ok"], "mask_blur": -1},
                    "invert 5": {"mask": b64["ok"], "inpainting_mask_invert": 5},
                    "padding -1": {"mask": b64["ok"], "inpaint_full_res_padding": -1},
                    "mask garbage": {"mask": b64["garbage"]}, "mask bomb": {"mask": b64["bomb"]},
                    "mask big": {"mask": b64["big"]}, "mask type": {"mask": 5}}.items():
        js(f"a1111 img2img {name}", i2i, dict(base_a, init_images=[b64["ok"]], **v))
    # OpenAI edits: multipart forms
    def form(label, fields, files, content_type=None):
        boundary = "fewstepbattery"
        parts = []
        for k, v in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        for k, (filename, data) in files:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{filename}"\r\n'
                         f'Content-Type: image/png\r\n\r\n'.encode("utf-8", "surrogateescape") + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        cases.append((label, "POST", "/v1/images/edits", body,
                      {"Content-Type": content_type or f"multipart/form-data; boundary={boundary}"}))

    for name in images:
        form(f"openai edit image {name}", {"prompt": "a"}, [("image", ("x.png", images[name]))])
    form("openai edit no image", {"prompt": "a"}, [])
    form("openai edit two images", {"prompt": "a"}, [("image", ("a.png", images["ok"])),
                                                     ("image", ("b.png", images["ok"]))])
    form("openai edit image as text", {"prompt": "a", "image": "abc"}, [])
    form("openai edit mask bomb", {"prompt": "a"}, [("image", ("a.png", images["ok"])),
                                                    ("mask", ("m.png", images["bomb"]))])
    form("openai edit loras not json", {"prompt": "a", "loras": "{x"}, [("image", ("a.png", images["ok"]))])
    form("openai edit loras loop", {"prompt": "a", "loras": '{"loop": 1}'}, [("image", ("a.png", images["ok"]))])
    form("openai edit n not a number", {"prompt": "a", "n": "many"}, [("image", ("a.png", images["ok"]))])
    form("openai edit surrogate filename", {"prompt": "a"}, [("image", ("\udcff.png", images["ok"]))])
    form("openai edit strength 5", {"prompt": "a", "strength": "5"}, [("image", ("a.png", images["ok"]))])
    form("openai edit as json", {}, [], content_type="application/json")
    form("openai edit bad boundary", {"prompt": "a"}, [("image", ("a.png", images["ok"]))],
         content_type="multipart/form-data; boundary=other")
    # raw bodies and headers
    for name, raw in {"invalid json": b"{", "empty": b"", "array": b"[]", "string": b'"x"', "null": b"null",
                      "not utf-8": b'{"prompt": "\xff\xfe"}', "deep": b'{"prompt": ' + b"[" * 100000 + b"]" * 100000
                      + b"}", "bom": b'\xef\xbb\xbf{"prompt": "a"}', "nan literal": b'{"prompt": "a", "n": NaN}',
                      "duplicate keys": b'{"prompt": "a", "prompt": 5}',
                      "big number": b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}"}.items():
        for path in (gen, t2i):
            js(f"raw {name} {path}", path, raw)
    cases.append(("text/plain body", "POST", gen, json.dumps(base_o).encode(), {"Content-Type": "text/plain"}))
    cases.append(("no content type", "POST", gen, json.dumps(base_o).encode(), {}))
    cases.append(("content-length abc", "POST", gen, b"{}", {"Content-Type": "application/json",
                                                             "Content-Length": "abc"}))
    cases.append(("content-length huge", "POST", gen, b"{}", {"Content-Type": "application/json",
                                                              "Content-Length": str(10**12)}))
    cases.append(("bad authorization", "POST", gen, json.dumps(base_o).encode(),
                  {"Content-Type": "application/json", "Authorization": "Basic !!!"}))
    for path in ("/v1/images/files/../../etc/passwd.png", "/v1/images/files/x.png", "/static/../../etc/passwd",
                 "/static/%2e%2e/%2e%2e/etc/passwd", "/sdapi/v1/nonexistent", "/%ff", "/v1/models/..%2f..%2fetc"):
        cases.append((f"GET {path!r}", "GET", path, None, {}))
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        cases.append((f"{method} {gen}", method, gen, None, {}))
    cases.append(("GET generations", "GET", gen, None, {}))
    return cases


def leaks(text, secrets):
    """The first path of this machine found in a response body, or None."""
    for s in secrets:
        if s and s in text:
            return s
    return None


def send(port, method, path, body, headers, timeout):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        headers = dict(headers)
        if body is not None and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body is not None:
            try:
                conn.send(body)
            except OSError:
                pass  # the server refused before reading the body (413): its answer still comes
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


def fixed_image(port):
    """A fixed-seed image (numpy uint8) from the server."""
    import numpy as np
    from PIL import Image

    body = json.dumps({"prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "seed": 42, "steps": 2}).encode()
    status, text = send(port, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"}, 120)
    if status != 200:
        raise SystemExit(f"the fixed-seed request failed: {status} {text[:300]}")
    data = base64.b64decode(json.loads(text)["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# ---- the CLI cases ---------------------------------------------------------------------------------------------
def cli_cases(root, folder, images):
    """(label, argv) for `fewstep generate`."""
    root = Path(root)
    (root / "afile").write_text("x")
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    for name in ("garbage", "bomb", "trunc", "hdr4096"):
        (root / f"{name}.png").write_bytes(images[name])
    (root / "ok.png").write_bytes(images["ok"])
    two = root / "two"
    two.mkdir()
    for n in ("a", "b"):
        (two / f"{n}.safetensors").write_bytes((folder / "good.safetensors").read_bytes())
    out = ["--out", str(root / "cli-out")]
    return [
        ("cli prompt with invalid UTF-8 bytes", [b"a \xff circle"] + out),
        ("cli negative with invalid UTF-8", ["a", "--negative", b"\xe9t\xe9"] + out),
        ("cli --out /proc/x", ["a", "--out", "/proc/x"]),
        ("cli --out an existing file as a folder", ["a", "--out", str(root / "afile")]),
        ("cli --out in a file", ["a", "--out", str(root / "afile" / "x.png")]),
        ("cli --steps 1-100", ["a", "--steps", "1-100"] + out),
        ("cli --steps 49-52", ["a", "--steps", "49-52", "--width", str(SIZE), "--height", str(SIZE)] + out),
        ("cli --steps 0", ["a", "--steps", "0"] + out),
        ("cli --steps abc", ["a", "--steps", "abc"] + out),
        ("cli --steps 5-2", ["a", "--steps", "5-2"] + out),
        ("cli --init-image FIFO", ["a", "--init-image", str(fifo)] + out),
        ("cli --init-image folder", ["a", "--init-image", str(root)] + out),
        ("cli --init-image /dev/zero", ["a", "--init-image", "/dev/zero"] + out),
        ("cli --init-image missing", ["a", "--init-image", str(root / "missing.png")] + out),
        ("cli --init-image garbage", ["a", "--init-image", str(root / "garbage.png")] + out),
        ("cli --init-image truncated", ["a", "--init-image", str(root / "trunc.png")] + out),
        ("cli --init-image decompression bomb", ["a", "--init-image", str(root / "bomb.png")] + out),
        ("cli --init-image header-only 4096x4096", ["a", "--init-image", str(root / "hdr4096.png")] + out),
        ("cli --mask FIFO", ["a", "--init-image", str(root / "ok.png"), "--mask", str(fifo)] + out),
        ("cli --control FIFO", ["a", "--control", f"canny:{fifo}"] + out),
        ("cli --lora folder of two", ["a", "--lora", str(two)] + out),
        ("cli --lora loop", ["a", "--lora", str(folder / "loop.safetensors")] + out),
        ("cli --lora ints", ["a", "--lora", str(folder / "ints.safetensors")] + out),
        ("cli --lora truncated", ["a", "--lora", str(folder / "trunc.safetensors")] + out),
        ("cli tag loop", ["a <lora:loop:1>", "--lora-dir", str(folder)] + out),
        ("cli tag missing", ["a <lora:nope:1>", "--lora-dir", str(folder)] + out),
        ("cli --width 7", ["a", "--width", "7"] + out),
        ("cli --num-images 0", ["a", "--num-images", "0"] + out),
        ("cli --guidance nan", ["a", "--guidance", "nan"] + out),
        ("cli --strength without image", ["a", "--strength", "0.5"] + out),
        ("cli --seed -1", ["a", "--seed", "-1"] + out),
        ("cli --timesteps x", ["a", "--timesteps", "x,y"] + out),
    ]


def run_cli(argv, timeout):
    """(problem or None, rc, stderr) of one `fewstep generate` run."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    cmd = [os.fsencode(sys.executable), b"-m", b"fewstep.cli", b"generate", b"-q"]
    cmd += [a if isinstance(a, bytes) else os.fsencode(a) for a in argv]
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hang", None, ""
    err = p.stderr.decode("utf-8", "replace")
    if "Traceback" in err:
        return "traceback", p.returncode, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("fewstep: warning")]
    if p.returncode == 0:
        return "accepted", 0, err
    if len(lines) != 1 or not lines[0].startswith("fewstep: error:"):
        return "not one line", p.returncode, err
    return None, p.returncode, err


# ---- main --------------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model source (default: the embedded default model)")
    p.add_argument("--max-size", type=int, default=128, help="the server's --max-size (default 128)")
    p.add_argument("--hang-s", type=float, default=60, help="an answer later than this is a hang (default 60)")
    p.add_argument("--no-cli", action="store_true", help="only the HTTP cases")
    p.add_argument("--json", help="also write the counts and problems to this file")
    args = p.parse_args()
    print(f"commit={commit()} model={args.model or 'fewstep-default'} cpus={os.cpu_count()} "
          f"machine={platform.machine()} python={platform.python_version()}", flush=True)
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="fewstep-battery-") as root:
        folder = lora_folder(root, args.model)
        log_path = Path(root) / "server.log"
        secrets = [str(Path(root).resolve()), root, str(Path.home()), str(Path(__file__).resolve().parents[1]),
                   "site-packages"]
        images = image_bytes()
        tried, problems = 0, []
        with open(log_path, "w") as log:
            proc, port = start_server(args, folder, log)
            try:
                before = fixed_image(port)
                seen = log_path.stat().st_size
                statuses, accepted = {}, []  # accepted: cases a server may rightly answer (odd, not wrong)
                for label, method, path, body, headers in http_cases(images):
                    tried += 1
                    t0 = time.monotonic()
                    try:
                        status, text = send(port, method, path, body, headers, args.hang_s)
                    except TimeoutError:
                        problems.append(f"{label}: hang (no answer in {args.hang_s:g} s)")
                        continue
                    except (OSError, http.client.HTTPException) as e:
                        problems.append(f"{label}: connection failed ({type(e).__name__}: {e})")
                        continue
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        accepted.append(label)
                    log.flush()
                    new = log_path.read_text(errors="replace")[seen:]
                    seen += len(new)
                    if status >= 500:
                        problems.append(f"{label}: {status} {text[:200]}")
                        time.sleep(0.5)  # its traceback is logged after the answer: not the next case's
                        log.flush()
                        seen += len(log_path.read_text(errors="replace")[seen:])
                    elif "Traceback" in new:
                        problems.append(f"{label}: a traceback in the log: {new.strip().splitlines()[-1][:200]}")
                    elif leaks(text, secrets):
                        problems.append(f"{label}: the body reveals {leaks(text, secrets)!r}: {text[:200]}")
                    elif time.monotonic() - t0 > args.hang_s:
                        problems.append(f"{label}: slow ({time.monotonic() - t0:.1f} s)")
                after = fixed_image(port)
                diff = int(np.abs(after - before).max())
                if proc.poll() is not None:
                    problems.append(f"the server died (rc {proc.returncode})")
            finally:
                stop(proc)
        http_tried = tried
        if not args.no_cli:
            for label, argv in cli_cases(root, folder, images):
                tried += 1
                problem, rc, err = run_cli(argv, args.hang_s)
                # a case that is fine to accept: none here, every one is a mistake the CLI must refuse
                if problem:
                    last = err.strip().splitlines()[-1][:200] if err.strip() else ""
                    problems.append(f"{label}: {problem} (rc {rc}) {last}")
                elif leaks(err, ["site-packages"]):
                    problems.append(f"{label}: stderr reveals site-packages")
        if diff > 1:
            problems.append(f"the fixed-seed image changed after the battery: max difference {diff}/255")
    clean = tried - len([p for p in problems if not p.startswith(("the fixed-seed", "the server died"))])
    print(f"http statuses: {dict(sorted(statuses.items()))}")
    print(f"tried {tried} (http {http_tried}, cli {tried - http_tried})  clean {clean}  problems {len(problems)}")
    print(f"fixed-seed image before/after the battery: max difference {diff}/255 "
          f"({'unchanged' if diff <= 1 else 'CHANGED'})")
    for problem in problems:
        print(f"PROBLEM {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tried=tried, clean=clean, problems=problems, statuses=statuses, image_diff=diff,
                           accepted=accepted), f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
