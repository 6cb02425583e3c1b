"""Token ids and counts for byte-level BPE ``tokenizer.json`` files, the same as ``tokenizers`` gives, faster.

``tokenizers`` spends most of its time per document on work that repeats: the same words are pre-tokenized
and BPE-merged again in every page. :class:`ByteLevelBPE` reproduces its pipeline step by step and caches the
one expensive step, a pre-tokenized piece's ids:

1. **added tokens** are cut out as ``tokenizers`` cuts them (``AddedVocabulary::find_matches``): first the
   tokens matched on the raw text (``normalized: false``), then, in each remaining piece after normalizing it,
   the ``normalized: true`` ones (matched in their normalized form); leftmost-longest, with the
   ``single_word``, ``lstrip`` and ``rstrip`` rules;
2. **normalization** is the file's own normalizer object from ``tokenizers`` (``normalize_str``), applied to
   the same pieces, so it is exact whatever the normalizer;
3. **pre-tokenization** (``ByteLevel`` with its GPT-2 regex, ``Split`` with a ``Regex`` in ``Isolated``
   mode, a ``Sequence`` of those) runs with the ``regex`` module. The Unicode classes the patterns use
   (``\\p{L}``, ``\\p{N}``, ``\\s``) are replaced by explicit character sets read off the Oniguruma engine
   inside ``tokenizers`` (:func:`onig_classes`): the two libraries ship different Unicode versions, and
   17,480 code points are letters or digits to one and not to the other;
4. **BPE** of each piece is ``tokenizers``' own model (``model.tokenize`` on the byte-level string), called
   once per piece not seen before and cached (bounded; :data:`CACHE_PIECES`); for GPT-2's pattern whole chunks (a whitespace run and the non-space run after it)
   are cached too, so a text seen in parts before costs one dictionary lookup per word.

For files whose only pattern is GPT-2's (GPT-2, GPT-NeoX, RoBERTa-style), steps 3 and 4 run compiled
(``udfs/_bpe_native.c``, built at install): the pattern written out as code over Oniguruma's classes and
``tokenizers``' merge loop (a heap of rank and position) over the file's merges, with its own piece cache.
Where it is not built, or the file has ``ignore_merges``, the Python steps above do the same work. For every
file the same module finds the added tokens of step 1 (a character trie, leftmost-longest) and tells which
texts are already normalized for step 2 (a set of the code points that could make a text fail
``unicodedata``'s test; :func:`unstable_in`), the two steps' costs on a typical web page. Where a file allows
(the compiled loop, no prefix space, no rule on the normalized added tokens), a text's count is one compiled
call that runs all of it (:meth:`ByteLevelBPE._whole_text_counter`); a text it cannot settle (a raw added token,
a character the normalizer may change, a surrogate) takes the steps one by one.

So the ids equal ``Tokenizer.encode(text, add_special_tokens=False).ids`` by construction for every step but
the third, which ``tests/udfs/test_bpe_fast.py`` checks on generated strings and every shared page. A file with a
feature outside what is reproduced here (another model type, pre-tokenizer, split behaviour, a pattern with
other Unicode classes, BPE dropout, ...) is not loaded by this class: :func:`load_encoder` says why (logged,
and in :attr:`Encoder.reason`) and returns an encoder that calls ``tokenizers``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain

import numpy as np

log = logging.getLogger(__name__)

# tokenizers' ByteLevel pre-tokenizer pattern (GPT-2's), used when ``use_regex`` is true.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Distinct pre-tokenized pieces kept per encoder; the cache is emptied when it grows past this.
CACHE_PIECES = 1 << 20
# The Unicode classes read off Oniguruma and what stands for each in a pattern.
CLASS_PATTERNS = {"L": r"\p{L}", "N": r"\p{N}", "S": r"\s"}


class Unsupported(ValueError):
    """The file uses a feature :class:`ByteLevelBPE` does not reproduce exactly."""


# ------------------------------------------------------------------ Unicode classes of tokenizers' regex


def _ranges(members: np.ndarray) -> list[tuple[int, int]]:
    """Sorted code points -> inclusive (lo, hi) runs."""
    if members.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(members) != 1)
    starts = np.concatenate([[members[0]], members[breaks + 1]])
    ends = np.concatenate([members[breaks], [members[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _lut(ranges: list[tuple[int, int]]) -> np.ndarray:
    """Inclusive code point ranges -> bool per code point."""
    lut = np.zeros(0x110000, dtype=bool)
    for a, b in ranges:
        lut[a:b + 1] = True
    return lut


def _code_points() -> np.ndarray:
    return np.array([c for c in range(0x110000) if not 0xD800 <= c < 0xE000], dtype=np.int64)


def _probe_classes() -> dict[str, list[tuple[int, int]]]:
    """Each class of :data:`CLASS_PATTERNS` as code point ranges, as ``tokenizers``' Oniguruma matches it."""
    from tokenizers import Regex, pre_tokenizers

    codes = _code_points()
    text = "".join(map(chr, codes))
    out = {}
    for name, pattern in CLASS_PATTERNS.items():
        member = np.ones(codes.size, dtype=bool)
        # "removed" leaves the runs of non-members, with their offsets (in characters)
        for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
            member[a:b] = False
        out[name] = _ranges(codes[member])
    return out


