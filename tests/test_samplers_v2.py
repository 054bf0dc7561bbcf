"""DDIM, Euler ancestral, trailing Euler and x0-prediction samplers against diffusers' schedulers (the oracle)."""

import pytest
import torch
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                       TCDScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd

from fewstep.errors import RequestError
from fewstep.sampling import (SAMPLERS, add_noise, noise_draws, sample_ddim, sample_euler, sample_euler_ancestral,
                              sample_lcm, sample_tcd)
from fewstep.schedules import (ddim_schedule, euler_schedule, lcm_schedule, noise_schedule, spaced_timesteps,
                               tcd_schedule)
from tests.test_sampling import SD_CONFIG, SHAPE, fake_model, fewstep_denoiser, noise_from, run_diffusers

STEPS = range(1, 9)
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
EULER_CONFIG = {k: v for k, v in SD_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}


def start_latent():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def as_epsilon(model, scheduler):
    """An x0-predicting model as the epsilon model diffusers' Euler ancestral accepts (it refuses "sample")."""

    def eps_model(x_in, t):
        sigma = scheduler.sigmas[scheduler.step_index]
        sample = x_in * (sigma**2 + 1) ** 0.5  # undo scale_model_input: diffusers' epsilon x0 is sample - sigma * eps
        return (sample - model(x_in, t)) / sigma

    return eps_model


def run_diffusers_from(scheduler, model, x, timesteps, seed):
    """diffusers' denoise loop over given (img2img-sliced) timesteps, as StableDiffusionImg2ImgPipeline runs it."""
    gen = torch.Generator().manual_seed(seed)
    for t in timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=gen, return_dict=False)[0]
    return x


