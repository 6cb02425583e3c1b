"""Train scorers from labeled text: DCLM-style quality classifiers and domain classifiers.

For each enabled entry of ``train_scorers.models``:
- task=quality: positives are reference texts (``train_scorers.reference`` sets, label ``hq``), negatives
  documents sampled from the ``documents`` table (label ``cc``), both cut into pieces the same way and
  matched in length so that neither length nor layout tells them apart (:mod:`quadmix_spark.curation.quality_examples`);
  metrics: held-out ROC AUC of P(hq), the same within length bins, and a report on corpus documents (length
  correlation, domains of the top 10%; :mod:`quadmix_spark.curation.scorer_report`) with warnings when a score is
  mostly length or one domain;
- task=domain: the documents' ``label_column`` (e.g. the shared corpus's 24 ``topic`` labels), labels
  slugged (``Science & Technology`` -> ``science_and_technology``); metric: held-out top-1 accuracy.
Models: ``fasttext`` (supervised fastText, trained in a fresh process so it is deterministic), ``tfidf``
(scikit-learn TF-IDF + logistic regression exported with skl2onnx, scored by ``onnx_text``), ``embedding``
(a logistic head on mean-pooled embeddings of an ONNX encoder, e.g. the shared MiniLM; scored by
``onnx_transformer`` with ``head: embedding``; the embeddings are computed on the executors), ``causal_lm``
(quality only: a small language model of the positives, scored by ``onnx_causal_lm`` as a perplexity
criterion; :mod:`quadmix_spark.curation.causal_lm_train`).

Held-out metrics are computed with the same adapters annotate uses, on the saved files.

Driver memory: training collects a bounded sample to the driver: at most ``max_docs`` domain examples,
``negatives`` documents (three times that before a ``negatives_filter``), each reference set's ``max_docs``
documents (texts, or for ``embedding`` models one float32 vector per example) and ``report_docs`` documents
for the report. Nothing else of the corpus leaves the executors.

Versions: a model's version is a hash of its settings, the seed, the held-out fraction, the encoder files
and the exact examples (with their split). It is written to ``<models_dir>/<name>/<version>/`` (files plus
``meta.json`` with metrics) and copied to ``<models_dir>/<name>/current/``, the path scorer configs
use. A version already on disk is not trained again (reruns are no-ops); its stored metrics are reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from quadmix_spark.curation.config import ReferenceSetConfig, TrainModelConfig
from quadmix_spark.core.config import ConfigError, QuadmixConfig
from quadmix_spark.curation.quality_examples import chunk_text, match_lengths
from quadmix_spark.curation.scorer_report import auc, auc_by_length, corpus_report, plot_report, report_warnings
from quadmix_spark.core.storage import read_table, table_exists
from quadmix_spark.core.tables import DOCUMENTS
from quadmix_udfs.fasttext_scorer import FastTextScorer, prepare_lines
from quadmix_udfs.onnx_text import OnnxTextScorer
from quadmix_udfs.onnx_transformer import Encoder, OnnxTransformerScorer

HQ, CC = "hq", "cc"
FORMAT = 3  # bump when the training code changes what a given config produces


class TrainDataError(ConfigError):
    """Training data that is missing or unusable (names the source and the problem)."""


# ---------------------------------------------------------------- examples


@dataclass
class Examples:
    """A bounded, driver-side training set: texts, labels, a stable key each, and the held-out flag."""

    texts: list[str]
    labels: list[str]
    keys: list[str]
    holdout: np.ndarray

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, label, text, hold in sorted(zip(self.keys, self.labels, self.texts, self.holdout.tolist())):
            h.update(f"{key}\t{label}\t{int(hold)}\t{hashlib.sha1(text.encode()).hexdigest()}\n".encode())
        return h.hexdigest()

    def part(self, held_out: bool) -> tuple[list[str], list[str]]:
        idx = np.flatnonzero(self.holdout == held_out)
        return [self.texts[i] for i in idx], [self.labels[i] for i in idx]

    def counts(self) -> dict[str, int]:
        return {"n_train": int((~self.holdout).sum()), "n_holdout": int(self.holdout.sum())}


def slug(label: str) -> str:
    """A label usable in fastText, column values and MLflow keys: ``Science & Technology`` -> ``science_and_technology``."""
    s = re.sub(r"[^0-9a-z]+", "_", label.lower().replace("&", " and ")).strip("_")
    return s or "unknown"


def paragraphs(text: str, chunk_chars: int, min_chars: int = 100) -> list[str]:
    """Split at blank lines into chunks of about ``chunk_chars`` characters (short leftovers dropped)."""
    chunks, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= chunk_chars:
            chunks.append(cur)
            cur = ""
    if len(cur) >= min_chars:
        chunks.append(cur)
    return chunks


def holdout_flags(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Deterministic split: a key is held out when a hash of (seed, key) falls under ``fraction``."""
    out = np.empty(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        out[i] = int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:8], 16) / 2**32 < fraction
    return out