def _disk_cached(name: str, compute) -> dict[str, list[tuple[int, int]]]:
    """``compute()`` (class name -> code point ranges), kept in a file per ``tokenizers`` version."""
    import tokenizers

    path = os.path.join(tempfile.gettempdir(), f"quadmix-{name}-{tokenizers.__version__}-v1.json")
    try:
        with open(path) as f:
            cached = json.load(f)
        return {k: [tuple(r) for r in v] for k, v in cached.items()}
    except (OSError, ValueError):
        pass
    classes = compute()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(classes, f)
        os.replace(tmp, path)
    except OSError:  # a read-only temp dir: the probe runs again next process
        pass
    return classes


@lru_cache(maxsize=1)
def onig_classes() -> dict[str, list[tuple[int, int]]]:
    """:func:`_probe_classes`, cached in this process and on disk (the probe scans every code point three
    times, ~2 s)."""
    return _disk_cached("onig-classes", _probe_classes)


def _probe_added_rules() -> dict[str, list[tuple[int, int]]]:
    """The Rust ``regex`` classes the added-token rules use, read off ``tokenizers`` itself: ``w`` (``\\w``,
    for ``single_word``) and ``s`` (``\\s``, for ``lstrip``/``rstrip``)."""
    from tokenizers import AddedToken, Tokenizer, models

    codes = _code_points()
    codes = codes[codes != 1]  # the probe token itself
    out = {}
    for name in ("w", "s"):
        tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        if name == "w":  # "\x01" is matched only when the character after it is not a word character
            tok.add_tokens([AddedToken("\x01", single_word=True, normalized=False)])
            text, at = "".join("\x01" + chr(c) + " " for c in codes), 0
        else:  # "\x01" takes the character before it when that is a space
            tok.add_tokens([AddedToken("\x01", lstrip=True, normalized=False)])
            text, at = "".join("a" + chr(c) + "\x01" for c in codes), 1
        enc = tok.encode(text, add_special_tokens=False)
        starts = np.array([o[0] for i, o in zip(enc.ids, enc.offsets) if i == 1], dtype=np.int64)
        hit = np.zeros(codes.size, dtype=bool)
        hit[(starts[starts % 3 == at] - at) // 3] = True
        member = ~hit if name == "w" else hit
        out[name] = _ranges(codes[member])
    return out


@lru_cache(maxsize=1)
def added_rule_classes() -> dict[str, np.ndarray]:
    """bool per code point for :func:`_probe_added_rules`' classes (probed once per machine, ~10 s, and
    only for files whose added tokens use those rules)."""
    return {name: _lut(ranges) for name, ranges in _disk_cached("added-rules", _probe_added_rules).items()}


@lru_cache(maxsize=1)
def class_mismatch() -> np.ndarray:
    """bool per code point: True where the ``regex`` module and Oniguruma disagree on one of the classes
    (different Unicode versions). Text without such a character splits the same under either engine."""
    import regex

    codes = _code_points()
    text = "".join(map(chr, codes))
    out = np.zeros(0x110000, dtype=bool)
    for name, pattern in CLASS_PATTERNS.items():
        onig = _lut(onig_classes()[name])
        mine = np.zeros(0x110000, dtype=bool)
        for m in regex.finditer(pattern + "+", text):
            mine[codes[m.start():m.end()]] = True
        out |= onig != mine
    return out


@lru_cache(maxsize=1)
def python_unassigned() -> np.ndarray:
    """bool per code point: unassigned (or a surrogate) in ``unicodedata``'s Unicode version."""
    out = np.ones(0x110000, dtype=bool)
    for c in range(0x110000):
        if unicodedata.category(chr(c)) not in ("Cn", "Cs"):
            out[c] = False
    return out


@lru_cache(maxsize=4)
def unstable_in(form: str) -> np.ndarray:
    """bool per code point, False only where any text of such characters passes :meth:`ByteLevelBPE.
    _unicode_normalize`'s test (``unicodedata`` finds it in ``form`` and every character assigned): assigned,
    canonical combining class 0, in ``form`` on its own, and, for the composing forms, never the second of a
    canonical pair nor a conjoining Hangul vowel or trailing consonant (so nothing in the text composes or
    reorders: Unicode's quick check answers yes). A superset of what could fail is fine: those texts take
    the full test."""
    out = python_unassigned().copy()
    composing = form in ("NFC", "NFKC")
    for c in np.flatnonzero(~out[0x80:]) + 0x80:
        ch = chr(c)
        if unicodedata.combining(ch) or not unicodedata.is_normalized(form, ch):
            out[c] = True
        if composing:
            parts = unicodedata.decomposition(ch).split()
            if len(parts) == 2 and not parts[0].startswith("<"):
                out[int(parts[1], 16)] = True
    if composing:
        out[0x1161:0x1176] = True  # Hangul V jamo (compose algorithmically, not in the decomposition data)
        out[0x11A8:0x11C3] = True  # Hangul T jamo
    return out


def _set_text(ranges: list[tuple[int, int]]) -> str:
    """Ranges as the inside of a ``regex`` character set."""
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)


