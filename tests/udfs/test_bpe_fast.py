"""The fast byte-level BPE path gives the ids ``tokenizers`` gives, on every file kind it accepts.

Files: the shared GPT-NeoX ``tokenizer.json`` and three trained in this session with ``tokenizers`` on shared
text, one per style the fast path claims: GPT-2 (ByteLevel with its regex, no normalizer), RoBERTa-like
(ByteLevel ``add_prefix_space``, a lowercasing normalizer) and Llama-3/Qwen (NFC, ``Split`` with Llama-3's
pattern then ByteLevel without regex, ``ignore_merges``). Each carries added tokens with every flag
(``normalized`` true/false, ``lstrip``, ``rstrip``, ``single_word``, special or not) and whitespace runs.

Inputs: generated strings (mixed scripts, emoji, combining marks, characters the two regex engines' Unicode
versions class differently, unassigned code points, whitespace runs, contractions in any case, added-token
look-alikes, long numbers, NUL and control characters) and every text of the shared data: the web pages, the
multilingual robustness crawl, the target validation set and the reference texts. ``make test``
runs 20,000 generated strings per file; the ``slow`` run 1,000,000 per file. Files with GPT-2's pattern alone are
checked twice, through the compiled inner loop (``udfs/_bpe_native.c``) and through the Python one.
"""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest

from quadmix_udfs import bpe_fast
from tests.conftest import DATA, TOKENIZER

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


SHARED_TEXTS = [  # (file, its text fields): every text the project tokenizes from the shared data
    (DATA / "web" / "weborganizer_dev.jsonl.gz", ("text",)),
    (DATA / "robustness" / "cc_raw_multilingual.jsonl.gz", ("text",)),
    (DATA / "target" / "target_val_texts.jsonl.gz", ("text",)),
    (DATA / "reference" / "enwiki_sample.jsonl.gz", ("text",)),
    (DATA / "reference" / "alpaca_eval_outputs.jsonl.gz", ("instruction", "output")),
]


def _pages(limit: int | None = None) -> list[str]:
    out = []
    for path, fields in SHARED_TEXTS:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out.extend(row[k] for k in fields if isinstance(row.get(k), str))
                if limit and len(out) >= limit:
                    return out[:limit]
    return out


def _added_tokens():
    from tokenizers import AddedToken

    return [
        AddedToken("<mask>", lstrip=True, rstrip=True, single_word=True, normalized=True),
        AddedToken("[SEP]", rstrip=True, normalized=False, special=True),
        AddedToken("<|tag|>", lstrip=True, normalized=False),
        AddedToken("word", single_word=True, normalized=True),
        AddedToken("ΣΑΣ", normalized=True),
        AddedToken("    ", normalized=True),
        AddedToken("  ", normalized=True),
        AddedToken("\n\n", normalized=False),
    ]


def _train(path, style: str) -> str:
    from tokenizers import Regex, Tokenizer, AddedToken, models, normalizers, pre_tokenizers, trainers

    if style in ("gpt2", "gpt2_plain"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "roberta":
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken("<|endoftext|>", special=True, normalized=False)],
                                  show_progress=False)
    tok.train_from_iterator(_pages(1500), trainer)
    added = _added_tokens()
    if style == "gpt2_plain":  # no single_word/lstrip/rstrip: the compiled whole-text count applies
        added = [t for t in added if not (t.single_word or t.lstrip or t.rstrip)]
    tok.add_tokens(added)
    out = str(path / f"{style}.json")
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"gpt_neox": str(TOKENIZER), **{s: _train(folder, s) for s in ("gpt2", "gpt2_plain", "roberta", "llama3")}}


