"""The fast path keeps images where they were; the bench command produces its rows."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

import fewstep
from fewstep.cli import main
from fewstep.errors import LoadError


def psnr(a, b):
    err = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(err, 1e-10))


LCM = dict(sampler="lcm", steps=2, guidance=1.0, seed=3)


def test_channels_last_is_on_by_default_on_cpu_and_changes_nothing(models):
    fast = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    plain = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, channels_last=False)
    conv = fast.c.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert psnr(fast.generate("a cat", **LCM).images[0], plain.generate("a cat", **LCM).images[0]) > 45


def test_prompt_cache_skips_the_text_encoder_and_follows_adapters(models, tmp_path):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora
    from tests.support.tiny import tiny_sd

    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    calls = []
    engine.c.text_encoders[0].register_forward_pre_hook(lambda *a: calls.append(1))
    first = engine.generate("a cat", **LCM)
    second = engine.generate("a cat", **LCM)
    assert len(calls) == 1
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    save_file(random_lora(tiny_sd()["unet"]), str(tmp_path / "l.safetensors"))
    engine.load_lora(str(tmp_path / "l.safetensors"), name="l", weight=0.5)
    engine.generate("a cat", **LCM)
    assert len(calls) == 2  # another adapter set: encoded again (a LoRA may touch the text encoder)


def test_tiny_decoder_from_a_local_folder(models, tmp_path):
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).save_pretrained(tmp_path / "taesd")
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, vae=str(tmp_path / "taesd"))
    assert isinstance(engine.decoder, AutoencoderTiny)
    calls = []
    engine.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    engine.decoder.decoder.register_forward_pre_hook(lambda *a: calls.append(2))
    image = engine.generate("a cat", **LCM).images[0]
    assert image.size == (64, 64) and 2 in calls
    with pytest.raises(LoadError, match="tiny decoder .* not found|not in the local Hugging Face cache"):
        fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, vae="/no/such/taesd")


def test_offload_and_cuda_graphs_are_for_gpus(capsys):
    with pytest.raises(LoadError, match="offload"):
        fewstep.load(device="cpu", lcm=False, offload=True)
    with pytest.raises(LoadError, match="--cuda-graphs needs a CUDA device"):
        fewstep.load(device="cpu", lcm=False, cuda_graphs=True)
    assert main(["generate", "a red circle", "--device", "cpu", "--cuda-graphs", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewstep: error: --cuda-graphs needs a CUDA device") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_compiled_engine_stays_close_to_eager(models):
    eager = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    compiled = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, compile=True)
    assert psnr(eager.generate("a cat", **LCM).images[0], compiled.generate("a cat", **LCM).images[0]) > 40


def test_bench_rows(models, capsys):
    code = main(["bench", "--model", str(models("sd")), "--size", "32", "--runs", "1", "--modes", "lcm",
                 "--systems", "fewstep,diffusers-tuned", "--json", "--dtype", "bf16", "--quality"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"fewstep", "diffusers-tuned"}
    for r in rows.values():
        assert r["unet_calls"] == 4 and r["seconds"] > 0 and r["decode_s"] > 0 and r["text_s"] > 0
        assert r["weights"] == "real" and r["size"] == 32 and r["commit"]
    assert rows["fewstep"]["speedup_vs"]["diffusers-tuned"] > 0
    assert 25 < rows["fewstep"]["psnr_vs_fp32"] < 100 and "psnr_vs_fp32" not in rows["diffusers-tuned"]  # bf16 fast path


def test_bench_recipe_rows_run_the_recipe_on_both_systems(models, capsys):
    code = main(["bench", "--model", str(models("sd")), "--size", "32", "--runs", "1", "--modes", "lcm", "--recipe",
                 "dmd2", "--systems", "fewstep,diffusers-tuned", "--json", "--dtype", "fp32"])
    assert code == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for r in rows.values():  # DMD2's four trained timesteps, no CFG: four single UNet passes on each side
        assert r["recipe"] == "dmd2" and r["unet_calls"] == 4 and r["guidance"] == 0.0


def test_bench_controlnet_rows(models, capsys):
    code = main(["bench", "--model", str(models("sd")), "--size", "32", "--runs", "1", "--modes", "lcm",
                 "--controlnet", "--systems", "fewstep,diffusers-seed", "--json", "--dtype", "fp32"])
    assert code == 0
    rows = {r["system"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {"fewstep", "diffusers-seed"}
    for r in rows.values():
        assert r["controlnet"] and r["unet_calls"] == 4 and r["seconds"] > 0


def _three_level_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32, 32), latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3).eval()


def test_phase_upsample_decodes_like_the_original_and_leaves_it_untouched():
    from diffusers.models.upsampling import Upsample2D

    from fewstep.speed import PhaseUpsample, phase_upsample_view

    vae = _three_level_vae()
    keys = list(vae.state_dict())
    view, count = phase_upsample_view(vae)
    assert count == 2 and isinstance(view.decoder.up_blocks[0].upsamplers[0], PhaseUpsample)
    assert isinstance(vae.decoder.up_blocks[0].upsamplers[0], Upsample2D) and list(vae.state_dict()) == keys
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z).sample
        assert (view.decode(z).sample - ref).abs().max() < 1e-4  # fp32: the same sums, another order
        vae.to(memory_format=torch.channels_last)
        out = view.decode(z.contiguous(memory_format=torch.channels_last)).sample
        assert (out - ref).abs().max() < 1e-4
        conv = vae.decoder.up_blocks[0].upsamplers[0].conv
        conv.weight.mul_(0.5)  # weights changed in place: the phase kernel follows
        assert (view.decode(z).sample - vae.decode(z).sample).abs().max() < 1e-4
        bf = copy.deepcopy(vae).to(torch.bfloat16)
        fast = phase_upsample_view(bf)[0].decode(z.bfloat16()).sample.float()
        assert (fast - vae.decode(z).sample).abs().max() < 0.1  # bf16: within bf16 rounding of the fp32 image


def test_phase_upsample_is_the_cpu_default_and_switchable(models):
    from fewstep.speed import PhaseUpsample

    def has_phase(engine):
        return any(isinstance(m, PhaseUpsample) for m in engine.decoder.modules())

    fast = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    plain = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, phase_upsample=False)
    assert has_phase(fast) and not has_phase(plain) and fast.speed_report["phase_upsample"] >= 1
    assert not any(isinstance(m, PhaseUpsample) for m in fast.c.vae.modules())
    assert psnr(fast.generate("a cat", **LCM).images[0], plain.generate("a cat", **LCM).images[0]) > 45


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_and_follow_lora_weights(models, tmp_path):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora

    eager = fewstep.load(models("sd"), device="cuda", dtype="fp32", lcm=False)
    graphed = fewstep.load(models("sd"), device="cuda", dtype="fp32", lcm=False, cuda_graphs=True)
    assert graphed.speed_report["cuda_graphs"]
    for batch in (1, 2):  # two shapes, two graphs
        a = eager.generate(["a cat"] * batch, **LCM).images
        b = graphed.generate(["a cat"] * batch, **LCM).images
        assert all(psnr(x, y) > 40 for x, y in zip(a, b))
    before = graphed.generate("a cat", **LCM).images[0]
    save_file(random_lora(eager.c.unet, seed=1, scale=0.5), str(tmp_path / "style.safetensors"))
    for engine in (eager, graphed):
        engine.load_lora(tmp_path / "style.safetensors", name="style", weight=1.0)
    after = graphed.generate("a cat", **LCM).images[0]
    assert psnr(eager.generate("a cat", **LCM).images[0], after) > 40 and psnr(before, after) < 40


def test_fused_qkv_changes_nothing_and_follows_lora_weights(models, tmp_path):
    from safetensors.torch import save_file

    from tests.support.loras import random_lora

    plain = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    fused = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False, fused_qkv=True)
    attn = fused.c.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert fused.speed_report["fused_qkv"] > 0 and attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()
    assert psnr(plain.generate("a cat", **LCM).images[0], fused.generate("a cat", **LCM).images[0]) > 45
    save_file(random_lora(plain.c.unet, seed=2, scale=0.5), str(tmp_path / "l.safetensors"))
    base = fused.generate("a cat", **LCM).images[0]
    for engine in (plain, fused):
        engine.load_lora(tmp_path / "l.safetensors", name="l", weight=1.0)
    styled = fused.generate("a cat", **LCM).images[0]
    assert psnr(plain.generate("a cat", **LCM).images[0], styled) > 45 and psnr(base, styled) < 40
    fused.unload_lora("l")
    assert psnr(fused.generate("a cat", **LCM).images[0], base) > 60
