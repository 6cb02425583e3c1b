"""Every scorer adapter gives a document the same bits whatever its batch neighbours, their number, the order
they come in and the model-call batch size (no Spark; the Spark side across 1/3/7 partitions is in
tests/curation/test_annotate.py)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.curation.scorers import build_scorer
from quadmix_udfs.onnx_transformer import BUCKET_MIN, Encoder, bucket_widths
from tests.conftest import DATA

LID = str(DATA / "models" / "lid" / "lid.176.ftz")
MINILM = DATA / "models" / "minilm_l6_v2"
ENCODER, BERT_TOK = str(MINILM / "model_int8.onnx"), str(MINILM / "tokenizer.json")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt") as f:
        pages = [json.loads(line)["text"] for _, line in zip(range(36), f)]
    # lengths spread over every bucket: cut pages at many sizes, plus odd documents
    cut = [p[: 20 + 37 * i] for i, p in enumerate(pages[:18])]
    return pages[18:] + cut + ["", "x", "!!! ??? ...", "Ceci est une page en français.", "日本語のテキストです。"]


@pytest.fixture(scope="module")
def heads(tmp_path_factory, texts) -> dict[str, str]:
    """Real heads fitted on MiniLM embeddings (logistic with 3 labels, linear), and single-graph models
    with the head inside (softmax, regression)."""
    from sklearn.linear_model import LogisticRegression

    from quadmix_spark.curation.onnx_compose import compose_classifier

    base = tmp_path_factory.mktemp("heads")
    emb = Encoder(ENCODER, BERT_TOK, max_chars=600, max_length=48).embed(texts)
    y = np.array(["short", "medium", "long"])[np.digitize([len(t) for t in texts], [300, 1500])]
    clf = LogisticRegression(max_iter=500).fit(emb, y)
    np.savez(base / "logistic.npz", weight=clf.coef_.T.astype(np.float32), bias=clf.intercept_.astype(np.float32),
             labels=clf.classes_.astype(str), kind=np.array("logistic"), normalize=np.array(True))
    np.savez(base / "linear.npz", weight=np.linspace(-1, 1, 384, dtype=np.float32), bias=np.array([0.25], np.float32),
             kind=np.array("linear"))
    labels = compose_classifier(ENCODER, str(base / "logistic.npz"), str(base / "softmax.onnx"))
    compose_classifier(ENCODER, str(base / "linear.npz"), str(base / "regression.onnx"))
    return {"logistic": str(base / "logistic.npz"), "linear": str(base / "linear.npz"), "softmax": str(base / "softmax.onnx"),
            "regression": str(base / "regression.onnx"), "labels": json.dumps(list(labels))}


@pytest.fixture(scope="module")
def tfidf_model(tmp_path_factory, texts) -> str:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    tfidf, clf = TfidfVectorizer(token_pattern=r"(?u)\b\w\w+\b"), LogisticRegression(max_iter=1000)
    y = ["long" if len(t) > 500 else "short" for t in texts]
    pipe = Pipeline([("tfidf", tfidf), ("lr", clf)]).fit(texts, y)
    onx = convert_sklearn(pipe, initial_types=[("text", StringTensorType([None, 1]))], target_opset={"": 17, "ai.onnx.ml": 3},
                          options={id(clf): {"zipmap": False}, id(tfidf): {"tokenexp": r"[\pL\pN_]{2,}", "locale": "C.UTF-8"}})
    path = tmp_path_factory.mktemp("tfidf") / "m.onnx"
    path.write_bytes(onx.SerializeToString())
    return str(path)


def minilm(**kw) -> dict:
    return {"type": "onnx_transformer", "model": ENCODER, "tokenizer": BERT_TOK, "max_length": 48, "max_chars": 600, "batch_size": 8,
            **kw}


def configs(heads: dict[str, str], tfidf_model: str) -> dict[str, dict]:
    labels = json.loads(heads["labels"])
    return {
        "fasttext_score": {"type": "fasttext", "model": LID, "label": "en"},
        "fasttext_label": {"type": "fasttext", "model": LID, "output": "label"},
        "onnx_text_score": {"type": "onnx_text", "model": tfidf_model, "label": "long", "batch_size": 16},
        "onnx_text_label": {"type": "onnx_text", "model": tfidf_model, "output": "label", "batch_size": 16},
        "embedding_logistic": minilm(head="embedding", head_file=heads["logistic"], output="label"),
        "embedding_logistic_score": minilm(head="embedding", head_file=heads["logistic"], label="long"),
        "embedding_linear": minilm(head="embedding", head_file=heads["linear"]),
        "softmax": minilm(head="softmax", model=heads["softmax"], labels=labels, output="label"),
        "regression": minilm(head="regression", model=heads["regression"]),
        "text_stats": {"type": "text_stats", "max_chars": 600, "filter": "all"},
    }


_ADAPTERS: dict[str, object] = {}


def score(cfg: dict, texts: list[str], batch_size: int | None = None) -> tuple[np.ndarray, list | None]:
    c = {**cfg, **({"batch_size": batch_size} if batch_size else {})}
    key = json.dumps(c, sort_keys=True)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = build_scorer("s", ScorerConfig(**c), validate=False).adapter
    values, labels = _ADAPTERS[key].score(texts)
    return np.asarray(values, dtype=np.float64), None if labels is None else list(labels)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.astype(np.float64).tobytes() == b.astype(np.float64).tobytes()


@pytest.mark.parametrize("kind", ["fasttext_score", "fasttext_label", "onnx_text_score", "onnx_text_label", "embedding_logistic",
                                  "embedding_logistic_score", "embedding_linear", "softmax", "regression", "text_stats"])
def test_a_document_scores_the_same_bits_alone_in_any_batch_and_at_any_batch_size(kind, texts, heads, tfidf_model):
    cfg = configs(heads, tfidf_model)[kind]
    alone = [score(cfg, [t]) for t in texts]
    alone_values = np.array([v[0] for v, _ in alone])
    alone_labels = None if alone[0][1] is None else [lab[0] for _, lab in alone]
    assert len(set(alone_values.tolist())) > len(texts) // 2  # real, varied scores
    rng = np.random.default_rng(7)
    for batch_size in (None, 1, 5):
        order = rng.permutation(len(texts))  # other neighbours, another order
        for chunk in np.array_split(order, int(rng.integers(1, 5))):
            values, labels = score(cfg, [texts[i] for i in chunk], batch_size)
            assert same_bits(values, alone_values[chunk]), f"{kind}, batch_size={batch_size}"
            if alone_labels is not None:
                assert labels == [alone_labels[i] for i in chunk]


def test_shared_encoder_heads_in_score_batch_give_the_bits_of_each_scorer_alone(texts, heads, tfidf_model):
    """score_batch runs one encoder pass for the embedding heads that share it, on the rows any of them
    needs: a document's score must not depend on which rows the other head asked for."""
    import pyarrow as pa

    from quadmix_udfs.scoring import ScorerRun, score_batch

    cfgs = configs(heads, tfidf_model)
    topic = build_scorer("t", ScorerConfig(**cfgs["embedding_logistic"]), validate=False).adapter
    lin = build_scorer("l", ScorerConfig(**cfgs["embedding_linear"]), validate=False).adapter
    runs = (ScorerRun("t", topic, "label", ("domain", "domain_conf")), ScorerRun("l", lin, "score", ("q_l",)))
    n = len(texts)
    rng = np.random.default_rng(1)
    expected_conf = np.array([topic.score([t])[0][0] for t in texts])
    expected_lin = np.array([lin.score([t])[0][0] for t in texts])
    for _ in range(3):
        need_t, need_l = rng.random(n) < 0.6, rng.random(n) < 0.6
        batch = pa.RecordBatch.from_pydict({"text": texts, "_need_t": need_t, "_need_l": need_l})
        out = score_batch(runs, batch, ["domain", "domain_conf", "q_l"])
        conf = out.column("domain_conf").to_numpy(zero_copy_only=False)
        lin_out = out.column("q_l").to_numpy(zero_copy_only=False)
        assert same_bits(conf[need_t], expected_conf[need_t]) and same_bits(lin_out[need_l], expected_lin[need_l])