def translate_pattern(pattern: str) -> str:
    """An Oniguruma pattern of ``tokenizers`` -> the same pattern for ``regex``, with ``\\p{L}``, ``\\p{N}``,
    ``\\s`` (and ``\\S``, ``\\P{L}``, ``\\P{N}`` outside sets) spelled out as Oniguruma's sets.
    :class:`Unsupported` for escapes whose meaning depends on Unicode data this does not pin down."""
    classes = onig_classes()
    sets = {r"\p{L}": "L", r"\p{N}": "N", r"\s": "S"}
    negated = {r"\P{L}": "L", r"\P{N}": "N", r"\S": "S"}
    out, i, in_set = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            two = pattern[i:i + 2]
            if two in (r"\p", r"\P"):
                end = pattern.find("}", i)
                if pattern[i + 2:i + 3] != "{" or end < 0:
                    raise Unsupported(f"pre-tokenizer pattern escape {pattern[i:i + 3]!r} at {i}")
                esc = pattern[i:end + 1]
            else:
                esc = two
            if esc in sets:
                body = _set_text(classes[sets[esc]])
                out.append(body if in_set else f"[{body}]")
            elif esc in negated:
                if in_set:
                    raise Unsupported(f"pre-tokenizer pattern has {esc!r} inside a set at {i}")
                out.append(f"[^{_set_text(classes[negated[esc]])}]")
            elif len(esc) == 2 and (not esc[1].isalnum() or esc[1] in "rntfvxu"):
                out.append(esc)  # an escaped symbol, a control character or a hex escape: the same in both engines
            else:
                raise Unsupported(f"pre-tokenizer pattern escape {esc!r} at {i} (Unicode-dependent or unknown)")
            i += len(esc)
            continue
        if in_set:
            if c == "[":
                raise Unsupported(f"nested character set at {i} in the pre-tokenizer pattern")
            if c == "]" and not (out and out[-1] in ("[", "[^")):
                in_set = False
            out.append(c)
        elif c == "[":
            in_set = True
            if pattern[i + 1:i + 2] == "^":
                out.append("[^")
                i += 2
                continue
            out.append("[")
        else:
            out.append(c)
        i += 1
    if in_set:
        raise Unsupported("unterminated character set in the pre-tokenizer pattern")
    return "".join(out)


