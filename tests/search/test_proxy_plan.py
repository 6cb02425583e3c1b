"""A θ's proxy plan reads the data the sample stage would write: the same copies of every document in every
epoch, the ε tail redrawn each epoch (spec §2.6), from the pool's document index (real Spark and Delta)."""

from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from quadmix_spark.search.proxy import prepare_pool, read_plan, tail_defaults, write_plans
from quadmix_spark.search.proxy_pool import load_doc_index
from quadmix_spark.search.proxy_data import VocabMap, WindowStream
from quadmix_spark.curation.sample import load_inputs, run_sample, run_sample_many
from quadmix_spark.core.storage import read_table
from quadmix_spark.search.token_store import TokenStore
from tests.conftest import make_config
from tests.sampling_data import a_theta, make_corpus

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def store(spark, tmp_path_factory):
    from quadmix_spark.curation.normalize import run_normalize

    cfg = make_config(tmp_path_factory.mktemp("plan"), "sampling.coarse_bins=64", "proxy.pool.shards=3")
    make_corpus(spark, cfg, n=400, n_domains=3, big_share=0.6)
    run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    return cfg


def test_each_epoch_of_the_plan_has_the_copies_of_the_sample_stage(spark, store):
    cfg = store.model_copy(deep=True)
    inp = load_inputs(spark, cfg)
    theta = a_theta(inp.domains, seed=3, omega=0.05, eps=0.2)  # a heavy tail: many documents redrawn per epoch
    cfg.sampling.run = "epochs"
    cfg.sampling.budget_tokens = int(3.5 * sum(r.n_tokens for r in inp.annotations.select("n_tokens").collect()) * 0.25)
    result = run_sample(spark, cfg, theta)
    full = [e for e, keep in result.epochs if keep == 1.0]
    assert len(full) >= 2
    out = read_table(spark, cfg.storage.table("training_output")).where(F.col("run") == "epochs")
    per_epoch = {e: {r.doc_id: r.n for r in out.where(F.col("epoch") == e).groupBy("doc_id").agg(F.count("*").alias("n")).collect()}
                 for e in full}

    _, pool = prepare_pool(spark, cfg)
    run_sample_many(spark, cfg, [theta])
    plans = write_plans(spark, cfg, pool, {theta.theta_id: tail_defaults(theta)})
    plan = read_plan(plans, theta.theta_id, pool.folder)
    store_ = TokenStore.open(pool.folder)
    stream = WindowStream(plan, store_, VocabMap.build(store_.token_counts(), 64, store_.eos_id), 16, theta.theta_key,
                          cfg.sampling.seed, train_seed=0)
    ids = {r.doc_hash: r.doc_id for r in read_table(spark, pool.offsets_table).select("doc_hash", "doc_id").collect()}
    assert len(plan["doc_hash"]) == len(load_doc_index(pool.folder)["doc_hash"]) == len(ids)  # ε > 0: every pool document
    tails = []
    for e in full:
        copies = stream.epoch_copies(e)
        got = {ids[h]: int(c) for h, c in zip(plan["doc_hash"], copies) if c > 0}
        assert got == per_epoch[e], f"epoch {e}"
        tails.append({d for d, s in zip(plan["doc_hash"], plan["S"]) if s < 1} & {h for h, c in zip(plan["doc_hash"], copies) if c})
    assert tails[0] != tails[1] and all(tails)  # the tail is drawn again: other documents each epoch


def test_baseline_plans_are_fixed_sets(spark, store):
    """Every baseline keeps only what its index lists, each listed document once (S = 1), every epoch: random
    is a fixed random set, not a fresh draw per epoch (which would read many more unique tokens than θ*);
    mix keeps at most the fraction of the tokens."""
    from quadmix_spark.search.evaluate import baseline_defaults
    from quadmix_spark.curation.sample import run_baseline_index

    cfg = store.model_copy(deep=True)
    inp = load_inputs(spark, cfg)
    _, pool = prepare_pool(spark, cfg)
    cfg.sampling.baseline_fraction = 0.1
    kinds = ["random", "topk:edu", "mix"]
    ids = run_baseline_index(spark, cfg, kinds)
    plans = write_plans(spark, cfg, pool, {ids[k][0]: baseline_defaults(inp.domains) for k in ids})
    index = read_table(spark, cfg.storage.table("proxy_index"))
    total = inp.annotations.agg(F.sum("n_tokens")).first()[0]
    pool_docs = len(load_doc_index(pool.folder)["doc_hash"])
    kept = {}
    for kind in kinds:
        plan = read_plan(plans, ids[kind][0], pool.folder)
        listed = index.where(F.col("theta_id") == ids[kind][0])
        assert 0 < len(plan["S"]) == listed.count() < pool_docs, kind
        assert (plan["S"] == 1.0).all(), kind
        assert list(plan["doc_hash"]) == sorted(plan["doc_hash"])  # canonical order
        kept[kind] = listed.agg(F.sum("n_tokens")).first()[0] / total
    assert 0.05 < kept["random"] < 0.2  # about the fraction: each document kept with probability 0.1
    assert 0.05 < kept["mix"] <= 0.1  # cut at the fraction, not the union of the criteria's top sets
