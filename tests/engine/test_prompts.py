"""Tests for malerei.engine.prompts and malerei.engine.tokenizer_builder.

Tiny random CLIP text encoders and a word-level CLIP tokenizer built offline stand in for the
real models; the stock diffusers pipelines' ``encode_prompt`` is the reference for plain prompts.
"""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from malerei.engine.errors import InvalidParameter
from malerei.engine.prompts import (
    CHUNK_LENGTH,
    MAX_CHUNKS,
    MAX_PROMPT_CHARS,
    encode_prompts,
    extract_lora_tags,
    parse_prompt_attention,
    tokenize_prompt,
)
from malerei.engine.tokenizer_builder import build_word_clip_tokenizer

WORDS = (
    "a photo of cat dog red blue green circle square the on big small house hill sun sky "
    "painting drawing bright dark"
).split()


# ------------------------------------------------------------------------------------------
# fixtures: tokenizers and tiny text encoders
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_clip_tokenizer(WORDS, tmp_path_factory.mktemp("tok1"))


@pytest.fixture(scope="module")
def tok_pad(tmp_path_factory):
    """SD2 / SDXL second tokenizer: pad token '!' (id 0) instead of EOS."""
    return build_word_clip_tokenizer(WORDS, tmp_path_factory.mktemp("tok2"), pad_token="!")


def _config(tokenizer, hidden=32, layers=2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=24,
    )


@pytest.fixture(scope="module")
def te(tok):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(_config(tok, layers=3)).eval()
    # Like a trained CLIP, let the final layer norm have a bias, so hidden states do not average
    # to exactly zero (A1111's emphasis divides by the mean).
    with torch.no_grad():
        model.final_layer_norm.bias.normal_(0.3, 0.1)
    return model


@pytest.fixture(scope="module")
def te_l(tok):
    from transformers import CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(_config(tok, hidden=32)).eval()


@pytest.fixture(scope="module")
def te_g(tok_pad):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(2)
    return CLIPTextModelWithProjection(_config(tok_pad, hidden=48)).eval()


@pytest.fixture(scope="module")
def sd_pipe(tok, te):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=tok, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sdxl_pipe(tok, tok_pad, te_l, te_g):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=None, text_encoder=te_l, text_encoder_2=te_g, tokenizer=tok, tokenizer_2=tok_pad,
        unet=None, scheduler=None,
    )


def sd1(tok, te, prompts, negs, **kw):
    return encode_prompts(tokenizers=tok, text_encoders=te, family="sd1", prompts=prompts,
                          negative_prompts=negs, **kw)


def sdxl(tok, tok_pad, te_l, te_g, prompts, negs, **kw):
    return encode_prompts(tokenizers=[tok, tok_pad], text_encoders=[te_l, te_g], family="sdxl",
                          prompts=prompts, negative_prompts=negs, **kw)


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------
# parse_prompt_attention: A1111's docstring examples (all of them) and edge cases
# ------------------------------------------------------------------------------------------

A1111_DOCSTRING_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCSTRING_EXAMPLES)
def test_parse_matches_a1111_docstring(text, expected):
    # exact float equality: A1111's results come from the same multiplication order
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("((a))", [("a", 1.1 * 1.1)]),
        ("[[a]]", [("a", (1 / 1.1) * (1 / 1.1))]),
        ("[a", [("a", 1 / 1.1)]),
        ("(a:1.5)", [("a", 1.5)]),
        ("(a: 1.5 )", [("a", 1.5)]),
        ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),
        ("(a:.5)", [("a", 0.5)]),
        ("((a:2))", [("a", 2 * 1.1)]),
        ("a) b", [("a) b", 1.0)]),  # a closing bracket without an opener is text
        ("a] b", [("a] b", 1.0)]),
        ("a:2) b", [("a:2) b", 1.0)]),  # a weight without an open bracket is text
        ("a:b", [("a:b", 1.0)]),
        ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # explicit weights only close round brackets
        ("\\\\", [("\\", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash disappears, as in A1111
        ("\\(a\\)", [("(a)", 1.0)]),
        ("(a)(b)", [("ab", 1.1)]),  # equal neighbours merge
        ("(a)[b]", [("a", 1.1), ("b", 1 / 1.1)]),
    ],
)
def test_parse_edge_cases(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_break():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("BREAK") == [("", 1.0), ("BREAK", -1.0), ("", 1.0)]
    # BREAK must be a whole word and upper case
    assert parse_prompt_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]
    # inside brackets A1111 multiplies the marker too, so it is no longer a break
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "(a:-1..2)"])
def test_parse_bad_weight_raises(text):
    with pytest.raises(InvalidParameter, match="not a number"):
        parse_prompt_attention(text)