# ------------------------------------------------------------------ the encoder


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, the one ``tokenizers``' ByteLevel uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_TABLE = {i: ch for i, ch in enumerate(_BYTE_CHARS)}


@dataclass(frozen=True)
class _Added:
    content: str
    id: int
    single_word: bool
    lstrip: bool
    rstrip: bool


def _trie_pattern(words) -> str:
    """A ``re`` pattern matching any of ``words``, longest first, as a character trie."""
    import re

    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(root)


def _trie_arrays(words: list[str]) -> tuple[bytes, bytes, bytes, bytes]:
    """The character trie of ``words`` in the CSR form ``_bpe_native.Trie`` takes: (starts int32[nodes + 1],
    chars uint32[edges] sorted within each node, targets int32[edges], terminals int32[nodes]: the index in
    ``words`` of the word ending at the node, or -1); node 0 is the root, nodes numbered breadth-first."""
    root: dict = {}
    for i, w in enumerate(words):
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = i
    starts, chars, targets, terminals = [0], [], [], []
    queue = [root]
    for node in queue:  # the queue grows as it is read: breadth-first
        terminals.append(node.get("", -1))
        for ch in sorted(k for k in node if k):
            chars.append(ord(ch))
            targets.append(len(queue))
            queue.append(node[ch])
        starts.append(len(chars))
    return (np.array(starts, dtype=np.int32).tobytes(), np.array(chars, dtype=np.uint32).tobytes(),
            np.array(targets, dtype=np.int32).tobytes(), np.array(terminals, dtype=np.int32).tobytes())


@lru_cache(maxsize=1)
def _compiled_or_why():
    """(the compiled module ``udfs/_bpe_native.c``, None), or (None, why not) where it was not built (setup.py
    marks the extension optional, so an install without a C compiler still succeeds)."""
    try:
        from quadmix_udfs import _bpe_native
    except ImportError as e:
        return None, f"not compiled ({e})"
    return _bpe_native, None


def _compiled():
    """The compiled module, or None where it was not built."""
    return _compiled_or_why()[0]


class _AddedMatcher:
    """``AddedVocabulary::find_matches`` over one set of added tokens (raw or normalized). The matches come
    from the compiled trie (``native``, where built) or from the same trie written as a ``re`` pattern."""

    def __init__(self, tokens: list[_Added], native: bool = True):
        import re

        self.tokens = {t.content: t for t in tokens}  # a later duplicate replaces an earlier one, as the map does
        self.by_index = list(self.tokens.values())
        self.index = {c: i for i, c in enumerate(self.tokens)}
        compiled = _compiled() if native and self.tokens else None
        self.trie = compiled.Trie(*_trie_arrays(list(self.tokens))) if compiled is not None else None
        # a trie as one pattern: at each character at most one branch goes on, and the optional groups are
        # greedy, so the match at the leftmost position is the longest (aho-corasick's LeftmostLongest)
        self.rx = re.compile(_trie_pattern(self.tokens)) if self.tokens and self.trie is None else None
        # every token starts with one of these: a text holding none of them has no match (a substring test is
        # much cheaper than the pattern's scan); None when there are too many to test one by one
        heads = {t[:2] for t in self.tokens}
        self.heads = tuple(sorted(heads)) if len(heads) <= 8 else None
        self.rules = any(t.single_word or t.lstrip or t.rstrip for t in self.by_index)
        classes = added_rule_classes() if self.rules else {}
        self.word, self.space = classes.get("w"), classes.get("s")

    def _matches(self, sentence: str) -> list | None:
        """(start, stop, token index in ``by_index``) of each leftmost-longest match, left to right; None when
        there is none."""
        if self.trie is not None:
            return self.trie.find(sentence) or None
        if self.rx is None or (self.heads is not None and not any(h in sentence for h in self.heads)):
            return None
        return [(m.start(), m.end(), self.index[m.group()]) for m in self.rx.finditer(sentence)] or None

    def split(self, sentence: str) -> list[tuple[str, int | None]]:
        """(piece, added token id or None) covering ``sentence``."""
        matches = self._matches(sentence) if sentence and self.tokens else None
        if matches is None:
            return [(sentence, None)]
        out: list[tuple[str, int | None]] = []
        offset = 0
        n = len(sentence)
        if not self.rules:  # each match is a piece as found
            tokens = self.by_index
            for start, stop, k in matches:
                if offset < start:
                    out.append((sentence[offset:start], None))
                out.append((sentence[start:stop], tokens[k].id))
                offset = stop
            if offset != n:
                out.append((sentence[offset:], None))
            return out
        for start, stop, k in matches:
            t = self.by_index[k]
            if t.single_word:
                # as tokenizers' ``\w$`` / ``^\w`` checks, with its Rust regex's Unicode data
                if (start > 0 and self.word[ord(sentence[start - 1])]) or (stop < n and self.word[ord(sentence[stop])]):
                    continue
            if t.lstrip:
                new = start
                while new > 0 and self.space[ord(sentence[new - 1])]:
                    new -= 1
                start = max(new, offset)
            if t.rstrip:
                while stop < n and self.space[ord(sentence[stop])]:
                    stop += 1
            if offset < start:
                out.append((sentence[offset:start], None))
            out.append((sentence[start:stop], t.id))
            offset = stop
        if offset != n:
            out.append((sentence[offset:], None))
        return out