def generated(n: int, seed: int) -> list[str]:
    """``n`` random strings built from fragments that stress each step of the pipeline."""
    rng = np.random.default_rng(seed)
    mismatch = np.flatnonzero(bpe_fast.class_mismatch())
    unassigned = np.flatnonzero(bpe_fast.python_unassigned())
    unassigned = unassigned[(unassigned < 0xD800) | (unassigned > 0xDFFF)]
    words = ["the", "The", "THE", "don't", "DON'T", "we'LL", "it'S", "I'm", "word", "words", "sword", "Word",
             "<mask>", "<mask", "mask>", "[SEP]", "[SEP", "<|tag|>", "<|endoftext|>", "<|endoftext", "ΣΑΣ", "σας",
             "naïve", "cafe\u0301", "Å", "A\u030a", "ﬁ", "Ⅻ", "①", "½", "٣٤٥", "१२३", "ſ", "K", "İstanbul", "ǅ",
             "東京", "한국어", "Москва", "عربي", "עברית", "ภาษาไทย", "🙂", "👩‍👩‍👧", "🇫🇷", "e\u0301\u0301",
             "12345678901234567890", "3.14159", "1,000,000", "0x1F", "http://a.b/c?d=e", "foo_bar", "a-b", "...",
             "—", "“quoted”", "$", "€", "\u200b", "\ufeff", "\u00ad", "\x00", "\x1c", "\x1f", "\x7f", "\x85"]
    spaces = [" ", "  ", "   ", "    ", " " * 9, " " * 25, "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\u00a0",
              "\u2000", "\u2009", "\u3000", "\u1680", "\x0b", "\x0c", "\u2028", ""]

    def frag() -> str:
        r = rng.random()
        if r < 0.45:
            return words[rng.integers(len(words))]
        if r < 0.75:
            return spaces[rng.integers(len(spaces))]
        if r < 0.83:
            return chr(int(mismatch[rng.integers(mismatch.size)]))
        if r < 0.86:
            return chr(int(unassigned[rng.integers(unassigned.size)]))
        if r < 0.93:  # any code point but a surrogate
            c = int(rng.integers(0x110000 - 2048))
            return chr(c + 2048 if c >= 0xD800 else c)
        return "".join(chr(int(c)) for c in rng.integers(0x20, 0x7F, size=rng.integers(1, 12)))

    return ["".join(frag() for _ in range(rng.integers(0, 14))) for _ in range(n)]