def test_parse_rejects_non_string():
    with pytest.raises(InvalidParameter, match="string"):
        parse_prompt_attention(None)


# ------------------------------------------------------------------------------------------
# extract_lora_tags
# ------------------------------------------------------------------------------------------


def test_lora_tags_removed_and_listed():
    text, loras = extract_lora_tags("a cat, <lora:add_detail:0.8>, <lora:style> <lyco:hada:-0.25>")
    assert text == "a cat, ,  "
    assert loras == [("add_detail", 0.8), ("style", 1.0), ("hada", -0.25)]


def test_lora_tags_whitespace_and_other_tags():
    text, loras = extract_lora_tags("<lora: my lora v2 : 1.5 >x <hypernet:h:1> <embedding>")
    assert loras == [("my lora v2", 1.5)]
    assert text == "x <hypernet:h:1> <embedding>"


def test_lora_tags_none():
    assert extract_lora_tags("plain (prompt)") == ("plain (prompt)", [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<lora:x:abc>", "not a number"),
        ("<lora:x:nan>", "not a number"),
        ("<lora:x:>", "not a number"),
        ("<lora: :0.5>", "no LoRA name"),
        ("<lora:x:0.5:0.7>", "2 weights"),
    ],
)
def test_lora_tags_malformed(text, message):
    with pytest.raises(InvalidParameter, match=message):
        extract_lora_tags(text)


# ------------------------------------------------------------------------------------------
# tokenizer_builder
# ------------------------------------------------------------------------------------------


def test_builder_known_words_are_single_tokens(tok):
    vocab = tok.get_vocab()
    for word in WORDS:
        assert ids_of(tok, word) == [vocab[word + "</w>"]]


def test_builder_lowercases_and_splits_unknown_words(tok):
    vocab = tok.get_vocab()
    assert ids_of(tok, "A RED Cat") == ids_of(tok, "a red cat")
    zebra = ids_of(tok, "zebra")
    # an unknown word falls apart into characters (or pieces of known words)
    assert len(zebra) > 1 and vocab["z"] in zebra
    assert "".join(tok.convert_ids_to_tokens(zebra)) == "zebra</w>"
    assert tok.decode(zebra) == "zebra"
    # bytes outside ASCII still tokenize (byte-level symbols)
    assert len(ids_of(tok, "café ü 猫")) > 0