def _parse_pre_tokenizer(spec) -> tuple[list[str], bool]:
    """(the file's regex patterns, applied in order with Isolated behaviour; ByteLevel's add_prefix_space)."""
    if spec is None:
        raise Unsupported("no pre-tokenizer (a byte-level BPE file has a ByteLevel one)")
    steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise Unsupported("the pre-tokenizer does not end with ByteLevel")
    patterns = []
    for s in steps[:-1]:
        if s.get("type") != "Split":
            raise Unsupported(f"pre-tokenizer {s.get('type')!r}")
        if s.get("behavior") != "Isolated" or s.get("invert"):
            raise Unsupported(f"Split behaviour {s.get('behavior')!r} (invert {s.get('invert')}); only Isolated is reproduced")
        pat = s.get("pattern") or {}
        if "Regex" in pat:
            translate_pattern(pat["Regex"])  # raises Unsupported for escapes not pinned down
            patterns.append(pat["Regex"])
        elif "String" in pat:
            import regex

            patterns.append(regex.escape(pat["String"]))
        else:
            raise Unsupported(f"Split pattern {pat!r}")
    last = steps[-1]
    if last.get("use_regex", True):
        patterns.append(GPT2_PATTERN)
    return patterns, bool(last.get("add_prefix_space", False))


