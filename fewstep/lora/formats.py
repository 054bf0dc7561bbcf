"""LoRA file formats -> one normal form: {(component, module path): (down, up, alpha or None)}.

Handles kohya / A1111 keys with diffusers block names (the published LCM-LoRAs), diffusers/peft keys (with or
without component prefixes and leaked adapter names), and the old diffusers attention-processor layout.
"""

import re

from ..errors import LoadError

COMPONENT_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                      "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                 "base_model.model.": "unet"}
UNSUPPORTED = {"hada_w1_a": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", "lokr_w2": "LyCORIS LoKr",
               ".diff": "LyCORIS full-diff", "oft_blocks": "LyCORIS OFT"}
OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def detect_unsupported(keys):
    for k in keys:
        for marker, name in UNSUPPORTED.items():
            if marker in k:
                return name
    return None


def normalize(state_dict, module_names):
    """Group a LoRA state dict by target module; returns (entries, unmatched keys).

    module_names: {component: {kohya-style flat name: dotted module path}} of the loaded model, used to undo
    kohya's replacement of dots by underscores without guessing.
    """
    fmt = detect_unsupported(state_dict)
    if fmt:
        raise LoadError(f"this is a {fmt} file, which fewstep does not apply yet (LoRA and LoCon are supported)")
    parts, unmatched = {}, []
    for key, tensor in state_dict.items():
        target = _target(key, module_names)
        if target is None:
            unmatched.append(key)
            continue
        (component, module), role = target
        parts.setdefault((component, module), {})[role] = tensor
    entries = {}
    for target, p in parts.items():
        if "down" not in p or "up" not in p:
            unmatched.append(f"{target[0]}:{target[1]} (has {'/'.join(sorted(p))} but not both down and up)")
            continue
        alpha = p.get("alpha")
        entries[target] = (p["down"], p["up"], None if alpha is None else float(alpha))
    return entries, unmatched


def _target(key, module_names):
    """((component, module path), role) of one key, role in down/up/alpha; None when it matches nothing."""
    for prefix, component in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            stem, _, rest = key.partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
            module = module_names.get(component, {}).get(stem[len(prefix):])
            return ((component, module), role) if module and role else None
    m = OLD_PROCESSOR.search(key)
    if m:
        proj = "to_out.0" if m.group(1) == "to_out" else m.group(1)
        component, path = _split_component(key[:m.start()] + "." + proj)
        return _known(module_names, component, path, m.group(2))
    m = re.search(r"\.lora_(A|B)(?:\.[\w-]+)?\.weight$", key) or re.search(r"\.lora\.(down|up)\.weight$", key)
    m2 = re.search(r"\.lora_linear_layer\.(down|up)\.weight$", key)
    m = m or m2
    if m:
        role = {"A": "down", "B": "up"}.get(m.group(1), m.group(1))
        component, path = _split_component(key[:m.start()])
        return _known(module_names, component, path, role)
    m = re.search(r"\.alpha$", key)
    if m:
        component, path = _split_component(key[:m.start()])
        return _known(module_names, component, path, "alpha")
    return None


def _split_component(path):
    for prefix, component in PEFT_PREFIXES.items():
        if path.startswith(prefix):
            return component, path[len(prefix):]
    return "unet", path


def _known(module_names, component, path, role):
    dotted = set(module_names.get(component, {}).values())
    return ((component, path), role) if path in dotted else None