def _reference(path: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def _assert_same(path: str, texts: list[str], engine: str = "python") -> None:
    enc = bpe_fast.load_encoder(path, native=engine == "compiled")
    assert enc.fast is not None, enc.reason
    compiled = engine == "compiled"
    # the compiled pre-tokenizer and merges serve GPT-2's pattern alone; the compiled added-token and
    # normalization scans serve every file
    assert (enc.fast.native is not None) == (compiled and enc.fast.chunks is not None), enc.fast.native_reason
    assert (enc.fast.raw_added.trie is not None) == compiled
    want = _reference(path, texts)
    got = enc.encode_batch(texts)
    bad = [i for i in range(len(texts)) if got[i] != want[i]]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {texts[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"
    counts = enc.count_batch(texts)
    np.testing.assert_array_equal(counts, [len(w) for w in want])


STYLES = ["gpt_neox", "gpt2", "roberta", "llama3", "gpt2_plain"]
COMPILED = importlib.util.find_spec("quadmix_udfs._bpe_native") is not None
# (file, engine): the compiled loop serves the files with GPT-2's pattern alone (llama3 has its own pattern, so
# "compiled" there is the compiled added-token and normalization scans only)
RUNS = [("gpt_neox", "compiled"), ("gpt_neox", "python"), ("gpt2", "compiled"), ("gpt2", "python"),
        ("roberta", "compiled"), ("roberta", "python"), ("llama3", "compiled"), ("llama3", "python"),
        ("gpt2_plain", "compiled")]  # gpt2 without added-token rules: the compiled whole-text count (Python: as gpt2)
RUNS = [r for r in RUNS if COMPILED or r[1] == "python"]
SHARED_RUNS = [r for r in RUNS if r[0] in ("gpt_neox", "llama3")]


def test_the_compiled_loop_is_built():
    # setup.py marks it optional so an install without a C compiler works; this project's own set-up builds it
    assert COMPILED, "udfs/_bpe_native.c was not compiled: run make setup (needs a C compiler)"


@pytest.mark.parametrize("style, engine", RUNS)
def test_generated_strings_give_the_same_ids(files, style, engine):
    _assert_same(files[style], generated(20_000, seed=STYLES.index(style)), engine)


@pytest.mark.slow
@pytest.mark.parametrize("style, engine", RUNS)
def test_a_million_generated_strings_give_the_same_ids(files, style, engine):
    for part in range(10):
        _assert_same(files[style], generated(100_000, seed=1000 * (STYLES.index(style) + 1) + part), engine)


@pytest.mark.slow  # ~100 s a file on 2 cores; make test checks every 8th text below
@pytest.mark.parametrize("style, engine", SHARED_RUNS)
def test_every_shared_text_gives_the_same_ids(files, style, engine):
    texts = _pages()
    assert len(texts) > 55_000
    _assert_same(files[style], texts, engine)


@pytest.mark.parametrize("style, engine", SHARED_RUNS)
def test_every_eighth_shared_text_gives_the_same_ids(files, style, engine):
    texts = _pages()[::8]  # every shared file contributes
    assert len(texts) > 55_000 // 8
    _assert_same(files[style], texts, engine)


@pytest.mark.parametrize("style, engine", SHARED_RUNS)  # cached chunks, cached pieces
def test_results_do_not_depend_on_what_was_cached_before(files, style, engine):
    texts = generated(2_000, seed=7) + _pages(300)
    native = engine == "compiled"
    fresh = bpe_fast.load_encoder(files[style], native=native)
    counts, ids = fresh.count_batch(texts), fresh.encode_batch(texts)
    tiny = bpe_fast.Encoder(files[style], bpe_fast.ByteLevelBPE(files[style], native, cache_limit=50), None, fresh.tokenizer)
    # emptied again and again, in another order
    np.testing.assert_array_equal(tiny.count_batch(texts[::-1])[::-1], counts)
    assert tiny.encode_batch(texts[::-1])[::-1] == ids
    # the compiled loop keeps its own cache; llama3's pattern keeps the Python one even with the compiled scans
    held = tiny.fast.native.cached() if tiny.fast.native is not None else len(tiny.fast.pieces)
    assert 0 < held <= max(50, max(len(i) for i in ids))


@pytest.mark.skipif(not COMPILED, reason="the compiled module is not built")
def test_whole_texts_are_counted_in_one_compiled_call_where_the_file_allows(files):
    # the generated-strings and shared-text runs above compare these counts with tokenizers; here: which files
    # take the one-call count, and which texts it leaves to the general path
    takes = {style: bpe_fast.ByteLevelBPE(path).whole_text is not None for style, path in files.items()}
    assert takes == {"gpt_neox": True, "gpt2_plain": True, "gpt2": False, "roberta": False, "llama3": False}
    assert bpe_fast.ByteLevelBPE(files["gpt_neox"], native=False).whole_text is None
    neox = bpe_fast.ByteLevelBPE(files["gpt_neox"])
    whole, general = neox.whole_text, bpe_fast.ByteLevelBPE(files["gpt_neox"])
    general.whole_text = None
    left = ["a<|endoftext|>b", "cafe\u0301", "A\u030a", "x\ud800y"]  # a raw added token, not NFC, a surrogate
    assert [whole(t) for t in left] == [-1] * len(left)
    kept = ["", "plain  text   with    runs", "naïve 東京 🙂\n\n\tend", "<|endoftext", "  " * 40]
    counts = [whole(t) for t in kept]
    assert min(counts) >= 0 and counts == [general.count(t) for t in kept]
    assert [neox.count(t) for t in left[:3]] == [general.count(t) for t in left[:3]]
    with pytest.raises(UnicodeEncodeError):
        neox.count(left[3])
    with pytest.raises(TypeError):
        neox.native.count_text("text", neox.stable, None, None)  # a CodePointSet where a Trie belongs


@pytest.mark.skipif(not COMPILED, reason="the compiled module is not built")
def test_the_compiled_trie_finds_what_the_pattern_finds():
    # overlapping prefixes, a one-character string, strings sharing low bytes of their code points (the pair
    # filter keys on those), astral characters, a string that is a prefix of another
    words = ["ab", "abc", "bcd", "c", "  ", "    ", "\u0120x", "\U0001F600\U0001F600", "\u0161", "a\u0161b", "b"]
    tokens = [bpe_fast._Added(w, i, False, False, False) for i, w in enumerate(words)]
    compiled, pattern = bpe_fast._AddedMatcher(tokens, native=True), bpe_fast._AddedMatcher(tokens, native=False)
    assert compiled.trie is not None and pattern.trie is None
    rng = np.random.default_rng(3)
    alphabet = ["a", "b", "c", "d", " ", "x", "\u0120", "\U0001F600", "\u0161", "a\u0161", "\u0100", "\u0200"]
    texts = ["", "a", "abc", "abcd", "bcd", "      ", "\U0001F600" * 3]
    texts += ["".join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(5000)]
    found = 0
    for t in texts:
        want = pattern._matches(t)
        assert compiled._matches(t) == want, t
        assert compiled.split(t) == pattern.split(t), t
        found += len(want or ())
    assert found > 10_000
    assert compiled._matches("abcd") == [(0, 3, words.index("abc"))]  # "d" after it starts nothing
    # arrays that do not make a trie are refused, never read past their ends
    trie = bpe_fast._compiled().Trie
    i32 = lambda *v: np.array(v, dtype=np.int32).tobytes()  # noqa: E731
    u32 = lambda *v: np.array(v, dtype=np.uint32).tobytes()  # noqa: E731
    assert trie(i32(0, 1, 1), u32(97), i32(1), i32(-1, 0)).find("xa") == [(1, 2, 0)]
    for starts, chars, targets, terminals in [
        (i32(0, 5, 1), u32(97), i32(1), i32(-1, 0)),  # an edge range past the edges
        (i32(0, 1, 1), u32(97), i32(0), i32(-1, 0)),  # an edge back to the root
        (i32(0, 1, 1), u32(0x110000), i32(1), i32(-1, 0)),  # not a code point
        (i32(0, 2, 2), u32(98, 97), i32(1, 1), i32(-1, 0)),  # characters out of order
        (i32(0, 1), u32(97), i32(1), i32(-1, 0)),  # starts of the wrong length
    ]:
        with pytest.raises(ValueError, match="Trie"):
            trie(starts, chars, targets, terminals)


@pytest.mark.parametrize("form", ["NFC", "NFD", "NFKC", "NFKD"])
def test_characters_outside_the_unstable_set_make_only_normalized_text(form):
    import unicodedata

    unstable = bpe_fast.unstable_in(form)
    stable = np.flatnonzero(~unstable)
    assert unstable[0xD800:0xE000].all() and not unstable[:0x80].any()
    assert unstable[0x0301] and unstable[0x00C5 if form.endswith("D") else 0x212B]  # a combining mark; Å / the Ångström sign
    if form in ("NFC", "NFKC"):
        assert unstable[0x1161] and unstable[0x0CD5]  # compose with what comes before (quick check: maybe)
    rng = np.random.default_rng(len(form))
    texts = ["".join(map(chr, rng.choice(stable, size=rng.integers(1, 12)))) for _ in range(20_000)]
    texts += [chr(c) for c in stable]
    bad = [t for t in texts if not unicodedata.is_normalized(form, t)]
    assert not bad, f"{len(bad)} texts of stable characters are not {form}, e.g. {bad[0]!r}"


def test_a_lone_surrogate_is_an_error_as_in_tokenizers(files):
    from tokenizers import Tokenizer

    with pytest.raises((TypeError, UnicodeEncodeError)):
        Tokenizer.from_file(files["gpt2"]).encode("a\ud800b", add_special_tokens=False)
    with pytest.raises(UnicodeEncodeError):
        bpe_fast.load_encoder(files["gpt2"]).fast.encode("a\ud800b")


def test_the_classes_differ_between_the_engines_where_unicode_versions_do():
    # the reason the patterns are not handed to ``regex`` as written: if this ever reads 0, the sets and the
    # mismatch check cost nothing and still hold
    mismatch = bpe_fast.class_mismatch()
    assert mismatch.dtype == bool and mismatch.shape == (0x110000,)
    assert not mismatch[:0x370].any()  # ASCII, Latin and the combining marks agree


def _edit(path: str, out, fn) -> str:
    spec = json.loads(open(path, encoding="utf-8").read())
    fn(spec)
    p = out / "edited.json"
    p.write_text(json.dumps(spec), encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("change, reason", [
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
    (lambda s: s["model"].update(end_of_word_suffix="</w>"), "end_of_word_suffix"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "does not end with ByteLevel"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{Lu}+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}), r"\p{Lu}"),
    (lambda s: s.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+"}, "behavior": "Removed", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}), "Removed"),
])
def test_an_unsupported_file_falls_back_to_tokenizers_and_says_why(tmp_path, change, reason, caplog):
    path = _edit(str(TOKENIZER), tmp_path, change)
    with caplog.at_level("WARNING"):
        enc = bpe_fast.load_encoder(path)
    assert enc.fast is None and reason in enc.reason and reason in caplog.text
    assert enc.describe().startswith("tokenizers (")
    texts = ["Hello world, it's 2026!", "  two  spaces", ""]
    if reason != "dropout":  # dropout draws merges at random
        assert enc.encode_batch(texts) == _reference(path, texts)


def test_translated_patterns_use_oniguruma_sets():
    out = bpe_fast.translate_pattern(r" ?[^\s\p{L}\p{N}]+|\S")
    assert r"\p{" not in out and r"\s" not in out and out.startswith(" ?[^")
    with pytest.raises(bpe_fast.Unsupported, match=r"\\w"):
        bpe_fast.translate_pattern(r"\w+")
    with pytest.raises(bpe_fast.Unsupported, match="inside"):
        bpe_fast.translate_pattern(r"[\S]")
