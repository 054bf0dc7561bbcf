"""Adapters on the engine: parity with diffusers' load_lora_weights + set_adapters, exact restore, atomic refusals."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

import fewstep
from fewstep.errors import LoadError, RequestError
from fewstep.lora import apply, fuse
from tests.support.loras import ATTENTION, lora_targets, make_lora, random_factors, random_lora, text_targets

PROMPT = "a toy_face man"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def snapshot(engine):
    """Every tensor of the UNet and text encoders, copied."""
    out = {f"unet.{k}": v.clone() for k, v in engine.c.unet.state_dict().items()}
    for i, enc in enumerate(engine.c.text_encoders):
        out.update({f"te{i}.{k}": v.clone() for k, v in enc.state_dict().items()})
    return out


def changed(engine, before):
    now = snapshot(engine)
    return [k for k in before if not torch.equal(now[k], before[k])]


def lcm_and_style(engine, root, *, lcm_layout, style_layout, xl):
    """An LCM-like LoRA (every recipe target, LoCon convs, alphas) and a style LoRA (attention + text encoders)."""
    unet = engine.c.unet
    lcm = make_lora({"unet": random_factors(unet, lora_targets(unet), rank=8, seed=1, scale=0.15)},
                    layout=lcm_layout, alpha=4, unet=unet, xl=xl)
    style_parts = {"unet": random_factors(unet, lora_targets(unet, ATTENTION), rank=4, seed=2, scale=0.3)}
    for i, enc in enumerate(engine.c.text_encoders):
        style_parts["text_encoder" if i == 0 else "text_encoder_2"] = random_factors(enc, text_targets(enc), rank=4,
                                                                                     seed=3 + i, scale=0.3)
    style = make_lora(style_parts, layout=style_layout, alpha=2 if style_layout.startswith("kohya") else None,
                      unet=unet, xl=xl)
    paths = root / f"lcm-{lcm_layout}.safetensors", root / f"style-{style_layout}.safetensors"
    save_file(lcm, str(paths[0]))
    save_file(style, str(paths[1]))
    return paths


@pytest.fixture(scope="module")
def sd(models):
    return fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)


@pytest.fixture(scope="module")
def sdxl(models):
    return fewstep.load(models("sdxl"), device="cpu", dtype="fp32", lcm=False)


@pytest.mark.parametrize("arch,lcm_layout,style_layout", [("sd", "kohya", "peft"), ("sdxl", "kohya-ldm", "kohya")])
def test_lcm_plus_style_matches_diffusers_set_adapters(models, tmp_path, request, arch, lcm_layout, style_layout):
    """The seed's example: LCM-LoRA at 1.0 + a style LoRA at 0.8, guidance 0.5, 4 steps, equal to diffusers."""
    engine = request.getfixturevalue(arch)
    lcm_file, style_file = lcm_and_style(engine, tmp_path, lcm_layout=lcm_layout, style_layout=style_layout,
                                         xl=arch == "sdxl")
    conv = engine.c.unet.down_blocks[0].resnets[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # speed's layout
    before = snapshot(engine)
    base = engine.generate(PROMPT, sampler="lcm", steps=4, guidance=0.5, seed=7).images[0]
    lcm = engine.load_lora(str(lcm_file), name="lcm", lcm=True)
    style = engine.load_lora(str(style_file), name="style", weight=0.8)
    assert engine.defaults()["sampler"] == "lcm" and engine.lcm_lora == "lcm"
    assert not lcm.unmatched and not style.unmatched and lcm.modules == len(lora_targets(engine.c.unet))
    assert set(style.components) == {"unet", "text_encoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())
    ours = engine.generate(PROMPT, steps=4, guidance=0.5, seed=7).images[0]
    engine.unload_loras()
    assert not changed(engine, before) and engine.lcm_lora is None

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    kw = {} if arch == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(models(arch), **kw)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lcm_file), adapter_name="lcm")
    pipe.load_lora_weights(str(style_file), adapter_name="style")
    pipe.set_adapters(["lcm", "style"], [1.0, 0.8])
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=0.5, generator=torch.Generator().manual_seed(7),
               height=64, width=64).images[0]
    assert np.abs(pixels(ref) - pixels(base)).max() > 20  # the adapters really change the image
    assert np.abs(pixels(ours) - pixels(ref)).max() <= 2


