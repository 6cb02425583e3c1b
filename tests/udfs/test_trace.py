"""Model-call spans from the encoder (udfs/trace.py) and the figures made of them; a model fed input_ids only."""

from __future__ import annotations

import time

import numpy as np
import pytest

from quadmix_udfs import trace
from quadmix_udfs.onnx_transformer import Encoder, bucket_widths
from tests.udfs.test_scorers import BERT_TOK, ENCODER, web_texts


def test_union_of_intervals():
    assert trace.union_seconds([]) == 0
    assert trace.union_seconds([(0, 1), (2, 3)]) == 2
    assert trace.union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4)


def test_summary_splits_a_run_into_before_busy_idle_and_after():
    spans = [
        {"kind": "tokenize", "pid": 1, "t0": 10.5, "t1": 11.0, "docs": 8},
        {"kind": "model", "pid": 1, "t0": 11.0, "t1": 13.0, "docs": 4, "tokens": 40},
        {"kind": "model", "pid": 2, "t0": 12.0, "t1": 14.0, "docs": 4, "tokens": 48},  # overlaps the first
        {"kind": "model", "pid": 2, "t0": 15.0, "t1": 16.0, "docs": 2, "tokens": 10},
        {"kind": "model", "pid": 3, "t0": 30.0, "t1": 31.0, "docs": 9, "tokens": 9},  # another run's
    ]
    s = trace.summarize(spans, 10.0, 17.0)
    assert s["model_calls"] == 3 and s["workers"] == 2 and s["docs"] == 10 and s["tokens"] == 98
    assert s["model_busy_s"] == 4.0 and s["model_sum_s"] == 5.0 and s["busy_fraction"] == pytest.approx(4 / 7, abs=1e-4)
    assert s["before_first_model_s"] == 1.0 and s["idle_between_s"] == 1.0 and s["after_last_model_s"] == 1.0
    assert s["tokenize_sum_s"] == 0.5 and s["before_first_batch_s"] == 0.5
    empty = trace.summarize(spans, 0.0, 5.0)
    assert empty["model_calls"] == 0 and empty["busy_fraction"] == 0.0 and empty["before_first_model_s"] is None


def test_the_encoder_writes_a_span_per_model_call_only_when_asked(tmp_path, monkeypatch):
    texts = web_texts(23)
    enc = Encoder(ENCODER, BERT_TOK, max_chars=300, max_length=32, batch_size=5)
    monkeypatch.delenv(trace.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    enc.embed(texts)
    assert list(tmp_path.iterdir()) == []  # off: nothing written anywhere
    monkeypatch.setenv(trace.ENV, str(tmp_path / "trace"))
    start = time.time()
    emb = enc.embed(texts)
    end = time.time()
    spans = trace.read_spans(tmp_path / "trace")
    model = [s for s in spans if s["kind"] == "model"]
    assert [s["kind"] for s in spans].count("tokenize") == 1
    # one model call per batch of at most 5 documents of one length bucket, each call 5 rows x its bucket width
    ids = enc.tokenize(texts)
    widths = bucket_widths(np.array([len(x) for x in ids]), enc.max_length)
    per_width = np.unique(widths, return_counts=True)
    calls = [(int(w), min(5, int(n) - start)) for w, n in zip(*per_width) for start in range(0, int(n), 5)]
    assert sorted((s["tokens"] // 5, s["docs"]) for s in model) == sorted(calls)
    assert sum(s["docs"] for s in model) == len(texts)
    s = trace.summarize(spans, start, end)
    parts = s["before_first_model_s"] + s["model_busy_s"] + s["idle_between_s"] + s["after_last_model_s"]
    assert s["workers"] == 1 and s["model_sum_s"] == pytest.approx(s["model_busy_s"], abs=2e-3)
    assert parts == pytest.approx(s["run_s"], abs=5e-3)
    assert emb.shape == (len(texts), 384)


def test_a_model_that_takes_input_ids_only(tmp_path, monkeypatch):
    """Inputs the graph does not declare are not fed; pooling still uses the adapter's own attention mask."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).normal(size=(30522, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])], "ids_only",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(table, "table")],
    )
    path = tmp_path / "ids_only.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    texts = ["a short one", "a somewhat longer text with more words in it", ""]
    enc = Encoder(str(path), BERT_TOK, max_length=16, batch_size=3)
    expected = np.stack([table[ids].mean(axis=0) for ids in enc.tokenize(texts)])
    np.testing.assert_allclose(enc.embed(texts), expected, rtol=1e-6)
