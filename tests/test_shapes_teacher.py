"""The shapes teacher: its architecture saves as a folder that fewstep and diffusers both load, and the training
script runs end to end on the CPU and resumes (slow)."""

import json

import numpy as np
import pytest
import torch

from fewstep.worlds.shapes import teacher


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes") / "teacher"
    vae, te, unet = teacher.build(teacher.TeacherConfig(), seed=0)
    vae.register_to_config(scaling_factor=0.5)
    teacher.save_pipeline(path, vae, te, unet, info={"note": "random weights"})
    return path


def test_teacher_folder_is_small_and_sd_shaped(teacher_folder):
    weights = sum(f.stat().st_size for f in teacher_folder.rglob("*.safetensors"))
    assert weights < 25 * 2**20  # fp16; the LCM-LoRA and the outline LoRA must fit beside it in 30 MB
    index = json.loads((teacher_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((teacher_folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["prediction_type"]) == (
        "scaled_linear", 0.00085, 0.012, "epsilon")
    assert json.loads((teacher_folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.5


def test_fewstep_and_diffusers_give_the_same_image(teacher_folder):
    from diffusers import StableDiffusionPipeline

    import fewstep

    prompt = "a red circle in the top left on a blue background"
    engine = fewstep.load(teacher_folder, device="cpu", dtype="fp32", lcm=False)
    ours = np.asarray(engine.generate(prompt, sampler="euler", steps=3, guidance=4.0, seed=7).images[0], np.float32)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_folder)  # no dtype given: everything loads as float32
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    ref = pipe(prompt, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(7),
               output_type="np").images[0] * 255
    assert ours.shape == (64, 64, 3)
    assert np.abs(ours - ref).max() < 1.5


@pytest.mark.slow
def test_train_teacher_runs_resumes_and_exports(tmp_path, monkeypatch):
    import fewstep
    from fewstep.train import checkpoint
    from fewstep.worlds.shapes import train_teacher as tt

    out = tmp_path / "run"
    argv = ["--out", str(out), "--device", "cpu", "--size", "32", "--vae-steps", "2", "--vae-batch", "2",
            "--text-steps", "3", "--unet-steps", "3", "--batch", "4", "--eval-n", "2", "--eval-steps", "2",
            "--evals", "1", "--vae-check-n", "4", "--threads", "2"]
    real_step = tt.Trainer.unet_step

    def interrupted(self, step, *a):
        if step == 1:
            raise KeyboardInterrupt
        return real_step(self, step, *a)

    monkeypatch.setattr(tt.Trainer, "unet_step", interrupted)
    assert tt.main(argv) == 130
    state = json.loads((checkpoint.checkpoints(out)[-1] / "state.json").read_text())["info"]  # no pickle to read
    assert state["steps"]["unet"] == 1
    monkeypatch.setattr(tt.Trainer, "unet_step", real_step)
    assert tt.main(argv) == 0
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "stage unet" in log
    doc = json.loads((out / "accuracy.json").read_text())
    assert doc["stage"] == "done" and doc["steps"]["unet"] == 3 and doc["results"]["final"]["n"] == 2
    assert (out / "samples.png").exists()
    i = argv.index("--unet-steps")
    argv_more = argv[:i] + argv[i + 2:] + ["--extend", "--unet-steps", "2"]
    assert tt.main(argv_more) == 0
    doc = json.loads((out / "accuracy.json").read_text())
    assert doc["stage"] == "done" and doc["steps"]["unet"] == 5 and doc["plan"]["unet_from"] == 3
    engine = fewstep.load(out / "model", device="cpu", dtype="fp32", lcm=False)
    assert engine.generate("a red circle in the center on a blue background", sampler="euler", steps=2,
                           seed=0).images[0].size == (32, 32)
