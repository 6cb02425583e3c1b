"""Scorer training on real data: held-out metrics, versioned model folders, MLflow runs, bad training data."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.core.config import ConfigError
from quadmix_spark.curation.ingest import run_ingest
from quadmix_spark.curation.scorers import build_scorer
from quadmix_spark.curation.train_scorers import (
    TrainDataError,
    holdout_flags,
    models_dir,
    paragraphs,
    quality_examples,
    run_train_scorers,
    slug,
)
from quadmix_spark.jobs import train_scorers_job
from tests.conftest import DATA, make_config

N_DOCS = 360
REF = DATA / "reference"
MINILM = DATA / "models" / "minilm_l6_v2"


def small_models() -> dict:
    mini = {"encoder": str(MINILM / "model_int8.onnx"), "tokenizer": str(MINILM / "tokenizer.json"), "max_length": 24,
            "max_chars": 200, "c": 10.0}
    return {
        "dclm": {"task": "quality", "model": "fasttext", "positives": ["alpaca", "enwiki"], "negatives": 240, "dim": 16,
                 "epoch": 15, "lr": 0.5, "bucket": 20000},
        "wiki": {"task": "quality", "model": "tfidf", "positives": ["enwiki"], "negatives": 120},
        "ref_mini": {"task": "quality", "model": "embedding", "positives": ["alpaca"], "negatives": 60, "max_docs": 120, **mini},
        "topic_ft": {"task": "domain", "model": "fasttext", "label_column": "topic", "dim": 16, "epoch": 40, "lr": 0.8,
                     "word_ngrams": 1, "bucket": 20000},
        "topic_mini": {"task": "domain", "model": "embedding", "label_column": "topic", "max_docs": 240, **mini},
        "ref_lm": {"task": "quality", "model": "causal_lm", "positives": ["alpaca", "enwiki"], "negatives": 120,
                   "tokenizer": str(DATA / "models" / "tokenizers" / "gpt_neox_20b.json"), "lm_vocab": 1024, "lm_d_model": 32,
                   "lm_seq_len": 48, "lm_steps": 40, "batch_size": 8},
    }


def train_config(root, models=None, *overrides):
    reference = {
        "alpaca": {"path": str(REF / "alpaca_eval_outputs.jsonl.gz"), "text_field": "output", "max_docs": 240},
        "enwiki": {"path": str(REF / "enwiki_sample.jsonl.gz"), "max_docs": 12, "chunk_chars": 1500},
    }
    return make_config(root, f"train_scorers.reference={json.dumps(reference)}",
                       f"train_scorers.models={json.dumps(models or small_models())}", *overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    """A store with N_DOCS real pages ingested and the small models trained once (through the job runner)."""
    base = tmp_path_factory.mktemp("train")
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt") as f, open(base / "docs.jsonl", "w") as out:
        for _, line in zip(range(N_DOCS), f):
            out.write(line)
    cfg = train_config(base / "store", None, f"ingest.input=[{base / 'docs.jsonl'}]")
    run_ingest(spark, cfg)
    report = train_scorers_job(cfg)
    return cfg, report


@pytest.mark.spark
def test_held_out_metrics_are_sane_on_real_data(trained):
    cfg, report = trained
    m = {t.name: t for t in report.models}
    assert list(m) == ["dclm", "wiki", "ref_mini", "topic_ft", "topic_mini", "ref_lm"]
    assert m["dclm"].metrics["auc"] > 0.9 and m["wiki"].metrics["auc"] > 0.9 and m["ref_mini"].metrics["auc"] > 0.75
    assert m["ref_lm"].metrics["auc"] > 0.6 and m["ref_lm"].scorer["type"] == "onnx_causal_lm"
    for name in ("topic_ft", "topic_mini"):
        classes = m[name].metrics["n_classes"]
        assert classes >= 20 and m[name].metrics["accuracy"] > 2 / classes  # well above chance
    assert m["wiki"].metrics["onnx_parity_max_abs_diff"] < 1e-4  # the exported ONNX pipeline = scikit-learn
    for t in report.models:
        assert t.n_holdout > 0 and t.n_train > 3 * t.n_holdout
    assert "dclm" in report.summary() and "held-out auc=" in report.summary()


@pytest.mark.spark
def test_quality_models_train_on_length_matched_pieces_and_report_what_they_measure(spark, trained):
    """Both classes are cut the same way and matched in length; the report (held-out AUC within length bins,
    length correlation and domains of the top 10% on unseen documents) is stored, logged and plotted."""
    import mlflow

    from quadmix_spark.curation.quality_examples import length_bins

    cfg, report = trained
    for t in (m for m in report.models if m.task == "quality"):
        ex = quality_examples(spark, cfg, cfg.train_scorers.models[t.name])
        positive = np.array([lab == "hq" for lab in ex.labels])
        bins = length_bins(np.array([len(x) for x in ex.texts]))
        for b in np.unique(bins):
            assert (positive & (bins == b)).sum() == (~positive & (bins == b)).sum()
        assert max(len(x) for x in ex.texts) <= cfg.train_scorers.models[t.name].chunk_chars
        for key in ("auc_within_length", "spearman_length", "top10_max_domain_share", "report_docs"):
            assert key in t.metrics, (t.name, key)
        assert t.metrics["report_docs"] > 0 and -1 <= t.metrics["spearman_length"] <= 1
        folder = json.load(open(f"{t.current}/meta.json"))
        assert "warnings" in folder and {"report.json", "report.png"} <= set(os.listdir(t.current))
        saved = json.load(open(f"{t.current}/report.json"))
        assert saved["length_bins"] and saved["domains"] and saved["top10_max_domain"]
    client = mlflow.MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quadmix").experiment_id],
                                "tags.`quadmix.model` = 'dclm'")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models/dclm")} >= {"models/dclm/report.png"}


@pytest.mark.spark
def test_quality_metrics_come_from_held_out_examples_only(spark, trained):
    from sklearn.metrics import roc_auc_score

    cfg, report = trained
    dclm = next(t for t in report.models if t.name == "dclm")
    ex = quality_examples(spark, cfg, cfg.train_scorers.models["dclm"])
    train_keys = {k for k, h in zip(ex.keys, ex.holdout) if not h}
    test_keys = {k for k, h in zip(ex.keys, ex.holdout) if h}
    assert not train_keys & test_keys and len(test_keys) == dclm.n_holdout
    texts, labels = ex.part(True)
    scores, _ = build_scorer("dclm", ScorerConfig(**dclm.scorer)).adapter.score(texts)
    assert roc_auc_score([lab == "hq" for lab in labels], scores) == pytest.approx(dclm.metrics["auc"])


@pytest.mark.spark
def test_models_are_versioned_reruns_skip_and_current_follows(spark, trained, tmp_path):
    cfg, report = trained
    again = run_train_scorers(spark, cfg)
    assert all(t.skipped for t in again.models)
    assert [t.version for t in again.models] == [t.version for t in report.models]
    assert [t.metrics for t in again.models] == [t.metrics for t in report.models]

    models = small_models()
    models = {"topic_ft": {**models["topic_ft"], "epoch": 30}}
    changed = train_config(cfg.storage.root, models)
    (new,) = run_train_scorers(spark, changed).models
    old = next(t for t in report.models if t.name == "topic_ft")
    assert not new.skipped and new.version != old.version
    folder = new.current.rsplit("/", 1)[0]
    import os

    assert {old.version, new.version, "current"} <= set(os.listdir(folder))
    assert json.load(open(f"{new.current}/meta.json"))["version"] == new.version
    # every trained model loads as a scorer from current/
    for t in [*report.models[:3], new]:
        scorer = build_scorer(t.name, ScorerConfig(**t.scorer))
        assert scorer.adapter.score(["A short page about the history of bridges."])[0].shape == (1,)


@pytest.mark.spark
def test_mlflow_run_has_a_nested_run_per_model_with_metrics_and_files(trained):
    import mlflow

    cfg, report = trained
    client = mlflow.MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name("quadmix").experiment_id
    (parent,) = client.search_runs([exp], "tags.`quadmix.stage` = 'train-scorers' and attributes.run_name = 'train-scorers'")
    assert parent.data.metrics["dclm.auc"] == pytest.approx(report.models[0].metrics["auc"])
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {r.data.tags["quadmix.model"]: r for r in children}
    assert set(by_name) == {t.name for t in report.models}
    topic = by_name["topic_mini"]
    assert topic.data.metrics["accuracy"] > 0 and topic.data.params["task"] == "domain"
    files = {a.path for a in client.list_artifacts(topic.info.run_id, "models/topic_mini")}
    assert {"models/topic_mini/head.npz", "models/topic_mini/meta.json"} <= files


def test_fasttext_training_is_deterministic(tmp_path):
    from quadmix_spark.curation.fasttext_train import train_in_subprocess

    with gzip.open(REF / "alpaca_eval_outputs.jsonl.gz", "rt") as f:
        rows = [json.loads(line)["output"].replace("\n", " ") for _, line in zip(range(200), f)]
    (tmp_path / "t.txt").write_text("".join(f"__label__{'a' if len(r) % 2 else 'b'} {r}\n" for r in rows))
    digests = set()
    for i in range(2):
        out = tmp_path / f"m{i}.bin"
        train_in_subprocess(str(tmp_path / "t.txt"), str(out), {"dim": 8, "epoch": 3, "bucket": 5000, "seed": 7})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.spark
def test_bad_training_data_is_a_clear_error(spark, trained, tmp_path):
    cfg, _ = trained
    models = {"q": {"task": "quality", "model": "fasttext", "positives": ["alpaca"]}}
    missing = make_config(cfg.storage.root, "train_scorers.reference={alpaca: {path: /nowhere/a.jsonl.gz}}",
                          f"train_scorers.models={json.dumps(models)}")
    with pytest.raises(TrainDataError, match=r"reference set 'alpaca': /nowhere/a.jsonl.gz does not exist"):
        run_train_scorers(spark, missing)
    wrong_field = make_config(cfg.storage.root, f"train_scorers.reference={{alpaca: {{path: {REF / 'alpaca_eval_outputs.jsonl.gz'}, text_field: body}}}}",
                              f"train_scorers.models={json.dumps(models)}")
    with pytest.raises(TrainDataError, match="no field 'body' .*fields: .*output"):
        run_train_scorers(spark, wrong_field)
    no_label = train_config(cfg.storage.root, {"d": {"task": "domain", "model": "fasttext", "label_column": "genre"}})
    with pytest.raises(TrainDataError, match="documents has no column 'genre'"):
        run_train_scorers(spark, no_label)
    # checked before anything trains: the quality model listed first is not trained when the domain one cannot be
    first_ok = train_config(cfg.storage.root, {"q_first": small_models()["wiki"], "d": {"task": "domain", "model": "fasttext",
                                                                                       "label_column": "genre"}})
    with pytest.raises(TrainDataError, match="model 'd': documents has no column 'genre'"):
        run_train_scorers(spark, first_ok)
    assert not (models_dir(first_ok) / "q_first").exists() and (models_dir(first_ok) / "wiki").exists()
    with pytest.raises(TrainDataError, match="no documents table"):
        run_train_scorers(spark, train_config(tmp_path / "empty", {"d": {"task": "domain", "model": "fasttext"}}))


def test_training_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="needs `positives`"):
        train_config(tmp_path, {"q": {"task": "quality", "model": "fasttext"}})
    with pytest.raises(ConfigError, match="unknown reference set\\(s\\) books"):
        train_config(tmp_path, {"q": {"task": "quality", "model": "tfidf", "positives": ["books"]}})
    with pytest.raises(ConfigError, match="needs `encoder` and `tokenizer`"):
        train_config(tmp_path, {"d": {"task": "domain", "model": "embedding"}})


def test_slugs_chunks_and_split_are_deterministic():
    assert slug("Science & Technology") == "science_and_technology" and slug("Software Dev.") == "software_dev"
    text = "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(20))
    chunks = paragraphs(text, 500)
    assert all(len(c) >= 500 for c in chunks[:-1]) and "".join(chunks).replace("\n", "") in text.replace("\n", "")
    keys = [f"doc:{i}" for i in range(2000)]
    flags = holdout_flags(keys, 0.2, seed=13)
    assert (flags == holdout_flags(keys, 0.2, seed=13)).all() and 0.17 < flags.mean() < 0.23
    assert not (flags == holdout_flags(keys, 0.2, seed=14)).all()
