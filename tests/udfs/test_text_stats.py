"""The ``text_stats`` scorer: every statistic against a plain Python reference on real pages and odd texts, the
score, the pre-filter, the config checks; and, in Spark, the annotation columns, the reject counts and the
sampler leaving rejected documents out."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

import quadmix_udfs.text_stats as ts
from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.core.config import ConfigError
from quadmix_spark.curation.scorers import ScorerError, build_scorer, fingerprint
from quadmix_udfs.scoring import ScorerRun, score_batch
from quadmix_udfs.text_stats import (RULES, STATS, TextStatsScorer, kernel_description, quality_score, rule_passes,
                                     text_statistics)
from tests.conftest import DATA

LID = str(DATA / "models" / "lid" / "lid.176.ftz")


def read_texts(path, field="text", n=None) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line)[field] for _, line in zip(range(n or 10**9), f)]


# ---------------------------------------------------------------- the reference


def reference(text: str | None, max_chars: int = 20_000) -> dict[str, float]:
    """Every statistic the slow, obvious way, from the module docstring's definitions."""
    t = (text or "")[:max_chars]
    words = t.split()
    n_words, sizes = len(words), [len(w) for w in words]
    chars = sum(sizes)
    raw_lines = [line for line in t.split("\n") if line.split()]
    lines = [line.split() for line in raw_lines]
    n_lines = len(lines)

    def frac(a, b):
        return a / b if b else 0.0

    def lower(s: str) -> bytes:
        return s.encode().lower()  # bytes.lower: ASCII letters only

    out = {
        "words": n_words, "chars": chars, "lines": n_lines,
        "mean_word_length": frac(chars, n_words),
        "symbol_word_ratio": frac(max(t.count("#"), t.count("...") + t.count("…")), n_words),
        "bullet_lines": frac(sum(line[0][0] in ts.BULLETS for line in lines), n_lines),
        "ellipsis_lines": frac(sum(line[-1].endswith(("...", "…")) for line in lines), n_lines),
        "alpha_words": frac(sum(any(c.isalpha() for c in w) for w in words), n_words),
        "stop_words": sum(any(lower(w) == s.encode() for w in words) for s in ts.STOP_WORDS),
        "terminal_lines": frac(sum(line[-1][-1] in ts.TERMINAL for line in lines), n_lines),
        "lorem_ipsum": float(b"lorem ipsum" in lower(t)),
        "curly_bracket": float("{" in t),
        "javascript_lines": frac(sum(b"javascript" in lower(line) for line in raw_lines), n_lines),
        "policy_lines": frac(sum(any(p.encode() in lower(line) for p in ts.POLICY_PHRASES) for line in raw_lines), n_lines),
    }
    seen, dup, dup_chars = set(), 0, 0
    for line in lines:
        if tuple(line) in seen:
            dup, dup_chars = dup + 1, dup_chars + sum(map(len, line))
        seen.add(tuple(line))
    out["dup_lines"], out["dup_line_chars"] = frac(dup, n_lines), frac(dup_chars, chars)
    for n in range(2, 11):
        grams = [tuple(words[i : i + n]) for i in range(n_words - n + 1)]
        count = Counter(grams)
        covered = [False] * n_words
        if n in ts.TOP_NGRAMS:
            repeated = [g for g, c in count.items() if c >= 2]
            if repeated:
                first = {}
                for i, g in enumerate(grams):
                    first.setdefault(g, i)
                best = max(repeated, key=lambda g: (count[g], sum(map(len, g)), -first[g]))
                for i, g in enumerate(grams):
                    if g == best:
                        covered[i : i + n] = [True] * n
            out[f"top_{n}gram"] = frac(sum(s for s, c in zip(sizes, covered) if c), chars)
        else:
            for i, g in enumerate(grams):
                if count[g] >= 2:
                    covered[i : i + n] = [True] * n
            out[f"dup_{n}gram"] = frac(sum(s for s, c in zip(sizes, covered) if c), chars)
    return {k: float(out[k]) for k in STATS}


def assert_matches_reference(texts, max_chars=20_000):
    got = text_statistics(pa.array(texts, type=pa.string()), max_chars)
    for i, t in enumerate(texts):
        want = reference(t, max_chars)
        wrong = {k: (got[k][i], want[k]) for k in STATS if got[k][i] != want[k]}
        assert not wrong, f"text {i} ({(t or '')[:60]!r}): (vectorized, reference) {wrong}"


