"""LoRA files in the layouts found in the wild -> one plan: {(component, module path): its down/up/alpha keys}.

Layouts: kohya sd-scripts / A1111 with diffusers block names (the published LCM-LoRAs) or with the original LDM/SGM
block names, diffusers/peft (with or without component prefixes, adapter names leaked into keys), and the old
diffusers attention-processor layout; LoCon convs are ordinary kohya keys with 4-d factors. Planning reads only key
names and header shapes, so a file for another architecture is refused before any tensor is read.

diffusers has converters for these (loaders.lora_conversion_utils), but they are private, rewrite names by string
substitution without looking at the model, and get SD 1.x's original names wrong (an upsampler in a block without
attention, output_blocks.2.1.conv, becomes an attention). Here every name is looked up in an index built from the
loaded model's own modules, so a key either resolves to a real module or is reported as matching nothing.
"""

import json
import math
import re
from dataclasses import dataclass, field

from ..arch import BY_CROSS_WIDTH, PRESETS
from ..errors import LoadError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te_", "text_encoder"))
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))
LAYOUTS = {"kohya": "kohya (diffusers block names)", "kohya-ldm": "kohya (original block names)",
           "peft": "diffusers/peft", "diffusers-old": "diffusers (old attention-processor layout)"}

# Key fragments of adapter kinds that are not plain low-rank products; each is refused by name.
UNSUPPORTED = (
    (re.compile(r"\.hada_"), "LyCORIS LoHa"), (re.compile(r"\.lokr_"), "LyCORIS LoKr"),
    (re.compile(r"\.b?oft_"), "LyCORIS OFT/BOFT"), (re.compile(r"\.(dora_scale|lora_magnitude_vector)"), "DoRA"),
    (re.compile(r"\.lora_mid\."), "LyCORIS LoCon with CP/Tucker decomposition (lora_mid)"),
    (re.compile(r"\.diff(_b)?$"), "LyCORIS full weight difference"), (re.compile(r"\.on_input$"), "LyCORIS (IA)^3"),
    (re.compile(r"\.[ab][12]\.weight$"), "LyCORIS GLoRA"), (re.compile(r"\.lora_B\.bias$"), "LoRA with trained biases"),
)
# Other model families, so that their files are refused with the right name rather than "matches nothing".
OTHER_FAMILIES = ((re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "Flux"),
                  (re.compile(r"joint_blocks|context_block|\.add_k_proj"), "SD3"),
                  (re.compile(r"^(lora_transformer_|transformer\.|diffusion_model\.)"),
                   "a transformer (DiT) model such as SD3, Flux or PixArt"))
# A cross-attention width names a family (fewstep.arch's titles) or the SDXL refiner, which is not one fewstep loads.
CROSS_WIDTHS = {**{width: PRESETS[arch].title for width, arch in BY_CROSS_WIDTH.items()}, 1280: "the SDXL refiner"}

_OLD = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PEFT = (re.compile(r"^(.*)\.lora_([AB])(?:\.[\w-]+)?\.weight$"), re.compile(r"^(.*)\.lora\.(down|up)\.weight$"),
         re.compile(r"^(.*)\.lora_linear_layer\.(down|up)\.weight$"), re.compile(r"^(.*)\.(alpha)$"))


@dataclass(frozen=True)
class Key:
    """What one tensor name says: the component, the module name as written, the role and the layout."""

    component: str
    name: str  # flat (kohya: dots turned into underscores) or dotted (peft, old diffusers)
    role: str  # down, up or alpha
    layout: str


def parse_key(key):
    """The Key of a tensor name, or None when it is no LoRA key fewstep knows."""
    for prefix, component in KOHYA_PREFIXES:
        if key.startswith(prefix):
            stem, _, rest = key.partition(".")
            role = KOHYA_ROLES.get(rest)
            return Key(component, stem[len(prefix):], role, "kohya") if role else None
    m = _OLD.match(key)
    if m:
        component, path = _split_component(m[1])
        proj = _OLD_TEXT[m[2]] if component.startswith("text_encoder") else ("to_out.0" if m[2] == "to_out" else m[2])
        return Key(component, f"{path}.{proj}", m[3], "diffusers-old")
    for pattern in _PEFT:
        m = pattern.match(key)
        if m:
            component, path = _split_component(m[1])
            return Key(component, path, {"A": "down", "B": "up"}.get(m[2], m[2]), "peft")
    return None


def _split_component(path):
    path = path.removeprefix("base_model.model.")  # peft's own save_pretrained of a wrapped model
    for prefix, component in PEFT_PREFIXES:
        if path.startswith(prefix):
            return component, path[len(prefix):].removeprefix("base_model.model.")
    return ("text_encoder" if path.startswith("text_model.") else "unet"), path


def unsupported_kind(keys):
    """The name of the adapter kind when the file is not a plain LoRA/LoCon; None when it is."""
    for key in keys:
        for pattern, kind in UNSUPPORTED:
            if pattern.search(key):
                return kind
    return None