def test_builder_files_and_special_tokens(tmp_path, tok):
    from transformers import CLIPTokenizer

    t = build_word_clip_tokenizer(["Hello", "world", "don't"], tmp_path / "t")
    vocab = json.loads((tmp_path / "t" / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "t" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    assert "hello</w>" in vocab and "Hello</w>" not in vocab
    again = CLIPTokenizer.from_pretrained(str(tmp_path / "t"), local_files_only=True)
    assert again("hello world")["input_ids"] == t("hello world")["input_ids"]
    assert again.model_max_length == 77
    assert t.pad_token_id == t.eos_token_id
    assert t("hello", padding="max_length", max_length=77)["input_ids"][-1] == t.eos_token_id


def test_builder_pad_token_option(tok_pad):
    assert tok_pad.pad_token == "!" and tok_pad.pad_token_id == 0


# ------------------------------------------------------------------------------------------
# tokenize_prompt: A1111 chunking
# ------------------------------------------------------------------------------------------


def test_chunk_short_prompt(tok):
    (chunk,) = tokenize_prompt("a red cat", tok)
    body = ids_of(tok, "a red cat")
    assert chunk.tokens == [tok.bos_token_id, *body] + [tok.eos_token_id] * (76 - len(body))
    assert chunk.weights == [1.0] * 77
    assert len(chunk.tokens) == 77


def test_chunk_weights_follow_emphasis(tok):
    (chunk,) = tokenize_prompt("a (red:1.5) [cat]", tok)
    assert chunk.weights[:4] == [1.0, 1.0, 1.5, 1 / 1.1]
    assert chunk.weights[4:] == [1.0] * 73


def test_chunk_exactly_75_tokens_is_one_chunk(tok):
    assert len(tokenize_prompt(" ".join(["cat"] * 75), tok)) == 1
    chunks = tokenize_prompt(" ".join(["cat"] * 76), tok)
    assert len(chunks) == 2
    cat = ids_of(tok, "cat")[0]
    assert chunks[0].tokens[1:76] == [cat] * 75
    assert chunks[1].tokens[1] == cat and chunks[1].tokens[2] == tok.eos_token_id


def test_chunk_comma_backtrack_moves_words_after_last_comma(tok):
    cat, dog, comma = ids_of(tok, "cat")[0], ids_of(tok, "dog")[0], tok.get_vocab()[",</w>"]
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = tokenize_prompt(prompt, tok)
    # 70 cats and the comma stay; the dogs after the comma start the next chunk
    assert first.tokens[1:72] == [cat] * 70 + [comma]
    assert first.tokens[72:] == [tok.eos_token_id] * 5
    assert second.tokens[1:11] == [dog] * 10


def test_chunk_comma_too_far_back_splits_hard(tok):
    cat, dog = ids_of(tok, "cat")[0], ids_of(tok, "dog")[0]
    prompt = " ".join(["cat"] * 10) + ", " + " ".join(["dog"] * 80)
    first, second = tokenize_prompt(prompt, tok)
    assert first.tokens[76] == tok.eos_token_id and first.tokens[75] == dog  # full chunk
    assert second.tokens[1:17] == [dog] * 16
    assert tokenize_prompt(prompt, tok, comma_padding_backtrack=0)[0].tokens == first.tokens


def test_chunk_break(tok):
    chunks = tokenize_prompt("a cat BREAK a dog", tok)
    assert len(chunks) == 2
    assert chunks[0].tokens[1:3] == ids_of(tok, "a cat")
    assert chunks[0].tokens[3:] == [tok.eos_token_id] * 74
    assert chunks[1].tokens[1:3] == ids_of(tok, "a dog")
    # BREAK at the start gives an empty first chunk, as in A1111
    lead = tokenize_prompt("BREAK cat", tok)
    assert len(lead) == 2 and lead[0].tokens[1] == tok.eos_token_id
    # a BREAK inside brackets is weighted text, not a break
    assert len(tokenize_prompt("(a BREAK b)", tok)) == 1


def test_chunk_sd2_pad_after_first_eos(tok_pad):
    (chunk,) = tokenize_prompt("a cat", tok_pad)
    assert chunk.tokens[:4] == [tok_pad.bos_token_id, *ids_of(tok_pad, "a cat"), tok_pad.eos_token_id]
    assert chunk.tokens[4:] == [0] * 73


def test_chunk_embedding_placeholders(tok):
    chunks = tokenize_prompt("a Fancy-Style cat", tok, embedding_sizes={"fancy-style": 3})
    (chunk,) = chunks
    a, cat = ids_of(tok, "a")[0], ids_of(tok, "cat")[0]
    assert chunk.tokens[:6] == [tok.bos_token_id, a, 0, 0, 0, cat]
    assert chunk.fixes == [(2, "fancy-style")]


def test_chunk_comma_backtrack_moves_embedding_with_its_words(tok):
    prompt = " ".join(["cat"] * 70) + ", dog emb " + " ".join(["dog"] * 10)
    first, second = tokenize_prompt(prompt, tok, embedding_sizes={"emb": 2})
    assert first.fixes == [] and first.tokens[72:] == [tok.eos_token_id] * 5
    assert second.fixes == [(2, "emb")] and second.tokens[2:4] == [0, 0]


def test_chunk_embedding_never_straddles_chunks(tok):
    prompt = " ".join(["cat"] * 74) + " emb"
    first, second = tokenize_prompt(prompt, tok, embedding_sizes={"emb": 4})
    assert first.fixes == [] and first.tokens[75] == tok.eos_token_id
    assert second.fixes == [(1, "emb")] and second.tokens[1:5] == [0, 0, 0, 0]


# ------------------------------------------------------------------------------------------
# encode_prompts against stock diffusers (bit-identical for plain prompts)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["a red cat", "", "A photo of a BIG house, on the hill", "zebra crossing"])
def test_sd1_plain_prompt_bit_identical_to_diffusers(sd_pipe, tok, te, prompt):
    ref, ref_neg = sd_pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt="blue dog")
    out = sd1(tok, te, [prompt], ["blue dog"])
    assert out.cond.shape == (1, 77, 32)
    assert torch.equal(out.cond, ref)
    assert torch.equal(out.uncond, ref_neg)
    assert out.cond_pooled is None and out.uncond_pooled is None


def test_sd1_batch_bit_identical_to_diffusers(sd_pipe, tok, te):
    prompts, negs = ["a red cat", "a blue dog on the hill"], ["dark", ""]
    ref, ref_neg = sd_pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negs)
    out = sd1(tok, te, prompts, negs)
    assert torch.equal(out.cond, ref) and torch.equal(out.uncond, ref_neg)


