"""Single-file checkpoints: tiny models written in the original layouts load back exactly; real-size layouts get the
real configs; user mistakes raise LoadError."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fewstep import singlefile
from fewstep.errors import LoadError
from fewstep.singlefile import detect_arch, load_single_file, read_state_dict
from tests.support.original_layout import clip_to_ldm, clip_to_openclip, to_original, unet_to_ldm, vae_to_ldm
from tests.support.tiny import tiny_sd, tiny_sdxl

PROMPT = "a red circle above a blue square"


def tiny_ssd1b(seed=0):
    """SDXL-like tiny model with SSD-1B's pruning: no mid-block transformer, shallower up blocks than down blocks."""
    parts = tiny_sdxl(seed)
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", transformer_layers_per_block=(1, 2),
        reverse_transformer_layers_per_block=[[2, 1, 1], [1, 1, 1]], attention_head_dim=(1, 1),
        use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32).eval()
    return parts


MODELS = {
    "sd15": lambda: tiny_sd(0),
    "sd15-lcm": lambda: tiny_sd(1, time_cond_proj_dim=16),
    "sd2": lambda: tiny_sd(2, v2=True),
    "sdxl": lambda: tiny_sdxl(3),
    "ssd1b": lambda: tiny_ssd1b(4),
}


def write(tmp_path, state_dict, name="model.safetensors"):
    path = tmp_path / name
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return path