ODD = {
    "empty": "",
    "whitespace": " \t\n\r\n \u00a0\u3000 \n",
    "one word": "word",
    "no newline": "A single line of text with no newline at all, but it ends with a full stop.",
    "crlf": "First line ends here.\r\nSecond line too!\r\n\r\nthird line has no end\r\n",
    "unicode punctuation": "“Quoted.” ‘Single’ — dash… end\n« Guillemets » ¿Qué? ¡Sí!\n日本語の文です。\n中文句子！",
    "emoji": "😀 emoji words 😀\n😀 emoji words 😀\nThe end 🎉.",
    "bullets": "• one\n‣ two\n- three\n* four\n· five\nnot a bullet",
    "ellipsis": "wait for it...\nand more…\n....\n. .. ... .... ...... #",
    "unicode spaces": "A\u00a0B\u2003C\u3000D\u2028E\u0085F\x1cG",
    "stop words": "THE The the be TO Of and, that HAVE with With.",
    "boilerplate": "Please enable JavaScript.\nThis site USES COOKIES.\nTerms of Use | Privacy Policy\nLorem Ipsum dolor {x}",
    "repeats": "the cat sat on the mat " * 12 + "\n" + "a b a b a b a b",
    "long words": "supercalifragilistic " * 3 + "x" * 300 + " " + "x" * 299 + "y " + "https://example.com/" + "a/" * 40,
    "control and NUL": "a\x00b c\x01d\x07 \x1fe",
}


# ---------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def web() -> list[str]:
    return read_texts(DATA / "web" / "weborganizer_dev.jsonl.gz", n=400)


def test_statistics_equal_the_reference_on_real_web_pages(web):
    assert_matches_reference(web)


def test_statistics_equal_the_reference_on_raw_multilingual_common_crawl():
    assert_matches_reference(read_texts(DATA / "robustness" / "cc_raw_multilingual.jsonl.gz"))


def test_statistics_equal_the_reference_on_odd_texts_and_null():
    assert_matches_reference([*ODD.values(), None])
    got = text_statistics(pa.array(list(ODD.values())), 20_000)
    at = {name: {k: got[k][i] for k in STATS} for i, name in enumerate(ODD)}
    assert all(v == 0.0 for v in at["empty"].values()) and all(v == 0.0 for v in at["whitespace"].values())
    assert at["one word"]["words"] == 1 and at["one word"]["lines"] == 1 and at["one word"]["terminal_lines"] == 0
    assert at["crlf"]["lines"] == 3 and at["crlf"]["terminal_lines"] == 2 / 3  # the \r does not hide the "." or "!"
    assert at["stop words"]["stop_words"] == 7  # case-insensitive; "and," does not count (punctuation stays)
    assert at["unicode spaces"]["words"] == 7 and at["emoji"]["dup_lines"] == 1 / 3
    boiler = at["boilerplate"]
    got = [boiler[k] for k in ("javascript_lines", "policy_lines", "lorem_ipsum", "curly_bracket")]
    assert got == [0.25, 0.5, 1, 1]


def test_texts_are_cut_to_max_chars_code_points_first():
    texts = ["é" * 30 + " word " * 10, "日本語 " * 20, "😀 " * 40, "short"]
    for max_chars in (1, 7, 25, 50):
        assert_matches_reference(texts, max_chars)
    huge = ("Annual report of the harbour authority. " * 80_000)[:3_000_000]  # a 3 MB page
    assert_matches_reference([huge, "after it"], 20_000)
    got = text_statistics(pa.array([huge]), 20_000)
    assert got["words"][0] == len(huge[:20_000].split()) and got["dup_10gram"][0] > 0.99