def test_sd2_pad_token_bit_identical_to_diffusers(tok_pad, te):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=tok_pad, unet=None, scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ref, ref_neg = pipe.encode_prompt("a small green square", "cpu", 1, True, negative_prompt="")
    out = encode_prompts(tokenizers=[tok_pad], text_encoders=[te], family="sd2",
                         prompts=["a small green square"], negative_prompts=[""])
    assert torch.equal(out.cond, ref) and torch.equal(out.uncond, ref_neg)


@pytest.mark.parametrize("prompt", ["a red cat", "the sun on a bright sky, painting"])
def test_sdxl_plain_prompt_bit_identical_to_diffusers(sdxl_pipe, tok, tok_pad, te_l, te_g, prompt):
    ref, ref_neg, ref_pooled, ref_neg_pooled = sdxl_pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="dark drawing"
    )
    out = sdxl(tok, tok_pad, te_l, te_g, [prompt], ["dark drawing"])
    assert out.cond.shape == (1, 77, 32 + 48) and out.cond_pooled.shape == (1, 24)
    assert torch.equal(out.cond, ref)
    assert torch.equal(out.cond_pooled, ref_pooled)
    assert torch.equal(out.uncond, ref_neg)
    assert torch.equal(out.uncond_pooled, ref_neg_pooled)


