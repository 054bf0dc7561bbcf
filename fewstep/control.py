"""ControlNets in the one denoise loop: loading (diffusers folder, hub id, single file in diffusers or original
layout) checked against the engine's UNet, control images prepared as diffusers' ControlNet pipelines prepare them,
built-in preprocessors, and the `control(inp, t, states, added) -> (down residuals, mid residual)` callable that
fewstep.denoiser adds to the UNet's blocks (summed over units, as diffusers' MultiControlNetModel sums them)."""

import os
import re
from pathlib import Path

import numpy as np
import torch

from . import arch, sources
from .errors import LoadError, RequestError
from .loading import check_fit, own_tensors
from .request import classifier_free
from .speed import OnDevice

CANNY_LOW, CANNY_HIGH = 100, 200  # the ControlNet examples' and A1111's canny thresholds


# ---- preprocessors ---------------------------------------------------------------------------------------------
def canny(image, low=CANNY_LOW, high=CANNY_HIGH):
    """Canny edges of the RGB image, white on black, as 3 channels (cv2.Canny, as the ControlNet examples run it)."""
    import cv2
    from PIL import Image

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


PREPROCESSORS = {"canny": canny}


def preprocessors():
    """The names of the built-in preprocessors (ControlUnit.preprocess)."""
    return tuple(PREPROCESSORS)


def preprocess(kind, image):
    """A built-in preprocessor run on a PIL image or an image path; returns a PIL image."""
    if kind not in PREPROCESSORS:
        raise RequestError(f"control: unknown preprocessor {kind!r} (use {', '.join(PREPROCESSORS)})",
                           field="control")
    return PREPROCESSORS[kind](read_image(image))


# ---- control images --------------------------------------------------------------------------------------------
def read_image(image, what="control image"):
    """A PIL image as given, or a file read as diffusers.utils.load_image reads it (EXIF orientation, RGB)."""
    from PIL import Image, ImageOps

    from .images import open_image

    if isinstance(image, Image.Image):
        return image
    return open_image(image, what, field="control", then=lambda im: ImageOps.exif_transpose(im).convert("RGB"))


def control_image(image, width, height):
    """(1, 3, height, width) float32 in [0, 1]: diffusers' control_image_processor (VaeImageProcessor with
    do_convert_rgb, no normalize): a Lanczos resize in the image's own mode first, then RGB, then / 255."""
    from PIL import Image

    image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None).convert("RGB")
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def keeps(n, start, end):
    """Per step of the n steps run, 1.0 where the unit applies, else 0.0 (diffusers' controlnet_keep)."""
    return [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]


# ---- requests --------------------------------------------------------------------------------------------------
def check(engine, req):
    """A request's ControlUnits against this engine, before any work: loaded ControlNets, known preprocessors,
    image files that exist (Engine.resolve calls this; reading the images waits for prepare)."""
    from PIL import Image

    for u in req.control:
        if u.model not in engine.controlnets:
            raise RequestError(f"control: no ControlNet named {u.model!r} is loaded (loaded: "
                               f"{', '.join(engine.controlnets) or 'none'}); load it first with load_controlnet",
                               field="control")
        if u.preprocess is not None and u.preprocess not in PREPROCESSORS:
            raise RequestError(f"control {u.model}: unknown preprocessor {u.preprocess!r} (use "
                               f"{', '.join(PREPROCESSORS)}, or none for a prepared control image)", field="control")
        for image in (u.image if isinstance(u.image, tuple) else (u.image,)):
            if isinstance(image, Image.Image):
                continue
            if not isinstance(image, (str, os.PathLike)):
                raise RequestError(f"control {u.model}: the control image must be a PIL image or a path, got "
                                   f"{type(image).__name__}", field="control")
            if not sources.local_path(image).is_file():
                raise RequestError(f"cannot read control image {image}: no such file", field="control")


