"""Scorer adapters against direct model calls, the registry's versions, and bad model files (no Spark)."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.curation.scorers import ScorerError, build_scorer, resolve_scorers
from quadmix_udfs.fasttext_scorer import load_fasttext, prepare_lines
from quadmix_udfs.onnx_transformer import device_for, load_session, mean_pool, task_gpu
from tests.conftest import DATA

LID = str(DATA / "models" / "lid" / "lid.176.ftz")
MINILM = DATA / "models" / "minilm_l6_v2"
ENCODER, BERT_TOK = str(MINILM / "model_int8.onnx"), str(MINILM / "tokenizer.json")
NEOX_TOK = str(DATA / "models" / "tokenizers" / "gpt_neox_20b.json")


def web_texts(n: int) -> list[str]:
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    odd = ["", "   \n\n\t ", "!!! ??? ... ###", "Ceci est une page en français, pas en anglais.", "日本語のテキストです。", "x"]
    return web_texts(24) + odd


@pytest.fixture(scope="module")
def head_file(tmp_path_factory, texts) -> str:
    """A real logistic head: 3 classes fitted on MiniLM embeddings of real pages (labels by page length)."""
    from sklearn.linear_model import LogisticRegression

    from quadmix_udfs.onnx_transformer import Encoder

    emb = Encoder(ENCODER, BERT_TOK, max_chars=300, max_length=32).embed(texts)
    y = np.array(["short", "medium", "long"])[np.digitize([len(t) for t in texts], [500, 3000])]
    clf = LogisticRegression(max_iter=500).fit(emb, y)
    path = tmp_path_factory.mktemp("head") / "head.npz"
    np.savez(path, weight=clf.coef_.T.astype(np.float32), bias=clf.intercept_.astype(np.float32),
             labels=clf.classes_.astype(str), kind=np.array("logistic"), normalize=np.array(False))
    return str(path)


def minilm(head_file: str | None = None, **kw) -> ScorerConfig:
    base = {"type": "onnx_transformer", "model": ENCODER, "tokenizer": BERT_TOK, "head": "embedding",
            "head_file": head_file, "output": "label", "max_length": 32, "max_chars": 300}
    return ScorerConfig(**{**base, **kw})


# ---------------------------------------------------------------- fastText


def test_fasttext_label_probability_and_top_label_match_the_model(texts):
    model = load_fasttext(LID)
    en = build_scorer("lang_en", ScorerConfig(type="fasttext", model=LID, label="en"))
    top = build_scorer("lang", ScorerConfig(type="fasttext", model=LID, output="label"))
    scores, labels = en.adapter.score(texts)
    conf, names = top.adapter.score(texts)
    assert labels is None and scores.shape == (len(texts),)
    for i, t in enumerate(texts):
        ls, ps = model.predict(t.replace("\n", " "), k=-1)
        direct = dict(zip(ls, ps))
        assert scores[i] == pytest.approx(min(direct.get("__label__en", 0.0), 1.0), abs=1e-6)
        assert names[i] == ls[0].removeprefix("__label__") and conf[i] == pytest.approx(min(ps[0], 1.0), abs=1e-6)
    assert names[-3] == "fr" and names[-2] == "ja" and scores[-3] < 0.1  # non-English is scored, not dropped


def test_fasttext_prepares_lines_and_truncates_huge_documents():
    lines = prepare_lines(["a\nb\n\nc", None, "", "x" * 50], max_chars=10)
    assert lines == ["a b  c\n", "\n", "\n", "x" * 10 + "\n"]
    huge = ("The committee reviewed the annual budget. " * 100_000)[:4_000_000]  # ~4 MB
    s = build_scorer("q", ScorerConfig(type="fasttext", model=LID, label="en", max_chars=5000)).adapter
    assert s.score([huge])[0][0] == pytest.approx(s.score([huge[:5000]])[0][0])


def test_arrow_lines_prepare_like_python_and_reach_fasttext_as_bytes(texts):
    import pyarrow as pa

    from quadmix_udfs.fasttext_scorer import arrow_lines

    sample = ["a\nb\n\nc", None, "", "x" * 50, "héllo wörld\nαβγδεζηθικλμ", *texts]
    for max_chars in (10, 20_000):
        for kind in (pa.string(), pa.large_string()):
            got = arrow_lines(pa.array(sample, type=kind), max_chars)
            assert got == [line.encode() for line in prepare_lines(sample, max_chars)]
    s = build_scorer("q", ScorerConfig(type="fasttext", model=LID, label="en")).adapter
    as_bytes, as_str = s.score_lines(arrow_lines(pa.array(texts), s.max_chars)), s.score(texts)
    assert as_bytes[0].tolist() == as_str[0].tolist()


def test_fasttext_scorers_of_a_batch_share_one_preparation_and_keep_their_own_rows(texts):
    import pyarrow as pa

    from quadmix_udfs.scoring import ScorerRun, score_batch

    en = build_scorer("en", ScorerConfig(type="fasttext", model=LID, label="en")).adapter
    fr = build_scorer("fr", ScorerConfig(type="fasttext", model=LID, label="fr")).adapter
    short = build_scorer("en40", ScorerConfig(type="fasttext", model=LID, label="en", max_chars=40)).adapter
    top = build_scorer("lang", ScorerConfig(type="fasttext", model=LID, output="label")).adapter
    n = len(texts)
    rng = np.random.default_rng(3)
    needs = {"en": np.ones(n, bool), "fr": rng.random(n) < 0.5, "en40": rng.random(n) < 0.5, "lang": rng.random(n) < 0.7}
    ids = pa.array([f"d{i}" for i in range(n)])
    batch = pa.RecordBatch.from_pydict({"doc_id": ids, "text": texts, **{f"_need_{k}": v for k, v in needs.items()}})
    runs = (ScorerRun("lang", top, "label", ("domain", "domain_conf")), ScorerRun("en", en, "score", ("q_en",)),
            ScorerRun("fr", fr, "score", ("q_fr",)), ScorerRun("en40", short, "score", ("q_en40",)))
    out = score_batch(runs, batch, ["doc_id", "domain", "domain_conf", "q_en", "q_fr", "q_en40"])
    assert out.schema.names == ["doc_id", "domain", "domain_conf", "q_en", "q_fr", "q_en40"]
    assert out.column("doc_id").equals(ids) and out.column("q_en").type == pa.float64()
    for name, adapter in (("en", en), ("fr", fr), ("en40", short)):
        idx = np.flatnonzero(needs[name])
        expected, _ = adapter.score([texts[i] for i in idx])
        got = out.column(f"q_{name}")
        assert got.null_count == n - len(idx)
        assert got.to_numpy(zero_copy_only=False)[idx].tolist() == expected.tolist()
    idx = np.flatnonzero(needs["lang"])
    conf, labels = top.score([texts[i] for i in idx])
    domain = out.column("domain").to_pylist()
    assert [domain[i] for i in idx] == labels.tolist() and out.column("domain").null_count == n - len(idx)
    assert out.column("domain_conf").to_numpy(zero_copy_only=False)[idx].tolist() == conf.tolist()


# ---------------------------------------------------------------- ONNX transformer


def test_embeddings_match_a_raw_session_and_order_survives_length_sorting(texts, head_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(BERT_TOK)
    tok.no_padding()
    tok.enable_truncation(32)
    session = load_session(ENCODER)
    raw = []
    for t in texts:  # one document per call: no padding, no sorting
        ids = np.array([tok.encode(t[:300]).ids], dtype=np.int64)
        (h,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
        raw.append(h[0].mean(axis=0))
    raw = np.stack(raw)
    for batch_size in (1, 5, 64):
        enc = build_scorer("d", minilm(head_file, batch_size=batch_size)).adapter.encoder
        np.testing.assert_allclose(enc.embed(texts), raw, atol=2e-5)


def test_embedding_head_scores_and_labels(texts, head_file):
    from quadmix_udfs.onnx_transformer import Encoder, load_head

    emb = Encoder(ENCODER, BERT_TOK, max_chars=300, max_length=32).embed(texts)
    head = load_head(head_file)
    probs = emb @ head.weight + head.bias
    probs = np.exp(probs - probs.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    conf, names = build_scorer("d", minilm(head_file)).adapter.score(texts)
    assert list(names) == [head.labels[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(conf, probs.max(1), atol=1e-5)
    p_long, none = build_scorer("q", minilm(head_file, output="score", label="long")).adapter.score(texts)
    assert none is None
    np.testing.assert_allclose(p_long, probs[:, head.labels.index("long")], atol=1e-5)


def test_single_graph_classifier_softmax_and_regression_heads(tmp_path, texts, head_file):
    from quadmix_spark.curation.onnx_compose import compose_classifier

    labels = compose_classifier(ENCODER, head_file, str(tmp_path / "clf.onnx"))
    composed = minilm(None, head="softmax", model=str(tmp_path / "clf.onnx"), labels=labels)
    a, b = build_scorer("a", minilm(head_file)).adapter.score(texts), build_scorer("b", composed).adapter.score(texts)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert list(a[1]) == list(b[1])
    compose_classifier(ENCODER, head_file, str(tmp_path / "probs.onnx"), probabilities=True)
    probs = build_scorer("c", minilm(None, head="softmax", model=str(tmp_path / "probs.onnx"), labels=labels,
                                     outputs_are_probabilities=True)).adapter.score(texts)
    np.testing.assert_allclose(a[0], probs[0], atol=1e-5)

    linear = tmp_path / "linear.npz"
    w = np.linspace(-1, 1, 384, dtype=np.float32)
    np.savez(linear, weight=w, bias=np.array([0.5], dtype=np.float32), kind=np.array("linear"), normalize=np.array(False))
    compose_classifier(ENCODER, str(linear), str(tmp_path / "reg.onnx"))
    reg = build_scorer("edu", minilm(None, head="regression", output="score", model=str(tmp_path / "reg.onnx")))
    values, _ = reg.adapter.score(texts[:8])
    emb = build_scorer("d", minilm(head_file)).adapter.encoder.embed(texts[:8])
    np.testing.assert_allclose(values, emb @ w + 0.5, atol=1e-4)


def test_mean_pool_ignores_padding():
    hidden = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(mean_pool(hidden, mask), [hidden[0, :2].mean(0), hidden[1, 0]])


def test_device_is_cpu_without_a_task_gpu_and_cuda_needs_the_provider():
    import onnxruntime as ort

    assert task_gpu() is None and device_for("auto") is None and device_for("cpu") is None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="no CUDA execution provider"):
            load_session(ENCODER, device_for("cuda"))


def test_a_cuda_session_that_falls_back_to_cpu_is_an_error(monkeypatch):
    """onnxruntime builds a CPU session, with only a log line, when its CUDA provider cannot load (here: the CPU
    wheel, told the provider exists so the first check passes); the adapter must refuse to run on it."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a working CUDA provider does not fall back")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="CUDA provider did not load") as err:
        load_session(ENCODER, device_id=3)
    assert "CPUExecutionProvider" in str(err.value) and ENCODER in str(err.value)