def _check_model(model) -> None:
    if model.get("type") != "BPE":
        raise Unsupported(f"model {model.get('type')!r} (only BPE is reproduced)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise Unsupported(f"BPE {key} {model.get(key)!r}")
    if model.get("byte_fallback"):
        raise Unsupported("BPE byte_fallback")
    # bytes C0, C1 and F5-FF never occur in UTF-8, so vocabularies may lack their characters
    utf8_bytes = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
    missing = [b for b in utf8_bytes if _BYTE_CHARS[b] not in model.get("vocab", {})]
    if missing:
        raise Unsupported(f"{len(missing)} of the byte-level characters of UTF-8 bytes are not in the vocabulary")


class ByteLevelBPE:
    """Exact ids and counts for a byte-level BPE ``tokenizer.json`` (see the module docstring)."""

    def __init__(self, path: str, native: bool = True, cache_limit: int = CACHE_PIECES):
        import regex
        from tokenizers import Tokenizer

        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        _check_model(spec.get("model") or {})
        patterns, self.add_prefix_space = _parse_pre_tokenizer(spec.get("pre_tokenizer"))
        for p in patterns:
            if regex.compile(p).match(""):
                raise Unsupported(f"a pre-tokenizer pattern matches the empty string: {p[:80]!r}")
        # the file's own patterns for text whose characters both engines class alike, the explicit sets else
        self.splitters = [regex.compile(p).findall for p in patterns]
        self.exact_splitters = [regex.compile(translate_pattern(p)).findall for p in patterns]
        # GPT-2's pattern never puts a non-space and the whitespace after it in one piece, so a text is the
        # concatenation of its chunks (a whitespace run and the non-space run after it), and each chunk's
        # pieces are the text's pieces there: chunks are cut with a cheap pattern and their counts cached
        self.chunks = None
        if patterns == [GPT2_PATTERN]:
            import re

            space = _set_text(onig_classes()["S"])
            self.chunks = re.compile(f"[{space}]*[^{space}]+|[{space}]+").findall
        self.tokenizer = Tokenizer.from_file(path)
        self.native, self.native_reason = (_native_counter(spec.get("model") or {}, patterns, cache_limit) if native
                                           else (None, "compiled path turned off"))
        norm = self.tokenizer.normalizer
        self.normalize = norm.normalize_str if norm is not None else None
        self.form = (spec.get("normalizer") or {}).get("type")
        self.stable = None  # the compiled set of characters that may need the form (see _unicode_normalize)
        if self.form in ("NFC", "NFD", "NFKC", "NFKD"):
            self.normalize = self._unicode_normalize
            self.unassigned = python_unassigned()
            compiled = _compiled() if native else None
            if compiled is not None:
                self.stable = compiled.CodePointSet(unstable_in(self.form).astype(np.uint8).tobytes())
        raw, normalized = [], []
        for t in spec.get("added_tokens") or []:
            content = t.get("content") or ""
            if not content:
                continue
            if self.tokenizer.token_to_id(content) != t["id"]:
                raise Unsupported(f"added token {content!r} has id {t['id']} in the file, {self.tokenizer.token_to_id(content)} loaded")
            if t.get("normalized", not t.get("special", False)):
                if self.normalize is not None:
                    content = self.normalize(content)
                normalized.append(_Added(content, int(t["id"]), bool(t.get("single_word")), bool(t.get("lstrip")), bool(t.get("rstrip"))))
            else:
                raw.append(_Added(content, int(t["id"]), bool(t.get("single_word")), bool(t.get("lstrip")), bool(t.get("rstrip"))))
        self.raw_added = _AddedMatcher(raw, native)
        self.normalized_added = _AddedMatcher(normalized, native)
        self.whole_text = self._whole_text_counter()
        # caches: piece -> ids and count; chunk -> ids and count. Each is emptied when a fill would take it
        # past ``limit`` keys; what they hold never depends on what came before (only how fast it comes)
        self.limit = cache_limit
        self.pieces: dict[str, tuple[int, ...]] = {}
        self.piece_n: dict[str, int] = {}
        self.chunk_ids: dict[str, tuple[int, ...]] = {}
        self.chunk_n: dict[str, int] = {}

    def _clean(self, text: str) -> bool:
        """No character of ``text`` is classed differently by the two regex engines."""
        return not class_mismatch()[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)].any()

    def _words(self, text: str, prefix: bool, clean: bool = False) -> list[str]:
        """The pre-tokenized pieces of one normalized, added-token-free text (``prefix``: ByteLevel's
        add_prefix_space is applied to the pieces reaching it; ``clean``: :meth:`_clean` is known true)."""
        if not self.splitters:
            return [" " + text if prefix and not text.startswith(" ") else text]
        splitters = self.splitters if clean or self._clean(text) else self.exact_splitters
        pieces = [text]
        for i, findall in enumerate(splitters):
            last = i == len(splitters) - 1
            nxt = []
            for p in pieces:
                if last and prefix and not p.startswith(" "):
                    p = " " + p
                nxt.extend(findall(p))
            pieces = nxt
        return pieces

    def _unicode_normalize(self, text: str) -> str:
        """The file's NFC/NFD/NFKC/NFKD: skipped when ``unicodedata`` says ``text`` is already in that form and
        every character of it is assigned in ``unicodedata``'s Unicode version (normalization stability: such
        a text stays normalized in every later version), else ``tokenizers``' own normalizer."""
        if text.isascii():  # ASCII is its own form under all four, and assigned in every Unicode version
            return text
        if self.stable is not None and self.stable.search(text) < 0:  # the test below, sure to pass
            return text
        if unicodedata.is_normalized(self.form, text) and not self.unassigned[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)].any():
            return text
        return self.tokenizer.normalizer.normalize_str(text)

    def _missing(self, keys: list, cache: dict) -> list:
        """The distinct ``keys`` not in ``cache``; all of them, the cache emptied, when adding them would take
        it past ``limit`` (so the caller finds every key after filling)."""
        missing = list(dict.fromkeys([k for k in keys if k not in cache]))
        if missing and len(cache) + len(missing) > self.limit:
            cache.clear()
            return list(dict.fromkeys(keys))
        return missing

    def _fill_pieces(self, words: list[str]) -> None:
        """Put the ids of every piece of ``words`` in the piece cache."""
        tokenize = self.tokenizer.model.tokenize
        for w in self._missing(words, self.pieces):
            self.pieces[w] = tuple(t.id for t in tokenize(w.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)))

    def _fill_chunks(self, chunks: list[str], cache: dict, ids: bool) -> None:
        """Put every chunk of ``chunks`` missing from ``cache`` in it (ids or counts)."""
        missing = self._missing(chunks, cache)
        if not missing:
            return
        clean = self._clean("".join(missing))  # else each chunk is checked on its own
        words = [self._words(c, False, clean) for c in missing]
        self._fill_pieces(list(chain.from_iterable(words)))
        get = self.pieces.__getitem__
        for c, ws in zip(missing, words):
            cache[c] = tuple(chain.from_iterable(map(get, ws))) if ids else sum(map(len, map(get, ws)))

    def _fill_words(self, words: list[str], cache: dict, ids: bool) -> None:
        missing = self._missing(words, cache)
        self._fill_pieces(missing)
        for w in missing:
            cache[w] = self.pieces[w] if ids else len(self.pieces[w])

    def _segments(self, text: str):
        """(piece, added id) after both added-token passes; plain pieces are normalized, never empty."""
        text.encode("utf-8")  # a lone surrogate is an error here, as it is in tokenizers
        for piece, tid in self.raw_added.split(text):
            if tid is not None:
                yield piece, tid
                continue
            if not piece:
                continue
            norm = self.normalize(piece) if self.normalize is not None else piece
            for sub, sid in self.normalized_added.split(norm):
                if sid is not None or sub:
                    yield sub, sid

    def _plain(self, segment: str, count: bool):
        """(cache keys, their cache, the fill for a miss) of one plain segment."""
        if self.chunks is not None:
            return self.chunks(self._prefixed(segment)), self.chunk_n if count else self.chunk_ids, self._fill_chunks
        return self._words(segment, self.add_prefix_space), self.piece_n if count else self.pieces, self._fill_words

    def _prefixed(self, segment: str) -> str:
        return " " + segment if self.add_prefix_space and not segment.startswith(" ") else segment

    def encode(self, text: str) -> list[int]:
        """``Tokenizer.encode(text, add_special_tokens=False).ids``."""
        out: list[int] = []
        for segment, tid in self._segments(text):
            if tid is not None:
                out.append(tid)
                continue
            if self.native is not None:
                out.extend(self.native.encode(self._prefixed(segment)))
                continue
            keys, cache, fill = self._plain(segment, False)
            try:
                ids = list(chain.from_iterable(map(cache.__getitem__, keys)))
            except KeyError:
                fill(keys, cache, True)
                ids = list(chain.from_iterable(map(cache.__getitem__, keys)))
            out.extend(ids)
        return out

    def _whole_text_counter(self):
        """``text -> count or -1``: the compiled count of a whole text in one call (added tokens, the normal-form
        test and every segment: ``Counter.count_text``), where this file's steps allow it (the compiled loop,
        no prefix space, no normalizer or a Unicode form, added tokens matched by compiled tries without
        single_word/lstrip/rstrip on the normalized ones); None elsewhere. It returns -1 for a text holding a
        raw added token, a character the normalizer may change or a surrogate: the general path counts those."""
        if self.native is None or self.add_prefix_space:
            return None
        if self.normalize is not None and self.stable is None:
            return None
        raw, norm = self.raw_added, self.normalized_added
        if (raw.tokens and raw.trie is None) or (norm.tokens and norm.trie is None) or norm.rules:
            return None
        count_text = self.native.count_text
        raw_trie, norm_trie, unstable = raw.trie, norm.trie, self.stable
        return lambda text: count_text(text, raw_trie, norm_trie, unstable)

    def count(self, text: str) -> int:
        """``len(encode(text))`` without building the id list."""
        if self.whole_text is not None:
            n = self.whole_text(text)
            if n >= 0:
                return n
        n = 0
        for segment, tid in self._segments(text):
            if tid is not None:
                n += 1
                continue
            if self.native is not None:
                n += self.native.count(self._prefixed(segment))
                continue
            keys, cache, fill = self._plain(segment, True)
            try:
                n += sum(map(cache.__getitem__, keys))
            except KeyError:
                fill(keys, cache, False)
                n += sum(map(cache.__getitem__, keys))
        return n