def test_style_lora_on_an_engine_loaded_with_its_lcm_lora(models, sd, tmp_path):
    """`fewstep generate --lora`: the LCM-LoRA is fused at load, before channels_last is set; a style LoRA fused later
    must see the same base (a base copy in the old layout once scrambled every 3x3 convolution)."""
    lcm_file = lcm_and_style(sd, tmp_path, lcm_layout="kohya", style_layout="kohya", xl=False)[0]
    style_file = tmp_path / "style-convs.safetensors"  # on the LCM-LoRA's own targets, 3x3 convolutions included
    save_file(random_lora(sd.c.unet, seed=5, scale=0.1), str(style_file))
    loaded = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=str(lcm_file))
    assert loaded.c.unet.down_blocks[0].resnets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loaded.load_lora(str(style_file), name="style", weight=0.8)
    sd.load_lora(str(lcm_file), name="lcm", lcm=True)
    sd.load_lora(str(style_file), name="style", weight=0.8)
    try:
        want = sd.generate(PROMPT, steps=4, guidance=1.0, seed=7).images[0]
    finally:
        sd.unload_loras()
    got = loaded.generate(PROMPT, steps=4, guidance=1.0, seed=7).images[0]
    assert np.abs(pixels(got) - pixels(want)).max() <= 1
    loaded.set_lora_weights({"style": 0.0})  # and back: base + LCM-LoRA only, as loaded
    alone = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=str(lcm_file))
    assert np.abs(pixels(loaded.generate(PROMPT, seed=7).images[0]) - pixels(alone.generate(PROMPT, seed=7).images[0])
                  ).max() <= 1


def test_any_sequence_restores_every_base_tensor_bit_exactly(models, tmp_path):
    """bf16 is where a subtract-to-unfuse would drift; the saved base copies make every step exact."""
    engine = fewstep.load(models("sdxl"), device="cpu", dtype="bf16", lcm=False)
    lcm_file, style_file = lcm_and_style(engine, tmp_path, lcm_layout="kohya", style_layout="peft", xl=True)
    before = snapshot(engine)
    engine.load_lora(str(lcm_file), name="a")
    fused_a = snapshot(engine)
    engine.load_lora(str(style_file), name="b", weight=0.5)
    assert len(changed(engine, before)) > 100
    engine.set_lora_weights({"a": 0.3})
    engine.set_lora_weights({"b": -1.0})
    engine.set_lora_weights({"a": 0.0, "b": 0.0})
    assert not changed(engine, before)
    engine.set_lora_weights({"a": 1.0, "b": 2.0})
    engine.set_lora_weights({"b": 0.0})
    assert not changed(engine, fused_a)  # the same set fuses to the same bits
    engine.unload_lora("a")
    engine.load_lora(str(lcm_file), name="a", weight=0.7)
    engine.unload_lora("b")
    engine.unload_lora("a")
    assert not changed(engine, before) and not apply.base_weights(engine)


def test_weights_zero_is_the_base_and_changes_refuse_only_touched_tensors(sd, tmp_path, monkeypatch):
    lcm_file, style_file = lcm_and_style(sd, tmp_path, lcm_layout="kohya", style_layout="peft", xl=False)
    before = snapshot(sd)
    sd.load_lora(str(lcm_file), name="a")
    sd.load_lora(str(style_file), name="b")
    try:
        calls = []
        real = fuse._fused
        monkeypatch.setattr(fuse, "_fused", lambda w, parts, base: (calls.append(1), real(w, parts, base)))
        sd.set_lora_weights({"b": 0.25})
        assert len(calls) == len(sd.loras["b"].factors) < len(sd.loras["a"].factors)
        calls.clear()
        sd.set_lora_weights({"b": 0.25})  # unchanged: nothing to do
        assert not calls
        sd.set_lora_weights({"a": 0, "b": 0})
        assert not changed(sd, before) and not apply.base_weights(sd)
        with pytest.raises(RequestError, match="finite"):
            sd.set_lora_weights({"a": float("nan")})
        with pytest.raises(LoadError, match="no LoRA named 'c'"):
            sd.set_lora_weights({"c": 1.0})
    finally:
        monkeypatch.undo()
        sd.unload_loras()
    assert not changed(sd, before)


