"""The compiled kernel of ``text_stats`` (udfs/_text_stats_native.c) against the numpy path: every statistic, the
same float64 bits, on the shared web pages, the raw crawl, generated texts, in any batching, on a document of the
largest size and on forced 42-bit hash collisions (where numpy's rule, not the exact one, decides); and what it
does with invalid UTF-8 and bad buffers. Every test needs the module built and says so when it is not."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pyarrow as pa
import pytest

import quadmix_udfs.text_stats as ts
from quadmix_udfs.text_stats import MAX_CHARS_LIMIT, STATS, TextStatsScorer, text_statistics
from tests.conftest import DATA
from tests.udfs.test_text_stats import ODD, read_texts, reference


@pytest.fixture(scope="module")
def kernel():
    kernel, why = ts._native_or_why()
    if kernel is None:
        if importlib.util.find_spec("quadmix_udfs._text_stats_native") is not None:
            pytest.fail(f"the compiled kernel is built but not used: {why}")
        pytest.skip(f"udfs/_text_stats_native.c is {why}; build it: python setup.py build_ext --inplace")
    return kernel


def assert_same(texts, max_chars: int = 20_000) -> dict[str, np.ndarray]:
    """The compiled kernel's statistics equal the numpy path's, bit for bit; returns them."""
    arr = texts if isinstance(texts, pa.Array) else pa.array(texts, type=pa.string())
    got = text_statistics(arr, max_chars)
    want = text_statistics(arr, max_chars, native=False)
    for k in STATS:
        assert got[k].dtype == np.float64 and want[k].dtype == np.float64
        if not np.array_equal(got[k], want[k]):
            i = int(np.flatnonzero(got[k] != want[k])[0])
            text = arr[i].as_py()
            raise AssertionError(f"{k} of text {i} ({(text or '')[:80]!r}): compiled {got[k][i]!r}, "
                                 f"numpy {want[k][i]!r}")
    return got


# ---------------------------------------------------------------- which path runs


def test_the_compiled_kernel_is_what_runs_when_built(kernel, monkeypatch):
    assert ts.kernel_description() == "compiled kernel (quadmix_udfs._text_stats_native)"
    assert ts.kernel_description(native=False).startswith("numpy")

    def numpy_path(*args):
        raise AssertionError("the numpy path ran")

    monkeypatch.setattr(ts, "_chunk_stats", numpy_path)
    texts = ["The cat sat on the mat.\nThe cat sat on the mat.", None, ""]
    assert text_statistics(pa.array(texts), 100)["dup_lines"].tolist() == [0.5, 0, 0]
    scores, (stats, _) = TextStatsScorer().score_arrow(pa.array(texts))
    assert stats.field("lines").to_pylist() == [2, 0, 0]
    TextStatsScorer().validate()
    for numpy_only in (lambda: text_statistics(pa.array(texts), 100, native=False),
                       lambda: TextStatsScorer(native=False).score_arrow(pa.array(texts))):
        with pytest.raises(AssertionError, match="the numpy path ran"):
            numpy_only()


def test_the_kernel_takes_its_definitions_from_the_module(kernel):
    from quadmix_udfs import _text_stats_native as native

    assert native.STATS == STATS
    flags = np.frombuffer(ts._flags_table(), dtype=np.uint8)
    assert [chr(c) for c in np.flatnonzero(flags & 4)] == sorted(ts.BULLETS)
    assert [chr(c) for c in np.flatnonzero(flags & 8)] == sorted(ts.TERMINAL)
    assert [chr(c) for c in np.flatnonzero(flags & 2)] == [c for c in map(chr, range(0x110000)) if c.isspace()]
    # another stop word list, phrase list or bullet set changes what the kernel counts
    bullets = bytearray(ts._flags_table())
    bullets[ord("+")] |= 4
    other = native.Kernel(bytes(bullets), [b"cat", b"harbours", b"quays"], [b"sat on"], [b"the mat"], [b"the cat"])
    texts = pa.array(["+ The cat sat on the mat\nthe cat HARBOURSX quay"])  # HARBOURSX, quay: only whole words count
    data, offsets = ts._utf8_buffers(texts, 100)
    rows = np.empty((len(STATS), 1))
    other.stats(data, offsets, rows)
    got = dict(zip(STATS, rows[:, 0]))
    names = ("bullet_lines", "stop_words", "lorem_ipsum", "javascript_lines", "policy_lines")
    assert [got[k] for k in names] == [0.5, 1, 1, 0.5, 1]


# ---------------------------------------------------------------- real pages


def test_every_shared_web_page_and_the_raw_crawl(kernel):
    pages = read_texts(DATA / "web" / "weborganizer_dev.jsonl.gz")
    assert len(pages) > 8000
    assert_same(pages)
    assert_same(pages[:500], max_chars=1000)
    assert_same(read_texts(DATA / "robustness" / "cc_raw_multilingual.jsonl.gz"))


def test_odd_texts_and_null(kernel):
    assert_same([*ODD.values(), None])
    for max_chars in (1, 2, 7, 50):
        assert_same(list(ODD.values()), max_chars)


# ---------------------------------------------------------------- generated texts

WORDS = [
    "the", "The", "THE", "cat", "sat", "on", "mat", "a", "I", "of", "and", "AND", "to", "be", "that", "have", "with",
    "With", "theme", "bee", "haves", "é", "naïve", "Straße", "Ωμέγα", "Жук", "日本語", "中文", "😀", "🎉x", "x😀y", "ﬁ", "Ⅻ",
    "٣", "a\u0300", "\u200b", "\ufeff", "x\x00y", "\x00", "\x01", "\x7f", "#tag", "#", "##", "{x}", "{", "}", "...",
    "wait...", "…", "end…", "....", "......", "-", "*", "•", "‣", "–", "►item", "—", "·", "word.", "why?", "yes!",
    '"q"', "'s'", "”", "’", "。", "！", "？", "lorem", "Lorem", "ipsum", "IPSUM", "javascript", "JavaScript",
    "xjavascriptx", "cookies", "Cookie", "policy", "Privacy", "terms", "use", "uses", "supercalifragilistic",
    "abcdefgh", "abcdefghi", "ABCDEFGHIJKLMNOPQ", "12345678", "1234567890123456", "https://example.com/a/b/c",
]
PHRASES = [
    "lorem ipsum", "Lorem Ipsum", "LOREM IPSUM dolor", "javascript", "JavaScript:void(0)", "terms of use",
    "Terms Of Use", "privacy policy", "PRIVACY POLICY", "cookie policy", "uses cookies", "use of cookies",
    "use cookies", "USE COOKIES", "abuses cookies", "privacy policyjavascript", "privacy\npolicy", "lorem\nipsum",
    "java\nscript", "terms of\nuse", "privacy  policy", "cookie\u00a0policy", "privacy\tpolicy", "use\r\ncookies",
]
SPACES = [
    "\t", "\n", "\x0b", "\x0c", "\r", "\r\n", "\x1c", "\x1d", "\x1e", "\x1f", " ", "\x85", "\xa0", "\u1680",
    *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "  ", " \n ", "\n\n",
]


def generated(n: int, seed: int) -> list[str | None]:
    """Texts of a few lines over a small vocabulary each (so words, n-grams and lines repeat), with every kind of
    whitespace, bullets, ellipses, terminal punctuation, the C4 phrases (mixed case, some across a line break),
    letters beyond ASCII, CJK, emoji, NUL; and some empty, blank and null texts."""
    rng = random.Random(seed)
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(None)
            continue
        if r < 0.04:
            out.append("")
            continue
        if r < 0.07:
            out.append("".join(rng.choices(SPACES, k=rng.randint(1, 5))))
            continue
        vocab = rng.sample(WORDS, rng.randint(1, 10))
        lines: list[str] = []
        for _ in range(rng.randint(1, 9)):
            if lines and rng.random() < 0.25:  # a repeated line, or the same words with other spacing
                line = rng.choice(lines)
                lines.append(line if rng.random() < 0.5 else "\t" + line.replace(" ", "  ") + " ")
                continue
            parts = []
            for _ in range(rng.randint(0, 12)):
                parts.append(rng.choice(PHRASES) if rng.random() < 0.06 else rng.choice(vocab))
                parts.append(" " if rng.random() < 0.8 else rng.choice(SPACES))
            if rng.random() < 0.15:
                parts *= rng.randint(2, 4)
            lines.append(rng.choice(["", "", "", "• ", "- ", " ", "\u3000"]) + "".join(parts))
        out.append(rng.choice(["", "", " ", "\n"]) + rng.choice(["\n", "\n", "\r\n", "\u2028"]).join(lines)
                   + rng.choice(["", "", "\n", " ", "\r\n"]))
    return out


def test_twenty_thousand_generated_texts(kernel):
    texts = generated(20_000, seed=11)
    got = assert_same(texts)
    for k in ("dup_lines", "top_2gram", "dup_10gram", "bullet_lines", "ellipsis_lines", "terminal_lines",
              "lorem_ipsum", "curly_bracket", "javascript_lines", "policy_lines", "stop_words", "symbol_word_ratio"):
        assert (got[k] > 0).sum() > 200, k  # the texts exercise every statistic
    assert_same(texts[:4000], max_chars=40)


def test_generated_texts_follow_the_definitions():
    """The generator's texts against the plain Python reference (the numpy path, and so the kernel)."""
    texts = generated(600, seed=5)
    got = text_statistics(pa.array(texts, type=pa.string()), 20_000)
    for i, t in enumerate(texts):
        want = reference(t)
        assert {k: got[k][i] for k in STATS} == want, f"text {i} {t!r}"