def prepare(engine, req, sched, batch):
    """The control(inp, t, states, added) callable of a resolved request, for `batch` images run over `sched`.

    A unit's image is one control image for every image of the call, or a tuple of `batch` images in prompt order
    (requests with different control images batched together by a server)."""
    check(engine, req)
    units = req.control
    nets = [engine.controlnets[u.model] for u in units]
    cfg = classifier_free(req.guidance, engine.full_lcm)
    # diffusers turns guess mode on when its (first) ControlNet pools its conditions (a shuffle ControlNet), and then
    # runs every ControlNet on the conditional half only
    guess = bool(nets[0].config.get("global_pool_conditions", False))
    images = []
    for u, net in zip(units, nets):
        per_image = isinstance(u.image, tuple)
        if per_image and len(u.image) != batch:
            raise RequestError(f"control {u.model}: {len(u.image)} control images for {batch} images",
                               field="control")
        prepared = []
        for image in (u.image if per_image else (u.image,)):
            image = read_image(image)
            if u.preprocess is not None:
                image = PREPROCESSORS[u.preprocess](image)
            prepared.append(control_image(image, req.width, req.height))
        x = torch.cat(prepared) if per_image else prepared[0].repeat_interleave(batch, dim=0)
        x = x.to(engine.device, net.dtype)
        images.append(torch.cat([x, x]) if cfg and not guess else x)
    # scale x keep per unit and step, on the device: the step is found from t with device ops only (no host sync in
    # the loop); the timesteps of a schedule are distinct (argmax takes the first match if one ever repeats).
    # A unit outside its start/end runs with scale 0, as diffusers runs it (and adds its zero residuals).
    timesteps = sched.timesteps.to(engine.device)
    scales = torch.tensor([[u.scale * k for k in keeps(len(sched), u.start, u.end)] for u in units],
                          dtype=torch.float32, device=engine.device)

    def control(inp, t, states, added):
        # a stream batch (fewstep.stream) passes one timestep per frame; its units run at one scale on every step,
        # so the first frame's step serves all of them
        step = (timesteps == t.reshape(-1)[0]).int().argmax().view(1)
        scale = scales.index_select(1, step)[:, 0]
        if cfg and guess:
            inp, states = inp.chunk(2)[1], states.chunk(2)[1]
            added = None if added is None else {k: v.chunk(2)[1] for k, v in added.items()}
        down = mid = None
        for j, (net, image) in enumerate(zip(nets, images)):
            # under offload each ControlNet visits the GPU for its call (the UNet stays there for the loop)
            with OnDevice(engine, net):
                d, m = net(inp, t, encoder_hidden_states=states, controlnet_cond=image, conditioning_scale=scale[j],
                           guess_mode=guess, added_cond_kwargs=added, return_dict=False)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if cfg and guess:  # the unconditional half gets no residuals
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    return control


# ---- loading ---------------------------------------------------------------------------------------------------
# What must agree for the residuals to fit the UNet's skips and the ControlNet to read the UNet's conditions.
FIT_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
            "projection_class_embeddings_input_dim")


def load_controlnet(engine, src, *, name=None, allow_pickle=False):
    """(name, ControlNetModel) for this engine's UNet from a diffusers folder, a hub id or one file (diffusers or
    original layout; pickles only with allow_pickle), placed like the UNet. Changes nothing on the engine."""
    from diffusers import ControlNetModel

    local = sources.local_path(src)
    name = name if name is not None else (local.stem if local.is_file() else Path(str(src).rstrip("/")).name)
    if not isinstance(name, str) or not name:
        raise LoadError(f"ControlNet {src}: give it a name")
    if name in engine.controlnets:
        raise LoadError(f"a ControlNet named {name!r} is already loaded: unload it first or pass another name")
    base = engine.c.unet
    title = arch.PRESETS[engine.arch].title
    patterns = ["config.json", "*.safetensors"] + (["*.bin"] if allow_pickle else [])
    path = sources.resolve(src, what="ControlNet", patterns=patterns,
                           expect="a ControlNet .safetensors file, a diffusers ControlNet folder or a hub id")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) + (sorted(path.glob("*.bin")) if allow_pickle else [])
        if not (path / "config.json").is_file():
            if len(files) != 1:
                raise LoadError(f"ControlNet {src}: a folder needs config.json and its weights, or exactly one "
                                "weights file")
            path = files[0]
    if path.is_dir():
        try:
            config = ControlNetModel.load_config(str(path))
        except (OSError, ValueError) as e:
            raise LoadError(f"cannot read ControlNet {src}/config.json: {str(e).splitlines()[0]}") from None
        if config.get("_class_name") not in (None, "ControlNetModel"):
            raise LoadError(f"ControlNet {src} holds a {config['_class_name']}, not a ControlNetModel")
        _check_fits(config, base.config, src, title, engine.vae_factor)  # before the weights are read
        net = _from_folder(path, src, allow_pickle)
    else:
        net = _from_file(path, base, title, allow_pickle, engine.vae_factor)
    net.to(device=torch.device("cpu") if engine.speed.offload else engine.device, dtype=engine.dtype)
    net.eval().requires_grad_(False)
    own_tensors(net)  # before channels_last: owned copies are made contiguous (NCHW)
    if engine.speed.channels_last:
        net.to(memory_format=torch.channels_last)
    return name, net


