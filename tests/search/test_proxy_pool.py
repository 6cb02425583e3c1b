"""The proxy pool is written as a stream: shard bytes, offsets and token counts do not depend on how the rows
reach the writer (Arrow batch size, input partitioning), and equal a direct tokenization in (shard, doc_id)
order. A failed shard writer leaves no file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from quadmix_spark.search.proxy_pool import build_pool
from quadmix_spark.core.storage import read_table, write_table
from quadmix_spark.search.token_store import ShardWriter, TokenStore
from tests.conftest import TOKENIZER, make_config
from tests.udfs.test_bpe_fast import generated

pytestmark = pytest.mark.spark

SHARDS = 3


@pytest.fixture(scope="module")
def docs(spark):
    texts = [t for t in generated(600, seed=5) if t.strip()]
    texts += ["a long page " * 2_000, "x"]
    return spark.createDataFrame([(f"d{i:04d}", t) for i, t in enumerate(texts)], "doc_id string, text string")


def _build(spark, root: Path, docs, batch: int, parts: int):
    cfg = make_config(root, f"proxy.pool.shards={SHARDS}")
    write_table(docs.repartition(parts), cfg.storage.table("documents"), mode="overwrite")
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    old = spark.conf.get(key)
    spark.conf.set(key, str(batch))
    try:
        domains = read_table(spark, cfg.storage.table("documents")).select("doc_id", F.lit("all").alias("domain"))
        return build_pool(spark, cfg, domains)
    finally:
        spark.conf.set(key, old)


def test_streamed_shards_equal_a_direct_tokenization_for_any_batching(spark, docs, tmp_path):
    from tokenizers import Tokenizer

    pools = [_build(spark, tmp_path / f"b{batch}-p{parts}", docs, batch, parts) for batch, parts in ((7, 5), (100_000, 1))]
    digests = [{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(pool.folder, "shards").glob("*.bin"))}
               for pool in pools]
    assert len(digests[0]) == SHARDS and digests[0] == digests[1]
    offsets = [read_table(spark, f"{pool.folder}/offsets").orderBy("doc_id").collect() for pool in pools]
    assert offsets[0] == offsets[1]
    np.testing.assert_array_equal(np.load(Path(pools[0].folder, "token_counts.npy")), np.load(Path(pools[1].folder, "token_counts.npy")))

    # the direct way: every shard's documents sorted by doc_id, tokenized, concatenated
    tok = Tokenizer.from_file(str(TOKENIZER))
    rows = docs.select("doc_id", "text", F.pmod(F.xxhash64("doc_id"), F.lit(SHARDS)).alias("shard")).collect()
    store = TokenStore.open(pools[0].folder)
    by_id = {r.doc_id: r for r in offsets[0]}
    counts = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for shard in range(SHARDS):
        mine = sorted((r for r in rows if r.shard == shard), key=lambda r: r.doc_id)
        ids = [np.asarray(tok.encode(r.text).ids, dtype=np.uint16) for r in mine]
        want = np.concatenate(ids).tobytes()
        assert Path(pools[0].folder, "shards", f"shard-{shard:05d}.bin").read_bytes() == want
        starts = np.r_[0, np.cumsum([len(a) for a in ids])[:-1]]
        assert [(by_id[r.doc_id].shard, by_id[r.doc_id].offset, by_id[r.doc_id].length) for r in mine] == \
            [(shard, int(s), len(a)) for s, a in zip(starts, ids)]
        for a in ids:
            counts += np.bincount(a.astype(np.int64), minlength=len(counts))
    np.testing.assert_array_equal(store.token_counts(), counts)
    assert pools[0].n_docs == len(rows)


def test_a_shard_writer_that_fails_leaves_no_file(tmp_path):
    path = tmp_path / "shards" / "shard-00000.bin"
    with pytest.raises(ValueError, match="out of range"):
        with ShardWriter(path, "uint16", vocab=100) as w:
            w.append([np.arange(5)])
            w.append([np.array([1, 200])])  # past the vocabulary
    assert not path.exists() and list(path.parent.iterdir()) == []
    with ShardWriter(path, "uint16", vocab=100) as w:
        assert [a.tolist() for a in w.append([np.arange(3), np.arange(4)])] == [[0, 3], [3, 4]]
        assert [a.tolist() for a in w.append([np.arange(2)])] == [[7], [2]]
    assert np.fromfile(path, dtype="<u2").tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert w.counts[:4].tolist() == [3, 3, 2, 1]
