"""Training examples that cannot be told apart by length, and the report that says what a score measures
(pure functions, on the shared reference and web texts; no Spark)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from quadmix_spark.curation.quality_examples import chunk_text, length_bins, match_lengths
from quadmix_spark.curation.scorer_report import auc, auc_by_length, corpus_report, report_warnings
from tests.conftest import DATA


def read(path, field, n):
    with gzip.open(path, "rt") as f:
        return [json.loads(line)[field] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def pieces():
    pos = read(DATA / "reference" / "alpaca_eval_outputs.jsonl.gz", "output", 800)
    neg = read(DATA / "web" / "weborganizer_dev.jsonl.gz", "text", 600)
    out = []
    # cut to different sizes, so that length separates the classes before matching
    for label, texts, size in ((True, pos, 700), (False, neg, 3000)):
        for i, t in enumerate(texts):
            out += [(f"{label}:{i}#{j}", p, label) for j, p in enumerate(chunk_text(t, size))]
    keys, texts, labels = zip(*out)
    return list(keys), list(texts), np.array(labels)


def test_chunks_cut_at_line_breaks_keep_the_text_and_respect_the_sizes():
    text = "\n".join(["short line"] * 30 + ["x" * 50 + " " + "y" * 3000] + ["tail " * 40])
    pieces = chunk_text(text, 500, min_chars=20)
    assert all(20 <= len(p.strip()) and len(p) <= 500 for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert chunk_text("tiny", 500) == [] and chunk_text("a" * 150, 500) == ["a" * 150]


def test_matched_lengths_leave_length_no_signal(pieces):
    keys, texts, positive = pieces
    lengths = np.array([len(t) for t in texts])
    assert auc(positive, lengths) < 0.3  # before: length tells the classes apart
    keep = match_lengths(keys, positive, lengths, seed=1)
    bins = length_bins(lengths)
    for b in np.unique(bins[keep]):
        in_bin = keep & (bins == b)
        assert (in_bin & positive).sum() == (in_bin & ~positive).sum()
    assert abs(auc(positive[keep], lengths[keep]) - 0.5) < 0.05
    within, _ = auc_by_length(positive[keep], lengths[keep], lengths[keep])
    assert abs(within - 0.5) < 0.1
    assert np.array_equal(keep, match_lengths(keys, positive, lengths, seed=1))  # deterministic
    capped = match_lengths(keys, positive, lengths, seed=1, max_per_class=100)
    assert 0 < (capped & positive).sum() == (capped & ~positive).sum() <= 100
    for b in np.unique(bins[capped]):  # a cap keeps every bin matched
        assert (capped & positive & (bins == b)).sum() == (capped & ~positive & (bins == b)).sum()


def test_auc_within_length_bins_sees_through_a_length_only_score():
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(7, 1, 4000)
    positive = rng.random(4000) < 1 / (1 + np.exp(-(np.log(lengths) - 7) * 3))  # long = positive
    score = np.log(lengths) + rng.normal(0, 0.01, 4000)  # a score that only measures length
    a = auc(positive, score)
    within, table = auc_by_length(positive, score, lengths)
    assert a > 0.8 and within < a - 0.1 and set(table.columns) == {"bin", "min_chars", "n", "positives", "auc"}
    warned = report_warnings({"auc": a, "auc_within_length": within})
    assert warned and "mostly length" in warned[0]


def test_corpus_report_finds_a_length_score_and_a_one_domain_score():
    rng = np.random.default_rng(1)
    n = 1000
    lengths = rng.lognormal(7, 1, n)
    domains = np.array(["health", "sports", "news", "science"])[rng.integers(0, 4, n)]
    by_length, _ = corpus_report(np.log(lengths), lengths, domains)
    assert by_length["spearman_length"] > 0.99 and any("mostly length" in w for w in report_warnings(by_length))
    one_domain = (domains == "sports") + rng.normal(0, 0.1, n)
    metrics, table = corpus_report(one_domain, lengths, domains)
    assert metrics["top10_max_domain"] == "sports" and metrics["top10_max_domain_share"] == 1.0
    assert table.set_index("domain").loc["sports", "share"] == pytest.approx((domains == "sports").mean())
    assert any("mostly one domain: 'sports'" in w for w in report_warnings(metrics))
    fair, _ = corpus_report(rng.normal(size=n), lengths, domains)
    assert report_warnings(fair) == []