def _from_folder(path, src, allow_pickle):
    from diffusers import ControlNetModel

    names = os.listdir(path)
    full = any(n.endswith(".safetensors") and ".fp16." not in n for n in names)
    variant = "fp16" if not full and any(n.endswith(".fp16.safetensors") for n in names) else None
    try:
        return ControlNetModel.from_pretrained(str(path), variant=variant, torch_dtype=torch.float32,
                                               use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as e:
        if any(n.endswith(sources.PICKLE_SUFFIXES) for n in names) and not allow_pickle:
            raise LoadError(f"ControlNet {src} has only pickle weights (.bin), which can run code when loaded; pass "
                            "--allow-pickle (allow_pickle=True) if you trust them") from None
        raise LoadError(f"cannot load ControlNet {src}: {str(e).splitlines()[0]}") from None


def _from_file(path, base, title, allow_pickle, vae_factor):
    """A ControlNetModel from one file, its config inferred from the base UNet's and the tensors' shapes."""
    from diffusers import ControlNetModel

    from .singlefile import read_state_dict

    state = read_state_dict(path, allow_pickle=allow_pickle)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("control_model.") for k in state) or "input_hint_block.0.weight" in state:
        state = _from_original(state, base.config, path.name)
    elif "controlnet_cond_embedding.conv_in.weight" not in state:
        raise LoadError(f"{path.name} is not a ControlNet (found keys like {', '.join(list(state)[:3])})")
    config = _config_from_state(state, base, path.name)
    _check_fits(config, base.config, path.name, title, vae_factor)
    with torch.device("meta"):
        net = ControlNetModel.from_config(config)
    check_fit(net.state_dict(), state, f"ControlNet {path.name} does not fit this {title} model")
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):
        raise LoadError(f"ControlNet {path.name}: some of its tensors were not in the file")
    return net


def _from_original(state, base_config, name):
    """Original (lllyasviel/ControlNet, A1111) keys -> diffusers', by diffusers' converter."""
    from diffusers.loaders.single_file_utils import (
        DIFFUSERS_TO_LDM_MAPPING,
        LDM_CONTROLNET_KEY,
        convert_controlnet_checkpoint,
    )

    bare = {k.removeprefix(LDM_CONTROLNET_KEY): v for k, v in state.items() if k.startswith(LDM_CONTROLNET_KEY)}
    bare = bare or state
    try:
        out = convert_controlnet_checkpoint(bare, {"layers_per_block": base_config["layers_per_block"]})
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        raise LoadError(f"ControlNet {name}: its original-layout tensors do not convert ({type(e).__name__}: {e})"
                        ) from None
    # converter gap: it leaves out SDXL's added-condition embedding (label_emb), which its own key table names
    for new, old in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if old in bare:
            out[new] = bare[old]
    return {k: v for k, v in out.items() if v is not None}  # the converter fills absent tensors with None


def _count(state, pattern):
    return len({m[1] for k in state if (m := re.match(pattern, k))})


def _config_from_state(state, base, name):
    """The base UNet's config as ControlNetModel.from_unet maps it, with what the tensors show on top: channels,
    the conditioning embedding, block widths and transformer depths (a smaller ControlNet-XL has fewer)."""
    from diffusers import ControlNetModel

    try:
        blocks = _count(state, r"controlnet_cond_embedding\.blocks\.(\d+)\.weight")
        embed = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
        embed += [state[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0] for i in range(blocks // 2)]
        levels = _count(state, r"down_blocks\.(\d+)\.")
        widths = [state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
        facts = dict(in_channels=state["conv_in.weight"].shape[1], block_out_channels=widths,
                     conditioning_channels=state["controlnet_cond_embedding.conv_in.weight"].shape[1],
                     conditioning_embedding_out_channels=embed,
                     layers_per_block=_count(state, r"down_blocks\.0\.resnets\.(\d+)\."))
    except KeyError as e:
        raise LoadError(f"ControlNet {name} lacks {e.args[0]}: is it a complete ControlNet file?") from None
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    facts["cross_attention_dim"] = None if to_k is None else to_k.shape[1]
    added = state.get("add_embedding.linear_1.weight")
    facts["addition_embed_type"] = None if added is None else "text_time"
    facts["projection_class_embeddings_input_dim"] = None if added is None else added.shape[1]
    with torch.device("meta"):
        config = dict(ControlNetModel.from_unet(base, load_weights_from_unet=False).config)
    depth = config.get("transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    for i in range(min(levels, len(depth))):
        found = _count(state, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
        depth[i] = found or depth[i]
    config.update(facts, transformer_layers_per_block=depth)
    if facts["addition_embed_type"] is None:
        config.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_fits(config, unet_config, source, title, vae_factor):
    """A LoadError unless the ControlNet's residuals fit this UNet's skips, it reads the UNet's conditions and its
    conditioning embedding shrinks a control image by the VAE's factor (to the latent's size)."""
    blocks = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)  # diffusers' default
    if 2 ** (len(blocks) - 1) != vae_factor:
        raise LoadError(f"ControlNet {source} does not fit this {title} model: its conditioning embedding shrinks "
                        f"control images {2 ** (len(blocks) - 1)}x, the model's latents are 1/{vae_factor} of the "
                        "image; is it a ControlNet for another architecture?")
    ours = dict(unet_config)
    ours["in_channels"] = ours["out_channels"]  # a ControlNet sees the latent before an inpainting UNet's extras
    for k in FIT_KEYS:
        if k == "projection_class_embeddings_input_dim" and ours.get("addition_embed_type") is None:
            continue
        a, b = config.get(k), ours.get(k)
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise LoadError(f"ControlNet {source} does not fit this {title} model: its {k} is {a}, the model's is "
                            f"{b}; is it a ControlNet for another architecture?")
