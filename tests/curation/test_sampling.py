"""Normalize, rank and sample on Spark: the same numbers as the numpy kernel, for any partitioning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pyspark.sql import functions as F

from quadmix_spark.kernel.copies import hash_uniform, realized_copies
from quadmix_spark.kernel.merge import merged_score
from quadmix_spark.kernel.rank import within_domain_rank
from quadmix_spark.kernel.sampling_fn import sampling_value
from quadmix_spark.kernel.sigma import Knots, map_scores, percentile_knots, zscore_params
from quadmix_spark.curation.normalize import load_knots, percentile_knots_distributed, run_normalize, zscore_knots_distributed
from quadmix_spark.curation.ranking import ThetaStack, rank_and_sample
from quadmix_spark.curation.sample import load_inputs, run_sample, run_sample_many, settings
from quadmix_spark.core.storage import read_table
from tests.sampling_data import CRITERIA, a_theta, make_corpus

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory):
    from tests.conftest import make_config

    cfg = make_config(tmp_path_factory.mktemp("sampling"), "sampling.coarse_bins=64")
    data = make_corpus(spark, cfg)
    run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    return cfg, data


def kernel_selection(data, knots, theta, seed=0, saturation=None):
    sigma = np.stack([map_scores(data["scores"][k.criterion], k) for k in knots], axis=1)
    d = np.searchsorted(theta.domains, np.array(data["domains"])[data["domain_idx"]])
    rbar = within_domain_rank(merged_score(sigma, d, theta.alpha, saturation), d, data["tokens"])
    S = sampling_value(rbar, theta.lam[d], theta.omega[d], theta.eta[d], theta.eps[d])
    return rbar, S, realized_copies(S, hash_uniform(data["ids"], theta.theta_key, seed))


def test_knots_equal_the_kernel(spark, corpus):
    cfg, data = corpus
    ann = read_table(spark, cfg.storage.table("annotations"))
    for n_knots in (11, 5000):
        for got in percentile_knots_distributed(ann, CRITERIA, n_knots):
            want = percentile_knots(data["scores"][got.criterion], data["tokens"], n_knots)
            assert np.array_equal(got.xs, want.xs) and np.array_equal(got.ys, want.ys)
            assert got.error_bound == pytest.approx(want.error_bound)
    for got in zscore_knots_distributed(ann, CRITERIA):
        mean, std = zscore_params(data["scores"][got.criterion], data["tokens"])
        assert (got.mean, got.std) == (pytest.approx(mean, rel=1e-12), pytest.approx(std, rel=1e-9))


def test_normalize_is_tied_to_the_annotations_version(spark, corpus):
    cfg, _ = corpus
    _, written = run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    assert written is False  # same annotations version: nothing to do
    with pytest.raises(RuntimeError, match="run `quadmix normalize` again"):
        load_knots(spark, cfg.storage.table("score_knots"), annotations_version=99)


def test_spark_ranks_s_and_copies_equal_the_kernel_with_a_skewed_domain(spark, corpus):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, seed=5)
    rbar, S, copies = kernel_selection(data, inp.knots, theta)
    stack = ThetaStack.of([theta], inp.domains, inp.criteria)
    with rank_and_sample(inp.annotations.repartition(7), stack, inp.knots, settings(cfg), keep_all=True) as ranked:
        rows = {r.doc_id: r for r in ranked.collect()}
    assert len(rows) == len(data["ids"])
    got = np.array([rows[i].rbar for i in data["ids"]])
    exact = np.array([rows[i].rank_exact for i in data["ids"]])
    assert np.array_equal(got[exact], rbar[exact])  # exact where it is computed exactly ...
    assert (rbar[~exact] > np.maximum(0.2, theta.omega.max()) - 1e-12).all()  # ... which covers r̄ <= 0.2 and ω
    big = data["domain_idx"] == 0
    assert (rbar[big & ~exact] > 0.2).all() and (big & exact).sum() > 0.2 * big.sum()
    assert np.abs(got - rbar).max() < 0.05  # coarse interpolation elsewhere (display only)
    assert np.allclose([rows[i].S for i in data["ids"]], S, rtol=0, atol=1e-15)
    assert np.array_equal([rows[i].copies for i in data["ids"]], copies)


def test_keep_everything_exactly_once(spark, corpus, tmp_path):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, omega=1.0, lam=1e-9, eta=0.0, eps=0.0)
    cfg = cfg.model_copy(deep=True)
    cfg.sampling.run = "all-once"
    result = run_sample(spark, cfg, theta)
    sel = read_table(spark, cfg.storage.table("selection")).where(F.col("run") == "all-once")
    assert sel.where(F.col("copies") != 1).count() == 0 and sel.count() == len(data["ids"])
    assert result.output_tokens == int(data["tokens"].sum())


def test_selection_and_output_do_not_depend_on_partitioning_or_reruns(spark, corpus, tmp_path):
    from quadmix_spark.core.storage import write_table

    cfg, _ = corpus
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, seed=9)
    results = []
    for i, parts in enumerate((1, 7, 7)):  # the same tables written as 1 and 7 files; the last run repeats the second
        c = cfg.model_copy(deep=True)
        c.storage.root = str(tmp_path / f"p{parts}")
        c.sampling.budget_tokens = 50_000
        if i < 2:
            for name in ("documents", "annotations"):
                write_table(read_table(spark, cfg.storage.table(name)).repartition(parts), c.storage.table(name), mode="overwrite")
            run_normalize(spark, c.storage.table("annotations"), c.storage.table("score_knots"), "percentile", 101)
        run_sample(spark, c, theta)
        sel = sorted(read_table(spark, c.storage.table("selection")).drop("run").collect())
        out = sorted(read_table(spark, c.storage.table("training_output")).drop("run").collect())
        results.append((sel, out))
    assert results[0] == results[1] == results[2]
    assert len(results[0][1]) > 0


def test_realized_tokens_per_domain_match_the_expectation(spark, corpus):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, seed=2, eps=0.3, omega=0.05)  # a heavy ε tail: many Bernoulli draws
    rbar, S, _ = kernel_selection(data, inp.knots, theta)
    stack = ThetaStack.of([theta], inp.domains, inp.criteria)
    with rank_and_sample(inp.annotations, stack, inp.knots, settings(cfg), keep_all=True) as ranked:
        per = {r.domain_idx: r for r in ranked.groupBy("domain_idx").agg(
            F.sum(F.col("copies") * F.col("n_tokens")).alias("realized"), F.sum(F.col("S") * F.col("n_tokens")).alias("expected")
        ).collect()}
    for m, name in enumerate(inp.domains):
        mask = np.array(data["domains"])[data["domain_idx"]] == name
        frac = S[mask] - np.floor(S[mask])
        sd = np.sqrt(np.sum(data["tokens"][mask] ** 2 * frac * (1 - frac)))
        assert abs(per[m].realized - per[m].expected) <= 5 * sd + 1e-9


def test_budget_fit_export_and_idempotent_rerun(spark, corpus):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, seed=4)
    total = int(data["tokens"].sum())
    for run, budget in (("under", 3 * total // 4), ("over", total // 50)):
        c = cfg.model_copy(deep=True)
        c.sampling.run, c.sampling.budget_tokens, c.sampling.export_shards = run, budget, 3
        first = run_sample(spark, c, theta)
        out = read_table(spark, c.storage.table("training_output")).where(F.col("run") == run)
        tokens = out.agg(F.sum("n_tokens")).first()[0]
        assert abs(tokens - budget) < 0.1 * budget + 2000, (run, tokens, budget)
        assert first.manifest["tokens"] == tokens and len(first.manifest["shards"]) == 3
        if run == "under":
            assert len(first.epochs) > 1 and out.select("epoch").distinct().count() == len(first.epochs)
        before = sorted(out.collect())
        run_sample(spark, c, theta)
        assert sorted(read_table(spark, c.storage.table("training_output")).where(F.col("run") == run).collect()) == before


def test_many_thetas_equal_single_theta_selections(spark, corpus):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    thetas = [a_theta(inp.domains, seed=s) for s in (11, 12, 13)]
    many = run_sample_many(spark, cfg, thetas)
    index = read_table(spark, cfg.storage.table("proxy_index"))
    for t in thetas:
        _, _, copies = kernel_selection(data, inp.knots, t)
        got = {r.doc_id: r.copies for r in index.where(F.col("theta_id") == t.theta_id).collect()}
        want = {i: int(c) for i, c in zip(data["ids"], copies) if c > 0}
        assert got == want
        realized = many.tokens.set_index("theta_id").loc[t.theta_id, "realized_tokens"]
        assert realized == int((copies * data["tokens"]).sum())


def test_sigma_saturation_selects_as_the_kernel_and_changes_the_selection(spark, corpus):
    """``sampling.sigma_saturation``: the proxy index of several θ equals the kernel's copies under the saturated
    merge, differs from the plain merge's, and the θ's proxies get another fingerprint."""
    from quadmix_spark.search.proxy import proxy_fingerprint

    cfg, data = corpus
    c = cfg.model_copy(deep=True)
    c.sampling.sigma_saturation = 0.02
    inp = load_inputs(spark, c)
    thetas = [a_theta(inp.domains, seed=s, omega=0.1) for s in (41, 42)]
    run_sample_many(spark, c, thetas)
    index = read_table(spark, c.storage.table("proxy_index"))
    changed = 0
    for t in thetas:
        _, _, copies = kernel_selection(data, inp.knots, t, saturation=0.02)
        got = {r.doc_id: r.copies for r in index.where(F.col("theta_id") == t.theta_id).collect()}
        assert got == {i: int(k) for i, k in zip(data["ids"], copies) if k > 0}
        _, _, plain = kernel_selection(data, inp.knots, t)
        changed += int((plain != copies).sum())
    assert changed > 0
    assert proxy_fingerprint(c) != proxy_fingerprint(cfg)


def test_many_thetas_in_chunks_give_the_same_index_with_memory_of_one_chunk(spark, corpus, monkeypatch):
    """``sampling.theta_chunk``: 5 θ ranked in chunks of 2 give the same ``proxy_index`` rows and tokens as in one
    chunk, and no histogram (the structure that grows with θ × domains × bins) holds more than a chunk."""
    from quadmix_spark.curation import ranking

    cfg, _ = corpus
    inp = load_inputs(spark, cfg)
    thetas = [a_theta(inp.domains, seed=s) for s in range(41, 46)]
    ids = [t.theta_id for t in thetas]

    def index_rows():
        return sorted(read_table(spark, cfg.storage.table("proxy_index")).where(F.col("theta_id").isin(ids)).collect())

    seen: list[int] = []
    real = ranking.coarse_histograms

    def spy(prepared, stack, *args):
        hist = real(prepared, stack, *args)
        seen.append(hist.mass.shape[0])
        return hist

    monkeypatch.setattr(ranking, "coarse_histograms", spy)
    whole = run_sample_many(spark, cfg, thetas)
    one_chunk = index_rows()
    assert seen == [5]
    chunked_cfg = cfg.model_copy(deep=True)
    chunked_cfg.sampling.theta_chunk = 2
    seen.clear()
    chunked = run_sample_many(spark, chunked_cfg, thetas)
    assert seen == [2, 2]  # the last chunk holds one θ: the SQL passes of ranking_sql, the same numbers
    assert index_rows() == one_chunk and len(one_chunk) > 0
    assert chunked.tokens.equals(whole.tokens)
    versions = read_table(spark, cfg.storage.table("proxy_index")).sparkSession.sql(
        f"DESCRIBE HISTORY delta.`{cfg.storage.table('proxy_index')}`").limit(3).collect()
    assert [json.loads(v.userMetadata)["chunk"] for v in versions] == ["3/3", "2/3", "1/3"]


def test_baselines_select_by_sigma(spark, corpus):
    cfg, data = corpus
    inp = load_inputs(spark, cfg)
    for kind in ("topk:edu", "mix", "random"):
        c = cfg.model_copy(deep=True)
        c.sampling.run, c.sampling.baseline_fraction = kind.replace(":", "-"), 0.1
        run_sample(spark, c, baseline=kind)
        sel = read_table(spark, c.storage.table("selection")).where(F.col("run") == c.sampling.run)
        picked = {r.doc_id for r in sel.where(F.col("copies") > 0).collect()}
        sig = {k.criterion: map_scores(data["scores"][k.criterion], k) for k in inp.knots}
        if kind == "topk:edu":
            assert picked == {i for i, s in zip(data["ids"], sig["edu"]) if s <= 0.1}
        elif kind == "mix":  # by the best criterion, cut where the kept tokens would pass 10% of the total
            best = np.minimum.reduce([sig[c] for c in CRITERIA])
            bins = np.minimum(np.floor(np.clip(best, 0, 1) * 65536), 65535).astype(int)
            tokens = np.asarray(data["tokens"], dtype=np.int64)
            per_bin = np.bincount(bins, weights=tokens, minlength=65536)
            cut = np.flatnonzero(np.cumsum(per_bin) <= 0.1 * tokens.sum())[-1]
            assert picked == {i for i, b in zip(data["ids"], bins) if b <= cut}
            share = tokens[np.isin(data["ids"], list(picked))].sum() / tokens.sum()
            assert 0.08 < share <= 0.1
        else:
            assert 0.05 < len(picked) / len(data["ids"]) < 0.15


def test_the_histogram_pass_rejects_a_theta_whose_domains_are_not_the_data_s(spark, corpus):
    from quadmix_spark.kernel.theta import ThetaMismatchError

    cfg, data = corpus
    doms = data["domains"]
    with pytest.raises(ValueError, match="have a domain that θ does not name"):  # the data has a domain θ lacks
        run_sample_many(spark, cfg, [a_theta(doms[:-1], seed=1)])
    with pytest.raises(ThetaMismatchError, match="elsewhere"):  # θ names a domain without documents
        run_sample_many(spark, cfg, [a_theta([*doms, "elsewhere"], seed=1)])


@pytest.mark.parametrize("keep_all,saturation", [(True, None), (False, None), (True, 0.01)])
def test_one_theta_sql_passes_equal_the_pandas_passes(spark, corpus, monkeypatch, keep_all, saturation):
    """One θ ranks in Spark SQL (ranking_sql); K θ in pandas. For the same θ both give identical rows (with the
    σ saturation too: its product and division are the same bits on the JVM and in numpy)."""
    import dataclasses

    from quadmix_spark.curation import ranking, ranking_sql

    cfg, _ = corpus
    inp = load_inputs(spark, cfg)
    stack = ThetaStack.of([a_theta(inp.domains, seed=21)], inp.domains, inp.criteria)
    s = dataclasses.replace(settings(cfg), saturation=saturation)

    def rows():
        with rank_and_sample(inp.annotations.repartition(3), stack, inp.knots, s, keep_all=keep_all) as ranked:
            return sorted(tuple(r) for r in ranked.collect())

    assert ranking_sql.supported(1, inp.knots)
    on_jvm = rows()
    monkeypatch.setattr(ranking.ranking_sql, "supported", lambda k, knots: False)
    pandas = rows()
    diff = [(a, b) for a, b in zip(on_jvm, pandas) if a != b]
    assert not diff, (len(diff), diff[:3])
    assert len(pandas) == len(on_jvm) > 0


def test_sql_sigma_is_numpy_interp_bit_for_bit(spark):
    import pandas as pd

    from quadmix_spark.kernel.sigma import Knots
    from quadmix_spark.curation.ranking import _sigma
    from quadmix_spark.curation.ranking_sql import sigma

    rng = np.random.default_rng(3)
    xs = np.unique(np.round(rng.normal(size=300), 6))
    ys = np.linspace(1.0, 0.001, xs.size) ** 1.7
    knots = Knots("c", "percentile", xs, ys)
    scores = np.r_[rng.normal(size=2000) * 1.5, xs[:50], xs[0] - 1, xs[-1], xs[-1] + 1, -0.0, 0.0, np.nan]
    df = spark.createDataFrame([(i, float(v)) for i, v in enumerate(scores)] + [(len(scores), None)], "i long, q_c double")
    got = dict(df.select("i", sigma(F.col("q_c"), knots).alias("s")).collect())
    want = _sigma(pd.DataFrame({"q_c": np.r_[scores, np.nan]}), [knots])[:, 0]
    assert np.array_equal(np.array([got[i] for i in range(len(want))]), want)  # exact, missing -> 1


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_null_scores_get_the_knots_worst_sigma_for_any_partitioning(spark, corpus, tmp_path, method):
    """A document without a score (a scorer failed on it) gets σ = the knots' worst whatever its neighbours: the
    knots, ranks, S and copies of one θ and of many θ are the same bits with 1 and 7 partitions and equal the
    kernel given that σ."""
    from quadmix_spark.core.storage import write_table

    cfg, data = corpus
    rng = np.random.default_rng(21)
    nulls = {c: rng.random(len(data["ids"])) < 0.1 for c in CRITERIA}
    ann = read_table(spark, cfg.storage.table("annotations"))
    null_ids = {c: [i for i, m in zip(data["ids"], nulls[c]) if m] for c in CRITERIA}
    ann = ann.select("doc_id", "domain", "domain_conf", "n_tokens", *[
        F.when(F.col("doc_id").isin(null_ids[c]), F.lit(None).cast("double")).otherwise(F.col(f"q_{c}")).alias(f"q_{c}")
        for c in CRITERIA])
    inp0 = load_inputs(spark, cfg)
    thetas = [a_theta(inp0.domains, seed=31), a_theta(inp0.domains, seed=32, omega=0.1)]
    results = []
    for parts in (1, 7):
        c = cfg.model_copy(deep=True)
        c.storage.root = str(tmp_path / f"{method}-{parts}")
        write_table(ann.repartition(parts), c.storage.table("annotations"), mode="overwrite")
        knots, _ = run_normalize(spark, c.storage.table("annotations"), c.storage.table("score_knots"), method, 101)
        inp = load_inputs(spark, c)
        stack = ThetaStack.of(thetas[:1], inp.domains, inp.criteria)
        with rank_and_sample(inp.annotations.repartition(parts), stack, inp.knots, settings(c), keep_all=True) as ranked:
            one = sorted(ranked.collect())
        run_sample_many(spark, c, thetas)
        many = sorted(read_table(spark, c.storage.table("proxy_index")).collect())
        results.append(([k.to_dict() for k in knots], one, many))
    assert results[0] == results[1]

    knots = [Knots.from_dict(d) for d in results[0][0]]
    worst = {k.criterion: k.missing_sigma() for k in knots}
    if method == "zscore":
        for k in knots:
            present = data["scores"][k.criterion][~nulls[k.criterion]]
            assert worst[k.criterion] == pytest.approx(-(present.min() - k.mean) / k.std, rel=1e-12)
    sigma = np.stack([np.where(nulls[k.criterion], worst[k.criterion], map_scores(data["scores"][k.criterion], k)) for k in knots], 1)
    theta = thetas[0]
    d = np.searchsorted(theta.domains, np.array(data["domains"])[data["domain_idx"]])
    rbar = within_domain_rank(merged_score(sigma, d, theta.alpha), d, data["tokens"])
    S = sampling_value(rbar, theta.lam[d], theta.omega[d], theta.eta[d], theta.eps[d])
    rows = {r.doc_id: r for r in results[0][1]}
    exact = np.array([rows[i].rank_exact for i in data["ids"]])
    assert np.array_equal(np.array([rows[i].rbar for i in data["ids"]])[exact], rbar[exact])
    assert np.allclose([rows[i].S for i in data["ids"]], S, rtol=0, atol=1e-15)
    if method == "zscore":  # top-k baselines keep σ <= fraction: a share of tokens only for percentiles
        from quadmix_spark.curation.sample import baseline_selection

        with pytest.raises(ValueError, match="needs percentile knots"):
            baseline_selection(inp, "topk:edu", 0.1, 0)
