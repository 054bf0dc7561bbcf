"""Prompt encoding for one (SD 1.x/2.x) or two (SDXL, SSD-1B) CLIP text encoders."""

import torch


def _tokenize(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def truncated(tokenizer, prompts):
    """The prompts longer than the encoder's 77 tokens (their tail is cut, as in every SD tool)."""
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    return [p for p, n in zip(prompts, lengths) if n > tokenizer.model_max_length]


@torch.no_grad()
def encode(tokenizers, encoders, prompts, device):
    """(hidden states, pooled or None) for a list of prompts, as diffusers' SD / SDXL pipelines compute them."""
    if len(encoders) == 1:
        enc, tok = encoders[0], tokenizers[0]
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").attention_mask.to(device)
        return enc(_tokenize(tok, prompts).to(device), attention_mask=mask)[0], None
    states, pooled = [], None
    for tok, enc in zip(tokenizers, encoders):
        out = enc(_tokenize(tok, prompts).to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # the projection model's pooled, projected output (SDXL's second encoder)
            pooled = out[0]
        states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
    return torch.cat(states, dim=-1), pooled
