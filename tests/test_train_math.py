"""The distillation arithmetic against first principles and diffusers' schedulers: DDIM solver, boundary
scalings, LCM-form guidance, Huber loss, and the student parameterisation the sampler evaluates."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from fewstep.arch import SD15_UNET, SDXL_UNET
from fewstep.denoiser import guidance_embedding, to_x0_eps
from fewstep.schedules import noise_schedule
from fewstep.train import consistency as cm

NS = noise_schedule({})  # SD's scaled-linear schedule


def test_ddim_grid_is_lcm_skip_20():
    s = cm.DDIMSolver.from_schedule(NS.alphas_cumprod, 50)
    assert s.skip == 20
    assert s.timesteps[:3].tolist() == [19, 39, 59] and s.timesteps[-1] == 999 and len(s.timesteps) == 50
    ac = NS.alphas_cumprod
    assert torch.equal(s.alphas, ac[s.timesteps])
    assert s.alphas_prev[0] == ac[0] and torch.equal(s.alphas_prev[1:], ac[s.timesteps[:-1]])
    start, end = s.endpoints(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and end.tolist() == [0, 19, 979]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_diffusers_ddim_scheduler(prediction_type):
    # DDIM with eta 0 on the trailing 50-step grid [999, 979, ..., 19] is the same solver; its step below 19 lands
    # on alpha_bar[0] when set_alpha_to_one is off, as the solver's first alphas_prev.
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, timestep_spacing="trailing", prediction_type=prediction_type)
    ref.set_timesteps(50)
    solver = cm.DDIMSolver.from_schedule(NS.alphas_cumprod, 50)
    gen = torch.Generator().manual_seed(0)
    for t in (999, 519, 19):
        index = torch.tensor([int((solver.timesteps == t).nonzero())])
        x, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        expected = ref.step(out, t, x, eta=0.0).prev_sample
        x0, eps = to_x0_eps(out, x, NS.alphas_cumprod[t], prediction_type)
        assert torch.allclose(solver.step(x0, eps, index), expected, atol=1e-5), t


def test_boundary_scalings_equal_lcm_scheduler_and_vanish_at_zero():
    ref = LCMScheduler()
    for t in (0, 19, 259, 999):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
        x = torch.randn(1, 4, 2, 2)
        x0 = torch.randn(1, 4, 2, 2)
        eps = (x - NS.alphas_cumprod[t].sqrt() * x0) / (1 - NS.alphas_cumprod[t]).sqrt()
        f = cm.consistency_output(x, eps, torch.tensor([t]), NS.alphas_cumprod[t].reshape(1), "epsilon", 10.0)
        assert torch.allclose(f, c_skip * x + c_out * x0, atol=1e-5)
    # the boundary condition f(x, 0) ~ x: the consistency function is the identity at the data end
    x = torch.randn(1, 4, 2, 2)
    f0 = cm.consistency_output(x, torch.randn_like(x), torch.tensor([0]), NS.alphas_cumprod[:1], "epsilon", 10.0)
    assert torch.allclose(f0, x)


def test_lcm_form_guidance_is_imagen_scale_w_plus_one():
    c, u, w = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0.0, 2.0, 7.5])
    assert torch.allclose(cm.lcm_cfg(c, u, w), u + (w[:, None] + 1) * (c - u))
    assert torch.equal(cm.lcm_cfg(c, u, torch.zeros(3)), c)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_step_guides_x0_and_eps_then_steps(prediction_type):
    solver = cm.DDIMSolver.from_schedule(NS.alphas_cumprod, 50)
    index = torch.tensor([30, 3])
    t = solver.timesteps[index]
    a = NS.alphas_cumprod[t]
    gen = torch.Generator().manual_seed(1)
    x, oc, ou = (torch.randn(2, 4, 4, 4, generator=gen) for _ in range(3))
    w = torch.tensor([5.0, 12.0])
    got = cm.teacher_step(solver, index, x, oc, ou, w, a, prediction_type)
    # first principles: the guided output (linear in x0 and eps) then a DDIM step to the grid point below
    guided = ou + (w + 1).view(-1, 1, 1, 1) * (oc - ou)
    x0, eps = to_x0_eps(guided, x, a.view(-1, 1, 1, 1), prediction_type)
    a_prev = NS.alphas_cumprod[t - 20].view(-1, 1, 1, 1)
    assert torch.allclose(got, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, atol=1e-5)


def test_huber_matches_its_formula_and_limits():
    p, y = torch.tensor([0.0, 3.0, -2.0]), torch.tensor([0.0, 0.0, 0.0])
    c = 0.001
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.0, 3.0, 2.0)) / 3
    assert cm.huber(p, y, c).item() == pytest.approx(expected, rel=1e-6)
    small = torch.tensor([1e-4])
    assert cm.huber(small, torch.zeros(1), c).item() == pytest.approx(1e-8 / (2 * c), rel=1e-2)  # quadratic
    big = torch.tensor([10.0], requires_grad=True)
    cm.huber(big, torch.zeros(1), c).backward()
    assert big.grad.item() == pytest.approx(1.0, rel=1e-6)  # linear: bounded gradient
    assert cm.distance(p, y, "l2").item() == pytest.approx((9 + 4) / 3)


def test_add_noise_is_the_forward_process():
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a = NS.alphas_cumprod[torch.tensor([10, 900])]
    xt = cm.add_noise(x0, eps, a)
    back, eps2 = to_x0_eps(eps, xt, a.view(-1, 1, 1, 1), "epsilon")
    assert torch.allclose(back, x0, atol=1e-4) and torch.equal(eps2, eps)


def test_guidance_embedding_equals_diffusers_lcm_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([4.0, 13.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_embedding(w, 256), ref, atol=1e-5)


def test_finetune_targets_equal_diffusers_ddpm():
    from diffusers import DDPMScheduler

    from fewstep.train.finetune import prediction_target

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([3, 800])
    a = NS.alphas_cumprod[t]
    assert torch.allclose(prediction_target("v_prediction", x0, noise, a), ref.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.equal(prediction_target("epsilon", x0, noise, a), noise)
    assert torch.allclose(cm.add_noise(x0, noise, a), ref.add_noise(x0, noise, t), atol=1e-6)


def test_lr_schedule():
    from fewstep.train.config import TrainConfig
    from fewstep.train.loop import lr_at

    cfg = TrainConfig("lora", "m", "d", "o", lr=1.0, lr_warmup=4, max_steps=14, lr_schedule="cosine")
    lrs = [lr_at(cfg, s) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.5) and lrs[-1] > 0
    assert all(b <= a for a, b in zip(lrs[4:], lrs[5:]))


SD15, SDXL = SD15_UNET, SDXL_UNET  # the published configs, as fewstep.arch holds them


@pytest.mark.parametrize("config,modules,params", [(SD15, 278, 67_252_224), (SDXL, 788, 196_751_360)])
def test_recipe_targets_make_the_published_lcm_loras(config, modules, params):
    """Rank 64 on the recipe's targets gives the published LCM-LoRAs' module and parameter counts (real-size
    architectures on the meta device: structure only)."""
    from diffusers import UNet2DConditionModel

    from fewstep.train.config import TARGETS
    from fewstep.train.models import add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        assert add_lora(unet, rank=64, alpha=64, targets=TARGETS["lcm"]) == modules
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == params
