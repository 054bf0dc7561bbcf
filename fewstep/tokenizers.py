"""The CLIP tokenizer files fewstep ships, so that single-file checkpoints and the default model load offline."""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "data" / "tokenizers" / "clip"

# SD 1.x and SDXL's first encoder (CLIP ViT-L) pad with the end token; SD 2.x and SDXL's second encoder (OpenCLIP)
# pad with "!" (id 0). Getting this wrong changes SDXL images, so the kind is explicit.
PAD_TOKENS = {"clip": "<|endoftext|>", "openclip": "!"}


def bundled_tokenizer(kind="clip"):
    """CLIPTokenizer from the bundled vocabulary, padding as the encoder of `kind` ("clip" or "openclip") expects."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(BUNDLED), pad_token=PAD_TOKENS[kind])
