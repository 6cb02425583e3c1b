"""Annotate on a small ingested subset of the shared corpus: counts, schema, incremental reruns, versions."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
from pyspark.sql import functions as F

from quadmix_spark.curation.annotate import (
    AnnotationVersionError,
    build_gpu_profile,
    gpu_resource_profile,
    plan_work,
    run_annotate,
    score_documents,
    spread_work,
    uniform_work,
    flag_documents,
)
from quadmix_spark.curation.ingest import run_ingest
from quadmix_spark.jobs import annotate_job
from quadmix_spark.curation.scorers import resolve_scorers
from quadmix_spark.core.storage import read_table, table_version
from tests.conftest import DATA, make_config

pytestmark = pytest.mark.spark

N_WEB = 80
LID = str(DATA / "models" / "lid" / "lid.176.ftz")
MINILM = DATA / "models" / "minilm_l6_v2"
ODD = {  # documents that must be scored, not crash
    "odd-huge": ("Annual report of the harbour authority. " * 80_000)[:3_000_000],
    "odd-fr": "Ceci est une page en français sur la cuisine et les recettes de saison.",
    "odd-ja": "これは日本語のページです。料理について書いています。",
    "odd-punct": "!!! ??? ... ### *** --- ///",
}


def read_jsonl(path, n):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, spark):
    """A store with ~100 real pages plus odd documents ingested, and the models the scorers use."""
    base = tmp_path_factory.mktemp("annotate")
    pages = read_jsonl(DATA / "web" / "weborganizer_dev.jsonl.gz", N_WEB)
    with open(base / "docs.jsonl", "w") as f:
        for r in pages:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "topic": r["topic"]}) + "\n")
        for doc_id, text in ODD.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    cfg = make_config(base / "store", f"ingest.input=[{base / 'docs.jsonl'}]", "ingest.max_chars=5000000")
    assert run_ingest(spark, cfg).documents == N_WEB + len(ODD)

    from quadmix_spark.curation.fasttext_train import train_in_subprocess
    from quadmix_udfs.fasttext_scorer import prepare_lines

    with open(base / "topics.txt", "w") as f:  # a real (small) fastText topic classifier
        for r, line in zip(pages, prepare_lines([r["text"] for r in pages], 20_000)):
            f.write(f"__label__{r['topic'].replace(' ', '_')} {line}")
    train_in_subprocess(str(base / "topics.txt"), str(base / "topics.bin"), {"dim": 8, "epoch": 5, "bucket": 10000, "seed": 1})

    from sklearn.linear_model import LogisticRegression

    from quadmix_udfs.onnx_transformer import Encoder

    wiki = [r["text"][:2000] for r in read_jsonl(DATA / "reference" / "enwiki_sample.jsonl.gz", 20)]
    enc = Encoder(str(MINILM / "model_int8.onnx"), str(MINILM / "tokenizer.json"), max_chars=200, max_length=24)
    emb = enc.embed(wiki + [r["text"] for r in pages[:30]])
    y = np.array(["hq"] * len(wiki) + ["cc"] * 30)
    clf = LogisticRegression(max_iter=500).fit(emb, y)
    np.savez(base / "wiki_head.npz", weight=np.stack([np.zeros(384), clf.coef_[0]], 1).astype(np.float32),
             bias=np.array([0, clf.intercept_[0]], np.float32), labels=np.array(["cc", "hq"]), kind=np.array("logistic"))
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import Pipeline
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    tfidf, lr = TfidfVectorizer(token_pattern=r"(?u)\b\w\w+\b"), LogisticRegression(max_iter=500)
    pipe = Pipeline([("tfidf", tfidf), ("lr", lr)]).fit(wiki + [r["text"] for r in pages[:30]], y)
    onx = convert_sklearn(pipe, initial_types=[("text", StringTensorType([None, 1]))], target_opset={"": 17, "ai.onnx.ml": 3},
                          options={id(lr): {"zipmap": False}, id(tfidf): {"tokenexp": r"[\pL\pN_]{2,}", "locale": "C.UTF-8"}})
    (base / "tfidf.onnx").write_bytes(onx.SerializeToString())
    topics = np.array([r["topic"] for r in pages[:50]])
    emb_t = enc.embed([r["text"] for r in pages[:50]])
    clf_t = LogisticRegression(max_iter=500).fit(emb_t, topics)
    np.savez(base / "topic_head.npz", weight=clf_t.coef_.T.astype(np.float32), bias=clf_t.intercept_.astype(np.float32),
             labels=clf_t.classes_.astype(str), kind=np.array("logistic"))
    return base


def fasttext_scorers(base):
    return {
        "topic": {"type": "fasttext", "model": str(base / "topics.bin"), "output": "label"},
        "en": {"type": "fasttext", "model": LID, "label": "en", "max_chars": 5000},
        "fr": {"type": "fasttext", "model": LID, "label": "fr"},
    }


def minilm_scorers(base):
    common = {"type": "onnx_transformer", "model": str(MINILM / "model_int8.onnx"), "tokenizer": str(MINILM / "tokenizer.json"),
              "head": "embedding", "max_chars": 200, "max_length": 24, "batch_size": 8}
    return {"topic_mini": {**common, "head_file": str(base / "topic_head.npz"), "output": "label"},
            "wiki_mini": {**common, "head_file": str(base / "wiki_head.npz"), "label": "hq"}}


def tfidf_scorers(base):
    return {"tfidf": {"type": "onnx_text", "model": str(base / "tfidf.onnx"), "label": "hq", "batch_size": 16}}


def store_for(spark, corpus, tmp_path, scorers, domain, quality, *overrides):
    """A fresh store holding a copy of the ingested documents, and its config."""
    root = tmp_path / "store"
    read_table(spark, str(corpus / "store" / "tables" / "documents")).write.format("delta").save(str(root / "tables" / "documents"))
    return config_for(root, scorers, domain, quality, *overrides)


def config_for(root, scorers, domain, quality, *overrides):
    return make_config(root, f"scorers={json.dumps(scorers)}", f"annotate.domain_scorer={domain}",
                       f"annotate.quality_scorers={json.dumps(quality)}", *overrides)


def annotations(spark, cfg):
    return read_table(spark, cfg.storage.table("annotations"))


def test_annotate_scores_each_document_once_and_a_rerun_changes_nothing(spark, corpus, tmp_path):
    cfg = store_for(spark, corpus, tmp_path, fasttext_scorers(corpus), "topic", ["en"])
    n = N_WEB + len(ODD)
    first = run_annotate(spark, cfg, histograms=False)
    assert first.new_documents == n and first.scored == {"topic": n, "en": n} and first.changed
    ann = annotations(spark, cfg)
    assert ann.columns == ["doc_id", "n_tokens", "domain", "domain_conf", "q_en", "scorer_versions"]
    assert ann.count() == n and ann.select("doc_id").distinct().count() == n
    assert ann.where(F.col("q_en").isNull() | F.col("domain").isNull()).count() == 0  # odd documents scored too
    assert all(r.scorer_versions == first.versions for r in ann.select("scorer_versions").collect())

    docs = {r.doc_id: r for r in read_table(spark, cfg.storage.table("documents")).collect()}
    rows = {r.doc_id: r for r in ann.collect()}
    scorers = resolve_scorers(cfg)
    ids = sorted(rows)
    en, _ = scorers.quality[0].adapter.score([docs[i].text for i in ids])
    conf, topic = scorers.domain.adapter.score([docs[i].text for i in ids])
    assert [rows[i].q_en for i in ids] == en.tolist()
    assert [rows[i].domain for i in ids] == list(topic)
    assert all(rows[i].n_tokens == docs[i].n_tokens for i in ids)
    assert rows["odd-fr"].q_en < 0.1 < rows["odd-huge"].q_en  # the 3 MB page: truncated to max_chars, scored

    version = table_version(spark, cfg.storage.table("annotations"))
    again = run_annotate(spark, cfg, histograms=False)
    assert not again.changed and again.scored == {"topic": 0, "en": 0} and again.rows == n
    assert table_version(spark, cfg.storage.table("annotations")) == version

    docs_table = cfg.storage.table("documents")  # three more documents arrive
    more = read_table(spark, docs_table).orderBy("doc_id").limit(3)
    more = more.withColumn("doc_id", F.concat(F.lit("new-"), "doc_id")).withColumn("text", F.concat("text", F.lit(" More.")))
    more.write.format("delta").mode("append").save(docs_table)
    third = run_annotate(spark, cfg, histograms=False)
    assert third.new_documents == 3 and third.scored == {"topic": 3, "en": 3}
    after = {r.doc_id: r for r in annotations(spark, cfg).collect()}
    assert len(after) == n + 3 and all(after[i] == rows[i] for i in ids)  # old rows untouched


def test_texts_are_cut_in_spark_exactly_as_the_adapters_cut_them(spark):
    from types import SimpleNamespace

    from quadmix_spark.curation.annotate import cut_text, text_limit
    from quadmix_udfs.scoring import ScorerRun

    texts = ["ab\ncdef", "日本語のページです", "日本", "😀x😀y😀z", "é" * 10, "é", "", None, "abc", "plain ascii text"]
    df = spark.createDataFrame([(t,) for t in texts], "text string")
    got = [r.t for r in df.select(cut_text(F.col("text"), 3).alias("t")).collect()]
    assert got == [t[:3] if t is not None else None for t in texts]  # code points, as Python slices

    def run(max_chars):
        return ScorerRun("s", SimpleNamespace(max_chars=max_chars) if max_chars else object(), "score", ("q_s",))

    assert text_limit([run(5000), run(20_000)]) == 20_000
    assert text_limit([run(5000), run(None)]) is None  # an adapter with no limit reads whole texts
    assert text_limit([]) is None


def test_a_changed_scorer_needs_an_explicit_rescore_and_only_its_column_changes(spark, corpus, tmp_path):
    scorers = fasttext_scorers(corpus)
    cfg = store_for(spark, corpus, tmp_path, scorers, "topic", ["en"])
    old = run_annotate(spark, cfg, histograms=False)
    before = {r.doc_id: r for r in annotations(spark, cfg).collect()}
    version = table_version(spark, cfg.storage.table("annotations"))

    changed = config_for(cfg.storage.root, {**scorers, "en": {**scorers["en"], "max_chars": 40}}, "topic", ["en"])
    with pytest.raises(AnnotationVersionError, match=r"column q_en: annotated by en@v1\.\w+ \(84 rows\); scorer 'en' is now en@v1\.\w+\n.*--rescore en"):
        run_annotate(spark, changed, histograms=False)
    assert table_version(spark, cfg.storage.table("annotations")) == version

    redo = run_annotate(spark, changed, rescore=["en"], histograms=False)
    assert redo.rescored == {"en": len(before)} and redo.scored == {"topic": 0, "en": len(before)} and redo.new_documents == 0
    after = {r.doc_id: r for r in annotations(spark, changed).collect()}
    assert after.keys() == before.keys()
    assert all(after[i].domain == before[i].domain and after[i].domain_conf == before[i].domain_conf for i in after)
    assert sum(after[i].q_en != before[i].q_en for i in after) > len(after) // 2  # 40 characters score differently
    assert all(after[i].scorer_versions == {**old.versions, "q_en": redo.versions["q_en"]} for i in after)
    assert not run_annotate(spark, changed, histograms=False).changed

    # a scorer added to the config: only its new column is computed, for every row
    added = config_for(cfg.storage.root, {**scorers, "en": {**scorers["en"], "max_chars": 40}}, "topic", ["en", "fr"])
    more = run_annotate(spark, added)
    assert more.scored == {"topic": 0, "en": 0, "fr": len(before)} and more.rescored == {}
    final = {r.doc_id: r for r in annotations(spark, added).collect()}
    assert all(final[i].q_en == after[i].q_en and final[i].q_fr is not None for i in final)
    assert final["odd-fr"].q_fr > 0.5


def test_scores_are_the_same_bits_across_partitionings_and_the_gpu_stage_split(spark, corpus, tmp_path):
    """Every adapter (fastText, onnx_text, MiniLM with a label head and a score head) gives each document the
    same bits with 1, 3 and 7 partitions and with the CPU/GPU stage split: no rounding hides a difference."""
    scorers = {**fasttext_scorers(corpus), **minilm_scorers(corpus), **tfidf_scorers(corpus)}
    quality = ["wiki_mini", "en", "tfidf"]
    runs = {}
    for n in (1, 3, 7):
        cfg = store_for(spark, corpus, tmp_path / f"p{n}", scorers, "topic_mini", quality, f"annotate.partitions={n}")
        run_annotate(spark, cfg, histograms=False)
        runs[n] = sorted(annotations(spark, cfg).drop("scorer_versions").collect())
    one = runs[1]
    assert runs[3] == one and runs[7] == one and len(one) == N_WEB + len(ODD)
    assert len({r.domain for r in one}) > 3 and all(0 <= r.q_wiki_mini <= 1 and 0 <= r.q_tfidf <= 1 for r in one)
    assert len({r.q_wiki_mini for r in one}) > N_WEB // 2  # unrounded, varied scores

    # the CPU stage / shuffle / GPU stage split (as with stage-level scheduling) gives the same rows
    resolved = resolve_scorers(cfg)
    work = plan_work(read_table(spark, cfg.storage.table("documents")), None, resolved)
    split = score_documents(work, resolved, gpu_stage=True, gpu_profile=None, partitions=2)
    cols = ["doc_id", "n_tokens", "domain", "domain_conf", "q_wiki_mini", "q_en", "q_tfidf"]
    assert sorted(split.select(*cols).collect()) == one


def test_a_documents_table_of_one_file_is_scored_on_every_core(spark, corpus, tmp_path):
    """A Parquet file smaller than a row group is one row group: Spark splits it by bytes for the cores, but the
    group's rows all go to the split holding its middle, so one task would score every row. Annotate spreads such
    a table by doc_id; a table read in enough files and partitions is left as read."""
    path = str(tmp_path / "one_file")
    read_table(spark, str(corpus / "store" / "tables" / "documents")).coalesce(1).write.format("delta").save(path)
    per_task = lambda df: df.rdd.mapPartitions(lambda rows: [sum(1 for _ in rows)]).collect()  # noqa: E731
    slots = spark.sparkContext.defaultParallelism
    assert slots >= 2
    spark.conf.set("spark.sql.files.maxPartitionBytes", "65536")
    try:
        documents = read_table(spark, path)
        files = len(documents.inputFiles())
        as_read = per_task(documents)
        assert files == 1 and len(as_read) >= slots and sorted(as_read)[-2] == 0  # the skew: one busy task
        spread = per_task(spread_work(documents, None, files))
        assert len(spread) == slots and min(spread) > 0 and sum(spread) == sum(as_read)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    balanced = documents.repartition(slots)
    assert spread_work(balanced, None, slots) is balanced
    assert spread_work(balanced, 3, slots).rdd.getNumPartitions() == 3


def test_a_failed_job_commits_nothing_and_the_rerun_completes(spark, corpus, tmp_path):
    model = tmp_path / "topics.bin"
    shutil.copyfile(corpus / "topics.bin", model)
    scorers = {**fasttext_scorers(corpus), "topic": {"type": "fasttext", "model": str(model), "output": "label"}}
    cfg = store_for(spark, corpus, tmp_path, scorers, "topic", ["en"])
    resolved = resolve_scorers(cfg)  # checked on the driver; the file then disappears before the tasks run
    model.unlink()
    with pytest.raises(Exception, match="topics.bin"):
        run_annotate(spark, cfg, scorers=resolved, histograms=False)
    assert annotations(spark, cfg).count() == 0
    shutil.copyfile(corpus / "topics.bin", model)
    report = run_annotate(spark, cfg, histograms=False)
    ann = annotations(spark, cfg)
    assert report.new_documents == ann.count() == ann.select("doc_id").distinct().count() == N_WEB + len(ODD)


def test_annotate_job_logs_versions_counts_and_histograms_to_mlflow(spark, corpus, tmp_path):
    import mlflow

    cfg = store_for(spark, corpus, tmp_path, fasttext_scorers(corpus), "topic", ["en", "fr"], "annotate.histogram_bins=10")
    report = annotate_job(cfg)
    assert "rows scored per scorer: topic=84, en=84, fr=84" in report.summary()
    assert "docs/s); annotations (new table) -> v" in report.summary()
    client = mlflow.MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quadmix").experiment_id], "tags.`quadmix.stage` = 'annotate'")
    assert run.data.params["quadmix.scorer.q_en"] == report.versions["q_en"]
    assert run.data.metrics["annotate.scored.topic"] == 84 and run.data.metrics["annotate.rows"] == 84
    names = {a.path for a in client.list_artifacts(run.info.run_id, "annotate")}
    assert {"annotate/score_histograms.json", "annotate/score_histograms.png", "annotate/summary.txt"} <= names
    png = client.download_artifacts(run.info.run_id, "annotate/score_histograms.png", str(tmp_path))
    assert open(png, "rb").read(4) == b"\x89PNG"
    hist = report.histograms
    assert set(hist["criterion"]) == {"q_en", "q_fr", "domain_conf"} and hist["bin"].between(0, 9).all()
    totals = hist.groupby(["criterion", "domain"])["count"].sum()
    assert (totals.groupby("criterion").sum() == 84).all()
    assert np.allclose(hist.groupby(["criterion", "domain"])["share"].sum(), 1.0)


def test_gpu_stage_profile_is_built_but_not_applied_in_local_mode(spark, corpus):
    cfg = config_for(corpus / "unused", minilm_scorers(corpus), "topic_mini", ["wiki_mini"], "annotate.stage_level_scheduling=true",
                     "annotate.task_gpus=0.5")
    profile, why = gpu_resource_profile(spark, cfg, resolve_scorers(cfg))
    assert profile is None and "local[" in why and "no GPU resources" in why
    off = config_for(corpus / "unused", minilm_scorers(corpus), "topic_mini", ["wiki_mini"])
    assert gpu_resource_profile(spark, off, resolve_scorers(off))[1].startswith("off")
    built = build_gpu_profile(0.5, 2)
    assert built.taskResources["gpu"].amount == 0.5 and built.taskResources["cpus"].amount == 2


FLAKY_MODULE = '''
"""A scorer whose first attempt of partition 0 dies after emitting its first batch (a lost executor)."""
import os
from dataclasses import dataclass

from quadmix_udfs.fasttext_scorer import FastTextScorer

MARKER = os.environ["QUADMIX_FLAKY_MARKER"]
_batches = {}


@dataclass(frozen=True)
class FlakyScorer(FastTextScorer):
    def score(self, texts):
        from pyspark import TaskContext

        ctx = TaskContext.get()
        key = (ctx.stageId(), ctx.partitionId(), ctx.attemptNumber())
        _batches[key] = _batches.get(key, 0) + 1
        if ctx.partitionId() == 0 and ctx.attemptNumber() == 0 and _batches[key] == 2:
            open(MARKER, "a").write(f"{key}\\n")
            raise RuntimeError("injected failure in the middle of a partition")
        return super().score(texts)
'''

RETRY_SCRIPT = '''
import json, os, sys
from quadmix_spark.curation.annotate import run_annotate
from quadmix_spark.curation.scorers import register_adapter
from quadmix_spark.core.session import get_spark
from quadmix_spark.core.storage import read_table
from quadmix_udfs.fasttext_scorer import FastTextScorer
from tests.conftest import make_config
from flaky_scorer import FlakyScorer

register_adapter("flaky")(lambda c: FlakyScorer(model=c.model, output=c.output, label=c.label, max_chars=c.max_chars))
root, lid = sys.argv[1], sys.argv[2]
scorers = {"lang": {"type": "fasttext", "model": lid, "output": "label"}, "en": {"type": "flaky", "model": lid, "label": "en"}}
cfg = make_config(root, "spark.master=local[2,3]", "spark.conf={spark.ui.enabled: 'false', "
                  "spark.sql.execution.arrow.maxRecordsPerBatch: '25'}", f"scorers={json.dumps(scorers)}",
                  "annotate.domain_scorer=lang", "annotate.quality_scorers=[en]", "annotate.partitions=2")
spark = get_spark(cfg)
texts = [f"Page {i}: " + ("a report on river transport and trade. " * (1 + i % 7)) for i in range(350)]
docs = spark.createDataFrame([(f"d{i:03d}", t, len(t.split())) for i, t in enumerate(texts)], "doc_id string, text string, n_tokens bigint")
docs.where("doc_id < 'd200'").write.format("delta").save(cfg.storage.table("documents"))
first = run_annotate(spark, cfg, histograms=False)  # into an empty table: the append path
docs.where("doc_id >= 'd200'").write.format("delta").mode("append").save(cfg.storage.table("documents"))
second = run_annotate(spark, cfg, histograms=False)  # new documents into a filled table: the MERGE path
rows = read_table(spark, cfg.storage.table("annotations")).collect()
clean, _ = FastTextScorer(lid, "score", "en").score(texts)
by_id = {r.doc_id: r.q_en for r in rows}
print(json.dumps({"rows": len(rows), "distinct": len(by_id), "new": [first.new_documents, second.new_documents],
                  "max_diff": max(abs(by_id[f"d{i:03d}"] - float(clean[i])) for i in range(350))}))
'''


@pytest.mark.slow
def test_a_task_retried_mid_partition_leaves_no_duplicates(tmp_path):
    """A real retry: ``local[2,3]`` (3 attempts per task) in a fresh process; in each run the first attempt of
    one task fails after it has emitted a batch; the append (empty table) and the MERGE (new documents) each
    commit every document once, with the right score."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "flaky_scorer.py").write_text(FLAKY_MODULE)
    (tmp_path / "run.py").write_text(RETRY_SCRIPT)
    marker = tmp_path / "failed.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "QUADMIX_FLAKY_MARKER": str(marker)}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "store"), LID], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert marker.exists() and len(marker.read_text().splitlines()) == 2  # the failure did happen, once per run
    assert result == {"rows": 350, "distinct": 350, "new": [200, 150], "max_diff": 0.0}


