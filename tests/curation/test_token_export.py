"""sampling.export_format: tokens — unique documents' ids once, the training order as Megatron index pointers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from pyspark.sql import functions as F

from quadmix_spark.curation.sample import run_sample
from quadmix_spark.core.storage import read_table
from quadmix_spark.curation.token_export import IndexedTokens, local_folder, shard_of_doc, token_dtype
from tests.conftest import DATA, make_config
from tests.sampling_data import a_theta, make_corpus

pytestmark = pytest.mark.spark
TOK = str(DATA / "models" / "tokenizers" / "gpt_neox_20b.json")


def read_megatron(prefix: str) -> list[np.ndarray]:
    """Megatron-LM's MMIDIDX layout read from its description alone (not with the module's reader)."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, n_docs = struct.unpack_from("<QBQQ", raw, 9)
    assert version == 1 and n_docs == n + 1
    dtype = {8: np.uint16, 4: np.int32}[code]
    at = 9 + 8 + 1 + 8 + 8
    sizes = np.frombuffer(raw, np.int32, n, at)
    pointers = np.frombuffer(raw, np.int64, n, at + 4 * n)
    docs = np.frombuffer(raw, np.int64, n + 1, at + 12 * n)
    assert docs.tolist() == list(range(n + 1))
    data = open(prefix + ".bin", "rb").read()
    return [np.frombuffer(data, dtype, int(s), int(p)) for s, p in zip(sizes, pointers)]


def test_the_token_stream_is_the_training_order_and_each_document_is_stored_once(spark, tmp_path):
    from tokenizers import Tokenizer

    cfg = make_config(tmp_path / "store", "sampling.coarse_bins=64", "sampling.run=tok", "sampling.export_format=tokens",
                      "sampling.export_shards=3", "sampling.budget_tokens=4000", f"ingest.tokenizer={TOK}")
    data = make_corpus(spark, cfg, n=400)
    from quadmix_spark.curation.normalize import run_normalize

    run_normalize(spark, cfg.storage.table("annotations"), cfg.storage.table("score_knots"), "percentile", 101)
    result = run_sample(spark, cfg, theta=a_theta(sorted(set(data["domains"])), seed=4))
    assert 2 <= len(result.epochs) <= 6, result.epochs  # repeats across epochs (and copies within them)
    out = read_table(spark, cfg.storage.table("training_output")).where(F.col("run") == "tok")
    assert "text" not in out.columns  # the order only
    rows = out.withColumn("shard", shard_of_doc(F.col("doc_id"), 3)).collect()
    texts = {r.doc_id: r.text for r in read_table(spark, cfg.storage.table("documents")).collect()}
    tok = Tokenizer.from_file(TOK)
    eod = tok.token_to_id("<|endoftext|>")
    ids = {d: tok.encode(texts[d], add_special_tokens=False).ids + [eod] for d in {r.doc_id for r in rows}}

    folder = cfg.storage.path("export", "tok")
    manifest = json.loads(open(f"{folder}/manifest.json").read())
    assert manifest["dtype"] == "uint16" and manifest["eod_id"] == eod and len(manifest["shards"]) == 3
    for s, info in enumerate(manifest["shards"]):
        seqs = read_megatron(f"{folder}/{info['prefix']}")
        mine = IndexedTokens(f"{folder}/{info['prefix']}")
        assert len(mine) == len(seqs) == info["sequences"] and all(np.array_equal(mine[i], x) for i, x in enumerate(seqs))
        docs_here = [r for r in sorted(rows, key=lambda r: r.order_key) if r.shard == s]
        # the shard's sequences, in index order, are its copies in training order
        assert [tuple(x) for x in seqs] == [tuple(ids[r.doc_id]) for r in docs_here]
        unique = {r.doc_id for r in docs_here}
        assert info["unique_docs"] == len(unique) and info["bin_bytes"] == 2 * sum(len(ids[d]) for d in unique)
        assert (tmp_path / "store" / "export" / "tok" / f"{info['prefix']}.bin").stat().st_size == info["bin_bytes"]
    assert sum(info["sequences"] for info in manifest["shards"]) == manifest["rows"] == len(rows)  # every copy of every epoch
    assert len(ids) < len(rows)  # documents repeat; each is stored once
    assert manifest["bin_bytes"] == 2 * sum(len(v) for v in ids.values())
    by_epoch = {}
    for r in rows:
        by_epoch[str(r.epoch)] = by_epoch.get(str(r.epoch), 0) + r.n_tokens
    assert manifest["tokens_by_epoch"] == by_epoch and manifest["tokens"] == sum(by_epoch.values()) == result.output_tokens
    assert sum(manifest["tokens_by_domain"].values()) == manifest["tokens"]

    # idempotent: the same files again; and the text export of the same order still works (text joined in)
    before = {p.name: p.read_bytes() for p in (tmp_path / "store" / "export" / "tok").iterdir()}
    run_sample(spark, cfg, theta=a_theta(sorted(set(data["domains"])), seed=4))
    assert {p.name: p.read_bytes() for p in (tmp_path / "store" / "export" / "tok").iterdir()} == before
    text_cfg = make_config(tmp_path / "store", "sampling.coarse_bins=64", "sampling.run=txt", "sampling.export_format=jsonl",
                           "sampling.budget_tokens=4000")
    run_sample(spark, text_cfg, theta=a_theta(sorted(set(data["domains"])), seed=4))
    exported = spark.read.json(text_cfg.storage.path("export", "txt") + "/part-*").collect()
    assert len(exported) == len(rows) and all(e.text == texts[e.doc_id] for e in exported)


def test_dtype_and_paths():
    assert token_dtype(50_280) == np.uint16 and token_dtype(1 << 16) == np.uint16 and token_dtype(151_936) == np.int32
    assert local_folder("file:///data/x") == "/data/x" and local_folder("/data/x") == "/data/x"
    with pytest.raises(ValueError, match="cannot write 's3://b/x'"):
        local_folder("s3://b/x")