def _ordered_sample(df: DataFrame, key: str, n: int | None, seed: int) -> DataFrame:
    ordered = df.orderBy(F.xxhash64(F.col(key), F.lit(seed)), F.col(key))
    return ordered.limit(n) if n else ordered


def read_reference(spark: SparkSession, name: str, ref: ReferenceSetConfig, seed: int) -> list[str]:
    """The texts of a reference set (at most ``max_docs`` documents, deterministic), chunked if asked; its
    file's existence is checked up front, by ``check_training_inputs``."""
    df = spark.read.json(ref.path)
    if ref.text_field not in df.columns:
        raise TrainDataError(f"reference set {name!r} ({ref.path}): no field {ref.text_field!r} (fields: {', '.join(df.columns)})")
    texts = df.select(F.col(ref.text_field).cast("string").alias("text")).where(F.length(F.trim("text")) > 0)
    rows = _ordered_sample(texts, "text", ref.max_docs, seed).collect()
    out = [r["text"] for r in rows]
    if ref.chunk_chars:
        out = [c for t in out for c in paragraphs(t, ref.chunk_chars)]
    if not out:
        raise TrainDataError(f"reference set {name!r} ({ref.path}): no non-empty {ref.text_field!r} values")
    return out


def _documents(spark: SparkSession, cfg: QuadmixConfig) -> DataFrame:
    table = cfg.storage.table(DOCUMENTS)
    if not table_exists(spark, table):
        raise TrainDataError(f"no documents table at {table}: run `quadmix ingest` first")
    return read_table(spark, table)