def test_a_page_alone_in_any_chunk_or_batch_has_the_same_bits(web, monkeypatch):
    texts = web[:60] + list(ODD.values())
    scorer = TextStatsScorer(max_chars=5000)
    full = text_statistics(pa.array(texts), 5000)
    scores = scorer.score(texts)[0]
    monkeypatch.setattr(ts, "_CHUNK_BYTES", 700)  # chunks of a few pages, and pages larger than a chunk
    rng = np.random.default_rng(3)
    order = rng.permutation(len(texts))
    empty = [i for i, t in enumerate(texts) if not t.split()]
    for part in [*np.array_split(order, 7), order[:1], order[:33], np.array(empty), np.array(empty[:1])]:
        got = text_statistics(pa.array([texts[i] for i in part]), 5000)
        for k in STATS:
            assert got[k].tobytes() == full[k][part].tobytes(), k
        assert scorer.score([texts[i] for i in part])[0].tobytes() == scores[part].tobytes()
    large = pa.array(texts, type=pa.large_string()).slice(5, 20)  # large_string, an offset into the buffers
    got = text_statistics(large, 5000)
    assert all(got[k].tobytes() == full[k][5:25].tobytes() for k in STATS)


def test_a_non_string_array_is_a_clear_error():
    with pytest.raises(TypeError, match="text_stats needs a string array, got int64"):
        text_statistics(pa.array([1, 2]), 100)


# ---------------------------------------------------------------- score and pre-filter


SPAM = [
    "Home | About | Contact | Privacy Policy | Terms of Use\nLogin\nRegister\nCart (0)\nCheckout\nHome\nAbout\nContact",
    "cheap shoes cheap shoes buy cheap shoes online best cheap shoes " * 30,
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore. " * 8,
    "Please enable JavaScript to view this page.\nThis site uses cookies. By continuing you accept our cookie policy.\n"
    "Accept\nDecline\nSkip to content\nMenu",
    "\n".join(f"• Click here for deal #{i} ... #win #free #prize" for i in range(40)),
    "\n".join(f"Tags: shoes, boots, sandals, heels, sneakers, loafers, slippers {i % 3}" for i in range(30)),
    "READ MORE\nREAD MORE\nREAD MORE\nSHARE\nSHARE\nTWEET\nTWEET\nREAD MORE\nSHARE\nTWEET\n" * 5,
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40",
]


def test_the_score_ranks_wikipedia_above_boilerplate_and_spam():
    articles = read_texts(DATA / "reference" / "enwiki_sample.jsonl.gz", n=80)
    wiki = [t[: max(t.rfind("\n\n", 0, 3000), 1000)] for t in articles]  # a first chunk, cut at a paragraph
    scorer = build_scorer("gopher", ScorerConfig(type="text_stats")).adapter
    good, _ = scorer.score(wiki)
    bad, _ = scorer.score(SPAM)
    assert len(wiki) == 80 and np.median(good) > 0.95 and bad.max() < 0.9
    assert np.percentile(good, 5) > bad.max()  # nearly every Wikipedia chunk above every spam page
    assert ((good >= 0) & (good <= 1)).all() and len(np.unique(good)) >= 0.95 * len(good)  # resolution, not levels


def test_the_score_is_the_weighted_share_of_passed_rules_plus_a_bounded_tie_break(web):
    stats = text_statistics(pa.array(web[:50] + SPAM), 20_000)
    passes = rule_passes(stats, RULES)
    weights = ts.rule_weights(RULES)
    assert weights.sum() == pytest.approx(1.0) and weights.min() > ts.TIE_WEIGHT  # one more rule beats any tie-break
    for family, share in ts.FAMILY_WEIGHTS.items():
        assert weights[[r.family == family for r in RULES]].sum() == pytest.approx(share)
    tie = (stats["terminal_lines"] + stats["words"] / (stats["words"] + 300)) / 2
    assert np.allclose(quality_score(stats, passes, RULES), 0.97 * (weights @ passes) + 0.03 * tie, rtol=0, atol=1e-15)
    assert TextStatsScorer().score(["", " \n ", None])[0].tolist() == [0, 0, 0]  # nothing to judge
    assert passes[:, 50:].sum(axis=0).max() < passes[:, :50].sum(axis=0).min()  # spam fails more rules


