"""Issue 16's other CPU levers: the feature cache across steps (--deep-cache) and the cheap progress previews."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

import fewstep
from fewstep.cli import main
from fewstep.errors import LoadError
from fewstep.featurecache import FeatureCacheUNet
from tests.support.serve import default_engine
from tests.support.tiny import tiny_sd

LCM4 = dict(sampler="lcm", steps=4, guidance=1.0, seed=1)


def psnr(a, b):
    err = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return 10 * np.log10(255**2 / max(err, 1e-10))


def _counted(module):
    calls = []
    module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_cached_call_is_the_unets_forward_cut_short(one_thread):
    unet = tiny_sd()["unet"].eval()
    fc = FeatureCacheUNet(unet, 2)
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = unet(x, 500, states, return_dict=False)[0]
        full = fc(x, 500, states, return_dict=False)[0]
        fc.last_t = float("inf")  # the next call continues the run: the shallow path, on the same input
        shallow = fc(x, 500, states, return_dict=False)[0]
        later = fc(x, 400, states, return_dict=False)[0]  # the third call of a run is a full one again
    assert (fc.full_calls, fc.cached_calls) == (2, 1)
    # the same input: the kept deep features are exactly what this call's deep path would give
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(shallow, ref, atol=1e-5, rtol=0)
    assert later.shape == ref.shape


def test_deep_cache_runs_the_deep_blocks_every_other_step_and_keeps_the_image(one_thread):
    plain = default_engine()
    cached = fewstep.load(device="cpu", dtype="fp32", deep_cache=2)
    assert cached.speed_report["deep_cache"] == 2 and isinstance(cached.unet_fn, FeatureCacheUNet)
    events = []  # "deep" for the mid block (full calls only), "outer" for the last up block (every call)
    cached.c.unet.mid_block.register_forward_pre_hook(lambda *a: events.append("deep"))
    cached.c.unet.up_blocks[-1].register_forward_pre_hook(lambda *a: events.append("outer"))
    prompt = "a red circle in the top left on a blue background"
    image = cached.generate(prompt, **LCM4).images[0]
    assert events == ["deep", "outer", "outer"] * 2  # 4 steps: the deep blocks at steps 1 and 3 only
    fc = cached.unet_fn
    fc.last_t, fc.calls = float("inf"), 1  # as if a run went on, its next call a cached one: only the reset helps
    events.clear()
    cached.generate(prompt, **LCM4)  # each request starts a new run, with a full call (FastPath.prepare)
    assert events == ["deep", "outer", "outer"] * 2 and (fc.full_calls, fc.cached_calls) == (4, 4)
    # this prompt, fp32: 26.7 dB (the n=200 median in bf16: 29.4 dB; benchmarks/cpu_levers.py quality)
    assert psnr(image, plain.generate(prompt, **LCM4).images[0]) > 24


def test_deep_cache_validation(capsys):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(LoadError, match="--deep-cache takes a whole number"):
            fewstep.load(device="cpu", lcm=False, deep_cache=bad)
    with pytest.raises(LoadError, match="--deep-cache runs the eager UNet"):
        fewstep.load(device="cpu", lcm=False, deep_cache=2, compile=True)
    assert main(["generate", "a red circle", "--device", "cpu", "--deep-cache", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fewstep: error: --deep-cache takes a whole number") and len(err.splitlines()) == 1


def test_progress_preview_uses_the_tiny_decoder_not_the_full_vae():
    from fewstep.previews import preview_decoder
    from fewstep.serve.progress import preview_image

    engine = default_engine()  # the shapes model: its AutoencoderTiny ships with it
    full = _counted(engine.c.vae.decoder)
    x0 = torch.randn(1, 4, 16, 16)
    image = preview_image(engine, x0)
    assert isinstance(preview_decoder(engine), AutoencoderTiny) and preview_decoder(engine) is not engine.decoder
    assert image.size == (64, 64) and full == []


class _LinearVAE:
    """A VAE whose encoder is linear in RGB (average pooling, then a 3 -> 4 channel map), as SD's nearly is."""

    class config(dict):  # noqa: N801 - diffusers' config reads as attributes
        scaling_factor, shift_factor = 0.5, 0.1

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, factor):
        g = torch.Generator().manual_seed(0)
        self.factor, self.m, self.c = factor, torch.randn(4, 3, generator=g), torch.randn(4, generator=g)
        self.config = _LinearVAE.config()

    def encode(self, x):
        from types import SimpleNamespace

        pooled = torch.nn.functional.avg_pool2d(x, self.factor)
        mean = torch.einsum("oc,nchw->nohw", self.m, pooled) + self.c.view(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_linear_preview_fit_recovers_a_linear_vae():
    from fewstep import latents
    from fewstep.previews import LatentRGB

    vae = _LinearVAE(4)
    rgb = LatentRGB.fit(vae, 4)
    colours = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = latents.to_unet(vae, vae.encode(colours.view(5, 3, 1, 1).expand(5, 3, 32, 32)).latent_dist.mean)
    out = rgb(z)
    assert out.shape == (5, 3, 32, 32)
    torch.testing.assert_close(out, colours.view(5, 3, 1, 1).expand_as(out), atol=1e-3, rtol=0)


def test_linear_preview_where_no_tiny_decoder_is_on_the_machine(models, monkeypatch):
    from fewstep import stream
    from fewstep.previews import LatentRGB, preview_decoder
    from fewstep.serve.progress import preview_image

    monkeypatch.setattr(stream, "_cached", lambda repo_id: None)  # whatever this machine's hub cache holds
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)  # SD: no TAESD in the test cache
    full = _counted(engine.c.vae.decoder)
    image = preview_image(engine, torch.randn(1, 4, 8, 8))
    assert isinstance(preview_decoder(engine), LatentRGB) and full == []
    assert image.size == (8 * engine.vae_factor, 8 * engine.vae_factor)


