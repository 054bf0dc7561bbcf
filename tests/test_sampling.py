"""Schedules and samplers against diffusers' schedulers on random inputs (the oracle)."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from fewstep.denoiser import to_x0_eps
from fewstep.errors import RequestError
from fewstep.sampling import add_noise, sample_euler, sample_lcm, sample_tcd
from fewstep.schedules import consistency_timesteps, euler_schedule, lcm_schedule, noise_schedule, tcd_schedule

SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)
SHAPE = (2, 4, 8, 8)


def fake_model(prediction_type):
    """A deterministic stand-in for a UNet: output depends on the input and the timestep."""
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    return lambda x, t: 0.3 * x + w * (float(t) / 1000.0) + 0.1


def run_diffusers(scheduler, model, x, steps, seed, **set_kw):
    gen = torch.Generator().manual_seed(seed)
    step_kw = set_kw.pop("step_kw", {})
    scheduler.set_timesteps(steps, **set_kw) if steps else scheduler.set_timesteps(**set_kw)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=gen, return_dict=False, **step_kw)[0]
    return scheduler.timesteps, x


def fewstep_denoiser(model, prediction_type):
    return lambda x, t, alpha: to_x0_eps(model(x, t), x, alpha, prediction_type)


def noise_from(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen)


@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_matches_diffusers(steps, prediction_type):
    config = dict(SD_CONFIG, prediction_type=prediction_type)
    model = fake_model(prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref_t, ref = run_diffusers(LCMScheduler(**config), model, x, steps, seed=3)
    sched = lcm_schedule(noise_schedule(config), steps)
    out = sample_lcm(fewstep_denoiser(model, prediction_type), x, sched, noise=noise_from(3))
    assert sched.timesteps.tolist() == ref_t.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_lcm_timesteps_from_the_reference():
    ns = noise_schedule(SD_CONFIG)
    assert consistency_timesteps(ns, 1) == [999]
    assert consistency_timesteps(ns, 4) == [999, 759, 499, 259]
    assert consistency_timesteps(ns, 8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert consistency_timesteps(ns, 4, strength=0.5) == [499, 379, 259, 139]
    assert consistency_timesteps(ns, timesteps=[999, 749, 499, 249]) == [999, 749, 499, 249]
    for steps in range(1, 51):  # every step count, including the sizes where float linspace rounds down
        ref = LCMScheduler(**SD_CONFIG)
        ref.set_timesteps(steps)
        assert consistency_timesteps(ns, steps) == ref.timesteps.tolist()


def test_lcm_custom_timesteps_and_original_steps_match_diffusers():
    model = fake_model("epsilon")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ns = noise_schedule(SD_CONFIG)
    ref_t, ref = run_diffusers(LCMScheduler(**SD_CONFIG), model, x, None, seed=4, timesteps=[999, 749, 499, 249])
    out = sample_lcm(fewstep_denoiser(model, "epsilon"), x, lcm_schedule(ns, timesteps=[999, 749, 499, 249]),
                     noise=noise_from(4))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ref_t, ref = run_diffusers(LCMScheduler(**SD_CONFIG), model, x, 4, seed=4, original_inference_steps=100)
    sched = lcm_schedule(ns, 4, original_steps=100)
    assert sched.timesteps.tolist() == ref_t.tolist()
    torch.testing.assert_close(sample_lcm(fewstep_denoiser(model, "epsilon"), x, sched, noise=noise_from(4)), ref,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", range(1, 9))
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(steps, gamma):
    model = fake_model("epsilon")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref_t, ref = run_diffusers(TCDScheduler(**SD_CONFIG), model, x, steps, seed=5, step_kw={"eta": gamma})
    sched = tcd_schedule(noise_schedule(SD_CONFIG), steps, gamma=gamma)
    out = sample_tcd(fewstep_denoiser(model, "epsilon"), x, sched, noise=noise_from(5))
    assert sched.timesteps.tolist() == ref_t.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(steps, spacing, prediction_type):
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type)
    config.pop("clip_sample"), config.pop("set_alpha_to_one")
    model = fake_model(prediction_type)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref_t, ref = run_diffusers(EulerDiscreteScheduler(**config), model, x, steps, seed=0)
    sched = euler_schedule(noise_schedule(config), steps)
    out = sample_euler(fewstep_denoiser(model, prediction_type), x * sched.init_sigma, sched)
    torch.testing.assert_close(sched.timesteps, ref_t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_img2img_noise_matches_diffusers():
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    unit = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    ns = noise_schedule(SD_CONFIG)
    lcm = LCMScheduler(**SD_CONFIG)
    sched = lcm_schedule(ns, 4, strength=0.5)
    torch.testing.assert_close(add_noise("lcm", clean, unit, sched),
                               lcm.add_noise(clean, unit, sched.timesteps[:1]))
    config = {k: v for k, v in SD_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
    euler = EulerDiscreteScheduler(**config)
    euler.set_timesteps(10)
    sched = euler_schedule(ns, 10, strength=0.6)
    assert len(sched) == 6
    euler.set_begin_index(4)
    torch.testing.assert_close(add_noise("euler", clean, unit, sched), euler.add_noise(clean, unit, euler.timesteps[4:5]))


def test_schedule_errors_are_user_errors():
    ns = noise_schedule(SD_CONFIG)
    with pytest.raises(RequestError, match="more than"):
        lcm_schedule(ns, 51)
    with pytest.raises(RequestError, match="descending"):
        lcm_schedule(ns, timesteps=[499, 999])
    with pytest.raises(RequestError, match="lie in"):
        lcm_schedule(ns, timesteps=[1000, 500])
    with pytest.raises(RequestError, match="strength"):
        lcm_schedule(ns, 8, strength=0.1)
    with pytest.raises(RequestError, match="runs no step"):
        euler_schedule(ns, 4, strength=0.1)
    with pytest.raises(RequestError, match="gamma"):
        tcd_schedule(ns, 4, gamma=1.5)
