"""The trainer end to end on tiny models: each method's output loads in fewstep and in diffusers (same image), the
losses are finite and fall on a fixed batch, the exported LoRA is the trained adapter, and a run killed with
SIGKILL and resumed ends with the same weights as a straight run."""

import json
import os
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import fewstep
from fewstep.train import TrainConfig, train
from fewstep.train.config import TrainError

PROMPT = "a red circle"
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


def assert_same(a, b, tol=2):
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= tol, np.abs(a - b).max()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six captioned 48x40 images of coloured circles (not square: the resize/crop path runs)."""
    root = tmp_path_factory.mktemp("train-images")
    colors = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 60)}
    lines = []
    for i, (name, rgb) in enumerate(list(colors.items()) * 2):
        im = Image.new("RGB", (48, 40), (240, 240, 240))
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, 28 + 4 * i, 28), fill=rgb)
        im.save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {name} circle"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(method, model, data, out, **kw):
    base = dict(max_steps=2, batch_size=2, resolution=32, quiet=True, validate_every=0, checkpoint_every=100,
                num_workers=1, save_dtype="fp32")
    if method != "lcm":
        base["rank"] = 4
    else:
        base["time_cond_proj_dim"] = 32
    base.update(kw)
    return TrainConfig(method=method, model=str(model), data=str(data), out=str(out), **base)


def lcm_pipe(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_both(engine, pipe, **kw):
    ours = engine.generate(PROMPT, seed=3, width=32, height=32, **kw).images[0]
    ref = pipe(PROMPT, height=32, width=32, generator=torch.Generator().manual_seed(3),
               num_inference_steps=kw.get("steps", 4), guidance_scale=kw.get("guidance", 1.0)).images[0]
    return ours, ref


@pytest.fixture(scope="module")
def sd_lcm_lora(models, images, tmp_path_factory):
    """An LCM-LoRA made here on the tiny SD (a large learning rate so that two steps move it visibly)."""
    out = tmp_path_factory.mktemp("lcm-lora")
    path = train(config("lcm-lora", models("sd"), images, out, lr=3e-2, validate_every=1, validation_steps=(1, 2)))
    assert path == out / "pytorch_lora_weights.safetensors"
    return out


@pytest.fixture(scope="module")
def sd_style(models, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("style")
    return train(config("lora", models("sd"), images, out, lr=3e-2, snr_gamma=5.0, caption_dropout=0.2))


def check_lora_parity(models, name, out, steps=4):
    """The file loads whole in fewstep and changes diffusers' image; both give the same image."""
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("lora_unet_") for k in sd)
    assert any(v.abs().max() > 0 for k, v in sd.items() if "lora_up" in k)  # trained: B starts at zero
    engine = fewstep.load(models(name), device="cpu", dtype="fp32", lcm=str(out))
    report = engine.loras["lcm"].report
    assert report.tensors == len(sd) and not report.unmatched
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = lcm_pipe(cls, models(name))
    base = pipe(PROMPT, height=32, width=32, generator=torch.Generator().manual_seed(3), num_inference_steps=steps,
                guidance_scale=1.0).images[0]
    pipe.load_lora_weights(str(out))
    ours, ref = generate_both(engine, pipe, steps=steps)
    assert np.abs(np.asarray(ref, np.int16) - np.asarray(base, np.int16)).max() > 0  # diffusers applied it
    assert_same(ours, ref)
    return sd


def test_lcm_lora_sd_loads_in_fewstep_and_diffusers(models, sd_lcm_lora):
    out = sd_lcm_lora
    sd = check_lora_parity(models, "sd", out)
    assert any(k.endswith("_conv1.lora_down.weight") for k in sd) and any("time_emb_proj" in k for k in sd)
    record = json.loads((out / "train_config.json").read_text())
    assert record["fewstep_version"] == fewstep.__version__ and record["config"]["method"] == "lcm-lora"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-00000001.png", "step-00000002.png"]
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(np.isfinite(r["loss"]) for r in lines)


def test_lcm_lora_sdxl_loads_in_fewstep_and_diffusers(models, images, tmp_path):
    train(config("lcm-lora", models("sdxl"), images, tmp_path, lr=3e-2, batch_size=1))
    check_lora_parity(models, "sdxl", tmp_path, steps=2)


def test_exported_lora_is_the_trained_adapter(models, tmp_path):
    """The kohya file, fused by fewstep, computes what the peft adapter computed during training."""
    from safetensors.torch import save_file

    from fewstep.train.models import adapters_disabled, add_lora, kohya_lora, load_models

    m = load_models(models("sd"))
    gen = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500]), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        base = m.unet(x, t, encoder_hidden_states=c).sample
    n = add_lora(m.unet, rank=4, alpha=2.0, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2",
                                                       "time_emb_proj", "downsamplers.0.conv"])
    assert n > 20
    with torch.no_grad():
        for p in m.unet.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        trained = m.unet(x, t, encoder_hidden_states=c).sample
        with adapters_disabled(m.unet):  # the LCM-LoRA's teacher: the same UNet, adapter off
            assert torch.equal(m.unet(x, t, encoder_hidden_states=c).sample, base)
    assert (trained - base).abs().max() > 1e-2
    assert all(p.requires_grad for name, p in m.unet.named_parameters() if ".lora_" in name)  # re-enabled
    save_file(kohya_lora(m.unet, torch.float32), str(tmp_path / "x.safetensors"))
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=False)
    engine.load_lora(str(tmp_path / "x.safetensors"))
    with torch.no_grad():
        fused = engine.c.unet(x, t, encoder_hidden_states=c).sample
    assert torch.allclose(fused, trained, atol=1e-4), (fused - trained).abs().max()


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_full_lcm_loads_in_fewstep_and_diffusers(models, images, tmp_path, name):
    out = tmp_path / "lcm"
    assert train(config("lcm", models(name), images, out, lr=1e-3)) == out
    engine = fewstep.load(out, device="cpu", dtype="fp32")
    assert engine.full_lcm and engine.c.unet.config.time_cond_proj_dim == 32
    cls = StableDiffusionXLPipeline if name == "sdxl" else LatentConsistencyModelPipeline
    pipe = cls.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    ours, ref = generate_both(engine, pipe, steps=2, guidance=6.0)
    assert_same(ours, ref)  # the guidance embedding goes in as diffusers computes it
    # the EMA target moved away from the teacher, and its new guidance layer learned
    teacher = load_file(str(models(name) / "unet" / "diffusion_pytorch_model.safetensors"))
    student = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert student["time_embedding.cond_proj.weight"].abs().max() > 0
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)