def test_the_pre_filter_names_the_enforced_rules_a_document_fails():
    texts = ["Too short.", SPAM[1], "A fine sentence with the words of a real text. " * 20]
    plain = build_scorer("g", ScorerConfig(type="text_stats")).adapter
    scores, (stats, rejected) = plain.score_arrow(pa.array(texts))
    assert rejected.to_pylist() == [[], [], []] and stats.type.names == list(STATS)  # no filter configured: none
    assert np.array_equal(scores, plain.score(texts)[0])
    quality = build_scorer("g", ScorerConfig(type="text_stats", filter=["gopher_quality"])).adapter
    got = quality.score_arrow(pa.array(texts))[1][1].to_pylist()
    assert got == [["gopher_word_count", "gopher_stop_words"], ["gopher_stop_words"], []]
    assert quality.passes_filter(texts).tolist() == [False, False, True] and plain.passes_filter(texts).all()
    strict = build_scorer("g", ScorerConfig(type="text_stats", filter="all",
                                            thresholds={"gopher_word_count": {"min": 500}})).adapter
    got = strict.score_arrow(pa.array(texts))[1][1].to_pylist()
    assert "gopher_top_2gram" in got[1] and "gopher_dup_10gram" in got[1]
    assert got[2][0] == "gopher_word_count" and "gopher_dup_10gram" in got[2]  # 200 words < the raised minimum; repeats
    assert got[1] == sorted(got[1], key=ts.RULE_NAMES.index)  # in the order of RULES
    assert TextStatsScorer(filter="c4").filter == tuple(r.name for r in RULES if r.family == "c4")  # specs resolve


def test_score_batch_fills_the_three_columns_on_the_rows_it_scores():
    adapter = build_scorer("g", ScorerConfig(type="text_stats", filter=["gopher_word_count"])).adapter
    run = ScorerRun("g", adapter, "score", ("q_g", "g_stats", "g_rejected"))
    texts = ["Too short.", "one two three " * 30, None, "x"]
    need = [True, False, True, False]
    out = score_batch([run], pa.RecordBatch.from_pydict({"text": texts, "_need_g": need}), ["q_g", "g_stats", "g_rejected"])
    alone, (stats, rejected) = adapter.score_arrow(pa.array([texts[0], texts[2]]))
    assert out.column("q_g").to_pylist() == [alone[0], None, alone[1], None]
    assert out.column("g_stats").to_pylist() == [stats[0].as_py(), None, stats[1].as_py(), None]
    assert out.column("g_rejected").to_pylist() == [["gopher_word_count"], None, ["gopher_word_count"], None]
    none = score_batch([run], pa.RecordBatch.from_pydict({"text": texts, "_need_g": [False] * 4}), ["g_stats", "g_rejected"])
    assert none.column("g_stats").null_count == 4 and none.schema.field("g_stats").type == adapter.extra_columns("g")[0][1]


# ---------------------------------------------------------------- config and versions


def test_text_stats_needs_no_model_and_the_others_still_do():
    assert ScorerConfig(type="text_stats").model is None
    with pytest.raises(ValueError, match="a fasttext scorer needs `model`"):
        ScorerConfig(type="fasttext", label="en")
    with pytest.raises(ValueError, match="a onnx_text scorer needs `model`"):
        ScorerConfig(type="onnx_text")
    with pytest.raises(ValueError, match="a text_stats scorer reads no model: remove `model`"):
        ScorerConfig(type="text_stats", model=LID)
    with pytest.raises(ValueError, match="gives a score"):
        ScorerConfig(type="text_stats", output="label")
    with pytest.raises(ValueError, match="`filter` is only for text_stats scorers"):
        ScorerConfig(type="fasttext", model=LID, label="en", filter="all")
    with pytest.raises(ValueError, match=r"unknown text_stats rule\(s\) \['gopher_wordcount'\]"):
        ScorerConfig(type="text_stats", filter=["gopher_wordcount"])
    with pytest.raises(ValueError, match=r"thresholds: unknown text_stats rule\(s\) \['c4_braces'\]"):
        ScorerConfig(type="text_stats", thresholds={"c4_braces": {"max": 1}})
    with pytest.raises(ValueError, match=r"thresholds.gopher_word_count: unknown key\(s\) \['maximum'\]"):
        ScorerConfig(type="text_stats", thresholds={"gopher_word_count": {"maximum": 10}})
    with pytest.raises(ValueError, match="thresholds.gopher_word_count: min 200.0 is above max 100.0"):
        ScorerConfig(type="text_stats", thresholds={"gopher_word_count": {"min": 200, "max": 100}})
    with pytest.raises(ValueError, match="reads at most 8,388,608 characters"):
        ScorerConfig(type="text_stats", max_chars=10**7)