# ------------------------------------------------------------------ the compiled inner loop


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    """The file's merges as (left, right) strings, either serialization (``"a b"`` or ``["a", "b"]``)."""
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise Unsupported(f"merge {m!r} is not two tokens")
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def _native_counter(model: dict, patterns: list[str], cache_limit: int):
    """(the compiled counter of ``udfs/_bpe_native.c``, None) for a file whose only pre-tokenizer pattern is
    GPT-2's, else (None, why not). It gets Oniguruma's classes, each byte's id and the merges as
    (left id, right id, merged id) in rank order; without it the pure-Python path below does the same work."""
    if patterns != [GPT2_PATTERN]:
        return None, "the pre-tokenizer is not GPT-2's pattern alone"
    if model.get("ignore_merges"):
        return None, "BPE ignore_merges"
    compiled, why = _compiled_or_why()
    if compiled is None:
        return None, why
    classes = np.zeros(0x110000, dtype=np.uint8)
    for flag, name in ((1, "L"), (2, "N"), (4, "S")):
        for a, b in onig_classes()[name]:
            classes[a:b + 1] |= flag
    vocab = model.get("vocab") or {}
    byte_ids = np.array([vocab.get(ch, -1) for ch in _BYTE_CHARS], dtype=np.int32)
    triples = []
    for a, b in _merge_pairs(model):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise Unsupported(f"merge {a!r} {b!r}: a token is not in the vocabulary")
        triples.append((vocab[a], vocab[b], vocab[a + b]))
    merges = np.array(triples, dtype=np.int32).reshape(-1, 3)
    return compiled.Counter(classes.tobytes(), byte_ids.tobytes(), merges.tobytes(), cache_limit), None


