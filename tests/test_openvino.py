"""The OpenVINO backend runs the same modules: its images equal the torch backend's (fp32, within 2/255), it
follows LoRA weight changes, caches converted models on disk, and a server-style engine never waits for a
conversion (torch runs meanwhile)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import fewstep
from fewstep.cli import main
from tests.support.images import assert_close_images

pytest.importorskip("openvino")

from fewstep.backends.openvino import runners

LCM = dict(sampler="lcm", steps=2, guidance=1.0, seed=3, width=64, height=64)
TOL = 2  # of 255: two executors of the same fp32 graph (OpenVINO's kernels vs oneDNN's), not bit-equal


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("openvino-cache"))


def stats(engine):
    return {r.role: dict(r.stats) for r in runners(engine.fast)}


def load(models, backend, cache=None, **kw):
    extra = dict(backend=backend, openvino_cache=cache) if backend == "openvino" else {}
    return fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, **extra, **kw)


def test_images_equal_torch_and_a_second_engine_reads_the_disk_cache(models, ov_cache):
    ref = load(models, "torch")
    ov = load(models, "openvino", ov_cache)
    a, b = ref.generate("a cat", **LCM).images[0], ov.generate("a cat", **LCM).images[0]
    assert_close_images(b, a, tol=TOL)
    s = stats(ov)
    assert s["unet"]["openvino_calls"] == 2 and s["unet"]["torch_calls"] == 0 and s["unet"]["conversions"] == 1
    assert s["decoder"]["openvino_calls"] == 1 and s["decoder"]["conversions"] == 1
    again = load(models, "openvino", ov_cache)  # a new process would do the same: read the IR, compile
    assert_close_images(again.generate("a cat", **LCM).images[0], a, tol=TOL)
    s = stats(again)
    assert s["unet"]["conversions"] == 0 and s["unet"]["disk_hits"] == 1 and s["decoder"]["disk_hits"] == 1


@pytest.mark.slow  # one more conversion (the encoder): ~5 s of CPU
def test_image_to_image_runs_the_encoder_through_openvino(models, ov_cache):
    ref, ov = load(models, "torch"), load(models, "openvino", ov_cache)
    init = ref.generate("a dog", **LCM).images[0]
    assert_close_images(ov.generate("a cat", init_image=init, strength=0.5, **LCM).images[0],
                        ref.generate("a cat", init_image=init, strength=0.5, **LCM).images[0], tol=TOL)
    assert stats(ov)["encoder"]["openvino_calls"] == 1 and stats(ov)["unet"]["openvino_calls"] >= 1


@pytest.mark.slow  # the shapes model's UNet and decoder: ~40 s of conversion on 2 cores
@pytest.mark.parametrize("dtype, tol", [("fp32", TOL), ("bf16", 8)])
def test_the_default_model_matches_torch(dtype, tol, tmp_path):
    # bf16: OpenVINO's bf16 kernels and PyTorch's round differently inside the graph; the tolerance says how far
    prompt = "a red circle in the top left on a blue background"
    ref = fewstep.load(device="cpu", dtype=dtype)
    ov = fewstep.load(device="cpu", dtype=dtype, backend="openvino", openvino_cache=str(tmp_path))
    assert_close_images(ov.generate(prompt, seed=1).images[0], ref.generate(prompt, seed=1).images[0], tol=tol)
    assert stats(ov)["unet"]["openvino_calls"] == 4


def test_the_weights_key_follows_lora_fusion_and_restore(models, tmp_path):
    # what decides a re-conversion (the full round trip through OpenVINO is the slow test below)
    from fewstep.backends.openvino import fingerprint, versions
    from tests.support.loras import random_lora
    from tests.support.tiny import tiny_sd

    save_file(random_lora(tiny_sd()["unet"], scale=0.3), str(tmp_path / "l.safetensors"))
    engine = load(models, "torch")
    unet = engine.c.unet
    base_v, base_fp = versions(unet), fingerprint(unet)
    engine.load_lora(str(tmp_path / "l.safetensors"), name="l", weight=1.0)
    full = fingerprint(unet)
    assert versions(unet) != base_v and full != base_fp
    engine.set_lora_weights({"l": 0.5})
    half = fingerprint(unet)
    assert half not in (base_fp, full)
    engine.set_lora_weights({"l": 0.0})
    assert fingerprint(unet) == base_fp  # restored exactly: the base weights' converted model is reused
    engine.set_lora_weights({"l": 0.5})
    assert fingerprint(unet) == half


@pytest.mark.slow  # one more UNet conversion: ~6 s of CPU on an idle machine, more on a shared one
def test_lora_weight_changes_are_followed_and_old_states_stay_cached(models, ov_cache, tmp_path):
    from tests.support.loras import random_lora
    from tests.support.tiny import tiny_sd

    save_file(random_lora(tiny_sd()["unet"], scale=0.3), str(tmp_path / "l.safetensors"))
    ref, ov = load(models, "torch"), load(models, "openvino", ov_cache)
    for e in (ref, ov):
        e.load_lora(str(tmp_path / "l.safetensors"), name="l", weight=1.0)
    plain = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False).generate("a cat", **LCM).images[0]
    with_lora = ref.generate("a cat", **LCM).images[0]
    assert_close_images(ov.generate("a cat", **LCM).images[0], with_lora, tol=TOL)
    with pytest.raises(AssertionError):  # the LoRA changes the image: the check above could fail
        assert_close_images(with_lora, plain, tol=TOL)
    before = stats(ov)["unet"]
    for e in (ref, ov):
        e.set_lora_weights({"l": 0.0})  # the base weights again: the state of the first test, cached
    assert_close_images(ov.generate("a cat", **LCM).images[0], plain, tol=TOL)
    after = stats(ov)["unet"]
    assert after["conversions"] == before["conversions"] and after["disk_hits"] == before["disk_hits"] + 1


def test_background_preparation_runs_torch_meanwhile(models, ov_cache):
    # the base weights' IR is on disk already (first test): the worker reads and compiles it; a weight state never
    # converted would be converted there from a copy of the module, the same way
    ov = load(models, "openvino", ov_cache, openvino_background=True)
    ref = load(models, "torch")
    a = ov.generate("a cat", **LCM).images[0]  # nothing compiled yet: the first step ran on torch
    first = stats(ov)["unet"]
    assert first["torch_calls"] >= 1 and first["torch_calls"] + first["openvino_calls"] == 2
    for r in runners(ov.fast):
        r.wait()
    b = ov.generate("a cat", **LCM).images[0]
    assert stats(ov)["unet"]["openvino_calls"] == first["openvino_calls"] + 2
    expected = ref.generate("a cat", **LCM).images[0]
    assert_close_images(a, expected, tol=TOL)  # torch's steps, maybe OpenVINO's for the last (it may be ready)
    assert_close_images(b, expected, tol=TOL)


def test_cli_refuses_what_openvino_cannot_do(models, capsys):
    assert main(["generate", "a cat", "--model", str(models("sd")), "--no-lcm", "--backend", "openvino",
                 "--compile"]) != 0
    err = capsys.readouterr().err
    assert "drop --compile" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "--backend", "onnx"])
    assert "invalid choice" in capsys.readouterr().err


def test_openvino_is_refused_off_the_cpu_and_unknown_backends_are_named():
    from fewstep.backends import check
    from fewstep.errors import LoadError

    with pytest.raises(LoadError, match="runs on the CPU"):
        check("openvino", torch.device("cuda"))
    with pytest.raises(LoadError, match="unknown backend"):
        fewstep.load(device="cpu", backend="onnx")


@pytest.mark.slow  # two conversions (the openvino system's UNet and decoder) and the tuned probe
def test_bench_runs_the_openvino_system_beside_diffusers(models, capsys):
    code = main(["bench", "--model", str(models("sd")), "--size", "32", "--runs", "1", "--modes", "lcm,euler",
                 "--euler-steps", "2", "--systems", "fewstep,diffusers-tuned,openvino", "--json", "--dtype", "fp32"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["system"], r["mode"]): r for r in data["rows"]}
    # the openvino system has the LCM-LoRA fused into its converted UNet: it runs the few-step rows only
    assert set(rows) == {("fewstep", "lcm"), ("diffusers-tuned", "lcm"), ("openvino", "lcm"), ("fewstep", "euler"),
                         ("diffusers-tuned", "euler")}
    ov = rows[("openvino", "lcm")]
    assert ov["unet_calls"] == 4 and ov["decode_s"] > 0 and ov["dtype"].startswith("openvino-")
    assert data["openvino_convert_s"] > 0 and data["backend"] == "torch" and data["peak_rss_bytes"] > 2**20
    assert data["tuned"].split()[0] in ("float32", "bfloat16")
    assert rows[("fewstep", "lcm")]["speedup_vs"]["openvino"] > 0


def test_what_openvino_cannot_convert_runs_on_torch(models, tmp_path, monkeypatch):
    from fewstep.backends.openvino import Runner

    def refuse(*a, **k):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(Runner, "_converted", refuse)
    ov = load(models, "openvino", str(tmp_path))
    image = ov.generate("a cat", **LCM).images[0]
    assert_close_images(image, load(models, "torch").generate("a cat", **LCM).images[0], tol=0)  # the same modules
    s = stats(ov)
    assert s["unet"]["torch_calls"] == 2 and s["unet"]["openvino_calls"] == 0 and len(ov.fast.unet_fn.runner.failed) == 1