def test_uniform_flags_skip_the_join_and_give_the_same_work(spark, corpus, tmp_path):
    scorers = fasttext_scorers(corpus)
    cfg = store_for(spark, corpus, tmp_path, scorers, "topic", ["en"])
    run_annotate(spark, cfg, histograms=False)
    added = config_for(cfg.storage.root, scorers, "topic", ["en", "fr"])
    resolved = resolve_scorers(added)
    docs, ann = read_table(spark, added.storage.table("documents")), annotations(spark, added)
    n = docs.count()
    joined = plan_work(docs, ann, resolved)
    work = uniform_work(docs, resolved, n, 0, {"topic": 0, "en": 0, "fr": n})
    assert "Join" not in work._jdf.queryExecution().optimizedPlan().toString()
    assert sorted(work.collect()) == sorted(joined.collect())
    # flags that differ between documents (some new, or a scorer needed by some) keep the join
    assert uniform_work(docs, resolved, n, 3, {"topic": 3, "en": 3, "fr": n}) is None
    assert uniform_work(docs, resolved, n, 0, {"topic": 0, "en": 5, "fr": n}) is None
    assert uniform_work(docs, resolved, n, 0, {"topic": 0, "en": 0, "fr": 0}) is None
    assert flag_documents(docs, ann, resolved).where("not _new").count() == n
