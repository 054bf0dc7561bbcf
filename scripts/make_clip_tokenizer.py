"""Write the CLIP BPE tokenizer files fewstep ships (fewstep/data/tokenizers) from the public BPE merges.

The merges are OpenAI's CLIP vocabulary as open_clip_torch's wheel carries it (bpe_simple_vocab_16e6.txt.gz).
Usage: python scripts/make_clip_tokenizer.py path/to/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "fewstep" / "data" / "tokenizers"


def bytes_to_unicode():
    """GPT-2 / CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(bpe_path):
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice CLIP itself uses: 48894 merges
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    # Padding differs per encoder (end token for CLIP ViT-L, "!" for OpenCLIP); fewstep.text sets it at load time.
    folder = OUT / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True,
                  add_prefix_space=False, errors="replace")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