# ---- the model side: which modules a LoRA can target, under every name a file may use ------------------------------
@dataclass
class ModuleIndex:
    """Target modules of one component: dotted paths, and flat (kohya) names -> path, original names included."""

    paths: set
    flat: dict
    original: set = field(default_factory=set)  # the flat names that are original (LDM/SGM) aliases


def module_index(models):
    """{component: ModuleIndex} of the Linear and Conv2d modules of {component: torch module}."""
    import torch

    index = {}
    for cname, model in models.items():
        paths = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        flat = {p.replace(".", "_"): p for p in paths}
        original = set()
        if cname == "unet":
            for path, old in original_names(model).items():
                if path in paths:
                    flat[old.replace(".", "_")] = path
                    original.add(old.replace(".", "_"))
        index[cname] = ModuleIndex(paths, flat, original)
    return index


_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2"}


def original_names(unet):
    """{diffusers module path: original (LDM/SGM) path} for a UNet2DConditionModel, read off its actual blocks.

    input block i: level (i-1) // (layers+1), inner 0 resnet / 1 attention, the level's last slot the downsampler
    (op); middle 0/1/2: resnet / attention / resnet; output block i: up level i // (layers+1), the upsampler after
    the last resnet's attention when the level has attention (slot 2), else right after the resnet (slot 1).
    """
    blocks = {}  # diffusers block prefix -> original block prefix
    i = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            blocks[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            blocks[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if getattr(block, "downsamplers", None):
            blocks[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    mid = unet.mid_block
    if mid is not None:
        blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                       "mid_block.resnets.1": "middle_block.2"})
    i = 0
    for b, block in enumerate(unet.up_blocks):
        attention = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            blocks[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            blocks[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if getattr(block, "upsamplers", None):
            blocks[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if attention else 1}.conv"
    out = {}
    import torch

    for path, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if path in _FIXED:
            out[path] = _FIXED[path]
            continue
        parts = path.split(".")
        for n in (5, 4, 3, 2):  # the longest block prefix that is known
            head = ".".join(parts[:n])
            if head in blocks:
                rest = ".".join(parts[n:])
                if ".resnets." in head or head.startswith("mid_block.resnets"):
                    rest = _RESNET_PARTS.get(rest, rest)
                out[path] = f"{blocks[head]}.{rest}" if rest else blocks[head]
                break
    return out


# ---- a plan: the file's keys grouped by target module, before any tensor is read ---------------------------------
@dataclass
class Plan:
    """The keys of a file grouped by target; what matched nothing; the layouts seen."""

    groups: dict  # (component, path) -> {"down": key, "up": key, "alpha": key (optional)}
    unmatched: list
    layouts: dict  # layout -> number of targets

    @property
    def matched_keys(self):
        return sum(len(g) for g in self.groups.values())


def plan(keys, index):
    """Group LoRA tensor names by the module of `index` ({component: ModuleIndex}) that each one targets."""
    kind = unsupported_kind(keys)
    if kind:
        raise LoadError(f"this is a {kind} file, which fewstep does not apply (plain LoRA and LoCon files are "
                        "supported)")
    parts, unmatched, layouts = {}, [], {}
    for key in keys:
        k = parse_key(key)
        target = _resolve(k, index) if k else None
        if target is None:
            unmatched.append(key)
            continue
        path, layout = target
        group = parts.setdefault((k.component, path), {})
        if k.role in group:  # the same module twice, e.g. two naming schemes in one file
            unmatched.append(key)
            continue
        group[k.role] = key
        layouts[(k.component, path)] = layout
    groups = {}
    for target, group in parts.items():
        if "down" in group and "up" in group:
            groups[target] = group
        else:
            unmatched.extend(group.values())
    counts = {}
    for target in groups:
        counts[layouts[target]] = counts.get(layouts[target], 0) + 1
    return Plan(groups, unmatched, counts)


def _resolve(k, index):
    ix = index.get(k.component)
    if ix is None:
        return None
    if k.layout == "kohya":
        path = ix.flat.get(k.name)
        if path is None:
            return None
        return path, "kohya-ldm" if k.name in ix.original else "kohya"
    return (k.name, k.layout) if k.name in ix.paths else None


def check_shapes(groups, shapes, weights):
    """The first misfit as a message; None when every down/up pair fits its target weight.

    shapes: {key: shape} from the file header; weights: {(component, path): target weight shape}.
    """
    for target, group in groups.items():
        down, up, w = tuple(shapes[group["down"]]), tuple(shapes[group["up"]]), tuple(weights[target])
        rank = down[0] if down else 0
        up_cols = math.prod(up[1:]) if len(up) > 1 else 0
        fits = (len(down) >= 2 and len(up) >= 2 and rank > 0 and up[0] == w[0] and up_cols == rank
                and math.prod(down[1:]) == math.prod(w[1:]) and (len(down) == 2 or down[1:] == w[1:]))
        if not fits:
            return (f"{target[0]} {target[1]} has weight {w}; the LoRA gives down {down} and up {up}")
        if "alpha" in group and math.prod(shapes[group["alpha"]]) != 1:
            return f"{target[0]} {target[1]}: alpha has shape {tuple(shapes[group['alpha']])}, not a number"
    return None


# ---- what a file is for --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchGuess:
    """What a LoRA's keys and shapes say about the model it was made for."""

    family: str | None  # "sd" (SD 1.x/2.x layout), "xl" (SDXL/SSD-1B layout) or None
    cross: int | None  # cross-attention width read off an attn2.to_k down factor
    other: str | None = None  # a different model family entirely (Flux, SD3...)

    @property
    def label(self):
        if self.other:
            return self.other
        if self.cross in CROSS_WIDTHS:
            return CROSS_WIDTHS[self.cross]
        base = {"sd": "an SD 1.x/2.x-layout model", "xl": "an SDXL-layout model"}.get(self.family)
        width = f"{self.cross}-wide cross-attention" if self.cross else None
        if base and width:
            return f"{base} with {width}"
        return base or (f"a model with {width}" if width else "an unknown model")


def guess_arch(keys, shapes):
    """ArchGuess from key names and header shapes alone."""
    for key in keys:
        for pattern, name in OTHER_FAMILIES:
            if pattern.search(key):
                return ArchGuess(None, None, name)
    family = cross = None
    for key in keys:
        k = parse_key(key)
        if k is None:
            continue
        if k.component == "text_encoder_2" or key.startswith("lora_te1_"):  # kohya names encoders 1/2 only for SDXL
            family = "xl"
        if k.component != "unet":
            continue
        flat = k.name.replace(".", "_")
        if k.role == "down" and flat.endswith(("attn2_to_k", "attn2_to_v")) and len(shapes.get(key, ())) >= 2:
            cross = cross or int(shapes[key][1])
        if re.search(r"transformer_blocks_[1-9]", flat) or flat.startswith(("add_embedding", "label_emb")):
            family = "xl"
        elif family is None and flat.startswith(("down_blocks_0_attentions", "input_blocks_1_1")):
            family = "sd"
    return ArchGuess(family, cross)


def model_arch(unet, text_encoders):
    """The ArchGuess a LoRA for this model would give."""
    xl = len(text_encoders) > 1 or unet.config.get("addition_embed_type") == "text_time"
    cross = unet.config.get("cross_attention_dim")
    return ArchGuess("xl" if xl else "sd", cross if isinstance(cross, int) else None)


def conflict(lora, model):
    """True when the LoRA's evidence contradicts the model's architecture."""
    if lora.other:
        return True
    if lora.family and model.family and lora.family != model.family:
        return True
    return bool(lora.cross and model.cross and lora.cross != model.cross)


# ---- scale -----------------------------------------------------------------------------------------------------
def peft_alphas(metadata):
    """{component: (r, lora_alpha, alpha_pattern, rank_pattern, use_rslora)} from diffusers' lora_adapter_metadata."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out = {}
    for component in COMPONENTS + ("",):
        prefix = f"{component}." if component else ""
        sub = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)} if prefix else meta
        if "lora_alpha" in sub:
            out[component or "unet"] = sub
    return out


def scale_of(component, path, rank, alpha, peft_meta):
    """alpha / rank (kohya, alpha missing: 1); peft metadata gives lora_alpha and per-module alpha_pattern."""
    if alpha is not None:
        return alpha / rank
    cfg = peft_meta.get(component)
    if not cfg:
        return 1.0
    a = cfg.get("lora_alpha", rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            a = value
            break
    return a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank


# ---- writing ---------------------------------------------------------------------------------------------------
def to_kohya(factors, *, xl, original=None):
    """A kohya state dict from {(component, path): (down, up, alpha)}; original: {path: LDM path} for UNet names."""
    import torch

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for (component, path), (down, up, alpha) in sorted(factors.items()):
        name = original.get(path, path) if original and component == "unet" else path
        stem = prefixes[component] + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = down.contiguous()
        out[f"{stem}.lora_up.weight"] = up.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha), dtype=down.dtype)
    return out


def to_peft(factors):
    """A diffusers/peft state dict (component prefixes, lora_A/lora_B, no alphas: alpha / rank is baked into B)."""
    out = {}
    for (component, path), (down, up, alpha) in sorted(factors.items()):
        rank = down.shape[0]
        if alpha is not None and alpha != rank:
            up = (up.float() * (alpha / rank)).to(up.dtype)
        out[f"{component}.{path}.lora_A.weight"] = down.contiguous()
        out[f"{component}.{path}.lora_B.weight"] = up.contiguous()
    return out
