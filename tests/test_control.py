"""ControlNet in fewstep's one loop equals diffusers' ControlNet pipelines (SD and SDXL, txt2img and img2img, one or
two ControlNets, guidance start/end, CFG or not) for the same tiny models and seed (within 2/255, fp32 CPU); loading
from a folder, a diffusers-layout file and an original-layout file; the errors; the canny preprocessor."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import fewstep
from fewstep.control import keeps, load_controlnet, preprocess, preprocessors
from fewstep.errors import LoadError, RequestError
from fewstep.request import ControlUnit
from tests.support.images import max_diff
from tests.support.original_layout import unet_to_ldm
from tests.test_parity import PROMPT, assert_same, gens, init_image

pytestmark = pytest.mark.usefixtures("one_thread")
# the tiny SD UNet attends at full latent resolution: its tests run at 32 px, 4x cheaper than 64
S, S_SIZE = dict(width=32, height=32), (32, 32)


def tiny_controlnet(unet, seed):
    """ControlNetModel.from_unet with its zero-initialised convolutions made random (seeded), so it does something."""
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block):
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def to_original(net):
    """A ControlNetModel's state dict in the original (lllyasviel/ControlNet) layout, written without diffusers."""
    sd = net.state_dict()
    out = {k.removeprefix("model.diffusion_model."): v
           for k, v in unet_to_ldm({k: v for k, v in sd.items() if not k.startswith("controlnet_")}).items()}
    blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    for w in ("weight", "bias"):
        out[f"input_hint_block.0.{w}"] = sd[f"controlnet_cond_embedding.conv_in.{w}"]
        for i in range(blocks):
            out[f"input_hint_block.{2 * (i + 1)}.{w}"] = sd[f"controlnet_cond_embedding.blocks.{i}.{w}"]
        out[f"input_hint_block.14.{w}"] = sd[f"controlnet_cond_embedding.conv_out.{w}"]
        for i in range(len(net.controlnet_down_blocks)):
            out[f"zero_convs.{i}.0.{w}"] = sd[f"controlnet_down_blocks.{i}.{w}"]
        out[f"middle_block_out.0.{w}"] = sd[f"controlnet_mid_block.{w}"]
    return {"control_model." + k: v.contiguous() for k, v in out.items()}


