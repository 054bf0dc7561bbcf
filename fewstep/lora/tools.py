"""Inspect and convert LoRA files without loading a model (names resolved against meta-device architectures)."""

import re
from pathlib import Path

import torch

from ..errors import LoadError
from .apply import open_lora
from .formats import (LAYOUTS, check_shapes, guess_arch, module_index, original_names, parse_key, peft_alphas, plan,
                      scale_of, to_kohya, to_peft, unsupported_kind)
from .reference import CROSS_TO_ARCH, folder_models, meta_models

# what a module name ends with -> the kind of target it is (diffusers and original names)
KINDS = (("attention q/k/v/out", r"attn[12][._]to[._](q|k|v|out[._]0)$"), ("proj_in/out", r"proj[._](in|out)$"),
         ("feed-forward", r"ff[._]net[._](0[._]proj|2)$"),
         ("resnet convs", r"(conv[12]|in[._]layers[._]2|out[._]layers[._]3)$"),
         ("resnet shortcuts", r"(conv[._]shortcut|skip[._]connection)$"),
         ("time_emb_proj", r"(time[._]emb[._]proj|emb[._]layers[._]1)$"),
         ("downsamplers", r"(downsamplers[._]0[._]conv|[._]op)$"),
         ("upsamplers", r"(upsamplers[._]0[._]conv|\d[._]conv)$"),
         ("time/added embedding", r"(time[._]embedding|time[._]embed|add[._]embedding|label[._]emb)"),
         ("conv_in/out", r"(conv[._](in|out)|input[._]blocks[._]0[._]0|out[._]2)$"),
         ("text attention", r"self[._]attn[._](q|k|v|out)[._]proj$"), ("text mlp", r"mlp[._]fc[12]$"),
         ("text projection", r"text[._]projection$"))

ORIGINAL = re.compile(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_\d")


def kind_of(name):
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def reference(arch=None, model=None, guess=None):
    """(label, {component: meta module}) to resolve names against: --model folder, --arch, or the file's guess."""
    if model:
        return str(model), folder_models(model)
    if arch is None and guess is not None:  # a cross-attention width no real model has: no reference
        arch = CROSS_TO_ARCH.get(guess.cross) if guess.cross else ("sdxl" if guess.family == "xl" else None)
    if arch is None:
        return None, None
    return arch, meta_models(arch)


def inspect_lora(src, *, arch=None, model=None, allow_pickle=False, weight_name=None):
    """A dict describing a LoRA file: format, architecture, ranks, alphas, targets, components, coverage."""
    source = open_lora(src, allow_pickle=allow_pickle, weight_name=weight_name)
    keys, shapes = source.keys, source.shapes
    size = source.path.stat().st_size if source.path else None
    info = dict(file=source.label, bytes=size, tensors=len(keys), unsupported=unsupported_kind(keys))
    guess = guess_arch(keys, shapes)
    info["architecture"] = guess.label
    meta = {k: v for k, v in source.metadata.items() if k in ("ss_base_model_version", "ss_network_module",
                                                                 "ss_network_dim", "ss_network_alpha",
                                                                 "ss_output_name", "modelspec.architecture")}
    info["metadata"] = meta
    from ..recipes import RECIPES, detect

    name = source.path.name if source.path else source.label
    recipe, steps = detect(name, {k: v for k, v in source.metadata.items() if not k.startswith("ss_tag")})
    info["recipe"] = None if recipe is None else dict(name=recipe, steps=steps or RECIPES[recipe].steps,
                                                      sampler=RECIPES[recipe].sampler,
                                                      guidance=RECIPES[recipe].guidance, note=RECIPES[recipe].note)
    modules, layouts, unparsed = {}, {}, []
    for key in keys:
        k = parse_key(key)
        if k is None:
            unparsed.append(key)
            continue
        modules.setdefault((k.component, k.name), {})[k.role] = key
        layout = "kohya-ldm" if k.layout == "kohya" and ORIGINAL.match(k.name) else k.layout
        layouts[layout] = layouts.get(layout, 0) + 1
    alpha_keys = [g["alpha"] for g in modules.values() if "alpha" in g]
    alphas = {k: float(v.float().reshape(())) for k, v in source.read(alpha_keys, torch.device("cpu")).items()
              if v.numel() == 1}
    ranks, alpha_values, comps, kinds, locon = set(), set(), {}, {}, 0
    for (component, name), g in modules.items():
        if "down" not in g:
            continue
        down = shapes[g["down"]]
        ranks.add(int(down[0]))
        locon += len(down) == 4 and down[-1] > 1
        if "alpha" in g and g["alpha"] in alphas:
            alpha_values.add(alphas[g["alpha"]])
        comps[component] = comps.get(component, 0) + 1
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0) + 1
    dtypes = source.dtypes()
    info.update(format=" + ".join(LAYOUTS[lay] for lay in sorted(layouts, key=lambda x: -layouts[x])) or "unknown",
                locon_modules=locon, ranks=sorted(ranks), alphas=sorted(alpha_values) or ["none (alpha = rank)"],
                components=comps, targets=dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
                modules=sum(comps.values()), dtypes=sorted(dtypes), unparsed=unparsed[:5], unparsed_count=len(unparsed))
    if info["unsupported"] is None:
        label, models = reference(arch, model, guess)
        if models is not None:
            p = plan(keys, module_index(models))
            info["coverage"] = dict(reference=label, matched_tensors=p.matched_keys, tensors=len(keys),
                                    modules=len(p.groups), unmatched=p.unmatched[:5],
                                    layouts={LAYOUTS[k]: n for k, n in p.layouts.items()})
    return info


