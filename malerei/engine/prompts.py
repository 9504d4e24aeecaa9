"""AUTOMATIC1111's prompt syntax and prompt encoding for SD1, SD2 and SDXL.

Behaviour follows A1111 (``modules/prompt_parser.py``, ``modules/sd_hijack_clip.py``,
``modules/sd_emphasis.py``, ``modules/extra_networks.py``); the code is malerei's own.

Syntax
    ``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)``, nesting multiplies, unclosed brackets apply
    to the end of the prompt, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters,
    ``BREAK`` starts a new 75-token chunk, ``<lora:name:0.8>`` / ``<lyco:name>`` name LoRAs
    (removed from the text by :func:`extract_lora_tags` before encoding).

Encoding (:func:`encode_prompts`)
    1. parse the attention syntax into ``(text, weight)`` fragments;
    2. tokenize each fragment without BOS/EOS and fill chunks of 75 tokens; an overflowing chunk is
       cut after its last comma when that comma is among the last 20 tokens (A1111's
       ``comma_padding_backtrack`` default); ``BREAK`` closes the chunk early; textual-inversion
       words become their vectors and never straddle two chunks;
    3. frame each chunk as ``BOS + 75 tokens + EOS`` (77), padding with EOS; when the tokenizer's
       pad token differs from EOS (SD2, SDXL's second tokenizer) every position after the first EOS
       becomes the pad id, as A1111 does for OpenCLIP and as diffusers' tokenizer padding does;
    4. run each chunk through the text encoder (SD1/SD2: last layer, or layer ``-clip_skip`` with
       the final layer norm; SDXL: penultimate layer of both encoders, concatenated on the feature
       axis, pooled output of the second encoder's first chunk);
    5. multiply hidden states by the per-token weights and rescale so the chunk keeps its
       original mean (A1111 emphasis "Original"), concatenate chunks along the sequence axis.

Textual inversion is done by substituting the output rows of the text encoder's input embedding
layer: a forward hook, added once per embedding module, writes the vectors that the *current*
call asked for. The request travels in a :class:`contextvars.ContextVar`, so it is private to the
calling thread; the tokenizer's vocabulary and the embedding table are never changed, and a prompt
encoded in another thread at the same time never sees another job's embeddings.
"""

from __future__ import annotations

import contextvars
import math
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from malerei.engine.errors import InvalidParameter

if TYPE_CHECKING:  # torch is imported lazily: no heavy imports at module import time
    import torch

FAMILIES = ("sd1", "sd2", "sdxl")
CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make it 77
COMMA_PADDING_BACKTRACK = 20  # A1111 default of opts.comma_padding_backtrack
MAX_PROMPT_CHARS = 10_000
MAX_CHUNKS = 20
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0  # A1111 marks BREAK as the fragment ("BREAK", -1)


# --------------------------------------------------------------------------------------------
# Attention syntax
# --------------------------------------------------------------------------------------------

