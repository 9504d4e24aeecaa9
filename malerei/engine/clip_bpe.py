"""The CLIP BPE tokenizer, built offline from the vocabulary file shipped in `configs/`.

SD 1.x (OpenAI CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14) and SDXL (both) share one byte-level
BPE vocabulary: `bpe_simple_vocab_16e6.txt.gz` (see configs/README.md for its origin). Real
single-file checkpoints carry no tokenizer, so malerei derives the Hugging Face `CLIPTokenizer`
(vocab + merges) from that file the same way CLIP's `SimpleTokenizer` does:

1. every byte maps to a printable unicode character (`bytes_to_unicode`);
2. the vocabulary is those 256 characters, then the same characters with the end-of-word mark
   `</w>`, then one token per merge rule (the two halves joined), then `<|startoftext|>` and
   `<|endoftext|>`: 256 + 256 + 48,894 + 2 = 49,408 ids;
3. the merge rules are lines 1 .. 48,894 of the file (line 0 is a version comment).

Known ids (CLIP's own): "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].

The pad token differs by text encoder: OpenAI CLIP pads with `<|endoftext|>`, the OpenCLIP
encoders (SD2, SDXL's second encoder) with `!` (id 0), as in the published tokenizer configs.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

VOCAB_FILE = Path(__file__).parent / "configs" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses this many merge rules from the file
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
PAD_OPENAI_CLIP = EOS
PAD_OPENCLIP = "!"


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> the printable character that stands for it in BPE tokens.

    Bytes that are already printable and not whitespace/control ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves; the other 68 bytes get the characters U+0100, U+0101, ... in byte order.
    The dict's order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    chars = list(bytes_to_unicode().values())
    vocab = (*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), BOS, EOS)
    return vocab, merges


def clip_vocab() -> dict[str, int]:
    """token -> id, as in Hugging Face's CLIP `vocab.json`."""
    vocab, _ = _vocab_and_merges()
    return {token: i for i, token in enumerate(vocab)}


def clip_merges() -> list[tuple[str, str]]:
    """The BPE merge rules in priority order, as in Hugging Face's CLIP `merges.txt`."""
    return list(_vocab_and_merges()[1])


def build_clip_tokenizer(*, pad_token: str = PAD_OPENAI_CLIP):
    """A fresh `transformers.CLIPTokenizer` (49,408 ids, max length 77). A new object each call, so
    callers may add tokens to it without affecting other models."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=clip_merges(),
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def write_clip_tokenizer_files(out_dir: Path) -> Path:
    """Write `vocab.json` and `merges.txt` (Hugging Face layout) to `out_dir`; returns out_dir."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(" ".join(m) for m in clip_merges())
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return out_dir