# ---------------------------------------------------------------- batching


def test_any_batching_gives_the_same_bits(kernel, monkeypatch):
    texts = read_texts(DATA / "web" / "weborganizer_dev.jsonl.gz", n=300) + generated(700, seed=3)
    full = assert_same(texts)
    monkeypatch.setattr(ts, "_CHUNK_BYTES", 300)  # the numpy path in chunks of a few texts (or one larger one)
    assert_same(texts)
    rng = np.random.default_rng(8)
    order = rng.permutation(len(texts))
    for part in [*np.array_split(order, 9), order[:1], order[-1:], np.arange(len(texts))[::-1]]:
        got = text_statistics(pa.array([texts[i] for i in part], type=pa.string()), 20_000)
        for k in STATS:
            assert got[k].tobytes() == full[k][part].tobytes(), k
    large = pa.array(texts, type=pa.large_string()).slice(17, 400)  # large_string, an offset into the buffers
    got = text_statistics(large, 20_000)
    assert all(got[k].tobytes() == full[k][17:417].tobytes() for k in STATS)
    assert all(len(v) == 0 for v in text_statistics(pa.array([], type=pa.string()), 100).values())


# ---------------------------------------------------------------- the largest document


def test_a_document_of_the_largest_size(kernel):
    unit = ("Annual report of the harbour authority, naïve café — 日本語 😀 the cat sat on the mat.\n"
            "The cat sat on the mat.\n• bullet line…\nlorem ipsum {x} #tag ...\n")
    huge = unit * (MAX_CHARS_LIMIT // len(unit) + 2)
    got = assert_same([huge, "after it", None], max_chars=MAX_CHARS_LIMIT)
    assert got["words"][0] == len(huge[:MAX_CHARS_LIMIT].split()) and got["dup_10gram"][0] > 0.99


@pytest.mark.slow
def test_the_most_words_a_document_can_hold(kernel):
    rng = random.Random(2)
    words = " ".join(rng.choices("abcdefghij", k=MAX_CHARS_LIMIT // 2))  # 2**22 words of one character
    got = assert_same([words, "😀" * MAX_CHARS_LIMIT, "z"], max_chars=MAX_CHARS_LIMIT)
    assert got["words"].tolist() == [MAX_CHARS_LIMIT // 2, 1, 1]


# ---------------------------------------------------------------- forced 42-bit collisions

_M = (1 << 64) - 1
_K1, _K2, _K3, _P = int(ts._K1), int(ts._K2), int(ts._K3), ts._P
_TOP = ~np.uint64((1 << ts._POS_BITS) - 1)


def _unmix(x: np.ndarray) -> np.ndarray:
    """The inverse of ts._mix (each xor-shift by 33 undoes itself; the products by the inverse constants)."""
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(pow(_K2, -1, 1 << 64))
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(pow(_K1, -1, 1 << 64))
    return x ^ (x >> np.uint64(33))


def _word_hash(word: bytes) -> int:
    """The numpy path's hash of one word."""
    b = np.zeros(len(word) + 16, dtype=np.uint8)
    b[: len(word)] = np.frombuffer(word, dtype=np.uint8)
    return int(ts._word_hashes(ts._u64_at(b), np.array([0]), np.array([len(word)]))[0][0])


def _printable(target: int, solve, size: int) -> list[bytes]:
    """Words of ``size`` printable ASCII bytes that ``solve`` makes from the hashes sharing the top 42 bits of
    ``target`` (it gives their packed little-endian values, as uint64)."""
    packed = solve((np.uint64(target) & _TOP) | np.arange(1 << ts._POS_BITS, dtype=np.uint64))
    as_bytes = packed.view(np.uint8).reshape(-1, 8)
    word, rest = as_bytes[:, :size], as_bytes[:, size:]
    ok = ((word >= 0x21) & (word <= 0x7E)).all(axis=1) & (rest == 0).all(axis=1)
    return [bytes(w) for w in as_bytes[ok][:, :size]]


def _first_colliding(words: list[bytes], hash_of, target: int) -> bytes:
    """The first of ``words`` whose ``hash_of`` differs from ``target`` in the low 22 bits only."""
    found = [w for w in words if hash_of(w) != target and (hash_of(w) ^ target) >> ts._POS_BITS == 0]
    assert found, "no printable word among these hashes"
    return found[0]


def _colliding_word(word: bytes) -> bytes:
    """Another word of the same length (7, 8 or 16 bytes) whose hash has the top 42 bits of ``word``'s."""
    target = _word_hash(word)
    if len(word) == 16:  # mix(mix(piece 0) + mix(piece 1 + K3) + 16 K1): piece 0 kept, piece 1 solved
        head = np.uint64(int(ts._mix(np.array([int.from_bytes(word[:8], "little")], dtype=np.uint64))[0]))
        tails = _printable(target, lambda h: _unmix(_unmix(h) - np.uint64(16 * _K1 & _M) - head) - np.uint64(_K3), 8)
        return _first_colliding([word[:8] + t for t in tails], _word_hash, target)
    length = np.uint64(len(word) << 56 if len(word) < 8 else 0)  # below 8 bytes the length is packed above them
    return _first_colliding(_printable(target, lambda h: _unmix(h) ^ length, len(word)), _word_hash, target)


def _bigram_partner(a: bytes, b: bytes, c: bytes) -> bytes:
    """An 8-byte word d whose bigram (c, d) has the top 42 bits of the bigram hash of (a, b)."""
    def gram(x: bytes, y: bytes) -> int:
        return int(ts._mix(np.array([(_word_hash(x) * _K3 + _word_hash(y)) & _M], dtype=np.uint64))[0])

    hc = np.uint64(_word_hash(c) * _K3 & _M)
    return _first_colliding(_printable(gram(a, b), lambda h: _unmix(_unmix(h) - hc), 8),
                            lambda d: gram(c, d), gram(a, b))


def _line_partner(a: bytes, b: bytes, c: bytes) -> bytes:
    """An 8-byte word d whose line "c d" has the top 42 bits of the line hash of "a b"."""
    def line(x: bytes, y: bytes) -> int:
        return int(ts._mix(np.array([(_word_hash(x) + _word_hash(y) * _P + 1) & _M], dtype=np.uint64))[0])

    inv_p, hc = np.uint64(pow(_P, -1, 1 << 64)), np.uint64(_word_hash(c))
    return _first_colliding(_printable(line(a, b), lambda h: _unmix((_unmix(h) - np.uint64(1) - hc) * inv_p), 8),
                            lambda d: line(c, d), line(a, b))


def test_forced_42_bit_collisions_give_numpys_answer(kernel):
    a, b, c = b"harbours", b"quarters", b"lanterns"
    d = _line_partner(a, b, c)
    lines = f"{a.decode()} {b.decode()}\n{c.decode()} {d.decode()}"
    got = assert_same([lines])
    assert got["dup_lines"][0] == 0.5 and reference(lines)["dup_lines"] == 0  # numpy's rule: the same line

    for word in (b"kilnmen", b"cornmeal", b"shipwrigworkshop"):
        e = _colliding_word(word)
        d = _bigram_partner(a, b, word)
        # the bigrams (a, b) and (word, d) collide; word occurs once, so its bigram is compared only because e
        # (another word) collides with it: numpy's candidates, not the exact repetitions, decide
        seen, unseen = (b" ".join([a, b, b"f1", word, d, b"f2", other, b"f3", a, b"f4", d, b]).decode()
                        for other in (e, b"f5"))
        got = assert_same([seen, unseen])
        assert got["top_2gram"][0] > 0 and got["top_2gram"][1] == 0
        assert reference(seen)["top_2gram"] == 0 and reference(unseen)["top_2gram"] == 0


# ---------------------------------------------------------------- invalid input


def test_invalid_utf8_gives_per_document_values_and_stays_in_bounds(kernel):
    rng = random.Random(4)
    pieces = [b"\xff", b"\xc3", b"\xe2\x80", b"\xf0\x9f\x98", b"\x80\x85\xa0", b"\xed\xa0\x80", b"\xc0\xaf",
              b"\xf4\x90\x80\x80", b"\xc2\x85", b"\xe2\x80\xa6", b"...", b"word", b" ", b"\n", b"#", b"javascript"]
    docs = [b"".join(rng.choices(pieces, k=rng.randint(0, 12))) for _ in range(400)]
    docs += [b"\xc3", b"\xe2\x80", b"ok \xf0\x9f\x98", b"\xe2"]  # a multi-byte character cut by the end
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    data = np.frombuffer(b"".join(docs), dtype=np.uint8)
    rows = np.empty((len(STATS), len(docs)))
    kernel.stats(data, offsets, rows)
    assert np.isfinite(rows).all()
    for i in rng.sample(range(len(docs)), 60):  # alone, each document has the values it has in the batch
        one = np.empty((len(STATS), 1))  # and nothing after its end counts (these bytes would complete a "…")
        kernel.stats(np.frombuffer(docs[i] + b"\x80\xa6\x80", dtype=np.uint8), np.array([0, len(docs[i])]), one)
        assert one[:, 0].tobytes() == rows[:, i].tobytes()
    valid = [i for i, d in enumerate(docs) if _decodes(d)]
    want = text_statistics(pa.array([docs[i].decode() for i in valid]), 1 << 20, native=False)
    assert all(np.array_equal(rows[k][valid], want[s]) for k, s in enumerate(STATS))


def _decodes(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_the_kernel_refuses_bad_buffers_and_settings(kernel):
    from quadmix_udfs import _text_stats_native as native

    data = np.frombuffer(b"abc def", dtype=np.uint8)
    out = np.empty((len(STATS), 2))
    for offsets in ([0, 4, 3], [0, 4, 8], [-1, 3, 7]):
        with pytest.raises(ValueError, match="do not delimit a document"):
            kernel.stats(data, np.array(offsets, dtype=np.int64), out)
    with pytest.raises(ValueError, match="out must be"):
        kernel.stats(data, np.array([0, 3, 7], dtype=np.int64), np.empty((len(STATS), 3)))
    for offsets in (np.array([0, 3, 7], dtype=np.int32), np.zeros(0, dtype=np.int64)):
        with pytest.raises(ValueError, match="offsets must be"):
            kernel.stats(data, offsets, out)
    with pytest.raises(TypeError, match="already initialised"):
        kernel.__init__(ts._flags_table(), [], [], [], [])
    flags = ts._flags_table()
    for args, message in (((flags[:-1], [], [], [], []), "one byte per code point"),
                          ((flags, [b"The"], [], [], []), "lower-case ASCII letters"),
                          ((flags, [b"the", b"the"], [], [], []), "twice"),
                          ((flags, [b"stopwords"], [], [], []), "1 to 8 bytes"),
                          ((flags, [], [b"Lorem"], [], []), "a phrase must be"),
                          ((flags, [], [b" x"], [], []), "a phrase must be"),
                          ((bytes(0x110000), [], [], [], []), "ASCII letters")):
        with pytest.raises(ValueError, match=message):
            native.Kernel(*args)
    with pytest.raises(ValueError, match="not initialised"):
        native.Kernel.__new__(native.Kernel).stats(data, np.array([0, 7], dtype=np.int64), np.empty((len(STATS), 1)))