def test_readme_comparison_in_one_process(models, tmp_path):
    """Attach the LCM-LoRA, 4 steps; unload it, Euler; reattach: same weights and image, no model reload."""
    engine = fewstep.load(models("sdxl"), device="cpu", dtype="fp32", lcm=False)
    lcm_file, _ = lcm_and_style(engine, tmp_path, lcm_layout="kohya", style_layout="peft", xl=True)
    before = snapshot(engine)
    engine.load_lora(str(lcm_file), name="lcm", lcm=True)
    fused = snapshot(engine)
    fast = engine.generate(PROMPT, seed=3)
    assert (fast.params["sampler"], fast.steps_run) == ("lcm", 4)
    engine.unload_lora(engine.lcm_lora)
    assert engine.defaults() == dict(sampler="euler", steps=25, guidance=7.5) and not changed(engine, before)
    slow = engine.generate(PROMPT, seed=3, steps=2)  # 25 in the README; 2 keeps the test fast
    assert slow.params["sampler"] == "euler" and slow.params["loras"] == {}
    unet = engine.c.unet
    engine.load_lora(str(lcm_file), name="lcm", lcm=True)
    assert engine.c.unet is unet and not changed(engine, fused)
    again = engine.generate(PROMPT, seed=3)
    assert np.array_equal(pixels(again.images[0]), pixels(fast.images[0]))


def test_prompt_embeddings_follow_text_encoder_adapters(sd, tmp_path):
    """The engine's prompt cache keys on text_signature: adapters by load identity and weight, not by name."""
    _, style_file = lcm_and_style(sd, tmp_path, lcm_layout="kohya", style_layout="peft", xl=False)
    plain = sd.encode_prompts([PROMPT])[0]
    try:
        sd.load_lora(str(style_file), name="style")
        styled = sd.encode_prompts([PROMPT])[0]
        assert not torch.equal(styled, plain)
        sd.unload_lora("style")
        assert sd.encode_prompts([PROMPT])[0] is plain
        other = make_lora({"text_encoder": random_factors(sd.c.text_encoders[0], text_targets(sd.c.text_encoders[0]),
                                                          seed=9, scale=0.3)})
        sd.load_lora(other, name="style")  # another file under the same name and weight
        assert not torch.equal(sd.encode_prompts([PROMPT])[0], styled)
    finally:
        sd.unload_loras()


# ---- refusals: each a clear error, and the model exactly as before ----------------------------------------------
def _loha(engine):
    path = lora_targets(engine.c.unet, ATTENTION)[0].replace(".", "_")
    return {f"lora_unet_{path}.hada_w1_a": torch.zeros(4, 2), f"lora_unet_{path}.hada_w1_b": torch.zeros(2, 4),
            f"lora_unet_{path}.hada_w2_a": torch.zeros(4, 2), f"lora_unet_{path}.hada_w2_b": torch.zeros(2, 4),
            f"lora_unet_{path}.alpha": torch.tensor(2.0)}


def _valid(engine):
    return make_lora({"unet": random_factors(engine.c.unet, lora_targets(engine.c.unet), rank=4)}, alpha=4)


def _misfit(engine):
    sd = _valid(engine)
    key = next(k for k in sd if k.endswith("attn2_to_q.lora_down.weight"))
    sd[key] = torch.zeros(4, sd[key].shape[1] + 8)
    return sd


def _nan(engine):
    sd = _valid(engine)
    sd[next(k for k in sd if k.endswith("lora_up.weight"))][0, 0] = float("nan")
    return sd


def _partial(engine):
    """A third of the modules renamed to nothing this model has."""
    sd = _valid(engine)
    stems = sorted({k.split(".")[0] for k in sd})
    other = set(stems[::3])
    return {(k.replace("lora_unet_", "lora_unet_x") if k.split(".")[0] in other else k): v for k, v in sd.items()}


