"""Loading from folders, single files and hub ids; device/dtype choice; the errors users can cause."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fewstep
from fewstep import loading
from fewstep.errors import LoadError, RequestError, ResourceError
from tests.support.images import assert_close_images
from tests.support.original_layout import to_original
from tests.support.tiny import tiny_sd, tiny_sdxl


@pytest.mark.parametrize("name,arch,build", [("sd", "sd15", tiny_sd), ("sdxl", "sdxl", tiny_sdxl)])
def test_single_file_gives_the_same_image_as_the_folder(models, tmp_path, name, arch, build):
    file = tmp_path / f"{name}.safetensors"
    save_file(to_original(build(), arch), str(file))
    a = fewstep.load(file, device="cpu", dtype="fp32", lcm=False)
    b = fewstep.load(models(name), device="cpu", dtype="fp32", lcm=False)
    assert a.arch == arch == b.arch
    for engine in (a, b):  # the loaders' memory-mapped views are replaced by owned, aligned tensors
        assert not unowned(engine)
    kw = dict(sampler="lcm", steps=2, guidance=1.5, negative_prompt="dark", seed=3, width=64, height=64)
    # two loading paths: equal weights, but equality of images is claimed within 1/255 only (see support/images.py)
    assert_close_images(a.generate("a cat", **kw).images[0], b.generate("a cat", **kw).images[0])


def unowned(engine):
    """Tensors that are views at unaligned offsets or strided (the layouts that made kernels differ by path)."""
    mods = [engine.c.unet, engine.c.vae, *engine.c.text_encoders]
    return [name for m in mods for name, t in [*m.named_parameters(), *m.named_buffers()]
            if t.data_ptr() % loading.ALIGN
            or not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))]


def test_own_tensors_copies_views_and_keeps_tied_weights():
    lin = torch.nn.Linear(3, 5)
    big = torch.randn(200)
    lin.weight = torch.nn.Parameter(big[1:16].view(5, 3), requires_grad=False)  # an offset view, as from a mmap
    lin.register_buffer("t", torch.randn(3, 4).T)  # a transposed view, as from a converter
    pair = torch.nn.ModuleDict({"a": lin, "b": torch.nn.Linear(3, 5)})
    pair["b"].weight = lin.weight  # tied
    want = lin.weight.detach().clone()
    assert loading.own_tensors(pair) == 2
    assert lin.weight.data_ptr() % loading.ALIGN == 0 and lin.t.is_contiguous()
    assert pair["b"].weight is lin.weight and torch.equal(lin.weight, want)
    assert loading.own_tensors(pair) == 0


def test_pickle_checkpoints_need_opt_in(tmp_path):
    file = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_original(tiny_sd(), "sd15")}, file)
    with pytest.raises(LoadError, match="allow-pickle"):
        fewstep.load(file, device="cpu", dtype="fp32", lcm=False)
    engine = fewstep.load(file, device="cpu", dtype="fp32", lcm=False, allow_pickle=True)
    assert engine.arch == "sd15"


def test_bad_sources(tmp_path):
    with pytest.raises(LoadError, match="not found"):
        fewstep.load(tmp_path / "nope", lcm=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="without model_index.json"):
        fewstep.load(tmp_path / "empty", lcm=False)
    save_file({"a": torch.zeros(3)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(LoadError, match="not a Stable Diffusion"):
        fewstep.load(tmp_path / "junk.safetensors", lcm=False)


def test_hub_id_offline_and_not_cached_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="not in the local Hugging Face cache"):
        fewstep.load("nobody-here/no-such-model-xyz", lcm=False)


def test_device_and_dtype_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_has_bf16_units", lambda: True)
    assert loading.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_bf16_units", lambda: False)
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert loading.resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(LoadError, match="unknown dtype"):
        loading.resolve_dtype("int3", cpu)
    with pytest.raises(LoadError, match="unknown device"):
        loading.resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="no CUDA"):
            loading.resolve_device("cuda")


def test_sdxl_vae_is_never_run_in_fp16(models):
    parts = loading.read_components(models("sdxl"))
    comps = loading.place(parts, "x", "x", torch.device("cpu"), torch.float16)
    assert comps.unet.dtype == torch.float16 and comps.vae.dtype == torch.float32


def test_bf16_engine_stays_close_to_fp32(models):
    kw = dict(sampler="lcm", steps=4, guidance=1.0, seed=2)
    ref = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False).generate("a cat", **kw).images[0]
    out = fewstep.load(models("sd"), device="cpu", dtype="bf16", lcm=False).generate("a cat", **kw).images[0]
    err = np.mean((np.asarray(ref, dtype=np.float64) - np.asarray(out, dtype=np.float64)) ** 2)
    psnr = 10 * np.log10(255**2 / max(err, 1e-10))
    assert psnr > 25, f"bf16 PSNR {psnr:.1f} dB vs fp32"


def test_nan_images_are_refused(models, monkeypatch):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    real = engine.decode_fn
    monkeypatch.setattr(engine.fast, "decode_fn", lambda z, return_dict=False: (real(z, return_dict=False)[0] * float("nan"),))
    with pytest.raises(ResourceError, match="NaN"):
        engine.generate("a cat", sampler="lcm", steps=1, guidance=1.0, seed=0)


def test_request_errors(models):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    cases = [(dict(width=63), "multiple of 2"), (dict(steps=51, sampler="lcm"), "more than"),
             (dict(guidance=-1), "guidance must be >= 0"), (dict(strength=0.5), "init image"),
             (dict(sampler="dpm"), "unknown sampler"), (dict(num_images=0), "num_images"),
             (dict(timesteps=(999, 999), sampler="lcm"), "descending"), (dict(init_image="/nonexistent.png"), "cannot read init image"),
             (dict(timesteps=(999, 500), sampler="euler"), "custom timesteps")]
    for kw, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.generate("a cat", **kw)
    with pytest.raises(RequestError, match="strength must be in"):
        engine.generate("a cat", init_image=np_image(), strength=1.5)


def np_image():
    from PIL import Image

    return Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8))


def test_too_many_images_for_memory_is_refused_before_running(models, monkeypatch):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    monkeypatch.setattr("fewstep.engine.free_memory", lambda device: 10 * 2**20)
    calls = []
    engine.c.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ResourceError, match="GiB is free"):
        engine.generate("a cat", num_images=64, width=512, height=512)
    assert not calls


def test_img2img_always_runs_a_step_and_reports_them(models):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    out = engine.generate("a cat", init_image=np_image(), strength=0.05, sampler="lcm", steps=1, guidance=1.0, seed=0)
    assert out.steps_run == 1 and out.timesteps == [39]
    with pytest.raises(RequestError, match="runs no step"):
        engine.generate("a cat", init_image=np_image(), strength=0.05, sampler="euler", steps=4)