# One token of the attention syntax per match, tried in this order: escapes, a lone backslash,
# opening brackets, ":<number>)" closing a weighted group, closing brackets, plain text, a colon.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]              # escaped bracket or backslash
    | \\                      # a lone backslash is text
    | [(\[]                   # opening brackets
    | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with an explicit weight
    | [)\]]                   # closing brackets
    | [^\\()\[\]:]+           # plain text
    | :                       # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(text, weight)`` fragments with A1111's attention rules.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    ``BREAK`` comes back as ``("BREAK", -1.0)``; neighbouring fragments of equal weight are merged;
    an empty prompt gives ``[("", 1.0)]``. A weight that is not a number, such as ``(a:1.2.3)``,
    raises :class:`InvalidParameter`.
    """
    if not isinstance(text, str):
        raise InvalidParameter(f"prompt must be a string, got {type(text).__name__}")

    res: list[list[Any]] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for match in _ATTENTION_TOKEN.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            # An escape gives its character; a lone backslash gives nothing (as in A1111).
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_from(round_brackets.pop(), _parse_weight(weight, piece))
        elif piece == ")" and round_brackets:
            multiply_from(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_from(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])

    # Brackets never closed apply to everything after them (innermost first, like A1111).
    for start in round_brackets:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_brackets:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        res = [["", 1.0]]

    merged: list[list[Any]] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


def _parse_weight(number: str, context: str) -> float:
    try:
        value = float(number)
    except ValueError:
        raise InvalidParameter(
            f"prompt weight {context!r} is not a number; write weights like (word:1.2)"
        ) from None
    if not math.isfinite(value):
        raise InvalidParameter(f"prompt weight {context!r} must be a finite number")
    return value


# --------------------------------------------------------------------------------------------
# LoRA tags
# --------------------------------------------------------------------------------------------

# A1111's extra-network tag: <type:arg1:arg2...>; only lora/lyco are taken out here.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_TYPES = ("lora", "lyco")


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<lora:name:weight>`` / ``<lora:name>`` (and ``<lyco:...>``) tags from a prompt.

    Returns the prompt with the tags deleted (nothing else changes, as in A1111) and the
    ``(name, weight)`` list in prompt order; a missing weight is 1.0. Other ``<type:...>`` tags
    stay in the text. A weight that is not a finite number, an empty name, or more than one
    weight (A1111's separate text-encoder/UNet weights) raises :class:`InvalidParameter`.
    """
    if not isinstance(prompt, str):
        raise InvalidParameter(f"prompt must be a string, got {type(prompt).__name__}")
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2)
        if kind not in LORA_TAG_TYPES:
            return match.group(0)
        parts = args.split(":")
        name = parts[0].strip()
        if not name:
            raise InvalidParameter(f"{match.group(0)!r} has no LoRA name; write <lora:name:0.8>")
        if len(parts) > 2:
            raise InvalidParameter(
                f"{match.group(0)!r} has {len(parts) - 1} weights; write <lora:name> or <lora:name:weight>"
            )
        weight = 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1].strip())
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise InvalidParameter(
                    f"LoRA weight in {match.group(0)!r} is not a number; write <lora:name:0.8>"
                )
        found.append((name, weight))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_prompt(prompt: Any, *, what: str = "prompt") -> str:
    """Check that ``prompt`` is a string of at most :data:`MAX_PROMPT_CHARS` characters."""
    if not isinstance(prompt, str):
        raise InvalidParameter(f"{what} must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidParameter(
            f"{what} is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are allowed"
        )
    return prompt


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


@dataclass
class PromptChunk:
    """77 token ids (BOS, 75 prompt tokens, EOS) with one weight per token.

    ``fixes`` lists textual-inversion placements as ``(offset, embedding name)``; ``offset`` is
    the position of the first vector within the 77 tokens.
    """

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _TokenizerInfo:
    bos: int
    eos: int
    pad: int
    comma: int | None