REFUSALS = {
    "other-arch": (None, "is for another architecture, an SDXL-layout model"),
    "loha": (_loha, "LyCORIS LoHa"),
    "lokr": (lambda e: {"lora_unet_x.lokr_w1": torch.zeros(2, 2), "lora_unet_x.lokr_w2": torch.zeros(2, 2)},
             "LyCORIS LoKr"),
    "dora": (lambda e: {**_valid(e), "lora_unet_x.dora_scale": torch.zeros(1)}, "DoRA"),
    "misfit": (_misfit, "does not fit this SD 1.x model: unet .*attn2.to_q has weight"),
    "nan": (_nan, "NaN/inf"),
    "partial": (_partial, "matches only .* refusing to apply it partly"),
    "unrelated": (lambda e: {"foo.weight": torch.zeros(2, 2)}, "matches none"),
    "no-tensors": (lambda e: {}, "holds no tensors"),
    "empty-file": ("", "not a complete .safetensors file"),
    "truncated": ("truncate", "not a complete .safetensors file .*truncated"),
    "garbage": (b"\x80\x04this is not safetensors", "not a complete .safetensors file"),
    "pickle": ("ckpt", "pickle file, which can run code"),
    "missing": ("missing", "not found"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_the_model_untouched(sd, sdxl, tmp_path, case):
    make, message = REFUSALS[case]
    sd.load_lora(make_lcm(sd, tmp_path), name="keep")  # one adapter already fused must stay exactly as it is
    before, loaded = snapshot(sd), dict(sd.loras)
    path = tmp_path / f"{case}.safetensors"
    if case == "other-arch":
        save_file(make_lora({"unet": random_factors(sdxl.c.unet, lora_targets(sdxl.c.unet))}, alpha=4), str(path))
    elif case == "truncated":
        data = (tmp_path / "keep.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "pickle":
        path = tmp_path / "x.ckpt"
        torch.save({"a": torch.zeros(1)}, path)
    elif case == "missing":
        path = tmp_path / "missing.safetensors"
    elif isinstance(make, (str, bytes)):
        path.write_bytes(make.encode() if isinstance(make, str) else make)
    else:
        save_file(make(sd), str(path))
    try:
        with pytest.raises(LoadError, match=message):
            sd.load_lora(str(path), name="new")
        assert dict(sd.loras) == loaded and not changed(sd, before)
    finally:
        sd.unload_loras()


def make_lcm(engine, root):
    path = root / "keep.safetensors"
    if not path.exists():
        save_file(make_lora({"unet": random_factors(engine.c.unet, lora_targets(engine.c.unet), rank=4)}, alpha=4),
                  str(path))
    return str(path)


def test_sd_lora_on_sdxl_names_both_architectures(sd, sdxl, tmp_path):
    path = tmp_path / "sd.safetensors"
    save_file(make_lora({"unet": random_factors(sd.c.unet, lora_targets(sd.c.unet))}, alpha=4), str(path))
    before = snapshot(sdxl)
    with pytest.raises(LoadError, match=r"another architecture, an SD 1.x/2.x-layout model .* this model is SDXL"):
        sdxl.load_lora(str(path))
    assert not sdxl.loras and not changed(sdxl, before)


def test_a_failure_while_fusing_rolls_back(sd, tmp_path, monkeypatch):
    sd.load_lora(make_lcm(sd, tmp_path), name="keep", weight=0.5)
    before = snapshot(sd)
    real, calls = fuse._fused, []

    def flaky(weight, parts, base):
        calls.append(1)
        if len(calls) == 40:
            raise RuntimeError("out of memory")
        return real(weight, parts, base)

    monkeypatch.setattr(fuse, "_fused", flaky)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            sd.load_lora(make_lcm(sd, tmp_path), name="again")
        assert list(sd.loras) == ["keep"] and not changed(sd, before)
        calls.clear()
        with pytest.raises(RuntimeError, match="out of memory"):
            sd.set_lora_weights({"keep": 2.0})
        assert sd.loras["keep"].weight == 0.5 and not changed(sd, before)
    finally:
        monkeypatch.undo()
        sd.unload_loras()


def test_missing_published_lcm_lora_offline_is_a_clear_error(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LoadError, match="latent-consistency/lcm-lora-sdv1-5 is not in the local Hugging Face cache"):
        fewstep.load(models("sd"), device="cpu", dtype="fp32")  # lcm=True: the published LoRA for sd15
