"""Heuristic text statistics (Gopher quality and repetition, C4) and a rule-based quality score: ``text_stats``.

No model: every number is computed from the text, by a compiled kernel (``udfs/_text_stats_native.c``, document by
document in C) where that module is built, else vectorized over an Arrow batch with numpy (no Python loop per
document or character; the loops here run per chunk of up to 512 KB of text, per n-gram size or per rule). The two
give the same float64 values, bit for bit (the tests compare them); :func:`kernel_description` says which one runs.

Definitions (each text is first cut to ``max_chars`` code points, as Python's ``text[:max_chars]``; null = "")
- **whitespace**: the characters Python's ``str.isspace`` accepts (ASCII ``\\t \\n \\v \\f \\r``, ``\\x1c``-``\\x1f``,
  space, and U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000).
- **words**: maximal runs of non-whitespace characters, i.e. ``text.split()``.
- **characters** (every "fraction of characters" below): the characters of the words, i.e. non-whitespace
  code points. A word's length is its number of code points.
- **lines**: ``text.split("\\n")`` with surrounding whitespace stripped (so a CRLF line loses its ``\\r``); lines
  with no word are ignored everywhere. Two lines are the same line when they have the same words (whitespace
  inside a line does not matter).
- **n-gram**: n consecutive words of the text (across line breaks); its characters are its words' characters.

Statistics (the ``STATS`` fields, float64; a fraction whose denominator is zero is 0.0)
- Gopher quality (Rae et al. 2021, appendix A): ``words``; ``mean_word_length``; ``symbol_word_ratio``:
  max(number of ``#``, number of ``...`` plus ``…``) / words (occurrences counted like ``str.count``: Gopher
  tests the hash and the ellipsis each against 0.1); ``bullet_lines``: fraction of lines whose first character is
  one of ``BULLETS``; ``ellipsis_lines``: fraction of lines ending with ``...`` or ``…``; ``alpha_words``:
  fraction of words with at least one alphabetic character (``str.isalpha``); ``stop_words``: how many of
  ``STOP_WORDS`` occur as a word (ASCII case-insensitive, no punctuation stripped).
- Gopher repetition: ``dup_lines``: fraction of lines equal to an earlier line; ``dup_line_chars``: their share
  of the characters; ``top_{2,3,4}gram``: share of the characters covered by the occurrences of the most frequent
  n-gram among those occurring at least twice (0 when none repeats; ties: the one with more characters, then the
  earliest); ``dup_{5..10}gram``: share of the characters covered by n-grams occurring at least twice. "Covered"
  counts each word once however many occurrences overlap it, so every fraction is at most 1.
- C4 (Raffel et al. 2020): ``terminal_lines``: fraction of lines whose last character is in ``TERMINAL``;
  ``lorem_ipsum`` and ``curly_bracket``: 1.0 when the text contains "lorem ipsum" (ASCII case-insensitive) or
  ``{``; ``javascript_lines`` and ``policy_lines``: fraction of lines containing "javascript" or one of
  ``POLICY_PHRASES`` (ASCII case-insensitive).
- ``lines`` and ``chars``: the counts behind the fractions.

Rules and score. Each rule of ``RULES`` passes when ``min <= statistic <= max`` (thresholds from Gopher's
appendix A, C4's paper and FineWeb's C4 variant for ``terminal_lines``; overridable per scorer). The score is::

    score = 0.97 * sum(weight of each passed rule) + 0.03 * tie_break

with the weights of each family summing to its share (Gopher quality 0.4, Gopher repetition 0.4, C4 0.2),
split equally among the family's rules, and ``tie_break = (terminal_lines + words / (words + 300)) / 2`` in
[0, 1]; a text without a word scores 0. Why: the rules are what the papers validated, so the score is first
the share of them a page passes; the families get fixed shares so that the eleven correlated repetition rules
do not outvote the seven quality rules. Every rule weighs at least 0.4 / 11 (0.97 x that > 0.03), so passing
one more rule always ranks a page higher than any tie-break difference; the tie-break only orders pages that
pass the same rules, preferring pages whose lines end like sentences and longer pages (saturating: 0.5 at 300
words, 0.97 at 10,000), so the ranking has resolution instead of ~20 levels; it uses only divisions (a
logarithm's SIMD and scalar paths may round differently). A pre-filter (``filter``) lists the rules a page
must pass; the names of those it fails are the ``<scorer>_rejected`` column.

Same bits whatever the batch: every statistic is a ratio of integer counts of one text. The numpy path processes the
texts in chunks of whole documents; repeated words, n-grams and lines are found by sorting 64-bit keys made of a
42-bit hash of the content and the position: equality is decided inside one document only, so two different word
sequences of one document taken as equal (a 42-bit hash collision: probability ~3e-8 per n-gram size for a 550-word
page, ~1e-6 for a 3,500-word one) depends on that text alone. The compiled kernel computes the same hashes and
applies the same rule (top 42 bits, one document, and an n-gram compared only where numpy compares it), with hash
tables instead of sorting, so a collision gives it the same values too. ``alpha_words`` follows the running Python's
Unicode tables (``str.isalpha``), so two Python versions may differ on newly assigned letters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

STATS = (
    "words", "chars", "lines", "mean_word_length", "symbol_word_ratio", "bullet_lines", "ellipsis_lines",
    "alpha_words", "stop_words", "dup_lines", "dup_line_chars", "top_2gram", "top_3gram", "top_4gram",
    "dup_5gram", "dup_6gram", "dup_7gram", "dup_8gram", "dup_9gram", "dup_10gram",
    "terminal_lines", "lorem_ipsum", "curly_bracket", "javascript_lines", "policy_lines",
)
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = "-*•‣⁃◦·▪▫■□●○►▶▸▹➢➤→✓✔❖◆◇–"
TERMINAL = ".!?\"'”’。！？"
LOREM_IPSUM, JAVASCRIPT = "lorem ipsum", "javascript"
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)
MAX_CHARS_LIMIT = 1 << 23  # word positions of a chunk fit 22 bits (see _POS_BITS)


@dataclass(frozen=True)
class Rule:
    """A document passes when ``lo <= stats[stat] <= hi`` (None: no bound)."""

    name: str
    family: str
    stat: str
    lo: float | None = None
    hi: float | None = None


_DUP_MAX = dict(zip(DUP_NGRAMS, (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)))
RULES: tuple[Rule, ...] = (
    Rule("gopher_word_count", "gopher_quality", "words", 50, 100_000),
    Rule("gopher_mean_word_length", "gopher_quality", "mean_word_length", 3, 10),
    Rule("gopher_symbol_ratio", "gopher_quality", "symbol_word_ratio", None, 0.1),
    Rule("gopher_bullet_lines", "gopher_quality", "bullet_lines", None, 0.9),
    Rule("gopher_ellipsis_lines", "gopher_quality", "ellipsis_lines", None, 0.3),
    Rule("gopher_alpha_words", "gopher_quality", "alpha_words", 0.8, None),
    Rule("gopher_stop_words", "gopher_quality", "stop_words", 2, None),
    Rule("gopher_dup_lines", "gopher_repetition", "dup_lines", None, 0.30),
    Rule("gopher_dup_line_chars", "gopher_repetition", "dup_line_chars", None, 0.20),
    Rule("gopher_top_2gram", "gopher_repetition", "top_2gram", None, 0.20),
    Rule("gopher_top_3gram", "gopher_repetition", "top_3gram", None, 0.18),
    Rule("gopher_top_4gram", "gopher_repetition", "top_4gram", None, 0.16),
    *(Rule(f"gopher_dup_{n}gram", "gopher_repetition", f"dup_{n}gram", None, hi) for n, hi in _DUP_MAX.items()),
    Rule("c4_terminal_lines", "c4", "terminal_lines", 0.12, None),
    Rule("c4_lorem_ipsum", "c4", "lorem_ipsum", None, 0),
    Rule("c4_curly_bracket", "c4", "curly_bracket", None, 0),
    Rule("c4_javascript_lines", "c4", "javascript_lines", None, 0.1),
    Rule("c4_policy_lines", "c4", "policy_lines", None, 0.1),
)
RULE_NAMES = tuple(r.name for r in RULES)
FAMILY_WEIGHTS = {"gopher_quality": 0.4, "gopher_repetition": 0.4, "c4": 0.2}
FAMILIES = tuple(FAMILY_WEIGHTS)
RULES_WEIGHT, TIE_WEIGHT = 0.97, 0.03
TIE_WORDS = 300.0  # the tie-break's length term is words / (words + 300): 0.5 at 300 words, 0.97 at 10,000
STATS_SUFFIX, REJECTED_SUFFIX = "_stats", "_rejected"
VERSION = 1  # of the definitions above; part of the scorer's fingerprint


# ---------------------------------------------------------------- configuration


def resolve_filter(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The rule names a filter spec enforces, in ``RULES`` order: ``None`` (none), ``"all"``, or a list of rule
    names and family names (``gopher_quality``, ``gopher_repetition``, ``c4``)."""
    if spec is None:
        return ()
    items = [spec] if isinstance(spec, str) else list(spec)
    unknown = [x for x in items if x != "all" and x not in RULE_NAMES and x not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown text_stats rule(s) {unknown} (rules: {', '.join(RULE_NAMES)}; "
                         f"or all, {', '.join(FAMILIES)})")
    return tuple(r.name for r in RULES if "all" in items or r.name in items or r.family in items)


def resolve_rules(thresholds: Mapping[str, Mapping[str, float | None]] | None) -> tuple[Rule, ...]:
    """``RULES`` with the bounds given as ``{rule: {min: x, max: y}}`` replaced (a bound left out keeps its
    default; ``None`` removes it)."""
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(RULE_NAMES))
    if unknown:
        raise ValueError(f"thresholds: unknown text_stats rule(s) {unknown} (rules: {', '.join(RULE_NAMES)})")
    out = []
    for r in RULES:
        bounds = dict(thresholds.get(r.name) or {})
        bad = sorted(set(bounds) - {"min", "max"})
        if bad:
            raise ValueError(f"thresholds.{r.name}: unknown key(s) {bad} (use min, max)")
        lo, hi = bounds.get("min", r.lo), bounds.get("max", r.hi)
        for key, v in (("min", lo), ("max", hi)):
            if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)):
                raise ValueError(f"thresholds.{r.name}.{key}: {v!r} is not a finite number")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"thresholds.{r.name}: min {lo} is above max {hi}")
        out.append(Rule(r.name, r.family, r.stat, lo, hi))
    return tuple(out)