def test_token_merging_merges_into_window_corners_and_undoes_exactly():
    from fewstep.tokenmerge import merge_fns

    x = torch.randn(2, 6 * 8, 5, generator=torch.Generator().manual_seed(0))
    merge, unmerge = merge_fns(x, 6, 8, 0)
    assert torch.equal(unmerge(merge(x)), x)
    merge, unmerge = merge_fns(x, 6, 8, 20)
    y = merge(x)
    assert y.shape == (2, 48 - 20, 5)
    back = unmerge(y)
    same = (back == x).all(-1).sum(1)  # the tokens neither merged nor merged into come back exactly
    assert back.shape == x.shape and (same >= 48 - 20 - 12).all() and (same < 48).all()


def test_tome_engine_merges_self_attention_and_keeps_the_image():
    plain = default_engine()
    merged = fewstep.load(device="cpu", dtype="fp32", tome=0.5)
    from fewstep.tokenmerge import ToMeProcessor

    procs = [p for p in merged.c.unet.attn_processors.values() if isinstance(p, ToMeProcessor)]
    assert merged.speed_report["tome"] == len(procs) > 0
    prompt = "a red circle in the top left on a blue background"
    image = merged.generate(prompt, **LCM4).images[0]
    assert sum(p.merged for p in procs) > 0
    # this prompt, fp32: 50 dB (bf16, n=200: 50.4 dB and every caption right; benchmarks/cpu_levers.py tome)
    assert psnr(image, plain.generate(prompt, **LCM4).images[0]) > 40
    wide = merged.generate(prompt, width=96, height=64, **LCM4).images[0]  # any aspect ratio: the hook's size
    assert wide.size == (96, 64)


def test_tome_validation():
    for bad in (0.75, -0.1, True, "half"):
        with pytest.raises(LoadError, match="--tome takes the share"):
            fewstep.load(device="cpu", lcm=False, tome=bad)
    with pytest.raises(LoadError, match="--tome runs the eager UNet"):
        fewstep.load(device="cpu", lcm=False, tome=0.5, compile=True)
