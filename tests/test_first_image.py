"""The first image of the default model: what `fewstep generate PROMPT` loads and imports (timings are measured by
benchmarks/first_image.py, never asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fewstep import loading
from fewstep.default_model import default_model_path

# what a default-model `fewstep generate` has no use for: the other subcommands (server, trainer, bench, the shapes
# world's tools), other backends, the ControlNet preprocessors (OpenCV); each adds its import time to a first image
NOT_NEEDED = ["fewstep.serve", "fastapi", "uvicorn", "ray", "fewstep.train", "fewstep.bench", "fewstep.worlds",
              "fewstep.stream_cli", "openvino", "nncf", "fewstep.backends.openvino", "cv2", "fewstep.control",
              "fewstep.inpaint"]

PROBE = """
import json, sys
from fewstep import loading
from fewstep.cli import main
calls = []
fp = loading._from_folder
loading._from_folder = lambda *a, **k: calls.append(a[0]) or fp(*a, **k)
code = main(["generate", "a red circle in the top left on a blue background", "--out", sys.argv[1], "--json", "-q"])
print(json.dumps(dict(code=code, modules=sorted(sys.modules), from_folder=[str(c) for c in calls])))
"""


def test_default_generate_imports_only_what_it_needs(tmp_path):
    out = tmp_path / "first.png"
    # this checkout's fewstep (the run is in tmp_path); a tiny model: one thread is enough, and kinder to a busy machine
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and out.is_file()
    loaded = set(report["modules"])
    needless = [m for m in NOT_NEEDED if m in loaded]
    assert not needless, f"imported for nothing: {needless}"
    assert report["from_folder"] == []  # the default model skips from_pretrained (loading.read_shipped)


def test_shipped_reader_loads_what_from_pretrained_loads():
    folder = default_model_path()
    ours = loading.read_shipped(folder, dtype=torch.bfloat16)
    ref = loading._from_folder(folder, allow_pickle=False, dtype=torch.bfloat16)
    assert ours["arch"] == ref["arch"] == "shapes"
    assert ours["scheduler_config"] == ref["scheduler_config"]
    for part in ("unet", "vae"):
        assert {k: v for k, v in ours[part].config.items() if k != "_name_or_path"} == \
            {k: v for k, v in ref[part].config.items() if k != "_name_or_path"}
    for a, b in [(ours["unet"], ref["unet"]), (ours["vae"], ref["vae"]),
                 (ours["text_encoders"][0], ref["text_encoders"][0])]:
        sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
        assert sa.keys() == sb.keys()
        # the same file tensors, converted to the same dtype: equal values (no computation between them)
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa), type(a).__name__
        buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())  # incl. non-persistent ones
        assert buffers_a.keys() == buffers_b.keys()
        assert all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
    ids = torch.tensor([[49406, 320, 736, 7117, 49407] + [49407] * 72])
    with torch.no_grad():
        ha = ours["text_encoders"][0].eval()(ids)[0].float()
        hb = ref["text_encoders"][0].eval()(ids)[0].float()
    assert torch.allclose(ha, hb, atol=1e-6, rtol=0)


def test_bundled_tokenizer_is_the_default_models_own():
    # read_shipped uses the bundled CLIP tokenizer instead of the folder's tokenizer.json (slow to parse)
    from fewstep.tokenizers import bundled_tokenizer
    from transformers import CLIPTokenizer

    bundled = bundled_tokenizer("clip")
    own = CLIPTokenizer.from_pretrained(str(default_model_path()), subfolder="tokenizer")
    prompts = ["a red circle in the top left on a blue background", "A  BLUE   Square,\tcentered!! on white.",
               "naïve café — ünïcödé 東京 🎨 <|endoftext|> it's they're", "", "x " * 120,
               "a green triangle in the bottom right on a black background, outlined"]
    kw = dict(padding="max_length", max_length=77, truncation=True)
    assert bundled(prompts, **kw).input_ids == own(prompts, **kw).input_ids
    assert bundled(prompts, **kw).attention_mask == own(prompts, **kw).attention_mask
    assert (bundled.model_max_length, bundled.pad_token, bundled.bos_token, bundled.eos_token) == \
        (own.model_max_length, own.pad_token, own.bos_token, own.eos_token)
    long = [len(x) for x in bundled(["x " * 120], truncation=False).input_ids]
    assert long == [len(x) for x in own(["x " * 120], truncation=False).input_ids]