def rule_weights(rules: Sequence[Rule]) -> np.ndarray:
    sizes = {f: sum(r.family == f for r in rules) for f in FAMILIES}
    return np.array([FAMILY_WEIGHTS[r.family] / sizes[r.family] for r in rules])


# ---------------------------------------------------------------- the score


def rule_passes(stats: Mapping[str, np.ndarray], rules: Sequence[Rule]) -> np.ndarray:
    """(rules x documents) booleans: does each document pass each rule."""
    out = np.ones((len(rules), len(stats["words"])), dtype=bool)
    for ok, r in zip(out, rules):
        x = stats[r.stat]
        if r.lo is not None:
            ok &= x >= r.lo
        if r.hi is not None:
            ok &= x <= r.hi
    return out


def quality_score(stats: Mapping[str, np.ndarray], passes: np.ndarray, rules: Sequence[Rule]) -> np.ndarray:
    """The combined score in [0, 1] (module docstring): weighted share of passed rules plus a bounded tie-break.

    Only element-wise additions, products and divisions, in a fixed order (no BLAS product, whose rounding
    depends on the array's length, and no SIMD logarithm), so a document's score has the same bits in any batch."""
    passed = np.zeros(passes.shape[1])
    for w, ok in zip(rule_weights(rules), passes):
        passed += w * ok
    words = stats["words"]
    tie = (stats["terminal_lines"] + words / (words + TIE_WORDS)) / 2.0
    return np.where(words > 0, RULES_WEIGHT * passed + TIE_WEIGHT * tie, 0.0)