def plain(config, drop=()):
    """A config as JSON data (tuples become lists), without private and listed keys."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_") and k not in drop}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(tmp_path, name):
    parts = MODELS[name]()
    arch = name.split("-")[0]
    path = write(tmp_path, to_original(parts, arch))
    out = load_single_file(path)

    assert out["arch"] == arch
    encoders = ["text_encoder", "text_encoder_2"] if arch in ("sdxl", "ssd1b") else ["text_encoder"]
    for component in ["unet", "vae", *encoders]:
        expected, loaded = parts[component].state_dict(), out[component].state_dict()
        assert loaded.keys() == expected.keys(), component
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), component
        assert all(t.dtype == torch.float32 for t in loaded.values() if t.is_floating_point())

    # Family defaults (sample sizes, SD 2.1's upcast) are the only config fields the weights do not determine.
    assert plain(out["unet"].config, ("sample_size", "upcast_attention")) == plain(parts["unet"].config,
                                                                                   ("sample_size", "upcast_attention"))
    assert plain(out["vae"].config, ("sample_size",)) == plain(parts["vae"].config, ("sample_size",))
    for encoder in encoders:
        got, want = out[encoder].config, parts[encoder].config
        fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                  "vocab_size", "max_position_embeddings"]
        if encoder == "text_encoder_2":
            fields.append("projection_dim")
        assert {f: getattr(got, f) for f in fields} == {f: getattr(want, f) for f in fields}, encoder

    tokenizers = {"text_encoder": out["tokenizer"], "text_encoder_2": out.get("tokenizer_2")}
    for encoder in encoders:
        tokenizer = tokenizers[encoder]
        assert tokenizer.pad_token == ("!" if arch == "sd2" or encoder == "text_encoder_2" else "<|endoftext|>")
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            got = out[encoder](ids, output_hidden_states=True)
            want = parts[encoder](ids, output_hidden_states=True)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert torch.equal(got.hidden_states[-2], want.hidden_states[-2])
        if encoder == "text_encoder_2":
            assert torch.equal(got.text_embeds, want.text_embeds)

    scheduler = out["scheduler_config"]
    assert scheduler["prediction_type"] == ("v_prediction" if arch == "sd2" else "epsilon")
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"]) == (0.00085, 0.012, 1)
    assert out["force_zeros_for_empty_prompt"] == (arch in ("sdxl", "ssd1b"))


def test_torch_dtype(tmp_path):
    out = load_single_file(write(tmp_path, to_original(tiny_sd(0), "sd15")), torch_dtype=torch.bfloat16)
    assert out["unet"].dtype == out["vae"].dtype == out["text_encoder"].dtype == torch.bfloat16
    positions = next(b for n, b in out["text_encoder"].named_buffers() if n.endswith("position_ids"))
    assert positions.dtype == torch.long


from fewstep.arch import BIG_G, SD2_UNET, SD15_UNET, SD_VAE, SDXL_UNET, SDXL_VAE, SSD1B_UNET, VIT_H, VIT_L  # noqa: E402


@pytest.mark.parametrize("arch, unet, vae, prediction_type", [
    ("sd15", SD15_UNET, SD_VAE, "epsilon"),
    ("sd2", SD2_UNET, dict(SD_VAE, sample_size=768), "v_prediction"),
    ("sdxl", SDXL_UNET, SDXL_VAE, "epsilon"),
    ("ssd1b", SSD1B_UNET, SDXL_VAE, "epsilon"),
])
def test_real_sizes_get_real_configs(arch, unet, vae, prediction_type):
    with torch.device("meta"):
        real_unet, real_vae = UNet2DConditionModel(**unet), AutoencoderKL(**vae)
    state_dict = unet_to_ldm(real_unet.state_dict()) | vae_to_ldm(real_vae.state_dict())

    # Without text encoders detection falls back on the cross-attention width, as diffusers' does.
    assert detect_arch(state_dict) == arch
    pooled_dim = 1280 if arch in ("sdxl", "ssd1b") else None
    config = singlefile.unet_config_from_state_dict(state_dict, arch, pooled_dim=pooled_dim,
                                                    prediction_type=prediction_type)
    with torch.device("meta"):
        assert plain(UNet2DConditionModel(**config).config) == plain(real_unet.config)
        vae_config = singlefile.vae_config_from_state_dict(state_dict, arch, prediction_type=prediction_type)
        assert plain(AutoencoderKL(**vae_config).config) == plain(real_vae.config)


@pytest.mark.parametrize("kind, real", [("clip", VIT_L), ("sd2", VIT_H), ("sdxl", BIG_G)])
def test_real_text_encoder_configs(kind, real):
    from diffusers.loaders import single_file_utils as sfu

    with torch.device("meta"):
        if kind == "sdxl":
            encoder = CLIPTextModelWithProjection(CLIPTextConfig(**real))
        else:
            # SD 2.x files hold all 24 ViT-H layers; the penultimate-layer encoder keeps 23.
            layers = real["num_hidden_layers"] + (kind == "sd2")
            encoder = CLIPTextModel(CLIPTextConfig(**dict(real, num_hidden_layers=layers)))
    if kind == "clip":
        original = clip_to_ldm(encoder.state_dict(), singlefile.SD1_TEXT)
        hf = singlefile._hf_clip(sfu.convert_ldm_clip_checkpoint(original))
    else:
        prefix = singlefile.SD2_TEXT if kind == "sd2" else singlefile.SGM_TEXT_2
        openclip = clip_to_openclip(encoder.state_dict(), prefix)
        hf = singlefile._open_clip_to_hf(sfu, openclip, prefix, penultimate=kind == "sd2")
    projection_dim = hf["text_projection.weight"].shape[0] if kind == "sdxl" else None
    config = singlefile._text_config(hf, real["hidden_act"], projection_dim=projection_dim)
    assert {k: getattr(config, k) for k in real} == real
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)


def test_sd2_base_ckpt_is_epsilon(tmp_path):
    # diffusers' rule: a .ckpt saved at global_step 875000 is SD 2.x-base (512 px, epsilon).
    path = tmp_path / "v2-1_512.ckpt"
    torch.save({"state_dict": to_original(tiny_sd(0, v2=True), "sd2"), "global_step": 875000}, path)
    out = load_single_file(path, allow_pickle=True)
    assert out["arch"] == "sd2"
    assert out["scheduler_config"]["prediction_type"] == "epsilon"
    assert (out["unet"].config.sample_size, out["vae"].config.sample_size) == (64, 512)


def test_v_pred_marker(tmp_path):
    state_dict = to_original(tiny_sdxl(0), "sdxl") | {"v_pred": torch.zeros(0)}
    assert load_single_file(write(tmp_path, state_dict))["scheduler_config"]["prediction_type"] == "v_prediction"


def test_pickle_needs_opt_in(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    for call in (read_state_dict, load_single_file):
        with pytest.raises(LoadError, match="allow-pickle"):
            call(path)
    assert read_state_dict(path, allow_pickle=True).keys() == {"x"}


def test_unrelated_tensors(tmp_path):
    path = write(tmp_path, {"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)})
    with pytest.raises(LoadError, match="not a Stable Diffusion 1.x/2.x, SDXL or SSD-1B checkpoint.*encoder.weight"):
        load_single_file(path)


def test_corrupt_and_missing_files(tmp_path):
    good = write(tmp_path, {"a": torch.zeros(64, 64)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    for path in (truncated, garbage, tmp_path / "absent.safetensors"):
        with pytest.raises(LoadError, match=path.name):
            load_single_file(path)
    with pytest.raises(LoadError, match="unsupported checkpoint type"):
        read_state_dict(good.rename(tmp_path / "model.onnx"))


def test_missing_tensor_is_an_error(tmp_path):
    state_dict = to_original(tiny_sd(0), "sd15")
    del state_dict["model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(LoadError, match="UNet does not match.*missing 1 tensors.*attn2.to_k.weight"):
        load_single_file(write(tmp_path, state_dict))

    state_dict = to_original(tiny_sdxl(0), "sdxl")
    del state_dict["conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(LoadError, match="second text encoder does not match.*layers.1.mlp.fc1.bias"):
        load_single_file(write(tmp_path, state_dict))


def test_unsupported_variants(tmp_path):
    state_dict = to_original(tiny_sd(0), "sd15")
    conv_in = state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    inpainting = state_dict | {"model.diffusion_model.input_blocks.0.0.weight": conv_in.new_zeros(32, 9, 3, 3)}
    assert detect_arch(inpainting) == "sd15"  # inpainting checkpoints load (tests/test_inpaint.py)
    pix2pix = state_dict | {"model.diffusion_model.input_blocks.0.0.weight": conv_in.new_zeros(32, 8, 3, 3)}
    with pytest.raises(LoadError, match="takes 8 channels.*instruct-pix2pix"):
        load_single_file(write(tmp_path, pix2pix))
    unet_only = {k: v for k, v in state_dict.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(LoadError, match="cross-attention width 32"):
        detect_arch(unet_only)