def quality_examples(spark: SparkSession, cfg: QuadmixConfig, m: TrainModelConfig) -> Examples:
    """Positives (reference sets, ``hq``) and documents (``cc``, well-formed ones when ``negatives_filter``
    names text_stats rules), both cut into ``chunk_chars`` pieces the same way and, with ``length_match``,
    matched in length bin by bin (:mod:`quadmix_spark.curation.quality_examples`); at most ``max_docs // 2`` pieces of
    each class. The held-out split is by source document, so pieces of one document are on one side."""
    ts = cfg.train_scorers
    sources = [(f"ref:{hashlib.sha1(t.encode()).hexdigest()}", t, HQ)
               for name in m.positives for t in read_reference(spark, name, ts.reference[name], ts.seed)]
    docs = _documents(spark, cfg).select("doc_id", "text")
    want = m.negatives * (3 if m.negatives_filter else 1)  # well-formed pages are a part of the sample
    rows = _ordered_sample(docs, "doc_id", want, ts.seed).collect()
    if m.negatives_filter:
        rows = well_formed(rows, m.negatives_filter)[: m.negatives]
    sources += [(f"doc:{r['doc_id']}", r["text"], CC) for r in rows]
    texts, labels, keys, groups = [], [], [], []
    for group, text, label in sources:
        for j, piece in enumerate(chunk_text(text, m.chunk_chars)):
            texts.append(piece)
            labels.append(label)
            keys.append(f"{group}#{j}")
            groups.append(group)
    positive = np.array([lab == HQ for lab in labels], dtype=bool)
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    if m.length_match:
        keep = match_lengths(keys, positive, lengths, ts.seed, max_per_class=m.max_docs // 2)
    else:
        keep = _cap(keys, positive, m.max_docs // 2, ts.seed)
    idx = np.flatnonzero(keep)
    ex = Examples([texts[i] for i in idx], [labels[i] for i in idx], [keys[i] for i in idx],
                  holdout_flags([groups[i] for i in idx], ts.holdout_fraction, ts.seed))
    for flag, part in ((False, "training"), (True, "held-out")):
        present = {lab for lab, h in zip(ex.labels, ex.holdout) if h == flag}
        if present != {HQ, CC}:
            raise TrainDataError(f"quality model: the {part} split lacks {sorted({HQ, CC} - present)} examples (too few "
                                 "documents, or too few of matching length?)")
    return ex


def _cap(keys: list[str], positive: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Every example, at most ``per_class`` of each class (smallest hashes of (seed, key) first)."""
    rank = np.array([hashlib.sha1(f"{seed}/{k}".encode()).hexdigest() for k in keys])
    keep = np.zeros(len(keys), dtype=bool)
    for cls in (True, False):
        idx = np.flatnonzero(positive == cls)
        keep[idx[np.argsort(rank[idx], kind="stable")[:per_class]]] = True
    return keep


def well_formed(rows: list, rules) -> list:
    """The rows whose text passes every ``rules`` of the heuristic scorer (``text_stats``)."""
    from quadmix_udfs.text_stats import TextStatsScorer

    if not rows:
        return rows
    passed = TextStatsScorer(filter=rules).passes_filter([r["text"] for r in rows])
    return [r for r, ok in zip(rows, passed) if ok]


def domain_examples(spark: SparkSession, cfg: QuadmixConfig, m: TrainModelConfig) -> Examples:
    """Documents with a non-empty ``label_column`` (checked up front, by ``check_training_inputs``; at most
    ``max_docs``), labels slugged; rare labels dropped."""
    ts = cfg.train_scorers
    docs = _documents(spark, cfg)
    labeled = docs.select("doc_id", "text", F.col(m.label_column).cast("string").alias("label")).where(
        F.length(F.trim("label")) > 0
    )
    rows = _ordered_sample(labeled, "doc_id", m.max_docs, ts.seed).collect()
    labels = [slug(r["label"]) for r in rows]
    counts = {lab: labels.count(lab) for lab in set(labels)}
    keep = [i for i, lab in enumerate(labels) if counts[lab] >= m.min_class_docs]
    if len({labels[i] for i in keep}) < 2:
        raise TrainDataError(f"domain model: fewer than 2 labels of {m.label_column!r} with >= {m.min_class_docs} documents")
    keys = [f"doc:{rows[i]['doc_id']}" for i in keep]
    return Examples([rows[i]["text"] for i in keep], [labels[i] for i in keep], keys, holdout_flags(keys, ts.holdout_fraction, ts.seed))


# ---------------------------------------------------------------- models


def _metrics(task: str, y_true: list[str], scores: np.ndarray, predicted: np.ndarray | None,
             texts: list[str] | None = None) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    if task == "quality":
        y = np.array([lab == HQ for lab in y_true])
        within, _ = auc_by_length(y, scores, np.array([len(t) for t in texts or []]) if texts else np.zeros(len(y)))
        return {"auc": auc(y, scores), "auc_within_length": within, "accuracy": float(((scores >= 0.5) == y).mean()),
                "holdout_hq": int(y.sum()), "holdout_cc": int((~y).sum())}
    return {"accuracy": float(accuracy_score(y_true, predicted)), "macro_f1": float(f1_score(y_true, predicted, average="macro")),
            "holdout_classes": len(set(y_true))}


def train_fasttext(ex: Examples, m: TrainModelConfig, task: str, folder: Path, seed: int) -> tuple[dict, dict, dict]:
    """(files, metrics, scorer config) of a fastText classifier trained on the training split."""
    from quadmix_spark.curation.fasttext_train import train_in_subprocess

    texts, labels = ex.part(False)
    # fastText reads the file in order with a decaying learning rate: shuffle (deterministically), or the
    # class written last pulls every score its way
    order = np.random.default_rng(seed).permutation(len(texts))
    lines = prepare_lines([texts[i] for i in order], m.max_chars)
    train_file = folder / "train.txt"
    with open(train_file, "w", encoding="utf-8") as f:
        for line, i in zip(lines, order):
            f.write(f"__label__{labels[i]} {line}")
    name = "model.ftz" if m.quantize else "model.bin"
    params = {"dim": m.dim, "epoch": m.epoch, "lr": m.lr, "wordNgrams": m.word_ngrams, "minCount": m.min_count,
              "bucket": m.bucket, "loss": "softmax", "seed": seed}
    train_in_subprocess(str(train_file), str(folder / name), params, m.quantize)
    train_file.unlink()
    test_texts, test_labels = ex.part(True)
    if task == "quality":
        scores, _ = FastTextScorer(str(folder / name), "score", HQ, m.max_chars).score(test_texts)
        metrics, scorer = _metrics(task, test_labels, scores, None, test_texts), {"type": "fasttext", "label": HQ}
    else:
        conf, pred = FastTextScorer(str(folder / name), "label", None, m.max_chars).score(test_texts)
        metrics, scorer = _metrics(task, test_labels, conf, pred), {"type": "fasttext", "output": "label"}
    return {"model": name}, metrics, {**scorer, "model": name, "max_chars": m.max_chars}


def train_tfidf(ex: Examples, m: TrainModelConfig, task: str, folder: Path, seed: int) -> tuple[dict, dict, dict]:
    """TF-IDF + logistic regression, exported with skl2onnx (string input), checked against scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    texts, labels = ex.part(False)
    cut = [t[: m.max_chars] for t in texts]
    tfidf = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w\w+\b", max_features=m.max_features, dtype=np.float32)  # sublinear_tf does not export exactly
    clf = LogisticRegression(C=m.c, max_iter=2000, random_state=seed)
    pipe = Pipeline([("tfidf", tfidf), ("logreg", clf)]).fit(cut, labels)
    onx = convert_sklearn(
        pipe,
        initial_types=[("text", StringTensorType([None, 1]))],
        options={id(clf): {"zipmap": False}, id(tfidf): {"tokenexp": r"[\pL\pN_]{2,}", "locale": "C.UTF-8"}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    classes = [str(c) for c in clf.classes_]
    meta = onx.metadata_props.add()
    meta.key, meta.value = "labels", json.dumps(classes)
    (folder / "model.onnx").write_bytes(onx.SerializeToString())
    test_texts, test_labels = ex.part(True)
    path = str(folder / "model.onnx")
    if task == "quality":
        scores, _ = OnnxTextScorer(path, "score", HQ, max_chars=m.max_chars).score(test_texts)
        metrics = _metrics(task, test_labels, scores, None, test_texts)
        ref = pipe.predict_proba([t[: m.max_chars] for t in test_texts])[:, classes.index(HQ)]
        scorer = {"type": "onnx_text", "label": HQ}
    else:
        scores, pred = OnnxTextScorer(path, "label", max_chars=m.max_chars).score(test_texts)
        metrics = _metrics(task, test_labels, scores, pred)
        ref = pipe.predict_proba([t[: m.max_chars] for t in test_texts]).max(axis=1)
        scorer = {"type": "onnx_text", "output": "label"}
    metrics["onnx_parity_max_abs_diff"] = float(np.abs(ref - scores).max()) if len(ref) else 0.0
    return {"model": "model.onnx"}, metrics, {**scorer, "model": "model.onnx", "max_chars": m.max_chars}


def compute_embeddings(spark: SparkSession, encoder: Encoder, texts: list[str]) -> np.ndarray:
    """Mean-pooled embeddings of ``texts`` computed on the executors (``mapInPandas``), in input order."""
    import functools

    import pandas as pd

    from quadmix_udfs.onnx_transformer import embed_partitions

    parts = max(1, min(spark.sparkContext.defaultParallelism * 2, len(texts) // 16 or 1))
    df = spark.createDataFrame(pd.DataFrame({"i": np.arange(len(texts), dtype=np.int64), "text": texts}))
    emb = df.repartition(parts).mapInPandas(functools.partial(embed_partitions, encoder), "i long, embedding array<float>")
    rows = emb.collect()
    out = np.zeros((len(texts), len(rows[0]["embedding"]) if rows else 0), dtype=np.float32)
    for r in rows:
        out[r["i"]] = r["embedding"]
    return out


def train_embedding_head(
    spark: SparkSession, ex: Examples, m: TrainModelConfig, task: str, folder: Path, seed: int
) -> tuple[dict, dict, dict]:
    """A logistic head on L2-normalised mean-pooled encoder embeddings, saved as ``head.npz``."""
    from sklearn.linear_model import LogisticRegression

    encoder = Encoder(model=m.encoder or "", tokenizer=m.tokenizer or "", max_chars=m.max_chars,
                      max_length=m.max_length, batch_size=m.batch_size, device="cpu")
    encoder.embed(["probe"], encoder.session(None))  # unusable encoder or tokenizer: fails here, not in a task
    emb = compute_embeddings(spark, encoder, ex.texts)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    y = np.array(ex.labels)
    train = ~ex.holdout
    clf = LogisticRegression(C=m.c, max_iter=3000, random_state=seed).fit(x[train], y[train])
    classes = [str(c) for c in clf.classes_]
    if len(classes) == 2:  # binary: a 2-class softmax whose logit difference is the fitted one
        weight = np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]], axis=1)
        bias = np.array([0.0, clf.intercept_[0]])
    else:
        weight, bias = clf.coef_.T, clf.intercept_
    np.savez(folder / "head.npz", weight=weight.astype(np.float32), bias=bias.astype(np.float32),
             labels=np.array(classes), kind=np.array("logistic"), normalize=np.array(True))
    head_path = str(folder / "head.npz")
    output, label = ("score", HQ) if task == "quality" else ("label", None)
    scorer_obj = OnnxTransformerScorer(encoder, "embedding", output, label, None, head_path)
    scores, pred = scorer_obj.score_embeddings(emb[ex.holdout])
    test_texts, test_labels = ex.part(True)
    metrics = _metrics(task, test_labels, scores, pred, test_texts)
    scorer = {"type": "onnx_transformer", "model": m.encoder, "tokenizer": m.tokenizer, "head": "embedding",
              "head_file": "head.npz", "max_chars": m.max_chars, "max_length": m.max_length, "batch_size": m.batch_size}
    scorer.update({"label": HQ} if task == "quality" else {"output": "label"})
    return {"head_file": "head.npz"}, metrics, scorer


def train_perplexity_lm(ex: Examples, m: TrainModelConfig, folder: Path, seed: int) -> tuple[dict, dict, dict]:
    """A causal LM of the training split's positives, exported to ONNX, scored as ``onnx_causal_lm`` perplexity
    (:mod:`quadmix_spark.curation.causal_lm_train`); held-out metrics from the exported model through the adapter."""
    from quadmix_spark.curation.causal_lm_train import LMSettings, export_onnx, train_causal_lm
    from quadmix_udfs.onnx_causal_lm import CausalLMScorer

    texts, labels = ex.part(False)
    positives = [t[: m.max_chars] for t, lab in zip(texts, labels) if lab == HQ]
    settings = LMSettings(vocab=m.lm_vocab, d_model=m.lm_d_model, layers=m.lm_layers, seq_len=m.lm_seq_len,
                          steps=m.lm_steps, batch_size=m.batch_size, lr=m.lm_lr, seed=seed)
    model, stats = train_causal_lm(positives, m.tokenizer or "", settings)
    tokenizer = folder / "tokenizer.json"
    shutil.copyfile(m.tokenizer or "", tokenizer)  # the scorer's files travel together (current/)
    export_onnx(model, str(folder / "model.onnx"))
    scorer = {"type": "onnx_causal_lm", "head": "perplexity", "prefix_token": _eos_name(str(tokenizer)),
              "max_length": m.lm_seq_len - 1, "max_chars": m.max_chars, "batch_size": 8}
    adapter = CausalLMScorer(str(folder / "model.onnx"), str(tokenizer), "perplexity", m.max_chars, m.lm_seq_len - 1,
                             8, "cpu", prefix_token=scorer["prefix_token"])
    adapter.validate()
    test_texts, test_labels = ex.part(True)
    metrics = {**_metrics("quality", test_labels, adapter.score(test_texts)[0], None, test_texts), **stats}
    metrics.pop("accuracy")  # a log-likelihood has no 0.5 threshold
    return {"model": "model.onnx", "tokenizer": "tokenizer.json"}, metrics, scorer


def _eos_name(tokenizer_path: str) -> str:
    from quadmix_udfs.tokens import eos_id
    from quadmix_udfs.tokens import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    return tok.id_to_token(eos_id(tok))


# ---------------------------------------------------------------- the quality report


def report_domain_column(cfg: QuadmixConfig, columns: list[str]) -> str | None:
    """The documents column the report reads domains from (see ``train_scorers.report_domain_column``)."""
    ts = cfg.train_scorers
    if ts.report_domain_column:
        if ts.report_domain_column not in columns:
            raise TrainDataError(f"train_scorers.report_domain_column {ts.report_domain_column!r} is not a documents "
                                 f"column (columns: {', '.join(columns)})")
        return ts.report_domain_column
    return next((m.label_column for m in ts.models.values() if m.enabled and m.task == "domain" and m.label_column in columns), None)


def score_texts(spark: SparkSession, scorer: dict, files: dict, folder: Path, texts: list[str]) -> np.ndarray:
    """The scores a trained model (its files in ``folder``) gives ``texts`` whole, as annotate would."""
    from quadmix_spark.curation.config import ScorerConfig
    from quadmix_spark.curation.scorers import build_scorer

    conf = {**scorer, **{k: str(folder / v) for k, v in files.items()}}
    adapter = build_scorer("report", ScorerConfig(**conf), validate=False).adapter
    if isinstance(adapter, OnnxTransformerScorer) and adapter.head == "embedding":
        return adapter.score_embeddings(compute_embeddings(spark, adapter.encoder, texts))[0]
    return np.asarray(adapter.score(texts)[0], dtype=np.float64)


def quality_report(spark: SparkSession, cfg: QuadmixConfig, name: str, ex: Examples, scorer: dict, files: dict,
                   folder: Path) -> tuple[dict, dict]:
    """(numeric metrics, report) of the report's corpus part (:mod:`quadmix_spark.curation.scorer_report`): ``report_docs``
    documents the model was not trained on, scored whole; ``report.json`` and ``report.png`` are written
    into ``folder``."""
    ts = cfg.train_scorers
    texts, labels = ex.part(True)
    _, bins = auc_by_length(np.array([lab == HQ for lab in labels]), score_texts(spark, scorer, files, folder, texts),
                            np.array([len(t) for t in texts]))
    out: dict = {}
    domains_table = None
    scores = lengths = np.zeros(0)
    if ts.report_docs:
        docs = _documents(spark, cfg)
        column = report_domain_column(cfg, docs.columns)
        used = sorted({k.rsplit("#", 1)[0][len("doc:"):] for k in ex.keys if k.startswith("doc:")})
        sample = docs.where(~F.col("doc_id").isin(used)) if used else docs
        cols = ["doc_id", "text", *([F.col(column).cast("string").alias("_domain")] if column else [])]
        rows = _ordered_sample(sample.select(*cols), "doc_id", ts.report_docs, ts.seed + 1).collect()
        texts_c = [r["text"] for r in rows]
        scores = score_texts(spark, scorer, files, folder, texts_c) if rows else np.zeros(0)
        lengths = np.array([len(t) for t in texts_c])
        out, domains_table = corpus_report(scores, lengths, np.array([r["_domain"] for r in rows], dtype=object) if column else None)
    report = {"length_bins": bins.to_dict("records"), "domains": [] if domains_table is None else domains_table.to_dict("records"),
              "top10_max_domain": out.pop("top10_max_domain", None)}
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=float))
    if len(scores):
        import pandas as pd

        plot_report(name, bins, scores, lengths, domains_table if domains_table is not None else pd.DataFrame(
            columns=["domain", "share", "top_share"]), folder / "report.png")
    return out, report


# ---------------------------------------------------------------- versions, folders, the stage


@dataclass
class TrainedModel:
    name: str
    task: str
    model: str
    version: str
    folder: str
    current: str
    metrics: dict[str, float]
    n_train: int
    n_holdout: int
    labels: list[str]
    scorer: dict  # a `scorers.<name>` entry that loads this model from current/
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        keys = (("auc", "auc_within_length", "accuracy", "spearman_length", "top10_max_domain_share") if self.task == "quality"
                else ("accuracy", "macro_f1", "n_classes"))
        shown = ", ".join(f"{k}={self.metrics[k]:.4g}" for k in keys if k in self.metrics)
        state = "up to date" if self.skipped else "trained"
        lines = [f"  {self.name:<16} {self.task}/{self.model} v{self.version} {state}: held-out {shown} "
                 f"(train {self.n_train}, held-out {self.n_holdout}) -> {self.current}"]
        return "\n".join(lines + [f"    warning: {w}" for w in self.warnings])


@dataclass
class TrainReport:
    models: list[TrainedModel] = field(default_factory=list)
    models_dir: str = ""

    def summary(self) -> str:
        if not self.models:
            return "train-scorers: no models enabled (train_scorers.models)"
        return f"train-scorers: {len(self.models)} models in {self.models_dir}\n" + "\n".join(m.line() for m in self.models)


def models_dir(cfg: QuadmixConfig) -> Path:
    d = cfg.train_scorers.models_dir or cfg.storage.path("models")
    if "://" in d:
        raise ConfigError(f"train_scorers.models_dir must be a local folder (got {d!r}); set it explicitly")
    return Path(d).resolve()


def model_version(m: TrainModelConfig, cfg: QuadmixConfig, ex: Examples) -> str:
    from quadmix_spark.curation.scorers import file_digest

    ts = cfg.train_scorers
    params = m.model_dump(exclude={"enabled", "positives", "encoder", "tokenizer"})
    files = {k: file_digest(v) for k, v in (("encoder", m.encoder), ("tokenizer", m.tokenizer)) if v}
    blob = json.dumps({"format": FORMAT, "params": params, "files": files, "seed": ts.seed,
                       "holdout": ts.holdout_fraction, "data": ex.fingerprint()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _publish(version_dir: Path, current: Path) -> None:
    """Copy a version's files into ``current/`` (fresh modification times, so workers reload them)."""
    staging = Path(tempfile.mkdtemp(prefix=".current-", dir=current.parent))
    for f in version_dir.iterdir():
        shutil.copyfile(f, staging / f.name)
    if current.exists():
        shutil.rmtree(current)
    os.replace(staging, current)


def train_model(spark: SparkSession, cfg: QuadmixConfig, name: str, m: TrainModelConfig, root: Path) -> TrainedModel:
    """Train (or find already trained) model ``name``; write its version folder and ``current/``."""
    ts = cfg.train_scorers
    ex = quality_examples(spark, cfg, m) if m.task == "quality" else domain_examples(spark, cfg, m)
    version = model_version(m, cfg, ex)
    base = root / name
    base.mkdir(parents=True, exist_ok=True)
    folder, current = base / version, base / "current"
    meta_file = folder / "meta.json"
    skipped = meta_file.exists()
    if not skipped:
        work = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
        try:
            if m.model == "fasttext":
                files, metrics, scorer = train_fasttext(ex, m, m.task, work, ts.seed)
            elif m.model == "tfidf":
                files, metrics, scorer = train_tfidf(ex, m, m.task, work, ts.seed)
            elif m.model == "causal_lm":
                files, metrics, scorer = train_perplexity_lm(ex, m, work, ts.seed)
            else:
                files, metrics, scorer = train_embedding_head(spark, ex, m, m.task, work, ts.seed)
            if m.task == "domain":
                metrics["n_classes"] = len(set(ex.labels))
            else:
                corpus, report = quality_report(spark, cfg, name, ex, scorer, files, work)
                metrics.update(corpus)
                warnings = report_warnings({**metrics, "top10_max_domain": report["top10_max_domain"]})
            meta = {"name": name, "task": m.task, "model": m.model, "version": version, "files": files,
                    "metrics": metrics, "warnings": warnings if m.task == "quality" else [], **ex.counts(), "labels": sorted(set(ex.labels)), "scorer": scorer,
                    "params": m.model_dump(), "seed": ts.seed, "holdout_fraction": ts.holdout_fraction}
            (work / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if folder.exists():  # an unfinished earlier attempt (no meta.json)
                shutil.rmtree(folder)
            os.replace(work, folder)
        finally:
            if work.exists():
                shutil.rmtree(work)
    meta = json.loads(meta_file.read_text())
    current_meta = current / "meta.json"
    if not current_meta.exists() or json.loads(current_meta.read_text()).get("version") != version:
        _publish(folder, current)
    scorer = dict(meta["scorer"])
    for key, file_name in meta["files"].items():  # files of the model folder, as published in current/
        scorer[key] = str(current / file_name)
    scorer["version"] = version
    return TrainedModel(name, m.task, m.model, version, str(folder), str(current), meta["metrics"], meta["n_train"],
                        meta["n_holdout"], meta["labels"], scorer, skipped, meta.get("warnings", []))


def check_training_inputs(spark: SparkSession, cfg: QuadmixConfig, models: dict[str, TrainModelConfig]) -> None:
    """What every model needs, checked before the first one trains: the documents table, the domain models'
    label columns and the quality models' reference files."""
    docs = _documents(spark, cfg)
    for name, m in models.items():
        if m.task == "domain" and m.label_column not in docs.columns:
            raise TrainDataError(
                f"model {name!r}: documents has no column {m.label_column!r} to learn domains from (columns: "
                f"{', '.join(docs.columns)}); set train_scorers.models.{name}.label_column to a passthrough column "
                f"of labels, or enabled: false and give annotate a domain scorer of your own"
            )
        for ref in m.positives if m.task == "quality" else []:
            path = cfg.train_scorers.reference[ref].path
            if not os.path.exists(path):
                raise TrainDataError(f"model {name!r}: reference set {ref!r}: {path} does not exist")


def run_train_scorers(spark: SparkSession, cfg: QuadmixConfig, log=None) -> TrainReport:
    """Train every enabled model of ``train_scorers.models``; ``log(trained)`` is called after each one."""
    root = models_dir(cfg)
    report = TrainReport(models_dir=str(root))
    enabled = {name: m for name, m in cfg.train_scorers.models.items() if m.enabled}
    check_training_inputs(spark, cfg, enabled)
    for name, m in enabled.items():
        trained = train_model(spark, cfg, name, m, root)
        report.models.append(trained)
        if log:
            log(trained)
    return report