def shapes(size=(64, 64), seed=0):
    """A control image with edges: a few filled shapes on a flat background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (30, 40, 160))
    d = ImageDraw.Draw(img)
    w, h = size
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        box = (x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    return img


def _setup(models, tmp_path_factory, kind, base_cls):
    path = models(kind)
    extra = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    base = base_cls.from_pretrained(path, **extra)
    base.set_progress_bar_config(disable=True)
    engine = fewstep.load(path, device="cpu", dtype="fp32", lcm=False)
    root = tmp_path_factory.mktemp(f"controlnets-{kind}")
    nets = {"a": tiny_controlnet(base.unet, 1), "b": tiny_controlnet(base.unet, 2)}
    for name, net in nets.items():
        net.save_pretrained(root / name)
        assert engine.load_controlnet(root / name) == name  # the default name is the folder's
    return SimpleNamespace(engine=engine, base=base, nets=nets, root=root)


@pytest.fixture(scope="module")
def sd(models, tmp_path_factory):
    return _setup(models, tmp_path_factory, "sd", StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl(models, tmp_path_factory):
    return _setup(models, tmp_path_factory, "sdxl", StableDiffusionXLPipeline)


def pipe(cls, m, nets, scheduler):
    p = cls.from_pipe(m.base, controlnet=nets if len(nets) > 1 else nets[0])
    p.scheduler = scheduler.from_config(m.engine.c.scheduler_config) if isinstance(scheduler, type) else scheduler
    p.set_progress_bar_config(disable=True)
    return p


# ---- parity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,negative", [(1.0, None), (1.5, "blurry")])
def test_sd_lcm(sd, guidance, negative):
    image = shapes(S_SIZE)
    ours = sd.engine.generate(PROMPT, **S, sampler="lcm", steps=4, guidance=guidance, negative_prompt=negative,
                              seed=11, control=[ControlUnit("a", image, scale=0.9, preprocess="canny")])
    ref = pipe(StableDiffusionControlNetPipeline, sd, [sd.nets["a"]], LCMScheduler)(
        PROMPT, image=preprocess("canny", image), controlnet_conditioning_scale=0.9, num_inference_steps=4,
        guidance_scale=guidance, negative_prompt=negative, generator=gens(11), **S).images
    assert_same(ours.images, ref)
    assert ours.params["control"] == [dict(model="a", preprocess="canny", scale=0.9, start=0.0, end=1.0)]
    # the ControlNet does change the image (the comparison is not vacuous), and scale 0 adds exact zeros
    same = dict(S, sampler="lcm", steps=4, guidance=guidance, negative_prompt=negative, seed=11)
    plain = sd.engine.generate(PROMPT, **same)
    assert max_diff(plain.images[0], ours.images[0]) > 8
    zero = sd.engine.generate(PROMPT, **same, control=[ControlUnit("a", image, scale=0.0)])
    assert max_diff(plain.images[0], zero.images[0]) == 0


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (1.5, "blurry")])
def test_sdxl_lcm(sdxl, guidance, negative):
    image = shapes(seed=1)
    ours = sdxl.engine.generate(PROMPT, sampler="lcm", steps=4, guidance=guidance, negative_prompt=negative, seed=5,
                                num_images=2, control=[ControlUnit("a", image, scale=0.7, start=0.25)])
    ref = pipe(StableDiffusionXLControlNetPipeline, sdxl, [sdxl.nets["a"]], LCMScheduler)(
        PROMPT, image=image, controlnet_conditioning_scale=0.7, control_guidance_start=0.25, num_inference_steps=4,
        guidance_scale=guidance, negative_prompt=negative, generator=gens(5, 2), num_images_per_prompt=2, height=64,
        width=64).images
    assert_same(ours.images, ref)


def test_sd_hyper_sd_ddim_trailing(sd):
    image = shapes(S_SIZE, seed=2)
    ours = sd.engine.generate(PROMPT, **S, recipe="hyper-sd", seed=3, control=[ControlUnit("b", image, end=0.5)])
    ref = pipe(StableDiffusionControlNetPipeline, sd, [sd.nets["b"]],
               DDIMScheduler.from_config(sd.engine.c.scheduler_config, timestep_spacing="trailing"))(
        PROMPT, image=image, control_guidance_end=0.5, num_inference_steps=4, guidance_scale=0.0, generator=gens(3),
        **S).images
    assert_same(ours.images, ref)


def test_sdxl_lightning_two_controlnets(sdxl):
    a, b = shapes((80, 48), seed=3), shapes(seed=4)  # the first is resized (Lanczos) to the output size
    units = [ControlUnit("a", a, scale=0.8, start=0.0, end=0.5), ControlUnit("b", b, scale=0.5, start=0.25)]
    ours = sdxl.engine.generate(PROMPT, recipe="lightning", seed=7, control=units)
    ref = pipe(StableDiffusionXLControlNetPipeline, sdxl, [sdxl.nets["a"], sdxl.nets["b"]],
               EulerDiscreteScheduler.from_config(sdxl.engine.c.scheduler_config, timestep_spacing="trailing"))(
        PROMPT, image=[a, b], controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
        control_guidance_end=[0.5, 1.0], num_inference_steps=4, guidance_scale=0.0, generator=gens(7), height=64,
        width=64).images
    assert_same(ours.images, ref)
    plain = sdxl.engine.generate(PROMPT, recipe="lightning", seed=7)
    assert max_diff(plain.images[0], ours.images[0]) > 8  # the ControlNets did something


def test_sd_two_controlnets_with_cfg(sd):
    a, b = shapes(S_SIZE, seed=5), shapes(S_SIZE, seed=6)
    units = [ControlUnit("a", a, scale=1.2, end=0.75), ControlUnit("b", b, scale=0.4, start=0.5)]
    ours = sd.engine.generate(PROMPT, **S, sampler="lcm", steps=4, guidance=1.5, negative_prompt="blurry", seed=2,
                              control=units)
    ref = pipe(StableDiffusionControlNetPipeline, sd, [sd.nets["a"], sd.nets["b"]], LCMScheduler)(
        PROMPT, image=[a, b], controlnet_conditioning_scale=[1.2, 0.4], control_guidance_start=[0.0, 0.5],
        control_guidance_end=[0.75, 1.0], num_inference_steps=4, guidance_scale=1.5, negative_prompt="blurry",
        generator=gens(2), **S).images
    assert_same(ours.images, ref)


def test_sd_img2img_keeps_count_the_steps_run(sd):
    image = shapes(S_SIZE, seed=7)
    ours = sd.engine.generate(PROMPT, **S, init_image=init_image(1, 32), strength=0.6, sampler="euler", steps=10,
                              guidance=1.5, negative_prompt="blurry", seed=9,
                              control=[ControlUnit("a", image, scale=1.1, start=0.2, end=0.7)])
    assert ours.steps_run == 6
    ref = pipe(StableDiffusionControlNetImg2ImgPipeline, sd, [sd.nets["a"]], EulerDiscreteScheduler)(
        PROMPT, image=init_image(1, 32), control_image=image, strength=0.6, num_inference_steps=10, guidance_scale=1.5,
        negative_prompt="blurry", controlnet_conditioning_scale=1.1, control_guidance_start=0.2,
        control_guidance_end=0.7, generator=gens(9), **S).images
    assert_same(ours.images, ref)


def test_pooled_conditions_run_in_guess_mode(sd):
    net = tiny_controlnet(sd.base.unet, 3)
    net.register_to_config(global_pool_conditions=True)  # a shuffle-type ControlNet: diffusers' guess mode
    net.save_pretrained(sd.root / "pool")
    sd.engine.load_controlnet(sd.root / "pool")
    try:
        image = shapes(S_SIZE, seed=8)
        ours = sd.engine.generate(PROMPT, **S, sampler="lcm", steps=2, guidance=1.5, seed=4,
                                  control=[ControlUnit("pool", image)])
        ref = pipe(StableDiffusionControlNetPipeline, sd, [net], LCMScheduler)(
            PROMPT, image=image, num_inference_steps=2, guidance_scale=1.5, generator=gens(4), **S).images
        assert_same(ours.images, ref)
    finally:
        sd.engine.unload_controlnet("pool")


def test_keeps_match_diffusers_rounding():
    assert keeps(4, 0.0, 1.0) == [1.0] * 4
    assert keeps(4, 0.25, 0.75) == [0.0, 1.0, 1.0, 0.0]
    assert keeps(6, 0.2, 0.7) == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # 1/6 < 0.2: off; 5/6 > 0.7: off


# ---- loading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_folder_diffusers_file_and_original_file_give_the_same_weights(kind, sd, sdxl, tmp_path):
    m = sd if kind == "sd" else sdxl
    net = m.nets["a"]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "flat.safetensors"))
    save_file(to_original(net), str(tmp_path / "control_original.safetensors"))
    want = m.engine.controlnets["a"].state_dict()
    for src in ("flat.safetensors", "control_original.safetensors"):
        name, got = load_controlnet(m.engine, tmp_path / src)
        assert name == src.removesuffix(".safetensors")
        assert got.state_dict().keys() == want.keys()
        assert all(torch.equal(got.state_dict()[k], want[k]) for k in want), src
        assert got.dtype == torch.float32 and not got.training
        assert not any(p.requires_grad for p in got.parameters())
    assert set(m.engine.controlnets) == {"a", "b"}  # load_controlnet itself changes nothing


def test_pickles_need_the_opt_in(sd, tmp_path):
    torch.save(sd.nets["b"].state_dict(), tmp_path / "cn.bin")
    with pytest.raises(LoadError, match="pickle"):
        load_controlnet(sd.engine, tmp_path / "cn.bin")
    _, net = load_controlnet(sd.engine, tmp_path / "cn.bin", allow_pickle=True)
    assert torch.equal(net.controlnet_mid_block.weight, sd.engine.controlnets["b"].controlnet_mid_block.weight)


def test_a_controlnet_for_another_architecture_is_refused(sd, sdxl, tmp_path):
    save_file({k: v.contiguous() for k, v in sd.nets["a"].state_dict().items()}, str(tmp_path / "sd.safetensors"))
    save_file(to_original(sd.nets["a"]), str(tmp_path / "sd_original.safetensors"))
    for src in (sd.root / "a", tmp_path / "sd.safetensors", tmp_path / "sd_original.safetensors"):
        with pytest.raises(LoadError, match="does not fit this SDXL model.*another architecture") as e:
            sdxl.engine.load_controlnet(src, name="wrong")
        assert "\n" not in str(e.value)
    with pytest.raises(LoadError, match="does not fit"):
        sd.engine.load_controlnet(sdxl.root / "b", name="wrong")
    assert set(sdxl.engine.controlnets) == {"a", "b"} and set(sd.engine.controlnets) == {"a", "b"}


def test_a_taken_name_is_refused(sd):
    with pytest.raises(LoadError, match="already loaded"):
        sd.engine.load_controlnet(sd.root / "b", name="a")
    assert sd.engine.controlnets["a"] is not None and set(sd.engine.controlnets) == {"a", "b"}


# ---- request errors --------------------------------------------------------------------------------------------
def test_bad_units_fail_before_any_unet_call(sd, tmp_path, monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("the UNet ran")

    monkeypatch.setattr(sd.engine.fast, "unet_fn", boom)
    for net in sd.engine.controlnets.values():
        monkeypatch.setattr(net, "forward", boom)
    (tmp_path / "not-an-image.png").write_text("hello")
    bad = [ControlUnit("nope", shapes()), ControlUnit("a", tmp_path / "missing.png"),
           ControlUnit("a", str(tmp_path / "not-an-image.png")), ControlUnit("a", shapes(), preprocess="depth")]
    for unit in bad:
        with pytest.raises(RequestError) as e:
            sd.engine.generate(PROMPT, sampler="lcm", steps=2, guidance=1.0, seed=0, control=[unit])
        assert e.value.field == "control"
    for kw in (dict(scale=-0.5), dict(start=0.5, end=0.5), dict(start=0.8, end=0.2)):
        with pytest.raises(RequestError) as e:
            ControlUnit("a", shapes(), **kw)
        assert e.value.field == "control"


# ---- preprocessors ---------------------------------------------------------------------------------------------
def test_canny_is_cv2_canny(tmp_path):
    image = shapes((96, 64), seed=9)
    assert "canny" in preprocessors()
    edges = cv2.Canny(np.asarray(image), 100, 200)
    assert edges.max() == 255  # the image has edges
    out = preprocess("canny", image)
    assert out.mode == "RGB" and out.size == image.size
    assert np.array_equal(np.asarray(out), np.repeat(edges[:, :, None], 3, axis=2))
    image.save(tmp_path / "c.png")
    assert np.array_equal(np.asarray(preprocess("canny", tmp_path / "c.png")), np.asarray(out))
    with pytest.raises(RequestError, match="unknown preprocessor"):
        preprocess("depth", image)


def test_one_control_image_per_image_equals_each_alone(sd):
    """A server batches requests whose control images differ: a unit's image may be a tuple, one per image."""
    a, b = shapes(S_SIZE, seed=3), shapes(S_SIZE, seed=4)
    kw = dict(S, sampler="lcm", steps=2, guidance=1.0)
    both = sd.engine.generate(prompt=(PROMPT, PROMPT), seeds=(1, 2), control=[ControlUnit("a", (a, b))], **kw)
    alone = [sd.engine.generate(PROMPT, seed=s, control=[ControlUnit("a", im)], **kw).images[0]
             for s, im in ((1, a), (2, b))]
    for ours, ref in zip(both.images, alone):
        assert max_diff(ours, ref) <= 1  # batch size 2 against 1: other GEMM blocking, the last bit may move
    assert max_diff(both.images[0], both.images[1]) > 8
    with pytest.raises(RequestError, match="3 control images for 2 images"):
        sd.engine.generate(prompt=(PROMPT, PROMPT), seeds=(1, 2), control=[ControlUnit("a", (a, b, a))], **kw)


def test_a_controlnet_that_shrinks_control_images_by_another_factor_is_refused(tmp_path):
    """The shapes model's latents are 1/4 of the image: diffusers' default 8x conditioning embedding cannot fit it
    (the first generation would fail with a shape error), so loading refuses it in one line."""
    from diffusers import ControlNetModel

    from tests.support.serve import default_engine

    engine = default_engine()
    ControlNetModel.from_unet(engine.c.unet).save_pretrained(tmp_path / "eightfold")
    before = dict(engine.controlnets)
    with pytest.raises(LoadError, match="shrinks control images 8x"):
        engine.load_controlnet(tmp_path / "eightfold")
    assert engine.controlnets == before