def test_sdxl_empty_negative_is_zero_like_diffusers_default(sdxl_pipe, tok, tok_pad, te_l, te_g):
    _, ref_neg, _, ref_neg_pooled = sdxl_pipe.encode_prompt(
        "a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    out = sdxl(tok, tok_pad, te_l, te_g, ["a cat", "a dog"], ["", "dark"])
    assert torch.equal(out.uncond[0], ref_neg[0]) and torch.equal(out.uncond_pooled[0], ref_neg_pooled[0])
    assert not torch.any(out.uncond[0]) and torch.any(out.uncond[1])


def test_sdxl_clip_skip_is_ignored_as_in_a1111(tok, tok_pad, te_l, te_g):
    a = sdxl(tok, tok_pad, te_l, te_g, ["a cat"], ["dog"])
    b = sdxl(tok, tok_pad, te_l, te_g, ["a cat"], ["dog"], clip_skip=2)
    assert torch.equal(a.cond, b.cond)


def test_half_precision_encoder(tok, te):
    """bf16 encoder: output keeps its dtype; emphasis runs in float32 as A1111's multipliers do."""
    half = copy.deepcopy(te).to(torch.bfloat16)
    ref = sd1(tok, te, ["a (red:1.3) cat"], ["dog"])
    out = sd1(tok, half, ["a (red:1.3) cat"], ["dog"])
    assert out.cond.dtype == out.uncond.dtype == torch.bfloat16
    assert torch.allclose(out.cond.float(), ref.cond, atol=0.1)
    assert torch.isfinite(out.cond.float()).all()


# ------------------------------------------------------------------------------------------
# encode_prompts: clip skip, emphasis, chunks, padding
# ------------------------------------------------------------------------------------------


def _ref_hidden(tok, te, text, layer=None):
    ids = torch.tensor([tok(text, padding="max_length", max_length=77)["input_ids"]])
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    if layer is None:
        return out.last_hidden_state[0]
    return te.final_layer_norm(out.hidden_states[layer])[0]


def test_clip_skip_uses_earlier_layer_with_final_norm(tok, te):
    for clip_skip in (2, 3):
        out = sd1(tok, te, ["a red cat"], [""], clip_skip=clip_skip)
        assert torch.equal(out.cond[0], _ref_hidden(tok, te, "a red cat", layer=-clip_skip))
    assert not torch.equal(sd1(tok, te, ["a red cat"], [""], clip_skip=2).cond, sd1(tok, te, ["a red cat"], [""]).cond)


def test_emphasis_scales_tokens_and_restores_mean(tok, te):
    out = sd1(tok, te, ["a (red:1.5) [cat]"], [""])
    z = _ref_hidden(tok, te, "a red cat")
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    assert torch.allclose(out.cond[0], expected, atol=1e-6, rtol=0)
    assert torch.allclose(out.cond[0].mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(out.cond[0], z)
    # a weight of exactly 1 is the plain prompt
    assert torch.equal(sd1(tok, te, ["a (red:1.0) cat"], [""]).cond, sd1(tok, te, ["a red cat"], [""]).cond)


def test_two_chunks_concatenate_to_154(tok, te):
    prompt = " ".join(["cat"] * 80)
    out = sd1(tok, te, [prompt], ["dog"])
    assert out.cond.shape == (1, 154, 32) and out.uncond.shape == (1, 154, 32)
    assert torch.equal(out.cond[0, :77], _ref_hidden(tok, te, " ".join(["cat"] * 75)))
    assert torch.equal(out.cond[0, 77:], _ref_hidden(tok, te, " ".join(["cat"] * 5)))
    # uncond is padded with the encoded empty prompt (A1111 pad_cond_uncond)
    assert torch.equal(out.uncond[0, :77], _ref_hidden(tok, te, "dog"))
    assert torch.equal(out.uncond[0, 77:], _ref_hidden(tok, te, ""))


def test_break_makes_two_chunks(tok, te):
    out = sd1(tok, te, ["a cat BREAK a dog"], [""])
    assert out.cond.shape == (1, 154, 32)
    assert torch.equal(out.cond[0, 77:], _ref_hidden(tok, te, "a dog"))


def test_longer_negative_pads_cond(tok, te):
    out = sd1(tok, te, ["cat"], ["dog BREAK red BREAK blue"])
    assert out.cond.shape == out.uncond.shape == (1, 231, 32)
    assert torch.equal(out.cond[0, 77:154], _ref_hidden(tok, te, ""))
    assert torch.equal(out.cond[0, 154:], _ref_hidden(tok, te, ""))


def test_batch_shorter_prompt_repeats_last_vector(tok, te):
    out = sd1(tok, te, ["cat BREAK dog", "red"], ["", ""])
    assert out.cond.shape == (2, 154, 32)
    short = _ref_hidden(tok, te, "red")
    assert torch.equal(out.cond[1, :77], short)
    assert torch.equal(out.cond[1, 77:], short[-1:].repeat(77, 1))


def test_sdxl_multi_chunk_pooled_from_first_chunk(tok, tok_pad, te_l, te_g):
    out = sdxl(tok, tok_pad, te_l, te_g, ["a red cat BREAK a dog"], ["big"])
    first = sdxl(tok, tok_pad, te_l, te_g, ["a red cat"], ["big"])
    assert out.cond.shape == (1, 154, 80) and out.uncond.shape == (1, 154, 80)
    assert torch.equal(out.cond_pooled, first.cond_pooled)
    assert torch.equal(out.cond[:, :77], first.cond)


# ------------------------------------------------------------------------------------------
# textual inversion
# ------------------------------------------------------------------------------------------


def _reference_with_vectors(tok, te, words_before, vectors, words_after):
    """Reference: a copy of the encoder with the vectors appended as new rows of its table."""
    ref = copy.deepcopy(te)
    n_old = ref.get_input_embeddings().weight.shape[0]
    ref.resize_token_embeddings(n_old + vectors.shape[0])
    with torch.no_grad():
        ref.get_input_embeddings().weight[n_old:] = vectors
    body = ids_of(tok, words_before) + list(range(n_old, n_old + vectors.shape[0])) + ids_of(tok, words_after)
    ids = [tok.bos_token_id, *body] + [tok.eos_token_id] * (76 - len(body))
    with torch.no_grad():
        return ref(torch.tensor([ids])).last_hidden_state


def test_embedding_word_replaced_by_vectors(tok, te):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    out = sd1(tok, te, ["a myStyle cat"], [""], embeddings={"mystyle": vectors})
    assert torch.equal(out.cond, _reference_with_vectors(tok, te, "a", vectors, "cat"))
    assert out.used_embeddings == ("mystyle",)


def test_embedding_does_not_leak(tok, te, sd_pipe):
    vocab_size = len(tok)
    table = te.get_input_embeddings().weight.clone()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(6))
    sd1(tok, te, ["a mystyle cat"], [""], embeddings={"mystyle": vectors})
    # later calls without the embedding see the plain word; nothing shared was changed
    assert len(tok) == vocab_size
    assert torch.equal(te.get_input_embeddings().weight, table)
    plain = sd1(tok, te, ["a mystyle cat"], [""])
    ref, _ = sd_pipe.encode_prompt("a mystyle cat", "cpu", 1, True, negative_prompt="")
    assert torch.equal(plain.cond, ref)
    assert plain.used_embeddings == ()


def test_embedding_threads_do_not_see_each_other(tok, te):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    with_emb = sd1(tok, te, ["a mystyle cat"], [""], embeddings={"mystyle": vectors}).cond
    without = sd1(tok, te, ["a mystyle cat"], [""]).cond
    assert not torch.equal(with_emb, without)
    barrier = threading.Barrier(4)

    def job(i):
        barrier.wait()
        results = []
        for _ in range(5):
            emb = {"mystyle": vectors} if i % 2 == 0 else None
            results.append(sd1(tok, te, ["a mystyle cat"], [""], embeddings=emb).cond)
        return i, results

    with ThreadPoolExecutor(4) as pool:
        for i, results in pool.map(job, range(4)):
            expected = with_emb if i % 2 == 0 else without
            assert all(torch.equal(r, expected) for r in results)


def test_embedding_sdxl_pair_and_weight(tok, tok_pad, te_l, te_g):
    g = torch.Generator().manual_seed(8)
    pair = (torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g))
    out = sdxl(tok, tok_pad, te_l, te_g, ["a (mystyle:1.2) cat"], [""], embeddings={"mystyle": pair})
    as_dict = sdxl(tok, tok_pad, te_l, te_g, ["a (mystyle:1.2) cat"], [""],
                   embeddings={"mystyle": {"clip_l": pair[0], "clip_g": pair[1]}})
    plain = sdxl(tok, tok_pad, te_l, te_g, ["a (mystyle:1.2) cat"], [""])
    assert torch.equal(out.cond, as_dict.cond)
    assert not torch.equal(out.cond, plain.cond)
    assert out.cond.shape == plain.cond.shape


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        ({"x": torch.zeros(2, 16)}, "size 16"),
        ({"x": torch.zeros(32)}, "shape"),
        ({"x": torch.zeros(76, 32)}, "at most 75"),
        ({"": torch.zeros(1, 32)}, "non-empty"),
    ],
)
def test_embedding_validation(tok, te, embeddings, message):
    with pytest.raises(InvalidParameter, match=message):
        sd1(tok, te, ["x"], [""], embeddings=embeddings)