_TOKENIZER_LOCK = threading.Lock()


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without BOS/EOS and without truncation.

    A lock serialises the calls: a Hugging Face tokenizer call sets the shared backend's
    truncation/padding mode, which must not change under another thread's feet.
    """
    with _TOKENIZER_LOCK:
        return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]


def _tokenizer_info(tokenizer) -> _TokenizerInfo:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise InvalidParameter("the tokenizer has no BOS/EOS tokens; a CLIP tokenizer is required")
    pad = tokenizer.pad_token_id
    # convert_tokens_to_ids is a dict lookup; get_vocab() would copy all 49,408 entries per job.
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == tokenizer.unk_token_id:
        comma = None
    return _TokenizerInfo(bos=bos, eos=eos, pad=eos if pad is None else pad, comma=comma)


def _embedding_lookup(tokenizer, embeddings: Mapping[str, int] | None) -> dict[int, list[tuple[list[int], str]]]:
    """First token id -> [(token ids of the embedding's name, name)], longest name first.

    ``embeddings`` maps name -> number of vectors; only the names are used here.
    """
    lookup: dict[int, list[tuple[list[int], str]]] = {}
    if not embeddings:
        return lookup
    names = list(embeddings)
    for name, ids in zip(names, _tokenize(tokenizer, names), strict=True):
        if ids:
            lookup.setdefault(ids[0], []).append((ids, name))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: len(c[0]), reverse=True)
    return lookup


def tokenize_prompt(
    prompt: str,
    tokenizer,
    *,
    embedding_sizes: Mapping[str, int] | None = None,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[PromptChunk]:
    """Split a prompt into 77-token chunks exactly as A1111's ``tokenize_line`` does.

    ``embedding_sizes`` maps textual-inversion names to their number of vectors; a name found in
    the token stream is replaced by that many placeholder tokens (id 0, as in A1111) recorded in
    the chunk's ``fixes``.
    """
    return _chunk_prompt(
        prompt,
        tokenizer,
        info=_tokenizer_info(tokenizer),
        lookup=_embedding_lookup(tokenizer, embedding_sizes),
        embedding_sizes=embedding_sizes or {},
        comma_padding_backtrack=comma_padding_backtrack,
    )


def _chunk_prompt(prompt, tokenizer, *, info, lookup, embedding_sizes, comma_padding_backtrack):
    parsed = parse_prompt_attention(prompt)
    tokenized = _tokenize(tokenizer, [text for text, _ in parsed])

    chunks: list[PromptChunk] = []
    current = PromptChunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal current, last_comma
        missing = CHUNK_LENGTH - len(current.tokens)
        current.tokens += [info.eos] * missing
        current.weights += [1.0] * missing
        current.tokens = [info.bos, *current.tokens, info.eos]
        current.weights = [1.0, *current.weights, 1.0]
        current.fixes = [(offset + 1, name) for offset, name in current.fixes]  # BOS shifts by one
        chunks.append(current)
        current = PromptChunk()
        last_comma = -1

    for tokens, (text, weight) in zip(tokenized, parsed, strict=True):
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == info.comma:
                last_comma = len(current.tokens)
            elif (
                comma_padding_backtrack != 0
                and len(current.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(current.tokens) - last_comma <= comma_padding_backtrack
            ):
                # Move the words after the last comma into the next chunk. (Unlike A1111, an
                # embedding among the moved words moves with them instead of being lost.)
                cut = last_comma + 1
                moved_tokens, moved_weights = current.tokens[cut:], current.weights[cut:]
                moved_fixes = [(o - cut, n) for o, n in current.fixes if o >= cut]
                current.tokens, current.weights = current.tokens[:cut], current.weights[:cut]
                current.fixes = [(o, n) for o, n in current.fixes if o < cut]
                close_chunk()
                current.tokens, current.weights, current.fixes = moved_tokens, moved_weights, moved_fixes

            if len(current.tokens) == CHUNK_LENGTH:
                close_chunk()

            match = _match_embedding(lookup, tokens, position)
            if match is None:
                current.tokens.append(token)
                current.weights.append(weight)
                position += 1
                continue

            name, name_length = match
            n_vectors = int(embedding_sizes[name])
            if len(current.tokens) + n_vectors > CHUNK_LENGTH:
                close_chunk()
            current.fixes.append((len(current.tokens), name))
            current.tokens += [0] * n_vectors
            current.weights += [weight] * n_vectors
            position += name_length

    if current.tokens or not chunks:
        close_chunk()

    if info.pad != info.eos:
        for chunk in chunks:
            first_eos = chunk.tokens.index(info.eos)
            chunk.tokens[first_eos + 1 :] = [info.pad] * (len(chunk.tokens) - first_eos - 1)
    return chunks


def _match_embedding(lookup, tokens: list[int], position: int) -> tuple[str, int] | None:
    for ids, name in lookup.get(tokens[position], ()):
        if tokens[position : position + len(ids)] == ids:
            return name, len(ids)
    return None


def _empty_chunk(info: _TokenizerInfo) -> PromptChunk:
    tokens = [info.bos, info.eos] + [info.pad] * CHUNK_LENGTH
    return PromptChunk(tokens=tokens, weights=[1.0] * (CHUNK_LENGTH + 2))


# --------------------------------------------------------------------------------------------
# Textual inversion: per-call substitution of input-embedding rows
# --------------------------------------------------------------------------------------------

# id(embedding module) -> [(row in the batch, offset, vectors)], for the current call only.
_ACTIVE_FIXES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("malerei_ti_fixes", default=None)
_HOOKED: weakref.WeakSet = weakref.WeakSet()
_HOOK_LOCK = threading.Lock()


def _substitute_rows(module, inputs, output):
    requests = _ACTIVE_FIXES.get()
    if not requests:
        return None
    fixes = requests.get(id(module))
    if not fixes:
        return None
    output = output.clone()
    for row, offset, vectors in fixes:
        output[row, offset : offset + vectors.shape[0]] = vectors.to(device=output.device, dtype=output.dtype)
    return output


def _ensure_hook(module) -> None:
    """Add the substitution hook to an input-embedding module once; it does nothing by itself."""
    with _HOOK_LOCK:
        if module not in _HOOKED:
            module.register_forward_hook(_substitute_rows)
            _HOOKED.add(module)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeds:
    """Text conditioning for one batch, ready for a batched ``[uncond, cond]`` UNet call.

    ``cond`` and ``uncond`` are ``[B, 77*k, D]`` with the same ``k``; ``cond_pooled`` and
    ``uncond_pooled`` (``[B, D_pooled]``) are set for SDXL only. ``used_embeddings`` names the
    textual-inversion embeddings that occurred (for A1111's "TI hashes").
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cond_pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    used_embeddings: tuple[str, ...] = ()


@dataclass
class _Encoded:
    hidden: torch.Tensor  # [77*k, D]
    pooled: torch.Tensor | None  # [D_pooled] for the pooled encoder, else None


def _final_layer_norm(text_encoder):
    model = getattr(text_encoder, "text_model", text_encoder)
    return model.final_layer_norm


def _num_layers(text_encoder) -> int:
    return int(text_encoder.config.num_hidden_layers)


def _encoder_device(text_encoder, device):
    import torch

    if device is not None:
        return torch.device(device)
    return getattr(text_encoder, "device", None) or next(text_encoder.parameters()).device


class _EncoderRun:
    """Encodes prompts through one tokenizer + text encoder with A1111's chunking and emphasis."""

    def __init__(self, *, tokenizer, text_encoder, layer: str, clip_skip: int, pooled: bool,
                 embeddings: Mapping[str, Any], device):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.layer = layer  # "last" (SD1/SD2 with clip_skip) or "penultimate" (SDXL)
        self.clip_skip = clip_skip
        self.pooled = pooled
        self.embeddings = embeddings
        self.sizes = {name: int(v.shape[0]) for name, v in embeddings.items()}
        self.device = _encoder_device(text_encoder, device)
        self.info = _tokenizer_info(tokenizer)
        self.lookup = _embedding_lookup(tokenizer, self.sizes)
        self.used: set[str] = set()

    def chunks(self, prompt: str) -> list[PromptChunk]:
        return _chunk_prompt(
            prompt,
            self.tokenizer,
            info=self.info,
            lookup=self.lookup,
            embedding_sizes=self.sizes,
            comma_padding_backtrack=COMMA_PADDING_BACKTRACK,
        )

    def encode(self, chunked: list[list[PromptChunk]]) -> list[_Encoded]:
        """Encode prompts already split into chunks; chunk ``i`` of every prompt is one batch."""
        import torch

        per_prompt_hidden: list[list[torch.Tensor]] = [[] for _ in chunked]
        per_prompt_pooled: list[torch.Tensor | None] = [None for _ in chunked]
        for index in range(max(len(c) for c in chunked)):
            rows = [(p, c[index]) for p, c in enumerate(chunked) if index < len(c)]
            hidden, pooled = self._encode_batch([chunk for _, chunk in rows])
            for r, (p, _) in enumerate(rows):
                per_prompt_hidden[p].append(hidden[r])
                if index == 0 and pooled is not None:
                    per_prompt_pooled[p] = pooled[r]
        return [
            _Encoded(hidden=torch.cat(h, dim=0), pooled=pl)
            for h, pl in zip(per_prompt_hidden, per_prompt_pooled, strict=True)
        ]

    def _encode_batch(self, batch: list[PromptChunk]):
        import torch

        ids = torch.tensor([c.tokens for c in batch], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = torch.zeros_like(ids)
            for r, chunk in enumerate(batch):
                mask[r, : chunk.tokens.index(self.info.eos) + 1] = 1
            kwargs["attention_mask"] = mask
        if self.layer == "penultimate" or self.clip_skip > 1:
            kwargs["output_hidden_states"] = True

        fixes = []
        for r, chunk in enumerate(batch):
            for offset, name in chunk.fixes:
                fixes.append((r, offset, self.embeddings[name]))
                self.used.add(name)
        token = None
        if fixes:
            module = self.text_encoder.get_input_embeddings()
            _ensure_hook(module)
            token = _ACTIVE_FIXES.set({id(module): fixes})
        try:
            out = self.text_encoder(ids, **kwargs)
        finally:
            if token is not None:
                _ACTIVE_FIXES.reset(token)

        if self.layer == "penultimate":
            z = out.hidden_states[-2]
        elif self.clip_skip > 1:
            z = _final_layer_norm(self.text_encoder)(out.hidden_states[-self.clip_skip])
        else:
            z = out[0]
        pooled = out[0] if self.pooled else None
        if pooled is not None and pooled.ndim != 2:
            raise InvalidParameter("the second SDXL text encoder must be a CLIPTextModelWithProjection")

        # A1111 keeps the multipliers in float32 (so half-precision states are scaled in float32).
        weights = torch.tensor([c.weights for c in batch], device=z.device, dtype=torch.float32)
        rows = []
        for r in range(len(batch)):
            if bool((weights[r] != 1).any()):
                rows.append(_apply_emphasis(z[r], weights[r]).to(z.dtype))
            else:  # all weights 1: A1111's arithmetic would give the same values back
                rows.append(z[r])
        return rows, pooled


def _apply_emphasis(z, weights):
    """A1111 emphasis "Original": scale each token by its weight, then restore the chunk's mean."""
    original_mean = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def _normalise_embeddings(embeddings, family: str, n_encoders: int) -> list[dict]:
    """word -> tensor (SD1/SD2) or word -> (clip_l, clip_g) / {"clip_l", "clip_g"} (SDXL)."""
    import torch

    per_encoder: list[dict] = [{} for _ in range(n_encoders)]
    if not embeddings:
        return per_encoder
    if not isinstance(embeddings, Mapping):
        raise InvalidParameter("embeddings must be a mapping of word -> vectors")
    for name, value in embeddings.items():
        if not isinstance(name, str) or not name.strip():
            raise InvalidParameter(f"embedding name {name!r} must be a non-empty string")
        if family == "sdxl":
            if isinstance(value, Mapping):
                if "clip_l" not in value or "clip_g" not in value:
                    raise InvalidParameter(f"SDXL embedding {name!r} needs both 'clip_l' and 'clip_g' vectors")
                parts = [value["clip_l"], value["clip_g"]]
            elif isinstance(value, (tuple, list)) and len(value) == 2:
                parts = list(value)
            else:
                raise InvalidParameter(
                    f"SDXL embedding {name!r} must be a (clip_l, clip_g) pair of tensors"
                )
        else:
            parts = [value]
        for k, part in enumerate(parts):
            if not isinstance(part, torch.Tensor) or part.ndim != 2 or part.shape[0] < 1:
                raise InvalidParameter(
                    f"embedding {name!r} must be a tensor of shape [n_vectors, dim], got "
                    f"{tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__}"
                )
            if part.shape[0] > CHUNK_LENGTH:
                raise InvalidParameter(
                    f"embedding {name!r} has {part.shape[0]} vectors; at most {CHUNK_LENGTH} fit a chunk"
                )
            per_encoder[k][name] = part.detach()
        if len({p.shape[0] for p in parts}) != 1:
            raise InvalidParameter(f"SDXL embedding {name!r} has different vector counts for clip_l and clip_g")
    return per_encoder


def _check_embedding_dims(run: _EncoderRun, family: str, k: int) -> None:
    dim = run.text_encoder.get_input_embeddings().weight.shape[1]
    for name, vectors in run.embeddings.items():
        if vectors.shape[1] != dim:
            which = ("clip_l", "clip_g")[k] if family == "sdxl" else "the text encoder"
            raise InvalidParameter(
                f"embedding {name!r} has vectors of size {vectors.shape[1]} but {which} needs {dim}; "
                "it was made for another model family"
            )


def _as_list(items, what: str) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidParameter(f"{what} must be a list of strings")
    return list(items)


def encode_prompts(
    *,
    tokenizers,
    text_encoders,
    family: str,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    clip_skip: int = 1,
    embeddings: Mapping[str, Any] | None = None,
    device=None,
) -> PromptEmbeds:
    """Encode a batch of prompts and negative prompts the way A1111 does.

    ``tokenizers`` / ``text_encoders``: one of each for ``family`` "sd1" / "sd2" (a bare object or
    a one-element sequence), two for "sdxl" (CLIPTextModel, CLIPTextModelWithProjection).
    ``prompts`` and ``negative_prompts`` have one string per image; LoRA tags must already be
    removed (:func:`extract_lora_tags`). ``clip_skip``: A1111's "Clip skip", 1 = last layer;
    for SDXL it is ignored, as in A1111 by default (SDXL always uses the penultimate layer).
    ``embeddings``: textual-inversion word -> ``[n, dim]`` tensor (SDXL: a ``(clip_l, clip_g)``
    pair or ``{"clip_l": ..., "clip_g": ...}``). ``device``: where token ids go (default: the
    text encoder's device).

    Padding, as A1111: within ``cond`` (and within ``uncond``) a shorter prompt repeats its last
    vector; between ``cond`` and ``uncond`` the shorter one gets encoded empty-prompt chunks. For
    SDXL an empty negative prompt gives zeros (A1111's and diffusers' default).
    """
    import torch

    # 1. Check inputs
    if family not in FAMILIES:
        raise InvalidParameter(f"model family {family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    n_encoders = 2 if family == "sdxl" else 1
    tokenizers = _as_components(tokenizers, n_encoders, "tokenizers", family)
    text_encoders = _as_components(text_encoders, n_encoders, "text_encoders", family)
    prompts = [validate_prompt(p) for p in _as_list(prompts, "prompts")]
    negative_prompts = [
        validate_prompt(p, what="negative prompt") for p in _as_list(negative_prompts, "negative_prompts")
    ]
    if not prompts:
        raise InvalidParameter("prompts must hold at least one prompt")
    if len(negative_prompts) != len(prompts):
        raise InvalidParameter(
            f"got {len(prompts)} prompts but {len(negative_prompts)} negative prompts; give one per prompt"
        )
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise InvalidParameter(f"clip_skip must be an integer, got {clip_skip!r}")
    if family != "sdxl":
        layers = _num_layers(text_encoders[0])
        if not 1 <= clip_skip <= layers:
            raise InvalidParameter(f"clip_skip must be between 1 and {layers} for this model, got {clip_skip}")
    elif clip_skip < 1:
        raise InvalidParameter(f"clip_skip must be at least 1, got {clip_skip}")
    per_encoder_embeddings = _normalise_embeddings(embeddings, family, n_encoders)

    runs = [
        _EncoderRun(
            tokenizer=tok,
            text_encoder=enc,
            layer="penultimate" if family == "sdxl" else "last",
            clip_skip=1 if family == "sdxl" else clip_skip,
            pooled=family == "sdxl" and k == 1,
            embeddings=per_encoder_embeddings[k],
            device=device,
        )
        for k, (tok, enc) in enumerate(zip(tokenizers, text_encoders, strict=True))
    ]
    for k, run in enumerate(runs):
        _check_embedding_dims(run, family, k)

    with torch.no_grad():
        # 2. Encode each distinct text once (A1111 caches identical prompts too)
        def encode_texts(texts: list[str]) -> dict[str, _Encoded]:
            unique = list(dict.fromkeys(texts))
            per_run = []
            for run in runs:
                chunked = [run.chunks(t) for t in unique]
                for text, chunks in zip(unique, chunked, strict=True):
                    if len(chunks) > MAX_CHUNKS:
                        raise InvalidParameter(
                            f"prompt is too long: {len(chunks)} chunks of {CHUNK_LENGTH} tokens "
                            f"(at most {MAX_CHUNKS}): {text[:60]!r}..."
                        )
                per_run.append(chunked)
            if len(runs) == 2:  # SDXL: both tokenizers must agree on chunk counts
                for p in range(len(unique)):
                    counts = [len(per_run[k][p]) for k in range(2)]
                    for k in range(2):
                        per_run[k][p] += [_empty_chunk(runs[k].info)] * (max(counts) - counts[k])
            encoded = [run.encode(chunked) for run, chunked in zip(runs, per_run, strict=True)]
            result = {}
            for p, text in enumerate(unique):
                parts = [encoded[k][p] for k in range(len(runs))]
                dtype = parts[-1].hidden.dtype  # diffusers casts SDXL states to text_encoder_2's dtype
                hidden = torch.cat([e.hidden.to(dtype) for e in parts], dim=-1)
                result[text] = _Encoded(hidden=hidden, pooled=parts[-1].pooled)
            return result

        cond_by_text = encode_texts(prompts)
        uncond_by_text = encode_texts(negative_prompts)

        if family == "sdxl":
            for text, enc in uncond_by_text.items():
                if text == "":
                    uncond_by_text[text] = _Encoded(
                        hidden=torch.zeros_like(enc.hidden), pooled=torch.zeros_like(enc.pooled)
                    )

        # 3. Stack each side, padding a shorter prompt with its last vector (A1111 stack_conds)
        cond = _stack([cond_by_text[p].hidden for p in prompts])
        uncond = _stack([uncond_by_text[p].hidden for p in negative_prompts])

        # 4. Pad the shorter side with encoded empty-prompt chunks (A1111 pad_cond_uncond)
        if cond.shape[1] != uncond.shape[1]:
            empty = encode_texts([""])[""].hidden
            if cond.shape[1] < uncond.shape[1]:
                cond = _pad_with(cond, empty, uncond.shape[1])
            else:
                uncond = _pad_with(uncond, empty, cond.shape[1])

        cond_pooled = uncond_pooled = None
        if family == "sdxl":
            cond_pooled = torch.stack([cond_by_text[p].pooled for p in prompts])
            uncond_pooled = torch.stack([uncond_by_text[p].pooled for p in negative_prompts])

    used = sorted(set().union(*(run.used for run in runs)))
    return PromptEmbeds(
        cond=cond, uncond=uncond, cond_pooled=cond_pooled, uncond_pooled=uncond_pooled,
        used_embeddings=tuple(used),
    )


def _as_components(value, n: int, what: str, family: str) -> list:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if len(items) != n or any(item is None for item in items):
        raise InvalidParameter(f"{family} needs {n} {what}, got {len(items)}")
    return items


def _stack(tensors: list) -> torch.Tensor:
    import torch

    longest = max(t.shape[0] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[0] < longest:
            t = torch.cat([t, t[-1:].repeat(longest - t.shape[0], 1)], dim=0)
        padded.append(t)
    return torch.stack(padded)


def _pad_with(batch, empty, length: int):
    import torch

    repeats = (length - batch.shape[1]) // empty.shape[0]
    filler = empty.unsqueeze(0).repeat(batch.shape[0], repeats, 1).to(batch)
    return torch.cat([batch, filler], dim=1)