def test_spaced_timesteps_equal_diffusers_for_every_step_count():
    for spacing in SPACINGS:
        ns = noise_schedule(dict(SD_CONFIG, timestep_spacing=spacing))
        for steps in range(1, 60):
            ddim = DDIMScheduler(**dict(SD_CONFIG, timestep_spacing=spacing))
            euler = EulerDiscreteScheduler(**dict(EULER_CONFIG, timestep_spacing=spacing))
            ddim.set_timesteps(steps), euler.set_timesteps(steps)
            assert spaced_timesteps(ns, steps, integer=True).tolist() == ddim.timesteps.tolist()
            assert spaced_timesteps(ns, steps, integer=False).tolist() == euler.timesteps.tolist()
    # the two schedulers really differ for linspace (DDIM rounds), so one helper must keep both behaviours
    ns = noise_schedule(SD_CONFIG)
    assert spaced_timesteps(ns, 4, "linspace", integer=False).tolist() == [999.0, 666.0, 333.0, 0.0]
    assert spaced_timesteps(ns, 3, "linspace", integer=False).tolist() == [999.0, 499.5, 0.0]
    assert spaced_timesteps(ns, 3, "linspace", integer=True).tolist() == [999, 500, 0]


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers(steps, spacing, prediction_type, set_alpha_to_one):
    config = dict(SD_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type,
                  set_alpha_to_one=set_alpha_to_one)
    model, x = fake_model(prediction_type), start_latent()
    ref_t, ref = run_diffusers(DDIMScheduler(**config), model, x, steps, seed=0)
    sched = ddim_schedule(noise_schedule(config), steps)
    out = sample_ddim(fewstep_denoiser(model, prediction_type), x, sched)
    assert sched.timesteps.tolist() == ref_t.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_clip_sample_matches_diffusers(steps):
    config = dict(SD_CONFIG, clip_sample=True, clip_sample_range=1.5)
    model, x = fake_model("epsilon"), start_latent()
    _, ref = run_diffusers(DDIMScheduler(**config), model, x, steps, seed=0)
    sched = ddim_schedule(noise_schedule(config), steps)
    assert sched.clip_range == 1.5
    out = sample_ddim(fewstep_denoiser(model, "epsilon"), x, sched)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # the clamp is active on these inputs, so the test would see it missing
    unclipped = sample_ddim(fewstep_denoiser(model, "epsilon"), x, ddim_schedule(noise_schedule(SD_CONFIG), steps))
    assert (unclipped - ref).abs().max() > 1e-2


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_ancestral_matches_diffusers(steps, spacing, prediction_type):
    config = dict(EULER_CONFIG, timestep_spacing=spacing, prediction_type=prediction_type)
    model, x = fake_model(prediction_type), start_latent()
    if prediction_type == "sample":
        ref_sched = EulerAncestralDiscreteScheduler(**dict(config, prediction_type="epsilon"))
        ref_model = as_epsilon(model, ref_sched)
    else:
        ref_sched, ref_model = EulerAncestralDiscreteScheduler(**config), model
    ref_t, ref = run_diffusers(ref_sched, ref_model, x, steps, seed=9)
    sched = euler_schedule(noise_schedule(config), steps)
    assert sched.init_sigma == pytest.approx(float(ref_sched.init_noise_sigma), rel=1e-6)
    out = sample_euler_ancestral(fewstep_denoiser(model, prediction_type), x * sched.init_sigma, sched,
                                 noise=noise_from(9))
    assert torch.equal(sched.timesteps, ref_t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_trailing_override_matches_diffusers(steps, prediction_type):
    # the model config says "leading" (SDXL's); Lightning and Turbo run trailing spacing over it
    config = dict(EULER_CONFIG, prediction_type=prediction_type)
    model, x = fake_model(prediction_type), start_latent()
    ref_sched = EulerDiscreteScheduler(**dict(config, timestep_spacing="trailing"))
    ref_t, ref = run_diffusers(ref_sched, model, x, steps, seed=0)
    sched = euler_schedule(noise_schedule(config), steps, spacing="trailing")
    assert sched.init_sigma == pytest.approx(float(ref_sched.init_noise_sigma), rel=1e-6)
    out = sample_euler(fewstep_denoiser(model, prediction_type), x * sched.init_sigma, sched)
    assert torch.equal(sched.timesteps, ref_t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", STEPS)
def test_lcm_and_tcd_x0_prediction_match_diffusers(steps):
    config = dict(SD_CONFIG, prediction_type="sample")
    model, x = fake_model("sample"), start_latent()
    ns = noise_schedule(config)
    ref_t, ref = run_diffusers(LCMScheduler(**config), model, x, steps, seed=3)
    sched = lcm_schedule(ns, steps)
    out = sample_lcm(fewstep_denoiser(model, "sample"), x, sched, noise=noise_from(3))
    assert sched.timesteps.tolist() == ref_t.tolist()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for gamma in (0.0, 0.3):
        ref_t, ref = run_diffusers(TCDScheduler(**config), model, x, steps, seed=5, step_kw={"eta": gamma})
        sched = tcd_schedule(ns, steps, gamma=gamma)
        out = sample_tcd(fewstep_denoiser(model, "sample"), x, sched, noise=noise_from(5))
        assert sched.timesteps.tolist() == ref_t.tolist()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps,strength", [(4, 0.5), (10, 0.6), (3, 0.34), (2, 1.0)])
def test_img2img_ddim_and_euler_ancestral_match_diffusers(steps, strength, spacing):
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    unit = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    model = fake_model("epsilon")
    keep = min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    t_start = steps - keep

    config = dict(SD_CONFIG, timestep_spacing=spacing)
    ref_sched = DDIMScheduler(**config)
    ref_sched.set_timesteps(steps)
    ts = ref_sched.timesteps[t_start:]
    sched = ddim_schedule(noise_schedule(config), steps, strength=strength)
    assert sched.timesteps.tolist() == ts.tolist()
    start = add_noise("ddim", clean, unit, sched)
    ref_start = ref_sched.add_noise(clean, unit, ts[:1])
    torch.testing.assert_close(start, ref_start)
    torch.testing.assert_close(sample_ddim(fewstep_denoiser(model, "epsilon"), start, sched),
                               run_diffusers_from(ref_sched, model, ref_start, ts, seed=0), rtol=1e-4, atol=1e-5)

    config = dict(EULER_CONFIG, timestep_spacing=spacing)
    ref_sched = EulerAncestralDiscreteScheduler(**config)
    ref_sched.set_timesteps(steps)
    ref_sched.set_begin_index(t_start)
    ts = ref_sched.timesteps[t_start:]
    sched = euler_schedule(noise_schedule(config), steps, strength=strength)
    assert torch.equal(sched.timesteps, ts)
    start = add_noise("euler_a", clean, unit, sched)
    ref_start = ref_sched.add_noise(clean, unit, ts[:1])
    torch.testing.assert_close(start, ref_start)
    torch.testing.assert_close(sample_euler_ancestral(fewstep_denoiser(model, "epsilon"), start, sched,
                                                      noise=noise_from(4)),
                               run_diffusers_from(ref_sched, model, ref_start, ts, seed=4), rtol=1e-4, atol=1e-5)


def test_img2img_that_runs_no_step_is_a_user_error():
    ns = noise_schedule(SD_CONFIG)
    with pytest.raises(RequestError, match="runs no step.*steps x strength"):
        ddim_schedule(ns, 1, strength=0.5)  # SD-Turbo's 1 step at strength 0.5
    with pytest.raises(RequestError, match="runs no step"):
        euler_schedule(ns, 2, strength=0.4, spacing="trailing")
    assert len(ddim_schedule(ns, 2, strength=0.5, spacing="trailing")) == 1


def counting(noise):
    calls = []
    return (lambda like: calls.append(1) or noise(like)), calls


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_noise_draws_match_diffusers_randn_calls(steps, monkeypatch):
    # count diffusers' own draws too: the engine pre-draws noise_draws() noises and the seeded order must match
    ref_calls = []
    for module in (scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd):
        real = module.randn_tensor
        monkeypatch.setattr(module, "randn_tensor", lambda *a, _real=real, **k: ref_calls.append(1) or _real(*a, **k))
    ns = noise_schedule(SD_CONFIG)
    model, x = fake_model("epsilon"), start_latent()
    cases = [("lcm", LCMScheduler(**SD_CONFIG), lcm_schedule(ns, steps), {}, 0.0),
             ("tcd", TCDScheduler(**SD_CONFIG), tcd_schedule(ns, steps, gamma=0.3), {"eta": 0.3}, 0.3),
             ("tcd", TCDScheduler(**SD_CONFIG), tcd_schedule(ns, steps, gamma=0.0), {"eta": 0.0}, 0.0),
             ("euler", EulerDiscreteScheduler(**EULER_CONFIG), euler_schedule(ns, steps), {}, 0.0),
             ("euler_a", EulerAncestralDiscreteScheduler(**EULER_CONFIG), euler_schedule(ns, steps), {}, 0.0),
             ("ddim", DDIMScheduler(**SD_CONFIG), ddim_schedule(ns, steps), {}, 0.0)]
    for name, ref_sched, sched, step_kw, gamma in cases:
        ref_calls.clear()
        run_diffusers(ref_sched, model, x, steps, seed=0, step_kw=step_kw)
        noise, calls = counting(noise_from(0))
        SAMPLERS[name](fewstep_denoiser(model, "epsilon"), x, sched, noise=noise)
        assert noise_draws(name, steps, gamma) == len(calls) == len(ref_calls), name
    assert noise_draws("euler_a", steps) == steps  # one on the last step too, where sigma_up is 0


def test_sample_prediction_is_accepted_and_new_config_keys_read():
    ns = noise_schedule(dict(SD_CONFIG, prediction_type="sample", clip_sample=True, clip_sample_range=2.0,
                             set_alpha_to_one=True))
    assert (ns.prediction_type, ns.clip_sample, ns.clip_sample_range, ns.set_alpha_to_one) == ("sample", True, 2.0,
                                                                                               True)
    ns = noise_schedule({})
    assert (ns.clip_sample, ns.clip_sample_range, ns.set_alpha_to_one) == (False, 1.0, False)
    with pytest.raises(RequestError, match="prediction_type"):
        noise_schedule({"prediction_type": "flow"})
    sched = ddim_schedule(ns, 4).to("cpu")
    assert sched.clip_range is None and sched.alphas_next.shape == (4,)