def test_sdxl_embedding_needs_pair(tok, tok_pad, te_l, te_g):
    with pytest.raises(InvalidParameter, match="pair"):
        sdxl(tok, tok_pad, te_l, te_g, ["x"], [""], embeddings={"x": torch.zeros(1, 32)})


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def test_rejects_non_string_prompt(tok, te):
    with pytest.raises(InvalidParameter, match="prompt must be a string"):
        sd1(tok, te, [42], [""])
    with pytest.raises(InvalidParameter, match="negative prompt must be a string"):
        sd1(tok, te, ["a"], [None])
    with pytest.raises(InvalidParameter, match="list of strings"):
        sd1(tok, te, "a cat", [""])


def test_rejects_too_long_prompts(tok, te):
    with pytest.raises(InvalidParameter, match=f"at most {MAX_PROMPT_CHARS}"):
        sd1(tok, te, ["a" * (MAX_PROMPT_CHARS + 1)], [""])
    too_many_chunks = " BREAK ".join(["cat"] * (MAX_CHUNKS + 1))
    with pytest.raises(InvalidParameter, match=f"{MAX_CHUNKS + 1} chunks of {CHUNK_LENGTH} tokens"):
        sd1(tok, te, [too_many_chunks], [""])
    # exactly MAX_CHUNKS chunks is fine
    ok = " BREAK ".join(["cat"] * MAX_CHUNKS)
    assert sd1(tok, te, [ok], [""]).cond.shape[1] == 77 * MAX_CHUNKS


def test_rejects_bad_arguments(tok, te):
    with pytest.raises(InvalidParameter, match="family"):
        encode_prompts(tokenizers=tok, text_encoders=te, family="sd3", prompts=["a"], negative_prompts=[""])
    with pytest.raises(InvalidParameter, match="2 prompts but 1 negative"):
        sd1(tok, te, ["a", "b"], [""])
    with pytest.raises(InvalidParameter, match="between 1 and 3"):
        sd1(tok, te, ["a"], [""], clip_skip=4)
    with pytest.raises(InvalidParameter, match="clip_skip must be an integer"):
        sd1(tok, te, ["a"], [""], clip_skip=1.5)
    with pytest.raises(InvalidParameter, match="sdxl needs 2"):
        encode_prompts(tokenizers=tok, text_encoders=te, family="sdxl", prompts=["a"], negative_prompts=[""])
    with pytest.raises(InvalidParameter, match="at least one"):
        sd1(tok, te, [], [])