def test_a_bad_scorer_in_a_config_file_is_named_with_its_place(tmp_path):
    from quadmix_spark.core.config import load_config
    from tests.conftest import DEFAULT_CONF

    with pytest.raises(ConfigError, match=r"scorers\.gopher[\s\S]*unknown text_stats rule"):
        load_config([DEFAULT_CONF], ['scorers={"gopher": {"type": "text_stats", "filter": ["nope"]}}'])


def test_version_covers_rules_filter_and_max_chars_and_no_file():
    base = {"type": "text_stats"}
    v = fingerprint(ScorerConfig(**base), build_scorer("g", ScorerConfig(**base), validate=False).adapter)
    assert build_scorer("g", ScorerConfig(**base)).version == f"v1.{v}"
    assert build_scorer("g", ScorerConfig(**base, batch_size=7)).version == f"v1.{v}"
    others = [{"filter": "all"}, {"thresholds": {"gopher_symbol_ratio": {"max": 0.2}}}, {"max_chars": 5000}]
    versions = {build_scorer("g", ScorerConfig(**base, **o)).version for o in others}
    assert len(versions) == 3 and f"v1.{v}" not in versions


def test_existing_scorers_keep_their_versions():
    """Fingerprints computed before text_stats existed: the new optional settings change none of them."""
    minilm = DATA / "models" / "minilm_l6_v2"
    assert fingerprint(ScorerConfig(type="fasttext", model=LID, label="en")) == "a8b00c6f"
    assert fingerprint(ScorerConfig(type="onnx_transformer", model=str(minilm / "model_int8.onnx"),
                                    tokenizer=str(minilm / "tokenizer.json"), head="regression", max_length=128)) == "627c8ad0"


def test_a_text_stats_scorer_named_like_a_criterion_column_is_refused(tmp_path):
    from quadmix_spark.curation.scorers import resolve_scorers
    from tests.conftest import make_config

    scorers = {"lang": {"type": "fasttext", "model": LID, "output": "label"}, "q_gopher": {"type": "text_stats"}}
    defined = f"scorers={json.dumps(scorers)}"
    cfg = make_config(tmp_path, defined, "annotate.domain_scorer=lang", "annotate.quality_scorers=[q_gopher]")
    with pytest.raises(ScorerError, match="q_gopher_stats, q_gopher_rejected would be read as quality criteria"):
        resolve_scorers(cfg)
    cfg = make_config(tmp_path, defined, "annotate.domain_scorer=q_gopher", "annotate.quality_scorers=[lang]")
    with pytest.raises(ScorerError, match="must have output=label"):
        resolve_scorers(cfg)


# ---------------------------------------------------------------- Spark: annotate, counts, sampling


