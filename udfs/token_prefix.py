"""Tokenize only the head of a long text, with the same ids as tokenizing all of it and truncating.

A transformer scorer keeps the first ``max_length`` tokens, but a Hugging Face tokenizer normalizes and splits
the whole text before it truncates: on web pages (3,200 characters on average, 512 tokens covering ~2,000)
most of the tokenizer's time went to text that is then thrown away. The encoder therefore tokenizes the first
``PREFIX_CHARS_PER_TOKEN * max_length`` characters, up to the start of their last whitespace run
(:func:`text_head`), and keeps that result when it fills ``max_length`` tokens, else tokenizes the whole text
again (rare: texts of very long tokens). :func:`tokenize_heads` does both steps for a batch.

Why that is exact: the tokenizers accepted here (:func:`split_characters`) split every text at whitespace
before their model runs, and their normalizers act on characters in place. The tokens of a text are then
the tokens of the text before a whitespace run followed by those of the rest, so when the part before the
run already has ``max_length`` tokens, the whole text truncated to ``max_length`` gives the same ids.
Tokenizers not known to behave so are never cut (the whole text is tokenized, as before).
"""

from __future__ import annotations

import json
from functools import lru_cache

from quadmix_udfs.model_cache import stamp

# 512 tokens of the shared web pages covered at most 3,494 characters (6.8 per token; p99 5.5)
PREFIX_CHARS_PER_TOKEN = 8

# whitespace every accepted normalizer keeps as whitespace (BERT's removes \x0b and \x0c as control characters)
WHITESPACE = " \t\n\r"

# pre-tokenizers that always split at these characters (as the text is after normalization)
_SPLIT_AT = {"BertPreTokenizer": WHITESPACE, "Whitespace": WHITESPACE, "WhitespaceSplit": WHITESPACE}
# normalizers that map characters (or canonical sequences, which never cross whitespace) in place
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Strip", "Prepend", "Nmt"}


def _normalizer_is_local(norm: dict | None) -> bool:
    if norm is None:
        return True
    kind = norm.get("type")
    if kind == "Sequence":
        return all(_normalizer_is_local(n) for n in norm.get("normalizers") or [])
    if kind == "Replace":  # a plain string pattern with no whitespace cannot reach across a whitespace run
        pattern = (norm.get("pattern") or {}).get("String")
        return isinstance(pattern, str) and bool(pattern) and not any(c in WHITESPACE for c in pattern + str(norm.get("content", "")))
    return kind in _LOCAL_NORMALIZERS


def _pre_tokenizer_splits(pre: dict | None) -> str | None:
    if pre is None:
        return None
    kind = pre.get("type")
    if kind in _SPLIT_AT:
        return _SPLIT_AT[kind]
    if kind == "ByteLevel" and pre.get("use_regex", True):  # GPT-2's pattern splits at every \s
        return WHITESPACE
    if kind == "Metaspace" and pre.get("split", True):  # splits at spaces only (turned into "▁")
        return " "
    if kind == "Sequence":  # later members only split further; the first sees the normalized text
        members = pre.get("pretokenizers") or []
        return _pre_tokenizer_splits(members[0]) if members else None
    return None


def split_characters(config: dict) -> str | None:
    """The whitespace characters a tokenizer (its ``tokenizer.json`` as a dict) always splits at, with a
    normalizer that keeps them in place; None when not known (then no text is cut early)."""
    if not _normalizer_is_local(config.get("normalizer")):
        return None
    return _pre_tokenizer_splits(config.get("pre_tokenizer"))


def tokenizer_split_characters(path: str) -> str | None:
    """:func:`split_characters` of a ``tokenizer.json`` file (once per file version and worker)."""
    return _split_characters(*stamp(path))


@lru_cache(maxsize=8)
def _split_characters(local: str, _size: int, _mtime: int) -> str | None:
    with open(local, encoding="utf-8") as f:
        return split_characters(json.load(f))


def last_run_start(text: str, end: int, chars: str) -> int:
    """Where the last run of ``chars`` in ``text[:end]`` starts, or -1 when there is none."""
    i = max(text.rfind(c, 0, end) for c in chars)
    while i > 0 and text[i - 1] in chars:
        i -= 1
    return i


def text_head(text: str, head: int, chars: str) -> str:
    """``text`` up to the start of the last whitespace run within its first ``head`` characters (``text``
    itself when it is not longer than ``head`` or has no such run)."""
    if len(text) <= head:
        return text
    boundary = last_run_start(text, head, chars)
    return text[:boundary] if boundary > 0 else text


def tokenize_heads(encode, texts: list[str], max_length: int, chars: str | None, head: int) -> list[list[int]]:
    """Ids of ``texts`` as ``encode`` (a tokenizer's batch encode, truncating to ``max_length``) gives them,
    each text tokenized by its head when the head fills ``max_length`` tokens, else whole."""
    if chars is None:
        return [e.ids for e in encode(texts, add_special_tokens=True)]
    heads = [text_head(t, head, chars) for t in texts]
    ids = [e.ids for e in encode(heads, add_special_tokens=True)]
    redo = [i for i, (t, h) in enumerate(zip(texts, heads)) if len(h) < len(t) and len(ids[i]) < max_length]
    if redo:
        for i, e in zip(redo, encode([texts[i] for i in redo], add_special_tokens=True)):
            ids[i] = e.ids
    return ids