# ---------------------------------------------------------------- hashing and grouping

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_K1, _K2, _K3 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(0x9E3779B97F4A7C15)
_POS_BITS = 22
_POS_MASK = np.uint64((1 << _POS_BITS) - 1)
_CHUNK_BYTES = 1 << 19  # a chunk of documents: at most 512 KB of text (so < 2**22 words), one document at least
_LOW_BYTES = np.array([0] + [(1 << (8 * k)) - 1 for k in range(1, 8)] + [(1 << 64) - 1], dtype=np.uint64)


def _mix(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit scrambler (xor-shift / multiply rounds), so distinct inputs stay distinct. Works in
    place: pass an array nothing else uses."""
    x ^= x >> np.uint64(33)
    x *= _K1
    x ^= x >> np.uint64(33)
    x *= _K2
    x ^= x >> np.uint64(33)
    return x


_P = 0x9E3779B97F4A7C15 | 1
_POWERS: list[np.ndarray] = [np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64)]


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P**k, P**-k mod 2**64 for k < n): the weights of a polynomial hash and the inverses that move a
    segment's sum to its own origin. Grown on demand, kept per process."""
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]))
        for i, base in enumerate((_P, pow(_P, -1, 1 << 64))):
            w = np.full(size, base, dtype=np.uint64)
            w[0] = 1
            _POWERS[i] = np.cumprod(w)  # wraps modulo 2**64, as wanted
    return _POWERS[0][:n], _POWERS[1][:n]


def _u64_at(buf: np.ndarray) -> np.ndarray:
    """``view[i]`` = the 8 bytes of ``buf`` from byte ``i`` (little-endian, unaligned); ``buf`` padded by 8."""
    return np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


