"""Tokenizing a long text by its head gives exactly the ids of tokenizing all of it (udfs/token_prefix.py)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from quadmix_udfs.onnx_transformer import Encoder
from quadmix_udfs.token_prefix import (
    WHITESPACE,
    SplitRule,
    head_boundary,
    split_rule,
    text_head,
    tokenize_heads,
    tokenizer_split_rule,
)
from tests.conftest import DATA
from tests.udfs.test_scorers import BERT_TOK, NEOX_TOK, web_texts

DROPS, KEEPS = SplitRule(WHITESPACE, False), SplitRule(WHITESPACE, True)


def truncating(path: str, max_length: int) -> Tokenizer:
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def full_ids(path: str, texts: list[str], max_length: int) -> list[list[int]]:
    return [e.ids for e in truncating(path, max_length).encode_batch(texts)]


def by_heads(path: str, texts: list[str], max_length: int, head: int) -> list[list[int]]:
    tok = truncating(path, max_length)
    normalize = tok.normalizer.normalize_str if tok.normalizer is not None else None
    return tokenize_heads(tok.encode_batch, texts, max_length, tokenizer_split_rule(path), head, normalize)


# every kind of character that can go wrong at a cut: ASCII and Unicode whitespace, characters normalizers
# remove or turn into spaces, combining marks, compatibility characters, CJK, contractions, special-token
# strings, words past BERT's 100-character limit
_WS = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u1680", "\u2003", "\u2028", "\u205f", "\u3000", "\x1c"]
_ODD = ["\u200b", "\ufeff", "\x00", "\ufffd", "\x7f", "\u00ad", "\u0301", "\u0308", "\u3099", "\u00a8", "\u00b4"]
_WORDS = ["word", "Tokenization", "naïve", "ﬁne", "Ⅻ", "½", "ｶﾞ", "가", "日本語のテキスト", "中文", "🙂🙃", "don't", "'s",
          "3.14159", "http://example.com/a?b=c", "[CLS]", "<|endoftext|>", "!!!", "—", "\u00a0\n\n", "\r\n"]


def awkward_texts(rng: random.Random, n: int, max_chars: int) -> list[str]:
    def piece() -> str:
        r = rng.random()
        if r < 0.3:
            return rng.choice(WHITESPACE) * rng.choice([1, 1, 2, 3])
        if r < 0.42:
            return rng.choice(_WS)
        if r < 0.52:
            return rng.choice(_ODD)
        if r < 0.97:
            return rng.choice(_WORDS)
        return rng.choice("aé中Q") * rng.randint(90, 120)

    out = []
    for _ in range(n):
        parts, size = [], rng.randint(0, max_chars)
        while sum(map(len, parts)) < size:
            parts.append(piece())
        out.append("".join(parts)[:size])
    return out


EDGE_CASES = [
    "a" * 10_000,  # no whitespace at all: tokenized whole
    "word " * 3_000,
    "x" * 100 + " " + "y" * 10_000,  # the only whitespace is early
    "漢字" * 3_000,  # CJK without spaces
    ("漢字" * 150 + "\n") * 20,
    ("abc " * 1_000) + "   \n\n  " + "def " * 1_000,
    ("Q" * 150 + " ") * 100,  # tokens of 151 characters: the head cannot fill max_length, the whole is used
    "\u00a0".join(["nbsp"] * 3_000),
    ("The cat sat on the mat. " * 200 + "\u00a0\n\n") * 5,
    "",
    "   ",
    "short text",
]


@pytest.mark.parametrize("path", [BERT_TOK, NEOX_TOK], ids=["bert", "neox"])
@pytest.mark.parametrize("max_length", [512, 64, 7])
def test_head_tokenization_equals_whole_text_tokenization(path, max_length):
    rng = random.Random(max_length)
    texts = web_texts(1_500) + EDGE_CASES + awkward_texts(rng, 300, 12 * max_length)
    enc = Encoder("unused.onnx", path, max_chars=20_000, max_length=max_length)
    assert enc.tokenize(texts) == full_ids(path, [t[:20_000] for t in texts], max_length)


@pytest.mark.parametrize("path", [BERT_TOK, NEOX_TOK], ids=["bert", "neox"])
def test_small_heads_fuzzed(path):
    """Short random texts cut by tiny heads, so that nearly every cut lands next to something awkward."""
    rng = random.Random(7)
    texts = awkward_texts(rng, 1_500, 60)
    for max_length in (1, 2, 3, 5, 8):
        expected = full_ids(path, texts, max_length)
        for head in (2, 5, 13, 40):
            assert by_heads(path, texts, max_length, head) == expected, (max_length, head)


def test_counterexamples_found_in_review(tmp_path):
    # byte-level BPE: a no-break space (whitespace to its pattern) before a newline forms one piece with it
    text = "The cat sat on the mat cat sat on the mat cat sat on the\xa0\n\nhttp://example.com/" + "x" * 130 + " more"
    for max_length, head in ((16, 128), (1, 2)):
        assert by_heads(NEOX_TOK, [text], max_length, head) == full_ids(NEOX_TOK, [text], max_length)
    assert by_heads(NEOX_TOK, ["\xa0\n\nb"], 1, 2) == full_ids(NEOX_TOK, ["\xa0\n\nb"], 1)
    # BERT's normalizer drops \x0b (a control character): "fo\x0bur" is the word "four", not "fo" + "ur"
    text = "one two three fo\x0bur five six seven eight nine ten eleven"
    for head in (17, 18, 24):
        assert by_heads(BERT_TOK, [text], 6, head) == full_ids(BERT_TOK, [text], 6)
    # a max_length below the special tokens truncates nothing: the head's ids are then not the whole's
    assert by_heads(BERT_TOK, ["z\r\rB\uff76\r\r"], 1, 2) == full_ids(BERT_TOK, ["z\r\rB\uff76\r\r"], 1)
    # Strip + Metaspace: the head must not end in whitespace the normalizer would strip
    vocab = {"▁": 0, "a": 1, "\t": 2, "a\t": 3, "▁a": 4, "b": 5, "▁b": 6}
    tok = Tokenizer(models.BPE(vocab, [("a", "\t"), ("▁", "a"), ("▁", "b")]))
    tok.normalizer, tok.pre_tokenizer = normalizers.Strip(), pre_tokenizers.Metaspace()
    path = str(tmp_path / "strip_metaspace.json")
    tok.save(path)
    assert tokenizer_split_rule(path) == SplitRule(" ", True)
    for text in ("a\t b", "a\xa0 b", "a\n b", "a\t\n b"):
        for max_length in (1, 2):
            assert by_heads(path, [text], max_length, len(text) - 1) == full_ids(path, [text], max_length), text
    # an added token with a space could span the cut: such tokenizers are not cut
    tok = Tokenizer.from_file(BERT_TOK)
    tok.add_tokens(["new york"])
    path = str(tmp_path / "added.json")
    tok.save(path)
    assert tokenizer_split_rule(path) is None
    assert by_heads(path, ["i love new york city"], 5, 11) == full_ids(path, ["i love new york city"], 5)


def test_the_head_is_what_gets_tokenized_and_the_whole_only_when_it_falls_short():
    tok = truncating(BERT_TOK, 16)
    calls: list[list[str]] = []

    def encode(texts, add_special_tokens=True):
        calls.append(list(texts))
        return tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    long_words = ("Q" * 110 + " ") * 40  # one [UNK] per 111 characters: the 128-character head gives 3 ids
    texts = ["plain words " * 500, long_words, "tiny"]
    ids = tokenize_heads(encode, texts, 16, DROPS, 128)
    assert len(calls) == 2
    assert len(calls[0][0]) < 128 and calls[0][0] == ("plain words " * 500)[: len(calls[0][0])]
    assert calls[0][2] == "tiny"
    assert calls[1] == [long_words]  # only the text whose head fell short is tokenized again, whole
    assert ids == full_ids(BERT_TOK, texts, 16)
    calls.clear()
    assert tokenize_heads(encode, texts, 16, None, 128) == ids and calls == [texts]  # unknown tokenizer: whole


def test_boundaries_follow_non_whitespace_before_and_after_normalization():
    assert head_boundary("ab  cd ef", 9, DROPS) == 6
    assert head_boundary("ab  cdef", 8, DROPS) == 2
    assert head_boundary("ab \n\t", 5, DROPS) == 2  # a run reaching the end
    assert head_boundary("abcdef", 6, DROPS) == -1
    assert head_boundary(" abc", 4, DROPS) == -1  # nothing before it
    assert head_boundary("ab\xa0 cd", 6, DROPS) == -1  # the no-break space before the space is whitespace
    assert head_boundary("ab cd\xa0 ef", 9, DROPS) == 2
    nfkc = normalizers.NFKC().normalize_str
    assert head_boundary("ab c\u00a8 d", 7, KEEPS, nfkc) == 5  # NFKC makes ¨ a space + a combining mark: fine
    assert head_boundary("ab c\u2474 d", 7, KEEPS, lambda s: s.replace("\u2474", " ")) == 2  # ends in a space there
    assert head_boundary(" x" * 20, 40, KEEPS, lambda s: s.replace("x", " ")) == -1  # gives up after MAX_TRIES
    assert text_head("one two three four", 10, DROPS) == "one two"
    assert text_head("one two", 10, DROPS) == "one two"  # not longer than the head: whole
    assert text_head("onetwothreefour", 10, DROPS) == "onetwothreefour"  # no boundary: whole
    assert text_head("a b", 2, SplitRule(" ", True)) == "a"


def test_only_tokenizers_known_to_split_at_whitespace_are_cut(tmp_path):
    assert tokenizer_split_rule(BERT_TOK) == DROPS
    assert tokenizer_split_rule(NEOX_TOK) == KEEPS
    bert = json.loads((DATA / "models" / "minilm_l6_v2" / "tokenizer.json").read_text())
    cases = {
        "split_regex": ({**bert, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed",
                                                    "invert": False}}, None),
        "replace_space": ({**bert, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}}, None),
        "replace_nbsp": ({**bert, "normalizer": {"type": "Replace", "pattern": {"String": "x"}, "content": "\xa0"}}, None),
        "precompiled": ({**bert, "normalizer": {"type": "Precompiled", "precompiled_charsmap": None}}, None),
        "replace_quotes": ({**bert, "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "``"}, "content": '"'}, {"type": "Lowercase"}]}}, DROPS),
        "metaspace": ({**bert, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                                  "split": True}}, SplitRule(" ", True)),
        "metaspace_unsplit": ({**bert, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "split": False}}, None),
        "bytelevel_no_regex": ({**bert, "pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}, None),
        "sequence": ({**bert, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "Digits", "individual_digits": True}]}}, DROPS),
        "no_pre_tokenizer": ({**bert, "pre_tokenizer": None}, None),
        "added_token_with_space": ({**bert, "added_tokens": [*bert["added_tokens"], {"id": 30522, "content": "new york"}]}, None),
    }
    for name, (config, expected) in cases.items():
        assert split_rule(config) == expected, name
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cases["split_regex"][0]))
    assert tokenizer_split_rule(str(path)) is None
    text = "some words " * 2_000
    enc = Encoder("unused.onnx", str(path), max_chars=20_000, max_length=32)
    assert enc.tokenize([text]) == full_ids(str(path), [text], 32)
