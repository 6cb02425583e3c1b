"""Tokenize only the head of a long text, with the same ids as tokenizing all of it and truncating.

A transformer scorer keeps the first ``max_length`` tokens, but a Hugging Face tokenizer normalizes and splits
the whole text before it truncates: on web pages (3,200 characters on average, 512 tokens covering ~2,000)
most of the tokenizer's time went to text that is then thrown away. The encoder therefore tokenizes the text
up to a *boundary* inside its first ``PREFIX_CHARS_PER_TOKEN * max_length`` characters (:func:`head_boundary`)
and keeps that result when it has exactly ``max_length`` ids, else tokenizes the whole text again (rare: texts
of very long tokens). :func:`tokenize_heads` does both steps for a batch.

A boundary is a character the pre-tokenizer always splits at (:class:`SplitRule`: space, tab, newline or
carriage return; a space only for ``Metaspace``) whose preceding character is not whitespace, before or after
normalization. Why that is exact, for the configurations :func:`split_rule` accepts:
- their normalizers map characters in place (a control character removed, a letter lowercased or composed,
  whitespace turned into a space) and never join characters across whitespace; ``Strip`` and ``Prepend`` act
  on the ends, and the head ends in non-whitespace, so they treat its end as the whole text's middle;
- their pre-tokenizers cut the normalized text between that non-whitespace character and the whitespace after
  it (BERT, ``Whitespace`` drop the whitespace; GPT-2's byte-level pattern and ``Metaspace`` attach it to
  what follows), so the pieces before the boundary are the same whatever follows it;
- no added token mixes whitespace and other characters (GPT-NeoX's runs of spaces start at or after the
  boundary, never before it), so none spans the boundary.
The model tokenizes each piece on its own, so the head's ids are the whole text's first ids; with truncation
to ``max_length`` (more than the special tokens), a head that already gives ``max_length`` ids gives the
whole text's. Tokenizers not known to behave so are never cut (the whole text is tokenized, as before).
A review found the counterexamples the tests keep (a no-break space before a newline under byte-level BPE,
``Strip`` with ``Metaspace``, added tokens with spaces, ``max_length`` below the special tokens).
"""


from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from quadmix_udfs.model_cache import stamp

# 512 tokens of the shared web pages covered at most 3,494 characters (6.8 per token; p99 5.5)
PREFIX_CHARS_PER_TOKEN = 8

# whitespace every accepted normalizer keeps as whitespace (BERT's removes \x0b and \x0c as control characters)
WHITESPACE = " \t\n\r"
# boundaries tried before giving up on a text (each failure moves to an earlier one)
MAX_TRIES = 8


@dataclass(frozen=True)
class SplitRule:
    """Where a tokenizer's pre-tokenizer always splits (``chars``), and whether it keeps whitespace in its
    pieces (byte-level BPE, ``Metaspace``: then the head must not end in whitespace after normalization)."""

    chars: str
    keeps_whitespace: bool


# pre-tokenizers that split at whitespace and drop it
_DROP_WHITESPACE = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
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
        return isinstance(pattern, str) and bool(pattern) and not any(c.isspace() for c in pattern + str(norm.get("content", "")))
    return kind in _LOCAL_NORMALIZERS


def _pre_tokenizer_rule(pre: dict | None) -> SplitRule | None:
    if pre is None:
        return None
    kind = pre.get("type")
    if kind in _DROP_WHITESPACE:
        return SplitRule(WHITESPACE, False)
    if kind == "ByteLevel" and pre.get("use_regex", True):  # GPT-2's pattern ends a piece before every \s
        return SplitRule(WHITESPACE, True)
    if kind == "Metaspace" and pre.get("split", True):  # splits before spaces only (turned into "▁")
        return SplitRule(" ", True)
    if kind == "Sequence":  # later members only split further; the first sees the normalized text
        members = pre.get("pretokenizers") or []
        return _pre_tokenizer_rule(members[0]) if members else None
    return None


def split_rule(config: dict) -> SplitRule | None:
    """The :class:`SplitRule` of a tokenizer (its ``tokenizer.json`` as a dict), or None when heads cannot be
    proven to tokenize like whole texts (then no text is cut early)."""
    for token in config.get("added_tokens") or []:  # only one mixing whitespace and text can span a boundary
        content = str(token.get("content", ""))
        if any(c.isspace() for c in content) and not content.isspace():
            return None
    if not _normalizer_is_local(config.get("normalizer")):
        return None
    return _pre_tokenizer_rule(config.get("pre_tokenizer"))


def tokenizer_split_rule(path: str) -> SplitRule | None:
    """:func:`split_rule` of a ``tokenizer.json`` file (once per file version and worker)."""
    return _split_rule(*stamp(path))


@lru_cache(maxsize=8)
def _split_rule(local: str, _size: int, _mtime: int) -> SplitRule | None:
    with open(local, encoding="utf-8") as f:
        return split_rule(json.load(f))


def head_boundary(text: str, end: int, rule: SplitRule, normalize: Callable[[str], str] | None = None) -> int:
    """The last boundary before ``end``: a ``rule.chars`` character whose preceding character is not whitespace
    (and, for a tokenizer that keeps whitespace, still is not once ``normalize`` has run); -1 when none of the
    last :data:`MAX_TRIES` candidates is one."""
    for _ in range(MAX_TRIES):
        i = max(text.rfind(c, 0, end) for c in rule.chars)
        if i <= 0:
            return -1
        if not text[i - 1].isspace():
            if not (rule.keeps_whitespace and normalize is not None):
                return i
            tail = normalize(text[max(0, i - 8) : i])
            if tail and not tail[-1].isspace():
                return i
        end = i
    return -1


def text_head(text: str, head: int, rule: SplitRule, normalize: Callable[[str], str] | None = None) -> str:
    """``text`` up to its last boundary within the first ``head`` characters (``text`` itself when it is not
    longer than ``head`` or has no boundary there)."""
    if len(text) <= head:
        return text
    boundary = head_boundary(text, head, rule, normalize)
    return text[:boundary] if boundary > 0 else text


def tokenize_heads(encode, texts: list[str], max_length: int, rule: SplitRule | None, head: int,
                   normalize: Callable[[str], str] | None = None, special: bool = True) -> list[list[int]]:
    """Ids of ``texts`` as ``encode`` (a tokenizer's batch encode, truncating to ``max_length``) gives them,
    each text tokenized by its head when that gives exactly ``max_length`` ids, else whole. ``normalize`` is the
    tokenizer's normalizer (``normalizer.normalize_str``), None when it has none; ``special``: with the
    tokenizer's special tokens (its post-processor)."""
    if rule is None:
        return [e.ids for e in encode(texts, add_special_tokens=special)]
    heads = [text_head(t, head, rule, normalize) for t in texts]
    ids = [e.ids for e in encode(heads, add_special_tokens=special)]
    # exactly max_length: truncation happened (a max_length below the special tokens truncates nothing)
    redo = [i for i, (t, h) in enumerate(zip(texts, heads)) if len(h) < len(t) and len(ids[i]) != max_length]
    if redo:
        for i, e in zip(redo, encode([texts[i] for i in redo], add_special_tokens=special)):
            ids[i] = e.ids
    return ids