# ------------------------------------------------------------------ loading, with tokenizers as the fallback


@dataclass
class Encoder:
    """Ids and counts of texts (``add_special_tokens=False``) by :class:`ByteLevelBPE` when the file allows,
    else by ``tokenizers``; ``fast`` says which and ``reason`` why not."""

    path: str
    fast: ByteLevelBPE | None
    reason: str | None
    tokenizer: object

    @property
    def kind(self) -> str:
        return "fast byte-level BPE" if self.fast is not None else "tokenizers"

    def describe(self) -> str:
        if self.fast is None:
            return f"tokenizers ({self.reason})"
        if self.fast.native is not None:
            return f"{self.kind}, compiled"
        return f"{self.kind}, Python ({self.fast.native_reason})"

    def encode_batch(self, texts: list[str], batch_size: int = 256) -> list[list[int]]:
        if self.fast is not None:
            return [self.fast.encode(t) for t in texts]
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        out: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            out.extend(e.ids for e in encode(texts[start:start + batch_size], add_special_tokens=False))
        return out

    def count_batch(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        if self.fast is not None:
            return np.fromiter((self.fast.count(t) for t in texts), dtype=np.int64, count=len(texts))
        return np.fromiter((len(ids) for ids in self.encode_batch(texts, batch_size)), dtype=np.int64, count=len(texts))


def load_encoder(path: str, fast: bool = True, native: bool = True) -> Encoder:
    """The :class:`Encoder` of ``path`` (a local ``tokenizer.json``); ``fast=False`` always uses ``tokenizers``;
    ``native=False`` runs the fast path's pre-tokenizer and merges in Python even where the compiled loop
    would apply (files with GPT-2's pattern alone; tests compare the two)."""
    from tokenizers import Tokenizer

    reason = None if fast else "fast path turned off"
    impl = None
    if fast:
        try:
            impl = ByteLevelBPE(path, native)
        except Unsupported as e:
            reason = str(e)
            log.warning("tokenizer %s: %s; counting with tokenizers", path, reason)
    tok = impl.tokenizer if impl is not None else Tokenizer.from_file(path)
    tok.no_padding()
    tok.no_truncation()
    return Encoder(path, impl, reason, tok)