def format_info(info):
    """The text `fewstep lora info` prints."""
    lines = [f"file          {info['file']}" + (f" ({info['bytes'] / 1e6:.1f} MB)" if info["bytes"] else "")]
    if info["unsupported"]:
        lines.append(f"format        {info['unsupported']} (not supported by fewstep)")
    else:
        locon = f", LoCon on {info['locon_modules']} convs" if info["locon_modules"] else ""
        lines.append(f"format        {info['format']}{locon}")
    lines += [f"architecture  {info['architecture']}",
              f"tensors       {info['tensors']} ({', '.join(info['dtypes'])})",
              f"modules       {info['modules']} ({', '.join(f'{n} in {c}' for c, n in info['components'].items())})",
              f"rank          {', '.join(map(str, info['ranks']))}",
              f"alpha         {', '.join(f'{a:g}' if isinstance(a, float) else a for a in info['alphas'])}",
              "targets       " + ", ".join(f"{k} {n}" for k, n in info["targets"].items())]
    if info["metadata"]:
        lines.append("metadata      " + ", ".join(f"{k}={v}" for k, v in info["metadata"].items()))
    r = info.get("recipe")
    if r:
        lines.append(f"recipe        looks like {r['name']} (its name says so): {r['steps']} steps, {r['sampler']} "
                     f"sampler, guidance {r['guidance']:g}; run with --recipe {r['name']} ({r['note']})")
    if info["unparsed_count"]:
        lines.append(f"not LoRA keys {info['unparsed_count']}, e.g. {info['unparsed']}")
    cov = info.get("coverage")
    if cov:
        s = (f"coverage      {cov['matched_tensors']}/{cov['tensors']} tensors resolve to {cov['modules']} modules of "
             f"a real {cov['reference']} model")
        if cov["unmatched"]:
            s += f"; unmatched e.g. {cov['unmatched']}"
        lines.append(s)
    return "\n".join(lines)


def convert_lora(src, out, *, to, arch=None, model=None, allow_pickle=False, weight_name=None, dtype=None):
    """Write `src` as a kohya (diffusers block names), kohya-ldm (original block names) or peft file at `out`.

    The names are resolved against a real architecture, so the file must map completely; peft files get alpha / rank
    folded into lora_B (peft's convention is alpha = rank).
    """
    if to not in ("kohya", "kohya-ldm", "peft"):
        raise LoadError(f"unknown target format {to!r} (use kohya, kohya-ldm or peft)")
    source = open_lora(src, allow_pickle=allow_pickle, weight_name=weight_name)
    if not source.shapes:
        raise LoadError(f"LoRA {source.label} holds no tensors: the file is empty")
    guess = guess_arch(source.keys, source.shapes)
    label, models = reference(arch, model, guess)
    if models is None:
        raise LoadError(f"cannot tell which architecture {source.label} is for ({guess.label}): pass --arch "
                        "sd15/sd2/sdxl or --model with a diffusers folder")
    p = plan(source.keys, module_index(models))
    if p.unmatched:
        raise LoadError(f"{len(p.unmatched)} of {len(source.keys)} tensors of {source.label} do not resolve in a "
                        f"{label} model (e.g. {p.unmatched[:3]}): is it for another architecture? (--arch)")
    weights = {t: models[t[0]].get_submodule(t[1]).weight.shape for t in p.groups}
    misfit = check_shapes(p.groups, source.shapes, weights)
    if misfit:
        raise LoadError(f"{source.label} does not fit a {label} model: {misfit}")
    tensors = source.read([k for g in p.groups.values() for k in g.values()], torch.device("cpu"))
    meta = peft_alphas(source.metadata)
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, None: None}[dtype]
    factors = {}
    for (component, path), g in p.groups.items():
        down, up = tensors[g["down"]], tensors[g["up"]]
        if cast is not None:
            down, up = down.to(cast), up.to(cast)
        alpha = float(tensors[g["alpha"]].float().reshape(())) if "alpha" in g else None
        if alpha is None:
            scale = scale_of(component, path, down.shape[0], None, meta)
            alpha = None if scale == 1.0 else scale * down.shape[0]
        factors[(component, path)] = (down, up, alpha)
    if to == "peft":
        sd = to_peft(factors)
        metadata = {"format": "pt"}
    else:
        original = original_names(models["unet"]) if to == "kohya-ldm" else None
        sd = to_kohya(factors, xl="text_encoder_2" in models, original=original)
        metadata = {k: v for k, v in source.metadata.items() if k.startswith("ss_")} | {"format": "pt"}
    from safetensors.torch import save_file

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=metadata)
    return dict(file=str(out), format=to, modules=len(factors), tensors=len(sd), reference=label)