def test_style_lora_loads_and_combines_with_an_lcm_lora_made_here(models, sd_style, sd_lcm_lora):
    check_lora_parity(models, "sd", sd_style.parent, steps=2)
    engine = fewstep.load(models("sd"), device="cpu", dtype="fp32", lcm=str(sd_lcm_lora))
    report = engine.load_lora(str(sd_style), name="style", weight=0.8)
    assert report.tensors == len(load_file(str(sd_style))) and not report.unmatched
    assert engine.generate(PROMPT, steps=4, seed=3, width=32, height=32).params["loras"] == {"lcm": 1.0,
                                                                                            "style": 0.8}


@pytest.mark.parametrize("method,name", [("lcm-lora", "sd"), ("lcm", "sd"), ("lora", "sd"), ("lora", "sdxl")])
def test_loss_falls_on_a_fixed_batch(models, images, method, name):
    from fewstep.train.data import Loader, open_source
    from fewstep.train.loop import make_method
    from fewstep.train.models import load_models, place_frozen

    torch.manual_seed(0)
    cfg = config(method, models(name), images, "unused", lr=3e-3 if method != "lcm" else 3e-5).resolved()
    m = load_models(cfg.model)
    place_frozen(m, torch.device("cpu"), torch.float32)
    method_ = make_method(cfg, m, torch.device("cpu"), torch.float32, nullcontext)
    batch = Loader(open_source(cfg.data), seed=0, resolution=32, per_process=2, workers=0).batch(0)
    draws = method_.draw(torch.Generator().manual_seed(0), 2)
    params = list(method_.trainable().values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    losses = []
    for _ in range(5):
        loss = method_.loss(method_.student, batch, draws)
        loss.backward()
        opt.step()
        opt.zero_grad()
        method_.after_step()
        losses.append(loss.item())
    # consistency losses fall fast on one batch; the noise-prediction loss of a random UNet falls slowly
    assert all(np.isfinite(losses)) and losses[-1] < (0.97 if method == "lora" else 0.8) * losses[0], losses


def test_resume_after_kill_9_is_exact(models, images, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, lr=1e-2)
    straight = train(config("lcm-lora", models("sd"), images, tmp_path / "a", **kw))

    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "fewstep.cli", "train", "lcm-lora", "--teacher", str(models("sd")), "--data",
           str(images), "--out", str(out), "--max-steps", "4", "--checkpoint-every", "2", "--lr", "1e-2",
           "--batch-size", "2", "--resolution", "32", "--rank", "4", "--validate-every", "0", "--num-workers", "1",
           "--save-dtype", "fp32", "-q"]
    env = dict(os.environ, FEWSTEP_TRAIN_KILL_AT_STEP="3", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-00000002"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 3  # step 3 ran and was lost
    assert not (out / "pytorch_lora_weights.safetensors").exists()

    with pytest.raises(TrainError, match="pass --resume"):
        train(config("lcm-lora", models("sd"), images, out, **kw))
    with pytest.raises(TrainError, match="other lr"):
        train(config("lcm-lora", models("sd"), images, out, resume="latest", **dict(kw, lr=5e-3)))
    resumed = train(config("lcm-lora", models("sd"), images, out, resume="latest", **kw))
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_full_lcm_resume_restores_the_ema_target_and_optimizer(models, images, tmp_path):
    kw = dict(lr=1e-3, checkpoint_every=1)
    train(config("lcm", models("sd"), images, tmp_path / "a", max_steps=3, **kw))
    train(config("lcm", models("sd"), images, tmp_path / "b", max_steps=1, **kw))
    train(config("lcm", models("sd"), images, tmp_path / "b", max_steps=3, resume="latest", **kw))  # may extend
    a, b = (load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors")) for d in "ab")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_mixed_precision_accumulation_and_checkpointing_run(models, images, tmp_path):
    out = tmp_path / "bf16"
    train(config("lcm-lora", models("sdxl"), images, out, max_steps=1, mixed_precision="bf16", grad_accum=2,
                 gradient_checkpointing=True, batch_size=1, save_dtype="fp16", vae=str(models("sdxl"))))
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert next(iter(sd.values())).dtype == torch.float16 and all(torch.isfinite(v).all() for v in sd.values())
    record = json.loads((out / "train_config.json").read_text())
    assert record["mixed_precision"] == "bf16" and record["global_batch"] == 2
