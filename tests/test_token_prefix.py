"""Tokenizing a long text by its head gives exactly the ids of tokenizing all of it (udfs/token_prefix.py)."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer

from quadmix_udfs.onnx_transformer import Encoder
from quadmix_udfs.token_prefix import (
    WHITESPACE,
    last_run_start,
    split_characters,
    text_head,
    tokenize_heads,
    tokenizer_split_characters,
)
from tests.conftest import DATA
from tests.test_scorers import BERT_TOK, NEOX_TOK, web_texts


def full_ids(path: str, texts: list[str], max_length: int) -> list[list[int]]:
    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(texts)]


def awkward_texts(rng: random.Random, n: int, max_chars: int) -> list[str]:
    """Texts mixing what can go wrong at a cut: whitespace runs of every kind, words far longer than a token
    (BERT makes a 100+ character word one [UNK]), unspaced CJK, emoji, non-breaking spaces, digits."""
    pieces = ["word", "Tokenization", "don't", "3.14159", "e-mail", "日本語のテキスト", "中文", "🙂🙃", "naïve",
              "\u00a0", "  ", "\n\n", "\t", " \r\n ", "\x0b", "\x0c", "\u3000", "!!!", "http://example.com/a?b=c", "Q" * 150, "ab" * 40]
    out = []
    for _ in range(n):
        parts, size = [], rng.randint(0, max_chars)
        while sum(map(len, parts)) < size:
            parts.append(rng.choice(pieces))
            parts.append(rng.choice([" ", " ", "", "\n", "  \n  "]))
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


def test_characters_a_normalizer_removes_are_not_boundaries():
    """BERT's normalizer drops \\x0b (a control character): "fo\\x0bur" is the word "four", not "fo" + "ur"."""
    text = "one two three fo\x0bur five six seven eight nine ten eleven"
    tok = Tokenizer.from_file(BERT_TOK)
    tok.no_padding()
    tok.enable_truncation(6)
    assert tok.encode(text).tokens[4] == "four"
    for head in (17, 18, 24):  # heads ending at, just after and past the control character
        assert tokenize_heads(tok.encode_batch, [text], 6, WHITESPACE, head) == [tok.encode(text).ids]


def test_the_head_is_what_gets_tokenized_and_the_whole_only_when_it_falls_short():
    tok = Tokenizer.from_file(BERT_TOK)
    tok.no_padding()
    tok.enable_truncation(16)
    calls: list[list[str]] = []

    def encode(texts, add_special_tokens=True):
        calls.append(list(texts))
        return tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    long_words = ("Q" * 110 + " ") * 40  # one [UNK] per 111 characters: the 128-character head gives 3 ids
    texts = ["plain words " * 500, long_words, "tiny"]
    ids = tokenize_heads(encode, texts, 16, WHITESPACE, 128)
    assert len(calls) == 2
    assert len(calls[0][0]) < 128 and calls[0][0] == ("plain words " * 500)[: len(calls[0][0])]
    assert calls[0][2] == "tiny"
    assert calls[1] == [long_words]  # only the text whose head fell short is tokenized again, whole
    assert ids == full_ids(BERT_TOK, texts, 16)
    calls.clear()
    assert tokenize_heads(encode, texts, 16, None, 128) == ids and calls == [texts]  # unknown tokenizer: whole


def test_last_whitespace_run_and_text_head():
    assert last_run_start("ab  cd ef", 9, WHITESPACE) == 6
    assert last_run_start("ab  cdef", 8, WHITESPACE) == 2
    assert last_run_start("ab \n\t", 5, WHITESPACE) == 2  # a run reaching the end
    assert last_run_start("abcdef", 6, WHITESPACE) == -1
    assert last_run_start(" abc", 4, WHITESPACE) == 0
    assert text_head("one two three four", 10, WHITESPACE) == "one two"
    assert text_head("one two", 10, WHITESPACE) == "one two"  # not longer than the head: whole
    assert text_head("onetwothreefour", 10, WHITESPACE) == "onetwothreefour"  # no whitespace: whole
    assert text_head("a b", 2, " ") == "a"


def test_only_tokenizers_known_to_split_at_whitespace_are_cut(tmp_path):
    assert tokenizer_split_characters(BERT_TOK) == WHITESPACE
    assert tokenizer_split_characters(NEOX_TOK) == WHITESPACE
    bert = json.loads((DATA / "models" / "minilm_l6_v2" / "tokenizer.json").read_text())
    cases = {
        "split_regex": ({**bert, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "Removed",
                                                    "invert": False}}, None),
        "replace_space": ({**bert, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}}, None),
        "precompiled": ({**bert, "normalizer": {"type": "Precompiled", "precompiled_charsmap": None}}, None),
        "replace_quotes": ({**bert, "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "``"}, "content": '"'}, {"type": "Lowercase"}]}}, WHITESPACE),
        "metaspace": ({**bert, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                                                  "split": True}}, " "),
        "metaspace_unsplit": ({**bert, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "split": False}}, None),
        "bytelevel_no_regex": ({**bert, "pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}, None),
        "sequence": ({**bert, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"}, {"type": "Digits", "individual_digits": True}]}}, WHITESPACE),
        "no_pre_tokenizer": ({**bert, "pre_tokenizer": None}, None),
    }
    for name, (config, expected) in cases.items():
        assert split_characters(config) == expected, name
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cases["split_regex"][0]))
    assert tokenizer_split_characters(str(path)) is None
    text = "some words " * 2_000
    enc = Encoder("unused.onnx", str(path), max_chars=20_000, max_length=32)
    assert enc.tokenize([text]) == full_ids(str(path), [text], 32)
