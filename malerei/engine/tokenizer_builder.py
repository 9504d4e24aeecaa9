"""Build a small word-level CLIP tokenizer in the standard ``vocab.json`` + ``merges.txt`` format.

malerei's built-in model and the tests use a CLIP tokenizer over a small vocabulary instead of
OpenAI's 49,408-token BPE. The files written here are the same format OpenAI's CLIP tokenizer
ships in, so stock ``transformers.CLIPTokenizer.from_pretrained(folder)`` and diffusers load them:

- the vocabulary starts with the 256 byte-level symbols and their 256 end-of-word (``</w>``) forms,
  in the order CLIP uses (so ``!`` has id 0, as in CLIP, which SD2 uses as its pad token); any text
  therefore tokenizes, an unknown word falls apart into characters instead of failing;
- then one merge chain per known word, so every known word is a single token (``cat</w>``);
- ``<|startoftext|>`` and ``<|endoftext|>`` come last, as in CLIP, so the end token has the
  highest id.

Words are lower-cased (the tokenizer lower-cases its input too) and split the way CLIP's
pre-tokenizer splits text: letters, single digits, runs of punctuation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77


def byte_symbols() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP), in CLIP's order.

    Printable bytes stand for themselves; the other 68 bytes are mapped to code points from 256 up,
    so that no vocabulary entry contains whitespace or control characters.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP orders the vocabulary by this insertion order: printable bytes first, then the rest.
    return table


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-tokenized piece: repeatedly merge the best-ranked pair."""
    parts = list(symbols)
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get((parts[i], parts[i + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, parts[i], parts[i + 1])
        if best is None:
            break
        _, left, right = best
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == left and parts[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def _pieces(text: str) -> list[str]:
    """Split ``text`` exactly as the CLIP tokenizer's normalizer and pre-tokenizer do."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def build_vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and ordered merge list that make every word one token."""
    base = list(byte_symbols().values())
    vocab_tokens: list[str] = base + [s + END_OF_WORD for s in base]
    known = set(vocab_tokens)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"tokenizer words must be strings, got {type(word).__name__}")
        for piece in _pieces(word):
            if piece in (BOS_TOKEN, EOS_TOKEN):
                continue
            symbols = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
            parts = _apply_merges(symbols, ranks)
            # Chain the remaining parts left to right. New merges rank after all earlier ones, so
            # the words added before still merge exactly as they did (their merges win first).
            while len(parts) > 1:
                pair = (parts[0], parts[1])
                joined = pair[0] + pair[1]
                if pair not in ranks:
                    ranks[pair] = len(merges)
                    merges.append(pair)
                if joined not in known:
                    known.add(joined)
                    vocab_tokens.append(joined)
                parts = [joined, *parts[2:]]

    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(vocab_tokens)}, merges


def build_word_clip_tokenizer(words: list[str], out_dir, *, pad_token: str = EOS_TOKEN):
    """Write a word-level CLIP tokenizer for ``words`` to ``out_dir`` and load it back.

    ``pad_token``: ``"<|endoftext|>"`` as in SD1's tokenizer (the default), or ``"!"`` as in
    SD2's and SDXL's second tokenizer. Returns the ``transformers.CLIPTokenizer`` loaded from the
    written folder with ``local_files_only=True``.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary; use '<|endoftext|>' or '!'")

    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    # The first line is the version header OpenAI's merges.txt carries; readers skip it.
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")

    tokenizer = CLIPTokenizer.from_pretrained(str(out), local_files_only=True)
    _check(tokenizer, words, vocab)
    return tokenizer


def _check(tokenizer, words: Iterable[str], vocab: dict[str, int]) -> None:
    """Every known word must come out as the tokens the builder intended (one per piece)."""
    for word in words:
        expected = [vocab[piece + END_OF_WORD] for piece in _pieces(word) if piece not in (BOS_TOKEN, EOS_TOKEN)]
        got = tokenizer(word, add_special_tokens=False)["input_ids"]
        if got != expected:
            raise RuntimeError(f"tokenizer builder: {word!r} tokenized to {got}, expected {expected}")