@pytest.mark.spark
def test_annotate_writes_stats_and_rejections_and_the_sampler_leaves_rejected_documents_out(spark, tmp_path):
    import mlflow
    from pyspark.sql import functions as F

    from quadmix_spark.curation.annotate import AnnotationVersionError, run_annotate
    from quadmix_spark.jobs import annotate_job
    from quadmix_spark.curation.ingest import run_ingest
    from quadmix_spark.kernel.theta import Theta, sample_thetas
    from quadmix_spark.curation.normalize import run_normalize
    from quadmix_spark.curation.sample import run_sample, run_sample_many
    from quadmix_spark.core.storage import read_table
    from tests.conftest import make_config

    pages = read_texts(DATA / "web" / "weborganizer_dev.jsonl.gz", n=40)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i, text in enumerate(pages + SPAM):
            f.write(json.dumps({"id": f"{'spam' if i >= len(pages) else 'page'}-{i:03d}", "text": text}) + "\n")
    gopher = {"type": "text_stats", "filter": ["gopher_word_count", "gopher_stop_words", "gopher_dup_lines", "gopher_top_2gram"]}
    scorers = {"lang": {"type": "fasttext", "model": LID, "output": "label"},
               "en": {"type": "fasttext", "model": LID, "label": "en"}, "gopher": gopher}

    def config(*overrides, **gopher_settings):
        return make_config(tmp_path / "store", f"ingest.input=[{tmp_path / 'docs.jsonl'}]", "sampling.coarse_bins=64",
                           f"scorers={json.dumps({**scorers, 'gopher': {**gopher, **gopher_settings}})}",
                           "annotate.domain_scorer=lang", 'annotate.quality_scorers=["en", "gopher"]', *overrides)

    cfg = config()
    run_ingest(spark, cfg)
    report = annotate_job(cfg)
    ann = read_table(spark, cfg.storage.table("annotations"))
    assert ann.columns == ["doc_id", "n_tokens", "domain", "domain_conf", "q_en", "q_gopher", "gopher_stats", "gopher_rejected",
                           "scorer_versions"]
    rows = {r.doc_id: r for r in ann.collect()}
    docs = {r.doc_id: r.text for r in read_table(spark, cfg.storage.table("documents")).collect()}
    ids = sorted(rows)
    adapter = build_scorer("gopher", cfg.scorers["gopher"]).adapter
    scores, (stats, rejected) = adapter.score_arrow(pa.array([docs[i] for i in ids]))
    assert [rows[i].q_gopher for i in ids] == scores.tolist()
    assert [rows[i].gopher_stats.asDict() for i in ids] == stats.to_pylist()
    assert [rows[i].gopher_rejected for i in ids] == rejected.to_pylist()
    out = {i for i in ids if rows[i].gopher_rejected}
    assert out and all(i.startswith("spam") for i in out) and len(out) >= 4

    counts = report.prefilter["gopher"]
    assert counts["rejected"] == len(out) and set(counts) == {"rejected", *gopher["filter"]}
    assert counts["gopher_dup_lines"] == sum("gopher_dup_lines" in rows[i].gopher_rejected for i in out)
    assert f"prefilter gopher: {len(out)} of {len(ids)} documents rejected" in report.summary()
    client = mlflow.MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quadmix").experiment_id], "tags.`quadmix.stage` = 'annotate'")
    assert run.data.metrics["annotate.prefilter.gopher.rejected"] == len(out)
    assert run.data.metrics["annotate.prefilter.gopher.gopher_top_2gram"] == counts["gopher_top_2gram"]
    # which path computed the statistics: in the summary and the run (the fastText scorers do not say)
    assert report.implementations == {"gopher": kernel_description()}
    assert f"gopher computed by {kernel_description()}" in report.summary()
    assert run.data.params["quadmix.scorer_impl.gopher"] == kernel_description()
    assert not run_annotate(spark, cfg).changed  # incremental: nothing to do

    # a changed filter is a new version: refused, then rescored explicitly (the column follows the new rules)
    looser = config(filter=["gopher_word_count"])
    with pytest.raises(AnnotationVersionError, match="column q_gopher"):
        run_annotate(spark, looser)
    redo = run_annotate(spark, looser, rescore=["gopher"])
    assert redo.scored["gopher"] == len(ids) and redo.scored["lang"] == 0
    after = {r.doc_id: r for r in read_table(spark, cfg.storage.table("annotations")).collect()}
    assert all(set(after[i].gopher_rejected) <= {"gopher_word_count"} for i in ids)
    assert {i for i in ids if after[i].gopher_rejected} <= out and after[ids[0]].q_en == rows[ids[0]].q_en
    assert redo.prefilter["gopher"]["rejected"] == sum(bool(after[i].gopher_rejected) for i in ids)
    out = {i for i in ids if after[i].gopher_rejected}
    assert out

    # every sampler: a rejected document never gets copies, even where every other document gets at least one
    run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    domains = sorted({r.domain for r in after.values() if r.gopher_rejected == []})
    base = sample_thetas(domains, ["en", "gopher"], 2, seed=4)
    every = [Theta(t.domains, t.criteria, t.alpha, t.lam, t.omega, t.eta, np.ones(len(domains))) for t in base]  # S >= 1
    selection = run_sample(spark, looser, theta=every[0])
    sel = read_table(spark, looser.storage.table("selection")).where(F.col("run") == "default")
    kept = {r.doc_id: r.copies for r in sel.collect()}
    assert set(kept) == set(ids) - out and min(kept.values()) >= 1 and selection.report.input_tokens.sum() > 0
    run_sample_many(spark, looser, every)
    index = read_table(spark, looser.storage.table("proxy_index")).collect()
    assert {r.doc_id for r in index} == set(ids) - out
    run_sample(spark, config("sampling.run=random", "sampling.baseline_fraction=1.0", filter=["gopher_word_count"]),
               baseline="random")  # S = 1 for every document it ranks
    rand = read_table(spark, looser.storage.table("selection")).where(F.col("run") == "random").collect()
    assert {r.doc_id for r in rand if r.copies > 0} == set(ids) - out