def _word_hashes(u64: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of each word's bytes, its first 8 bytes zero-padded). Words of up to 8 bytes get distinct
    hashes (bytes, and below 8 bytes the length, packed in 64 bits, then mixed bijectively; an 8-byte word ending
    in a control byte 1-7 could meet a shorter word); a longer word sums its 8-byte pieces, each mixed with its
    place in the word."""
    first = u64[starts] & _LOW_BYTES[np.minimum(lengths, 8)]
    h = _mix(np.where(lengths < 8, first | (lengths.astype(np.uint64) << np.uint64(56)), first))
    long = np.flatnonzero(lengths > 8)
    if len(long):
        size = lengths[long]
        pieces = (size + 7) >> 3
        ends = np.cumsum(pieces)
        owner = np.repeat(np.arange(len(long)), pieces)
        j = np.arange(ends[-1]) - (ends - pieces)[owner]
        piece = u64[starts[long][owner] + 8 * j] & _LOW_BYTES[np.minimum(size[owner] - 8 * j, 8)]
        total = np.cumsum(_mix(piece + j.astype(np.uint64) * _K3))
        sums = total[ends - 1] - np.concatenate([[np.uint64(0)], total[ends[:-1] - 1]])
        h[long] = _mix(sums + size.astype(np.uint64) * _K1)
    return h, first


def _sort_keys(hashes: np.ndarray, positions: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted by (42-bit hash, position), and whether each equals the previous one: same hash, same
    document). Positions < 2**22; documents are compared exactly."""
    keys = (hashes & ~_POS_MASK) | positions.astype(np.uint64)
    keys.sort()
    pos = (keys & _POS_MASK).astype(np.intp)
    top = keys >> np.uint64(_POS_BITS)
    d = docs[pos]
    same = np.zeros(len(keys), dtype=bool)
    same[1:] = (top[1:] == top[:-1]) & (d[1:] == d[:-1])
    return pos, same


def _repeated(hashes: np.ndarray, positions: np.ndarray, docs: np.ndarray, size: int) -> np.ndarray:
    """Flags over ``size`` places: the ``positions`` whose hash occurs at another position of the same document."""
    pos, same = _sort_keys(hashes, positions, docs)
    rep = same.copy()
    rep[:-1] |= same[1:]
    flags = np.zeros(size, dtype=bool)
    flags[pos] = rep
    return flags


def _sorted_runs(hashes: np.ndarray, positions: np.ndarray, docs: np.ndarray):
    """Groups of equal hashes in one document: (positions sorted by (hash, position), each one's group, each
    group's first index, each group's size)."""
    pos, same = _sort_keys(hashes, positions, docs)
    new = ~same
    first = np.flatnonzero(new)
    lengths = np.diff(np.append(first, len(pos)))
    run = np.cumsum(new) - 1
    return pos, run, first, lengths


def _covered(starts: np.ndarray, n: int, cum_chars: np.ndarray, word_doc: np.ndarray, n_docs: int) -> np.ndarray:
    """Characters per document covered by the n-grams starting at ``starts`` (sorted), each word counted once."""
    if not len(starts):
        return np.zeros(n_docs)
    nxt = np.append(starts[1:], np.iinfo(np.int64).max)
    ends = np.minimum(starts + n, nxt)  # an n-gram never leaves its document, so the next start bounds the overlap
    return np.bincount(word_doc[starts], weights=cum_chars[ends] - cum_chars[starts], minlength=n_docs)


@lru_cache(maxsize=1)
def _keep_freed_memory() -> bool:
    """glibc only, once per process: serve arrays up to 32 MB from the heap and keep up to 64 MB of freed heap.

    The statistics allocate many arrays of a chunk's size; by default glibc maps each one afresh (or gives freed
    memory back to the system) and every page faults again when touched: ~20% of the adapter's time, all of it
    in the kernel (measured: 7-8 faults and ~15 µs of system time per page). The cost is that a Python worker
    keeps up to that much freed memory for its next batch."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters of <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 64 << 20))


# ---------------------------------------------------------------- Unicode tables


@lru_cache(maxsize=1)
def _alpha_table() -> np.ndarray:
    """``str.isalpha`` of every code point (this Python's Unicode database)."""
    return np.frombuffer(bytes(chr(i).isalpha() for i in range(0x110000)), dtype=bool)


@lru_cache(maxsize=1)
def _flags_table() -> bytes:
    """The compiled kernel's table, one byte per code point: 1 ``str.isalpha``, 2 ``str.isspace``, 4 in
    ``BULLETS``, 8 in ``TERMINAL``."""
    flags = _alpha_table().astype(np.uint8)
    flags[np.frombuffer(bytes(chr(i).isspace() for i in range(0x110000)), dtype=bool)] |= 2
    flags[_BULLET_CPS] |= 4
    flags[_TERMINAL_CPS] |= 8
    return flags.tobytes()


@lru_cache(maxsize=1)
def _native_or_why():
    """(the compiled kernel of ``udfs/_text_stats_native.c``, set up with this module's tables and phrases, None),
    or (None, why not): not built (setup.py marks it optional), or built from other definitions."""
    try:
        from quadmix_udfs import _text_stats_native
    except ImportError as e:
        return None, f"not compiled ({e})"
    if tuple(_text_stats_native.STATS) != STATS:
        return None, "a stale build: its statistics are not STATS (rebuild it)"
    try:
        kernel = _text_stats_native.Kernel(_flags_table(), [w.encode() for w in STOP_WORDS], [LOREM_IPSUM.encode()],
                                           [JAVASCRIPT.encode()], [p.encode() for p in POLICY_PHRASES])
    except ValueError as e:
        return None, f"it refuses these definitions ({e})"
    return kernel, None


def kernel_description(native: bool = True) -> str:
    """Which path computes the statistics (for ``native`` as :func:`text_statistics` takes it), in one line."""
    if not native:
        return "numpy (the compiled kernel is not asked for)"
    why = _native_or_why()[1]
    return "compiled kernel (quadmix_udfs._text_stats_native)" if why is None else f"numpy (compiled kernel: {why})"


def _decode_at(b: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Code points of the UTF-8 sequences starting at ``pos`` (``b`` padded by 3 bytes; a stray continuation
    byte decodes as itself)."""
    b0 = b[pos].astype(np.int64)
    cp = b0.copy()
    for size, lead_lo, lead_hi, lead_bits in ((2, 0xC0, 0xDF, 0x1F), (3, 0xE0, 0xEF, 0x0F), (4, 0xF0, 0xF7, 0x07)):
        m = np.flatnonzero((b0 >= lead_lo) & (b0 <= lead_hi))
        if len(m):
            v = b0[m] & lead_bits
            for k in range(1, size):
                v = (v << 6) | (b[pos[m] + k].astype(np.int64) & 0x3F)
            cp[m] = v
    return np.minimum(cp, 0x10FFFF)


def _last_chars(b: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Code point of each word's last character (``ends`` exclusive)."""
    pos = ends - 1
    for _ in range(3):  # step back over continuation bytes, never before the word's start
        back = ((b[pos] & 0xC0) == 0x80) & (pos > starts)
        if not back.any():
            break
        pos = pos - back
    return _decode_at(b, pos)


_BULLET_CPS = np.array(sorted(map(ord, BULLETS)))
_TERMINAL_CPS = np.array(sorted(map(ord, TERMINAL)))


def _pack(word: str) -> int:
    return int.from_bytes(word.encode(), "little")


_STOP_PACKED = np.array([_pack(w) for w in STOP_WORDS], dtype=np.uint64)


def _slot_multiplier(values: np.ndarray, bits: int) -> np.uint64:
    """An odd multiplier whose top ``bits`` bits of ``value * m`` differ for every value (a perfect hash)."""
    m = int(_K3)
    while len(set(((values * np.uint64(m)) >> np.uint64(64 - bits)).tolist())) < len(values):
        m = (m + 2 * int(_K3)) % (1 << 64)  # the next odd multiple of the constant
    return np.uint64(m)


_STOP_BITS = 4
_STOP_MUL = _slot_multiplier(_STOP_PACKED, _STOP_BITS)
_STOP_TABLE = np.zeros(1 << _STOP_BITS, dtype=np.uint64)  # slot -> packed stop word (0: none)
_STOP_TABLE[(_STOP_PACKED * _STOP_MUL) >> np.uint64(64 - _STOP_BITS)] = _STOP_PACKED
_MULTIBYTE_SPACES = [c.encode() for c in map(chr, range(0x80, 0x3001)) if c.isspace()]


# ---------------------------------------------------------------- one chunk of documents


def _whitespace(b: np.ndarray, n: int, high: np.ndarray) -> np.ndarray:
    """The whitespace flag of every byte: ``str.isspace`` characters, their every byte (``high``: the positions of
    the bytes >= 0xC0, where multi-byte characters start)."""
    body = b[:n]
    ws = body == 32
    ws |= (body - np.uint8(9)) <= 4
    ws |= (body - np.uint8(0x1C)) <= 3
    lead = b[high]
    leads = high[(lead == 0xC2) | ((lead - np.uint8(0xE1)) <= 2)]  # C2, E1, E2, E3 start the spaces
    if len(leads):
        seq = (b[leads].astype(np.uint32) << 16) | (b[leads + 1].astype(np.uint32) << 8) | b[leads + 2]
        two = seq >> 8
        for s in _MULTIBYTE_SPACES:
            hit = leads[two == ((s[0] << 8) | s[1])] if len(s) == 2 else leads[seq == int.from_bytes(s, "big")]
            for k in range(len(s)):
                ws[hit + k] = True
    return ws


# each phrase is looked for where one of its rarer bytes (or byte pairs) sits: (byte at that place, phrase, place)
_PHRASE_ANCHORS = (("j", JAVASCRIPT, 0), ("v", "privacy policy", 3), ("k", "cookie", 3),
                   ("p", LOREM_IPSUM, 7), ("m", "terms of use", 3))
# the cookie phrases, as (phrase, where "cookie" sits in it)
_COOKIE_PHRASES = tuple((p, p.index("cookie")) for p in POLICY_PHRASES if "cookie" in p)


def _matches(u64: np.ndarray, pos: np.ndarray, phrase: str) -> np.ndarray:
    """Which ``pos`` start ``phrase`` in the lower-cased chunk (``u64`` its 8-byte view)."""
    raw = phrase.encode()
    ok = np.ones(len(pos), dtype=bool)
    for k in range(0, len(raw), 8):
        part = raw[k : k + 8]
        ok &= (u64[pos + k] & _LOW_BYTES[len(part)]) == np.uint64(int.from_bytes(part, "little"))
    return ok


def _phrase_starts(lower: np.ndarray, n: int, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Byte positions where "javascript", "lorem ipsum" and each policy phrase start in the lower-cased chunk
    (padded by 16 bytes), inside one document."""
    body = lower[:n]
    cand = (body == ord("p")) | (body == ord("m"))
    cand &= lower[1 : n + 1] == ord("s")  # "p" and "m" anchor only as "ps" ("ipsum") and "ms" ("terms")
    for c in "jvk":
        cand |= body == ord(c)
    cand = np.flatnonzero(cand)
    kind = body[cand]
    u64 = _u64_at(lower)
    found: dict[str, np.ndarray] = {}
    for c, phrase, at in _PHRASE_ANCHORS:
        start = cand[kind == ord(c)] - at
        start = start[start >= 0]
        found[phrase] = start[_matches(u64, start, phrase)]
    cookie = found.pop("cookie")
    for phrase, at in _COOKIE_PHRASES:
        start = cookie - at
        start = start[start >= 0]
        found[phrase] = start[_matches(u64, start, phrase)]
    for phrase, pos in found.items():  # a match must not run from one document into the next
        pos = pos[pos + len(phrase) <= n]
        doc = np.searchsorted(offsets, pos, side="right")
        found[phrase] = pos[doc == np.searchsorted(offsets, pos + len(phrase) - 1, side="right")]
    return found


@dataclass
class _Chunk:
    """A chunk of documents cut into words and lines (positions are byte offsets into ``b``, word and line
    indices run over the whole chunk)."""

    b: np.ndarray  # the bytes, padded by 16 zero bytes
    n: int  # bytes of text
    offsets: np.ndarray  # document i is b[offsets[i]:offsets[i + 1]]
    e2: np.ndarray  # positions of the bytes 0xE2
    lower: np.ndarray  # the bytes with ASCII letters lower-cased (padded)
    starts: np.ndarray  # word i is b[starts[i]:ends[i]]
    ends: np.ndarray
    bounds: np.ndarray  # words of document i: bounds[i]:bounds[i + 1]
    word_doc: np.ndarray
    alpha_words: np.ndarray  # has a letter
    cum_chars: np.ndarray  # characters of words 0..i-1
    line_first: np.ndarray  # line j: words line_first[j]..line_last[j]
    line_last: np.ndarray
    line_of_word: np.ndarray

    @property
    def nd(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def line_doc(self) -> np.ndarray:
        return self.word_doc[self.line_first]

    def doc_of_bytes(self, pos: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, pos, side="right") - 1

    def per_doc(self, doc: np.ndarray, weights=None) -> np.ndarray:
        return np.bincount(doc, weights=weights, minlength=self.nd)


def _cut(b: np.ndarray, n: int, offsets: np.ndarray) -> _Chunk:
    """Words (with their letters and characters) and lines of a chunk."""
    body = b[:n]
    high = np.flatnonzero(body >= 0xC0)
    ws = _whitespace(b, n, high)
    word = ~ws
    st = word.copy()
    st[1:] &= ws[:-1]
    en = word
    en[:-1] &= ws[1:]
    inner = offsets[1:-1]
    inner = inner[(inner > 0) & (inner < n)]
    st[inner] = ~ws[inner]  # a document's first word never continues the previous document's last one
    en[inner - 1] = ~ws[inner - 1]
    starts = np.flatnonzero(st)
    ends = np.flatnonzero(en) + 1
    nw = len(starts)
    bounds = np.searchsorted(starts, offsets)
    words = np.diff(bounds)
    word_doc = np.repeat(np.arange(len(offsets) - 1), words)
    nbytes = ends - starts

    lower = np.zeros(n + 16, dtype=np.uint8)
    upper = (body - np.uint8(65)) <= 25
    np.bitwise_or(body, upper.view(np.uint8) << 5, out=lower[:n])
    letters = (lower[:n] - np.uint8(97)) <= 25
    if len(high):
        letters[high] = _alpha_table()[_decode_at(b, high)]
    # one prefix sum counts letters (1) and newlines (2): inside a word it counts letters, between words newlines
    mark = letters.view(np.uint8) | ((body == 10).view(np.uint8) << 1)
    cum = np.zeros(n + 1, dtype=np.uint32)
    np.cumsum(mark, dtype=np.uint32, out=cum[1:])
    at_s, at_e = cum[starts], cum[ends]
    new_line = np.ones(nw, dtype=bool)  # a word after a newline, or a document's first word, starts a line
    new_line[1:] = at_s[1:] != at_e[:-1]
    new_line[bounds[:-1][words > 0]] = True
    chars = nbytes
    if len(high) * 16 > n:  # many multi-byte characters: their continuation bytes are not characters
        np.cumsum(((body & 0xC0) == 0x80).view(np.uint8), dtype=np.uint32, out=cum[1:])
        chars = nbytes - (cum[ends] - cum[starts]).astype(np.int64)
    elif len(high):  # a few: each lead byte inside a word says how many continuation bytes follow it
        inside = high[~ws[high]]
        chars = nbytes.copy()
        follow = 1 + (b[inside] >= 0xE0).astype(np.int64) + (b[inside] >= 0xF0)
        np.subtract.at(chars, np.searchsorted(starts, inside, side="right") - 1, follow)
    cum_chars = np.zeros(nw + 1, dtype=np.int64)
    np.cumsum(chars, out=cum_chars[1:])

    line_first = np.flatnonzero(new_line)
    line_last = np.empty_like(line_first)
    line_last[:-1] = line_first[1:] - 1
    line_last[-1:] = nw - 1
    return _Chunk(b, n, offsets, high[b[high] == 0xE2], lower, starts, ends, bounds, word_doc, at_e != at_s, cum_chars,
                  line_first, line_last, np.cumsum(new_line) - 1)


def _line_ends(c: _Chunk) -> dict[str, np.ndarray]:
    """Lines per document starting with a bullet, ending with an ellipsis, ending with terminal punctuation."""
    last_s, last_e = c.starts[c.line_last], c.ends[c.line_last]
    last_cp = _last_chars(c.b, last_s, last_e)
    three = _u64_at(c.b)[np.maximum(last_e - 3, 0)] & _LOW_BYTES[3]
    ellipsis = (last_cp == 0x2026) | ((last_e - last_s >= 3) & (three == np.uint64(int.from_bytes(b"...", "little"))))
    doc = c.line_doc
    return {"bullet_lines": c.per_doc(doc, np.isin(_decode_at(c.b, c.starts[c.line_first]), _BULLET_CPS)),
            "ellipsis_lines": c.per_doc(doc, ellipsis), "terminal_lines": c.per_doc(doc, np.isin(last_cp, _TERMINAL_CPS))}


def _stop_words(c: _Chunk, first8: np.ndarray) -> np.ndarray:
    """Distinct stop words per document: words of 2 to 4 bytes, ASCII-folded (OR 0x20 lowers letters and maps no
    other byte to one), looked up by a perfect hash."""
    nbytes = c.ends - c.starts
    short = np.flatnonzero((nbytes - 2) <= 2)
    folded = first8[short] | (_LOW_BYTES[nbytes[short]] & np.uint64(0x2020202020202020))
    slot = (folded * _STOP_MUL) >> np.uint64(64 - _STOP_BITS)
    cell = (c.word_doc[short] << _STOP_BITS) + slot.astype(np.intp)
    seen = np.zeros(c.nd << _STOP_BITS, dtype=bool)
    seen[cell[_STOP_TABLE[slot] == folded]] = True
    return seen.reshape(c.nd, -1).sum(axis=1)


def _symbols(c: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: number of '#', of ellipses ('...' three dots of a run each, and '…'), and whether '{' occurs."""
    body = c.b[: c.n]
    marks = np.flatnonzero((body == 35) | (body == 46) | (body == 123))
    kind = body[marks]
    dots = marks[kind == 46]
    dot_doc = c.doc_of_bytes(dots)
    run_start = np.ones(len(dots), dtype=bool)
    run_start[1:] = (dots[1:] != dots[:-1] + 1) | (dot_doc[1:] != dot_doc[:-1])
    firsts = np.flatnonzero(run_start)
    ell = c.per_doc(dot_doc[firsts], np.diff(np.append(firsts, len(dots))) // 3)
    e2 = c.e2
    ell += c.per_doc(c.doc_of_bytes(e2[(c.b[e2 + 1] == 0x80) & (c.b[e2 + 2] == 0xA6)]))
    return c.per_doc(c.doc_of_bytes(marks[kind == 35])), ell, c.per_doc(c.doc_of_bytes(marks[kind == 123])) > 0


def _c4_phrases(c: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: "lorem ipsum" present, lines with "javascript", lines with a policy phrase."""
    found = _phrase_starts(c.lower, c.n, c.offsets)
    doc = c.line_doc

    def lines_with(pos: np.ndarray) -> np.ndarray:
        hit_lines = np.unique(c.line_of_word[np.searchsorted(c.starts, pos, side="right") - 1])
        return c.per_doc(doc[hit_lines])

    lorem = c.per_doc(c.doc_of_bytes(found[LOREM_IPSUM])) > 0
    return lorem, lines_with(found[JAVASCRIPT]), lines_with(np.concatenate([found[p] for p in POLICY_PHRASES]))


def _dup_lines(c: _Chunk, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per document: lines equal to an earlier line, and their characters. A line's hash is a polynomial hash of its
    word hashes, moved to the line's first word."""
    nw = len(hashes)
    pw, inv = _powers(nw + 1)
    line_sum = np.zeros(nw + 1, dtype=np.uint64)
    np.cumsum(hashes * pw[:nw], out=line_sum[1:])
    first, last = c.line_first, c.line_last
    line_hash = _mix((line_sum[last + 1] - line_sum[first]) * inv[first] + (last - first).astype(np.uint64))
    doc = c.line_doc
    pos, same = _sort_keys(line_hash, np.arange(len(first)), doc)
    dup = pos[same]  # every occurrence after a line's first
    return c.per_doc(doc[dup]), c.per_doc(doc[dup], c.cum_chars[last[dup] + 1] - c.cum_chars[first[dup]])


def _chunk_stats(b: np.ndarray, n: int, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of the documents ``b[offsets[i]:offsets[i + 1]]`` (``n`` bytes, then 16 zero bytes)."""
    c = _cut(b, n, offsets)
    words = np.diff(c.bounds)
    chars = c.cum_chars[c.bounds[1:]] - c.cum_chars[c.bounds[:-1]]
    lines = c.per_doc(c.line_doc)
    hashes, first8 = _word_hashes(_u64_at(b), c.starts, c.ends - c.starts)
    hash_signs, ellipses, curly = _symbols(c)
    lorem, js_lines, policy_lines = _c4_phrases(c)
    dup_lines, dup_line_chars = _dup_lines(c, hashes)
    per_w, per_l, per_c = np.maximum(words, 1), np.maximum(lines, 1), np.maximum(chars, 1)
    return {
        "words": words.astype(np.float64),
        "chars": chars.astype(np.float64),
        "lines": lines.astype(np.float64),
        "mean_word_length": chars / per_w,
        "symbol_word_ratio": np.maximum(hash_signs, ellipses) / per_w,
        **{k: v / per_l for k, v in _line_ends(c).items()},
        "alpha_words": c.per_doc(c.word_doc, c.alpha_words) / per_w,
        "stop_words": _stop_words(c, first8).astype(np.float64),
        "dup_lines": dup_lines / per_l,
        "dup_line_chars": dup_line_chars / per_c,
        **{k: v / per_c for k, v in _repetition(hashes, c.cum_chars, c.word_doc, c.nd).items()},
        "lorem_ipsum": lorem.astype(np.float64),
        "curly_bracket": curly.astype(np.float64),
        "javascript_lines": js_lines / per_l,
        "policy_lines": policy_lines / per_l,
    }


def _repetition(hashes: np.ndarray, cum_chars: np.ndarray, word_doc: np.ndarray, nd: int) -> dict[str, np.ndarray]:
    """Characters per document covered by the top 2/3/4-gram and by repeated 5..10-grams.

    An n-gram can repeat only where the (n-1)-grams at i and i + 1 both repeat, so each size sorts only those
    candidates (every word for n = 1, then ever fewer)."""
    nw = len(hashes)
    out = {f"top_{n}gram": np.zeros(nd) for n in TOP_NGRAMS} | {f"dup_{n}gram": np.zeros(nd) for n in DUP_NGRAMS}
    repeated = _repeated(hashes, np.arange(nw), word_doc, nw)
    gram = hashes.copy()
    for n in range(2, max(DUP_NGRAMS) + 1):
        cand = np.flatnonzero(repeated[: max(nw - n + 1, 0)] & repeated[1 : max(nw - n + 2, 1)])
        cand = cand[word_doc[cand] == word_doc[cand + n - 1]]
        if not len(cand):
            break
        gram[cand] = _mix(gram[cand] * _K3 + hashes[cand + n - 1])  # the (n-1)-gram's hash, one word longer
        if n in TOP_NGRAMS:
            pos, run, first, lengths = _sorted_runs(gram[cand], cand, word_doc)
            repeated = np.zeros(nw, dtype=bool)
            repeated[pos[lengths[run] >= 2]] = True
            out[f"top_{n}gram"] = _top_covered(pos, run, first, lengths, n, cum_chars, word_doc, nd)
        else:
            repeated = _repeated(gram[cand], cand, word_doc, nw)
            if n in DUP_NGRAMS:
                out[f"dup_{n}gram"] = _covered(np.flatnonzero(repeated), n, cum_chars, word_doc, nd)
    return out


def _top_covered(pos, run, first, lengths, n, cum_chars, word_doc, nd) -> np.ndarray:
    """Characters per document covered by its most frequent repeated n-gram (ties: more characters, then earliest)."""
    runs = np.flatnonzero(lengths >= 2)
    if not len(runs):
        return np.zeros(nd)
    p0 = pos[first[runs]]
    doc = word_doc[p0]
    key = (lengths[runs].astype(np.int64) << 24) | (cum_chars[p0 + n] - cum_chars[p0])  # characters < 2**23
    best = np.full(nd, -1, dtype=np.int64)
    np.maximum.at(best, doc, key)
    tied = np.flatnonzero(key == best[doc])
    earliest = np.full(nd, np.iinfo(np.int64).max)
    np.minimum.at(earliest, doc[tied], p0[tied])
    chosen = np.zeros(len(lengths), dtype=bool)
    chosen[runs[tied[p0[tied] == earliest[doc[tied]]]]] = True
    return _covered(np.sort(pos[chosen[run]]), n, cum_chars, word_doc, nd)


# ---------------------------------------------------------------- batches


def _utf8_buffers(texts, max_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """The texts of an Arrow string array (or a list), null as "" and cut to ``max_chars`` code points: (their UTF-8
    bytes, int64 offsets: text i is ``data[offsets[i]:offsets[i + 1]]``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(texts, pa.Array):
        texts = pa.array(list(texts), type=pa.string())
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise TypeError(f"text_stats needs a string array, got {texts.type}")
    texts = texts.fill_null("")
    if len(texts) and pc.max(pc.binary_length(texts)).as_py() > max_chars:  # bytes >= characters: else no cut
        texts = pc.utf8_slice_codeunits(texts, 0, max_chars)
    nd = len(texts)
    if not nd:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64 if pa.types.is_large_string(texts.type) else np.int32)
    offsets = offsets[texts.offset : texts.offset + nd + 1].astype(np.int64)
    data = texts.buffers()[2]
    return (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)), offsets


def text_chunks(texts, max_chars: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """The texts of an Arrow string array (or a list), null as "" and cut to ``max_chars`` code points, in chunks of
    consecutive documents holding at most ``_CHUNK_BYTES`` (or one document): (first document, end document,
    the chunk's bytes followed by 16 zero bytes, document offsets into them)."""
    data, offsets = _utf8_buffers(texts, max_chars)
    nd = len(offsets) - 1
    lo = 0
    while lo < nd:
        hi = min(max(int(np.searchsorted(offsets, offsets[lo] + _CHUNK_BYTES, side="right")) - 1, lo + 1), nd)
        a, z = int(offsets[lo]), int(offsets[hi])
        b = np.zeros(z - a + 16, dtype=np.uint8)
        b[: z - a] = data[a:z]
        yield lo, hi, b, offsets[lo : hi + 1] - a
        lo = hi


def text_statistics(texts, max_chars: int, native: bool = True) -> dict[str, np.ndarray]:
    """``STATS`` of every text of an Arrow string array (null = ""), each cut to ``max_chars`` code points: by the
    compiled kernel where it is built and ``native``, else by the numpy path (the same values)."""
    kernel = _native_or_why()[0] if native else None
    if kernel is not None:
        data, offsets = _utf8_buffers(texts, max_chars)
        rows = np.empty((len(STATS), len(offsets) - 1))
        kernel.stats(data, offsets, rows)
        return dict(zip(STATS, rows))
    out = {k: np.zeros(len(texts)) for k in STATS}
    for lo, hi, b, offsets in text_chunks(texts, max_chars):
        stats = _chunk_stats(b, int(offsets[-1]), offsets)
        for k in STATS:
            out[k][lo:hi] = stats[k]
    return out


@dataclass(frozen=True)
class TextStatsScorer:
    """Adapter ``text_stats``: the rule-based quality score, with every statistic and the pre-filter's verdict.

    ``thresholds`` holds ``(rule, min, max)`` replacing the bounds of those rules in ``RULES`` (any of them; see
    :func:`resolve_rules`); ``filter`` the enforced rules, as :func:`resolve_filter` takes them (names, families,
    ``"all"``; kept as the rule names). Fills ``q_<name>`` (the score), ``<name>_stats`` (struct of ``STATS``)
    and ``<name>_rejected`` (the enforced rules a document fails; empty when it passes or none is enforced).
    ``native=False`` computes with the numpy path even where the compiled kernel is built (the same values).
    """

    max_chars: int = 20_000
    filter: tuple[str, ...] = ()
    thresholds: tuple[tuple[str, float | None, float | None], ...] = ()
    output: str = "score"
    native: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "filter", resolve_filter(self.filter or None))
        object.__setattr__(self, "thresholds", tuple(tuple(t) for t in self.thresholds))

    @property
    def rules(self) -> tuple[Rule, ...]:
        if not self.thresholds:
            return RULES
        bounds = {name: (lo, hi) for name, lo, hi in self.thresholds}
        return tuple(Rule(r.name, r.family, r.stat, *bounds.get(r.name, (r.lo, r.hi))) for r in RULES)

    def validate(self) -> None:
        """Nothing to load; checks the settings and builds the Unicode tables (and the compiled kernel) once."""
        from quadmix_udfs.fasttext_scorer import ModelLoadError

        if not 0 < self.max_chars <= MAX_CHARS_LIMIT:
            raise ModelLoadError(f"text_stats: max_chars must be between 1 and {MAX_CHARS_LIMIT:,}")
        if self.native:
            _native_or_why()
        _alpha_table()

    def describe(self) -> str:
        """Which path computes the statistics here (the values are the same either way)."""
        return kernel_description(self.native)

    def fingerprint_settings(self) -> dict:
        """What decides the output beyond the config: the definitions' version and the effective rules."""
        return {"text_stats": VERSION, "rules": [[r.name, r.lo, r.hi] for r in self.rules], "filter": list(self.filter)}

    @staticmethod
    def extra_columns(name: str) -> list[tuple[str, object]]:
        """(column, Arrow type) of the columns filled besides ``q_<name>``."""
        import pyarrow as pa

        return [(name + STATS_SUFFIX, pa.struct([(k, pa.float64()) for k in STATS])),
                (name + REJECTED_SUFFIX, pa.list_(pa.string()))]

    def passes_filter(self, texts) -> np.ndarray:
        """Per text: does it pass every enforced rule (all True when none is)."""
        rules = self.rules
        enforced = [i for i, r in enumerate(rules) if r.name in self.filter]
        stats = text_statistics(texts, self.max_chars, self.native)
        return rule_passes(stats, [rules[i] for i in enforced]).all(axis=0)

    def score(self, texts: Sequence[str | None]) -> tuple[np.ndarray, None]:
        return self.score_arrow(texts)[0], None

    def score_arrow(self, texts) -> tuple[np.ndarray, list]:
        """(scores, [stats struct array, rejected list array]) of an Arrow string array (or a list of str)."""
        import pyarrow as pa

        _keep_freed_memory()
        rules = self.rules
        stats = text_statistics(texts, self.max_chars, self.native)
        passes = rule_passes(stats, rules)
        scores = quality_score(stats, passes, rules)
        struct = pa.StructArray.from_arrays([pa.array(stats[k]) for k in STATS], names=list(STATS))
        enforced = np.array([r.name in self.filter for r in rules])
        doc, rule = np.nonzero((~passes & enforced[:, None]).T)
        counts = np.bincount(doc, minlength=len(scores))
        offsets = np.zeros(len(scores) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        names = pa.array([r.name for r in rules]).take(pa.array(rule))
        rejected = pa.ListArray.from_arrays(pa.array(offsets), names)
        return scores, [struct, rejected]
