"""LoRA layouts: every layout of the same factors fuses to the same weights; real-size names map 100% (meta device)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import fewstep
from fewstep.lora.formats import (ArchGuess, check_shapes, guess_arch, module_index, original_names, parse_key, plan,
                                  scale_of)
from fewstep.lora.reference import meta_models
from tests.support.loras import ATTENTION, ldm_names, lora_targets, make_lora, random_factors, text_targets

LAYOUTS = ["kohya", "kohya-ldm", "peft", "peft-bare", "diffusers-old"]
EXPECTED_FORMAT = {"kohya": "kohya (diffusers block names)", "kohya-ldm": "kohya (original block names)",
                   "peft": "diffusers/peft", "peft-bare": "diffusers/peft",
                   "diffusers-old": "diffusers (old attention-processor layout)"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def engine(request, models):
    return fewstep.load(models(request.param), device="cpu", dtype="fp32", lcm=False)


def parts_for(engine, layout, dtype=torch.float32):
    """UNet recipe targets (attention only for the old layout, which has nothing else) and every text encoder."""
    unet = engine.c.unet
    ends = ATTENTION if layout == "diffusers-old" else None
    parts = {"unet": random_factors(unet, lora_targets(unet, *([ends] if ends else [])), rank=4, seed=1, scale=0.2,
                                    dtype=dtype)}
    for i, enc in enumerate(engine.c.text_encoders):
        parts["text_encoder" if i == 0 else "text_encoder_2"] = random_factors(enc, text_targets(enc), rank=4,
                                                                               seed=2 + i, scale=0.2, dtype=dtype)
    return parts


def fused(engine, sd, tmp_path, name="x", **kw):
    """{(component, path): fused weight} after loading sd, and the report; the engine is left as it was."""
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path), metadata=kw.pop("metadata", None))
    report = engine.load_lora(str(path), name=name, **kw)
    comps = {"unet": engine.c.unet, "text_encoder": engine.c.text_encoders[0]}
    if len(engine.c.text_encoders) > 1:
        comps["text_encoder_2"] = engine.c.text_encoders[1]
    out = {t: comps[t[0]].get_submodule(t[1]).weight.detach().clone() for t in engine.loras[name].factors}
    engine.unload_lora(name)
    return out, report


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_fuses_like_kohya(engine, tmp_path, layout):
    xl = len(engine.c.text_encoders) > 1
    parts = parts_for(engine, layout)
    reference, _ = fused(engine, make_lora(parts, layout="kohya", alpha=2, xl=xl), tmp_path, "ref")
    ours, report = fused(engine, make_lora(parts, layout=layout, alpha=2, xl=xl, unet=engine.c.unet), tmp_path)
    assert report.format.startswith(EXPECTED_FORMAT[layout]) and not report.unmatched
    assert report.components["unet"] == len(parts["unet"])
    assert report.components["text_encoder"] == len(parts["text_encoder"])
    assert ours.keys() == reference.keys() and len(ours) == sum(len(p) for p in parts.values())
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-6)


def test_alpha_missing_means_rank_and_half_precision_files_fuse_the_same(models, tmp_path):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    # bf16 values away from fp16's subnormals are exact in fp16 and fp32 too: the three files hold the same numbers
    parts = {c: {p: tuple(torch.where(t.abs() < 1e-3, 1e-3, t).to(torch.bfloat16) for t in f) for p, f in fs.items()}
             for c, fs in parts_for(engine, "kohya").items()}
    ref, report = fused(engine, make_lora(parts, layout="kohya", alpha=4), tmp_path, "alpha-is-rank")
    assert report.ranks == [4] and report.alphas == [4.0] and report.dtype == "bfloat16"
    no_alpha, report = fused(engine, make_lora(parts, layout="kohya", alpha=None), tmp_path, "no-alpha")
    assert report.alphas == [] and all(torch.equal(ref[k], no_alpha[k]) for k in ref)
    for dtype in (torch.float16, torch.float32):
        cast = {c: {p: (d.to(dtype), u.to(dtype)) for p, (d, u) in f.items()} for c, f in parts.items()}
        other, report = fused(engine, make_lora(cast, layout="peft"), tmp_path, f"as-{dtype}".replace(".", ""))
        assert report.dtype == str(dtype).removeprefix("torch.") and all(torch.equal(ref[k], other[k]) for k in ref)


def test_peft_adapter_metadata_gives_alphas(models, tmp_path):
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    parts = {"unet": random_factors(engine.c.unet, lora_targets(engine.c.unet, ATTENTION), rank=4, scale=0.2)}
    special = next(iter(parts["unet"]))
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                 "unet.alpha_pattern": {special: 2}})}
    ours, _ = fused(engine, make_lora(parts, layout="peft"), tmp_path, "meta", metadata=meta)
    rest = {p: f for p, f in parts["unet"].items() if p != special}
    ref, _ = fused(engine, make_lora({"unet": rest}, layout="kohya", alpha=8), tmp_path, "alpha8")
    ref.update(fused(engine, make_lora({"unet": {special: parts["unet"][special]}}, layout="kohya", alpha=2),
                     tmp_path, "alpha2", min_match=0)[0])
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert scale_of("unet", "a.b", 16, None, {"unet": {"lora_alpha": 8, "use_rslora": True}}) == 2.0


# ---- real-size architectures on the meta device ----------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = meta_models(arch)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,modules,label", [("sd15", 278, "SD 1.x"), ("sdxl", 788, "SDXL"), ("sd2", 278, "SD 2.x")])
@pytest.mark.parametrize("layout", ["kohya", "kohya-ldm", "peft"])
def test_real_size_recipe_and_text_encoder_keys_map_completely(real, arch, modules, label, layout):
    models = real(arch)
    unet = models["unet"]
    parts = {"unet": random_factors(unet, lora_targets(unet), rank=64, meta=True)}
    for component in ("text_encoder", "text_encoder_2"):
        if component in models:
            parts[component] = random_factors(models[component], text_targets(models[component]), rank=8, meta=True)
    sd = make_lora(parts, layout=layout, alpha=64 if layout != "peft" else None, xl=arch == "sdxl", unet=unet)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    p = plan(list(sd), module_index(models))
    assert len(parts["unet"]) == modules  # the published LCM-LoRAs' target count
    assert not p.unmatched and p.matched_keys == len(sd)
    assert len(p.groups) == sum(len(f) for f in parts.values())
    weights = {t: models[t[0]].get_submodule(t[1]).weight.shape for t in p.groups}
    assert check_shapes(p.groups, shapes, weights) is None
    assert guess_arch(list(sd), shapes).label == label
    unet_params = sum(math.prod(shapes[k]) for k in sd if k.startswith(("lora_unet_", "unet.")) and "alpha" not in k)
    # the published LCM-LoRAs (SD 2.x has none: its 1024-wide cross-attention makes to_k/to_v bigger)
    assert unet_params == {"sd15": 67_252_224, "sd2": 67_776_512, "sdxl": 196_751_360}[arch]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_original_names_agree_with_the_single_file_converter(real, arch):
    unet = real(arch)["unet"]
    ours, theirs = original_names(unet), ldm_names(unet)
    assert ours == {p: theirs[p] for p in ours}
    if arch == "sd15":  # an upsampler in a level without attention sits right after the resnet
        assert ours["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
        assert ours["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"


# ---- names and guesses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,expected", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
     ("unet", "down_blocks_0_attentions_0_proj_in", "down", "kohya")),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha", ("text_encoder_2", "text_model_encoder_layers_0_mlp_fc1",
                                                            "alpha", "kohya")),
    ("unet.mid_block.attentions.0.proj_out.lora_B.weight", ("unet", "mid_block.attentions.0.proj_out", "up", "peft")),
    ("mid_block.attentions.0.proj_out.lora_A.default_0.weight",
     ("unet", "mid_block.attentions.0.proj_out", "down", "peft")),
    ("base_model.model.up_blocks.1.resnets.0.conv1.lora_A.weight", ("unet", "up_blocks.1.resnets.0.conv1", "down",
                                                                    "peft")),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight",
     ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "up", "peft")),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "up", "diffusers-old")),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_k_lora.down.weight",
     ("text_encoder", "text_model.encoder.layers.3.self_attn.k_proj", "down", "diffusers-old")),
    ("text_encoder.text_model.encoder.layers.3.mlp.fc2.lora_linear_layer.down.weight",
     ("text_encoder", "text_model.encoder.layers.3.mlp.fc2", "down", "peft")),
    ("lora_unet_x.hada_w1_a", None), ("model.diffusion_model.input_blocks.0.0.weight", None),
])
def test_parse_key(key, expected):
    k = parse_key(key)
    assert (k and (k.component, k.name, k.role, k.layout)) == expected


@pytest.mark.parametrize("keys,label", [
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "Flux"),
    (["transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight"], "SD3"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "an SDXL-layout model"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "an SDXL-layout model"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "an unknown model"),
    (["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"], "an SD 1.x/2.x-layout model"),
])
def test_guess_arch_names_other_families(keys, label):
    assert guess_arch(keys, {}).label == label
    assert ArchGuess("xl", 64).label == "an SDXL-layout model with 64-wide cross-attention"


def test_folders_and_weight_name(tmp_path):
    from fewstep.errors import LoadError
    from fewstep.lora import open_lora

    for name in ("a", "b"):
        save_file({f"lora_unet_{name}.alpha": torch.tensor(1.0)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(LoadError, match=r"holds 2 matching LoRA files \(.safetensors: a.safetensors, b.safetensors\)"):
        open_lora(tmp_path)
    assert open_lora(tmp_path, weight_name="b.safetensors").keys == ["lora_unet_b.alpha"]