# ---------------------------------------------------------------- onnx_text


def test_onnx_text_pipeline_matches_scikit_learn(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    pages = web_texts(160)
    with gzip.open(DATA / "reference" / "enwiki_sample.jsonl.gz", "rt") as f:
        wiki = [json.loads(line)["text"][:3000] for _, line in zip(range(60), f)]
    tfidf, clf = TfidfVectorizer(token_pattern=r"(?u)\b\w\w+\b"), LogisticRegression(max_iter=1000)
    pipe = Pipeline([("tfidf", tfidf), ("lr", clf)]).fit(pages[:120] + wiki[:40], ["cc"] * 120 + ["hq"] * 40)
    onx = convert_sklearn(pipe, initial_types=[("text", StringTensorType([None, 1]))], target_opset={"": 17, "ai.onnx.ml": 3},
                          options={id(clf): {"zipmap": False}, id(tfidf): {"tokenexp": r"[\pL\pN_]{2,}", "locale": "C.UTF-8"}})
    (tmp_path / "m.onnx").write_bytes(onx.SerializeToString())
    test = pages[120:] + wiki[40:] + ["", "Ünïcödé ÄÖÜ straße"]
    s = build_scorer("wiki", ScorerConfig(type="onnx_text", model=str(tmp_path / "m.onnx"), label="hq", batch_size=7))
    scores, _ = s.adapter.score(test)
    np.testing.assert_allclose(scores, pipe.predict_proba(test)[:, 1], atol=1e-5)
    assert s.adapter.class_labels() == ("cc", "hq")  # read from the classifier node
    conf, names = build_scorer("top", ScorerConfig(type="onnx_text", model=str(tmp_path / "m.onnx"), output="label")).adapter.score(test)
    assert list(names) == list(pipe.predict(test))


# ---------------------------------------------------------------- versions and registry


def test_version_tracks_model_content_and_output_settings_only(tmp_path):
    model = tmp_path / "lid.ftz"
    shutil.copyfile(LID, model)
    cfg = {"type": "fasttext", "model": str(model), "label": "en"}
    v1 = build_scorer("lang", ScorerConfig(**cfg)).version
    assert v1.startswith("v1.") and len(v1) == 11
    assert build_scorer("lang", ScorerConfig(**cfg, batch_size=7, intra_op_threads=2)).version == v1
    assert build_scorer("lang", ScorerConfig(**cfg, max_chars=100)).version != v1
    assert build_scorer("lang", ScorerConfig(**{**cfg, "label": "fr"})).version != v1
    assert build_scorer("lang", ScorerConfig(**cfg, version="v2")).version.startswith("v2.")
    with open(model, "ab") as f:  # same path, other bytes: another version
        f.write(b"\0")
    assert build_scorer("lang", ScorerConfig(**cfg), validate=False).version != v1
    assert build_scorer("lang", ScorerConfig(**cfg)).tag.startswith("lang@v1.")


def test_resolve_scorers_checks_roles_and_names():
    scorers = {"lang": {"type": "fasttext", "model": LID, "output": "label"}, "en": {"type": "fasttext", "model": LID, "label": "en"}}

    def cfg(**annotate):
        return QuadmixConfig.model_validate({"scorers": scorers, "annotate": annotate})

    s = resolve_scorers(cfg(domain_scorer="lang", quality_scorers=["en"]))
    assert s.versions().keys() == {"domain", "q_en"} and s.value_columns() == ["domain", "domain_conf", "q_en"]
    with pytest.raises(ScorerError, match="domain scorer 'en' must have output=label"):
        resolve_scorers(cfg(domain_scorer="en", quality_scorers=["lang"]))
    with pytest.raises(ScorerError, match="'nope', which is not in `scorers`"):
        resolve_scorers(cfg(domain_scorer="lang", quality_scorers=["nope"]))
    with pytest.raises(ScorerError, match="domain_scorer is not set"):
        resolve_scorers(cfg(quality_scorers=["en"]))
    with pytest.raises(ScorerError, match="unknown type 'bert'"):
        build_scorer("x", ScorerConfig(type="bert", model=LID))
    with pytest.raises(ScorerError, match="must be lower-case"):
        build_scorer("Bad-Name", ScorerConfig(type="fasttext", model=LID, label="en"))


# ---------------------------------------------------------------- bad model files


def test_missing_and_corrupt_model_files_are_clear_errors(tmp_path):
    with pytest.raises(ScorerError, match=r"model file '.*/nothing\.bin' does not exist"):
        build_scorer("q", ScorerConfig(type="fasttext", model=str(tmp_path / "nothing.bin"), label="hq"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ScorerError, match="fastText model .* cannot be loaded"):
        build_scorer("q", ScorerConfig(type="fasttext", model=str(junk), label="hq"))
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(open(ENCODER, "rb").read()[:100_000])
    with pytest.raises(ScorerError, match="ONNX model .* cannot be loaded"):
        build_scorer("d", minilm(None, head="softmax", labels=["a"], model=str(truncated)))
    with pytest.raises(ScorerError, match="tokenizer .* cannot be loaded"):
        build_scorer("d", minilm(None, head="softmax", labels=["a"], tokenizer=str(junk)))
    with pytest.raises(ScorerError, match="label 'hq' is not a label of"):
        build_scorer("q", ScorerConfig(type="fasttext", model=LID, label="hq"))


def test_mismatched_tokenizer_labels_and_head_are_clear_errors(tmp_path, head_file):
    with pytest.raises(ScorerError, match=r"tokenizer .*gpt_neox_20b\.json' does not fit ONNX model .*token id 50279"):
        build_scorer("d", minilm(head_file, tokenizer=NEOX_TOK))
    with pytest.raises(ScorerError, match="max_length=600 is out of the model's range"):
        build_scorer("d", minilm(head_file, max_length=600))
    from quadmix_spark.curation.onnx_compose import compose_classifier

    labels = compose_classifier(ENCODER, head_file, str(tmp_path / "clf.onnx"))
    with pytest.raises(ScorerError, match="scorer labels \\(2\\) do not match the 3 outputs"):
        build_scorer("d", minilm(None, head="softmax", model=str(tmp_path / "clf.onnx"), labels=labels[:2]))
    wide = tmp_path / "wide.npz"
    np.savez(wide, weight=np.zeros((768, 2), np.float32), bias=np.zeros(2, np.float32), labels=np.array(["a", "b"]))
    with pytest.raises(ScorerError, match="expects 768-dim embeddings, model .* gives 384"):
        build_scorer("d", minilm(str(wide)))
    with pytest.raises(ScorerError, match="needs `label`"):
        build_scorer("d", minilm(head_file, output="score"))


def test_relative_model_paths_are_made_absolute_for_executors(tmp_path, monkeypatch):
    shutil.copy(LID, tmp_path / "lid.ftz")
    monkeypatch.chdir(tmp_path)
    relative = ScorerConfig(type="fasttext", model="lid.ftz", output="score", label="__label__en")
    scorer = build_scorer("lang", relative, validate=False)
    assert scorer.adapter.model == str(tmp_path / "lid.ftz")
    absolute = ScorerConfig(type="fasttext", model=str(tmp_path / "lid.ftz"), output="score", label="__label__en")
    assert build_scorer("lang", absolute, validate=False).version == scorer.version  # same files, same version