def test_bucket_widths_depend_on_the_length_alone_and_hold_it():
    lengths = np.arange(0, 700)
    widths = bucket_widths(lengths, 512)
    assert (widths >= np.minimum(np.maximum(lengths, 1), 512)).all() and widths.max() == 512
    assert set(widths.tolist()) == {16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512}
    big = lengths >= BUCKET_MIN
    assert (widths[big & (lengths <= 512)] <= np.ceil(lengths[big & (lengths <= 512)] * 1.5)).all()  # at most 1/3 padding
    assert (bucket_widths(lengths, 40) <= 40).all() and bucket_widths(np.array([39, 40]), 40).tolist() == [40, 40]
    assert bucket_widths(np.array([3]), 7).tolist() == [7]  # max_length below the smallest bucket


def test_model_calls_have_the_batch_size_and_bucket_shape(texts, monkeypatch):
    """Every session.run gets (batch_size, width) inputs, width a bucket of its rows, rows of one bucket only."""
    enc = Encoder(ENCODER, BERT_TOK, max_chars=600, max_length=48, batch_size=4)
    session = enc.session()
    shapes = []

    class Recording:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, names, feeds):
            shapes.append((feeds["input_ids"].shape, feeds["attention_mask"].sum(axis=1).tolist()))
            return session.run(names, feeds)

    enc.embed(texts, session=Recording())
    assert shapes and all(shape[0] == 4 for shape, _ in shapes)
    shapes.clear()
    Encoder(ENCODER, BERT_TOK, max_chars=600, max_length=48, batch_size=1).embed(texts[:3], session=Recording())
    assert shapes and all(shape[0] == 2 for shape, _ in shapes)  # never a single row
    for (rows, width), lengths in shapes:
        assert width in {16, 24, 32, 48} and all(bucket_widths(np.array(lengths), 48) == width)
