"""The A1111 API beyond txt2img/img2img: the listings clients read at start-up (webuiapi, ComfyUI nodes, Krita
plugins), answered in A1111's shapes (modules/api/api.py and models.py) with empty lists where fewstep has no such
thing, and A1111's sampler names mapped onto fewstep's samplers."""

import logging

from fastapi import APIRouter, Request

from ..recipes import SAMPLERS, sampler_for_label

log = logging.getLogger("fewstep")

# A1111 1.10's samplers (modules/sd_samplers_kdiffusion.py, _timesteps.py, _lcm.py): name -> (aliases, family).
# "ancestral": fresh noise every step (the a / SDE / Restart samplers); "ode": deterministic; "ddim": DDIM's family.
A1111_SAMPLERS = {
    "DPM++ 2M": (("k_dpmpp_2m",), "ode"),
    "DPM++ SDE": (("k_dpmpp_sde",), "ancestral"),
    "DPM++ 2M SDE": (("k_dpmpp_2m_sde",), "ancestral"),
    "DPM++ 2M SDE Heun": (("k_dpmpp_2m_sde_heun",), "ancestral"),
    "DPM++ 2S a": (("k_dpmpp_2s_a",), "ancestral"),
    "DPM++ 3M SDE": (("k_dpmpp_3m_sde",), "ancestral"),
    "Euler a": (("k_euler_a", "k_euler_ancestral"), "ancestral"),
    "Euler": (("k_euler",), "ode"),
    "LMS": (("k_lms",), "ode"),
    "Heun": (("k_heun",), "ode"),
    "DPM2": (("k_dpm_2",), "ode"),
    "DPM2 a": (("k_dpm_2_a",), "ancestral"),
    "DPM fast": (("k_dpm_fast",), "ode"),
    "DPM adaptive": (("k_dpm_ad",), "ode"),
    "Restart": (("restart",), "ancestral"),
    "DDIM": (("ddim",), "ddim"),
    "DDIM CFG++": (("ddim_cfgpp",), "ddim"),
    "PLMS": (("plms",), "ddim"),
    "UniPC": (("unipc",), "ode"),
    "LCM": (("k_lcm",), "lcm"),
}
ALIASES = {a.lower(): name for name, (aliases, _) in A1111_SAMPLERS.items() for a in (name, *aliases)}
# the closest fewstep sampler of each family, on a model without a few-step adapter
CLOSEST = {"ancestral": "euler_a", "ode": "euler", "ddim": "ddim", "lcm": "lcm"}
# A1111 1.10's schedulers (modules/sd_schedulers.py); older clients append one to the sampler ("DPM++ 2M Karras")
A1111_SCHEDULERS = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "SGMUniform",
                    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
_said = set()  # the sampler names already explained in the log


def a1111_sampler(name, engine, scheduler=None):
    """(fewstep sampler, notes) for an A1111 sampler name and scheduler; (None, ()) for a name A1111 does not know
    either (the caller answers 422).

    A name fewstep runs (LCM, TCD, Euler, Euler a, DDIM and their aliases) runs as named: an A1111 client that sends
    webuiapi's default "Euler a" on an LCM-LoRA model gets an image as right as LCM's at those settings (docs/serve.md
    has the figures). Any other A1111 sampler runs as the model's own sampler when the model has a few-step adapter
    or UNet (the recipe's: LCM on an LCM-LoRA model, Euler on SDXL-Lightning...), since A1111's multistep solvers are
    made for 20-50 steps of a standard model; on a standard model, as its closest fewstep equivalent (DPM++ 2M ->
    Euler, DPM++ SDE -> Euler a, PLMS -> DDIM). A1111's own API runs its default sampler for a name it does not
    know."""
    notes = []
    base = name.strip()
    for label in A1111_SCHEDULERS:  # "DPM++ 2M Karras": the sampler, then a scheduler, as A1111 splits it
        if base.lower().endswith(" " + label.lower()) and base[: -len(label) - 1].lower() in ALIASES:
            scheduler, base = label, base[: -len(label) - 1]
            break
    a1111 = ALIASES.get(base.lower())
    mine = sampler_for_label(base) or (a1111 and sampler_for_label(a1111))
    if mine is None and a1111 is None:
        return None, ()
    recipe = engine.default_recipe()
    if mine is not None:  # one fewstep runs: as named
        pass
    elif recipe != "standard":
        mine = engine.defaults()["sampler"]
        notes.append(f"sampler {name!r} is not one fewstep runs: it ran as {SAMPLERS[mine].label}, the model's "
                     f"few-step sampler ({recipe} recipe)")
    else:
        mine = CLOSEST[A1111_SAMPLERS[a1111][1]]
        notes.append(f"sampler {name!r} is not one fewstep runs: it ran as {SAMPLERS[mine].label}, its closest "
                     "equivalent here")
    if scheduler and scheduler.lower() not in ("automatic", ""):
        notes.append(f"scheduler {scheduler!r} is not used: each fewstep sampler walks its recipe's own schedule")
    for note in notes:
        if note not in _said:
            _said.add(note)
            log.warning(f"A1111 request: {note} (said once)")
    return mine, tuple(notes)


def sampler_list():
    """/sdapi/v1/samplers: the samplers fewstep runs, under A1111's names (other A1111 names are accepted too)."""
    out = []
    for s in SAMPLERS.values():
        extra = A1111_SAMPLERS.get(s.label, ((), ""))[0]
        out.append({"name": s.label, "aliases": list(dict.fromkeys([s.name, *s.aliases, *extra])), "options": {}})
    return out


def router(server):
    """The listing routes, for create_app to include."""
    r = APIRouter(prefix="/sdapi/v1")

    @r.get("/samplers")
    async def samplers():
        return sampler_list()

    @r.get("/schedulers")
    async def schedulers():
        # fewstep's samplers each walk their recipe's schedule: A1111's "automatic" is the one that means that
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False}]

    @r.get("/scripts")
    async def scripts():
        # the ControlNet extension's alwayson_scripts.controlnet units are understood (fewstep.serve.dialects)
        return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}

    @r.get("/script-info")
    async def script_info():
        return [{"name": "controlnet", "is_alwayson": True, "is_img2img": i2i, "args": []} for i2i in (False, True)]

    @r.get("/embeddings")
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @r.get("/cmd-flags")
    async def cmd_flags(request: Request):
        # the few of A1111's flags that say something true about this server; never a path or the key
        engine = server.engine  # the current model's (clients may switch models)
        device = str(getattr(engine, "device", "cpu"))
        dtype = str(getattr(engine, "dtype", "")).split(".")[-1]
        port = (request.scope.get("server") or (None, None))[1]  # the socket's; the bound host is not known here
        return {"api": True, "nowebui": False, "api_auth": None, "port": port,
                "no_half": dtype == "float32", "precision": "full" if dtype == "float32" else "autocast",
                "use_cpu": ["all"] if device == "cpu" else [], "lowvram": False, "medvram": False}

    # what fewstep has none of: A1111 answers these with the same shapes, here empty
    for path in ("/upscalers", "/sd-vae", "/hypernetworks", "/face-restorers", "/realesrgan-models",
                 "/prompt-styles", "/latent-upscale-modes", "/extensions"):
        r.add_api_route(path, _empty, methods=["GET"], name=f"a1111_{path.strip('/').replace('-', '_')}")
    return r


async def _empty():
    return []
