"""The proxy pool (spec §2.6, §8): a fixed, hash-chosen share of the corpus, tokenized once.

Every proxy of a search reads the same pool through its θ's index, so the text is tokenized once and
never copied per θ. Layout of ``<storage.root>/proxy/pools/<pool key>/``::

    shards/shard-00000.bin   packed token ids (uint16; uint32 past 65,536 ids), documents concatenated,
                             written as a stream of batches (memory holds one Arrow batch, not a shard)
    counts/shard-00000.npy   token frequencies of the shard (summed into token_counts.npy)
    offsets/                 Delta table: doc_id, doc_hash, domain, shard, offset, length
    docs/shard-00000.npz     the same per shard as arrays (doc_hash, offset, length, domain codes and names),
                             for trainers that read every pool document (the ε tail redrawn each epoch)
    token_counts.npy         frequency of every token id over the pool (vocab compaction)
    pool.json                written last: the pool is complete when it exists

A shard holds the documents whose ``pmod(xxhash64(doc_id), shards)`` is its number, sorted by
doc_id, so its bytes do not depend on the input's partitioning; a retried task rewrites the same file
atomically. The pool key covers the documents version, the pool settings and the tokenizer, so a
rebuild is a no-op and a changed corpus gets a new pool.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from quadmix_spark.core import faults
from quadmix_spark.core.config import QuadmixConfig, local_path
from quadmix_spark.kernel.copies import UNIFORM_SCALE as UNIFORM
from quadmix_spark.core.storage import read_table, table_version, write_table
from quadmix_spark.search.token_store import dtype_for_vocab
from quadmix_spark.core.tables import DOCUMENTS

FORMAT = "quadmix-token-pool/1"
DOCS_DIR, DOCS_DONE = "docs", "docs.json"
OFFSETS_SCHEMA = T.StructType([
    T.StructField("doc_id", T.StringType()), T.StructField("doc_hash", T.LongType()),
    T.StructField("domain", T.StringType()), T.StructField("shard", T.IntegerType()),
    T.StructField("offset", T.LongType()), T.StructField("length", T.IntegerType()),
])


def pool_predicate(cfg: QuadmixConfig) -> Column | None:
    """Membership of a document in the pool: a uniform hash of (doc_id, pool seed) below the fraction."""
    pc = cfg.proxy.pool
    if pc.fraction >= 1.0:
        return None
    u = F.shiftrightunsigned(F.xxhash64("doc_id", F.lit(pc.seed).cast("bigint")), 11) * F.lit(UNIFORM)
    return u < F.lit(pc.fraction)


def tokenizer_path(cfg: QuadmixConfig) -> str:
    return local_path(cfg.proxy.pool.tokenizer or cfg.ingest.tokenizer)


@dataclass(frozen=True)
class Pool:
    folder: str
    key: str
    meta: dict

    @property
    def offsets_table(self) -> str:
        return f"{self.folder}/offsets"

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])


def pool_key(cfg: QuadmixConfig, documents_version: int) -> str:
    pc, tok = cfg.proxy.pool, tokenizer_path(cfg)
    size = os.path.getsize(tok) if os.path.exists(tok) else -1
    ident = {"documents_version": documents_version, "fraction": pc.fraction, "seed": pc.seed, "shards": pc.shards,
             "tokenizer": [os.path.basename(tok), size], "documents": cfg.storage.table(DOCUMENTS)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def _write_shards(folder: str, tok_path: str, batch_size: int, vocab: int, fast: bool, batches):
    """mapInPandas body: the partition's rows arrive sorted by (shard, doc_id); each Arrow batch is tokenized and
    appended to its shard's file as it comes, so memory holds one batch (its text and ids), never a shard."""
    from quadmix_spark.search.token_store import ShardWriter, dtype_for_vocab
    from quadmix_udfs.tokens import load_encoder

    encoder = load_encoder(tok_path, fast)
    writer: ShardWriter | None = None
    shard, written = -1, set()
    try:
        for pdf in batches:
            if not len(pdf):
                continue
            shards = pdf["shard"].to_numpy(np.int64)
            for lo, hi in _runs(shards):
                if shards[lo] != shard:
                    if writer is not None:
                        _close_shard(folder, shard, writer)
                        written.add(shard)
                    shard = int(shards[lo])
                    if shard in written:  # the rows are not sorted by shard: never rewrite a finished shard
                        raise RuntimeError(f"pool shard {shard} came back after it was written")
                    writer = ShardWriter(f"{folder}/shards/shard-{shard:05d}.bin", dtype_for_vocab(vocab), vocab)
                part = pdf.iloc[lo:hi]
                arrays = [np.asarray(ids, dtype=np.uint32) for ids in encoder.encode_batch(part["text"].tolist(), batch_size)]
                offsets, lengths = writer.append(arrays)
                yield pd.DataFrame({
                    "doc_id": part["doc_id"].to_numpy(), "doc_hash": part["doc_hash"].to_numpy(np.int64),
                    "domain": part["domain"].to_numpy(), "shard": np.int32(shard), "offset": offsets.astype(np.int64),
                    "length": lengths.astype(np.int32),
                })
        if writer is not None:
            _close_shard(folder, shard, writer)
            writer = None
    finally:
        if writer is not None:  # an error: the unfinished shard leaves no file
            writer.abort()


def _runs(keys: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of each run of equal consecutive keys."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return list(zip(starts.tolist(), np.r_[starts[1:], len(keys)].tolist()))


def _close_shard(folder: str, shard: int, writer) -> None:
    """The shard's file appears (atomically), then its token counts."""
    writer.close()
    name = f"shard-{shard:05d}"
    tmp = f"{folder}/counts/.{name}.{os.getpid()}.npy"
    np.save(tmp, writer.counts)
    os.replace(tmp, f"{folder}/counts/{name}.npy")


def _sum_counts(spark: SparkSession, folder: str, shards: int, vocab: int) -> np.ndarray:
    """Token frequencies summed over the shards on the executors (a tree reduce: one vector reaches the driver)."""
    def load(i: int) -> np.ndarray:
        p = Path(f"{folder}/counts/shard-{i:05d}.npy")
        return np.load(p) if p.exists() else np.zeros(vocab, dtype=np.int64)

    n = max(1, min(shards, spark.sparkContext.defaultParallelism * 4))
    return spark.sparkContext.parallelize(range(shards), n).map(load).treeReduce(np.add)


def build_pool(spark: SparkSession, cfg: QuadmixConfig, domains: DataFrame, run_id: str | None = None) -> Pool:
    """Tokenize the pool once into packed shards (a no-op when this pool already exists).

    ``domains`` is a (doc_id, domain) frame (the annotations); documents without one are left out."""
    docs_table = cfg.storage.table(DOCUMENTS)
    version = table_version(spark, docs_table)
    if version is None:
        raise FileNotFoundError(f"no documents table at {docs_table}: run `quadmix ingest` first")
    key = pool_key(cfg, version)
    folder = local_path(cfg.storage.path("proxy", "pools", key))
    meta_path = Path(folder) / "pool.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        write_doc_index(spark, folder, len(meta["shards"]))  # pools made before the index existed
        return Pool(folder, key, meta)
    if "://" in folder:
        raise ValueError(f"the proxy pool needs a folder every executor can open as a file (got {folder})")
    for sub in ("shards", "counts"):
        Path(folder, sub).mkdir(parents=True, exist_ok=True)

    pc, tok_path = cfg.proxy.pool, tokenizer_path(cfg)
    from quadmix_udfs.tokens import eos_id, load_tokenizer

    tok = load_tokenizer(tok_path)
    vocab, eos = tok.get_vocab_size(with_added_tokens=True), eos_id(tok)
    docs = read_table(spark, docs_table, version=version).select("doc_id", "text")
    where = pool_predicate(cfg)
    if where is not None:
        docs = docs.where(where)
    docs = docs.join(domains.select("doc_id", "domain"), "doc_id", "inner")
    docs = docs.withColumn("doc_hash", F.xxhash64("doc_id")).withColumn("shard", F.pmod(F.col("doc_hash"), F.lit(pc.shards)).cast("int"))
    body = functools.partial(_write_shards, folder, tok_path, pc.batch_size, vocab, cfg.ingest.fast_tokenizer)
    # sorted inside each partition by Spark (which spills), so the writer streams one shard after another
    ordered = docs.repartition(pc.shards, "shard").sortWithinPartitions("shard", "doc_id")
    offsets = faults.during(ordered.mapInPandas(body, OFFSETS_SCHEMA), "proxy.pool.write")
    write_table(offsets, f"{folder}/offsets", mode="overwrite", metadata={"stage": "proxy-pool", "run_id": run_id, "pool": key})

    counts = _sum_counts(spark, folder, pc.shards, vocab)
    np.save(Path(folder) / "token_counts.npy", counts)
    stats = read_table(spark, f"{folder}/offsets").agg(F.count("*").alias("docs"), F.sum("length").alias("tokens")).first()
    meta = {
        "format": FORMAT, "dtype": dtype_for_vocab(vocab), "eos_id": eos, "tokenizer_vocab": vocab,
        "tokenizer": tok_path, "shards": [f"shard-{i:05d}.bin" for i in range(pc.shards)], "n_docs": int(stats["docs"]),
        "n_tokens": int(stats["tokens"] or 0), "documents_version": version, "fraction": pc.fraction, "seed": pc.seed,
    }
    write_doc_index(spark, folder, pc.shards)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return Pool(folder, key, meta)


# ---------------------------------------------------------------- the pool's documents as arrays


def _write_doc_shards(folder: str, batches):
    """mapInPandas body: one ``docs/shard-NNNNN.npz`` per shard of this partition (sorted by doc_hash, offset)."""
    frames = [pdf for pdf in batches if len(pdf)]
    if not frames:
        return
    pdf = pd.concat(frames, ignore_index=True)
    for shard, part in pdf.groupby("shard", sort=True):
        part = part.sort_values(["doc_hash", "offset"], kind="stable")
        names, codes = np.unique(part["domain"].astype(str).to_numpy(), return_inverse=True)
        path = Path(folder, DOCS_DIR, f"shard-{int(shard):05d}.npz")
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, doc_hash=part["doc_hash"].to_numpy(np.int64), offset=part["offset"].to_numpy(np.int64),
                 length=part["length"].to_numpy(np.int64), domain=codes.astype(np.int32), names=names.astype(str))
        os.replace(tmp, path)
        yield pd.DataFrame({"shard": [int(shard)], "docs": [len(part)]})


def write_doc_index(spark: SparkSession, folder: str, shards: int) -> None:
    """``docs/`` of a pool from its offsets table, on the executors (a no-op when ``docs.json`` exists)."""
    done = Path(folder, DOCS_DONE)
    if done.exists():
        return
    Path(folder, DOCS_DIR).mkdir(parents=True, exist_ok=True)
    offsets = read_table(spark, f"{folder}/offsets").select("doc_hash", "domain", "shard", "offset", "length")
    body = functools.partial(_write_doc_shards, folder)
    written = offsets.repartition(shards, "shard").mapInPandas(body, "shard int, docs long").collect()
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"shards": sorted(int(r.shard) for r in written), "docs": int(sum(r.docs for r in written))}))
    os.replace(tmp, done)


def load_doc_index(folder: str) -> dict[str, np.ndarray]:
    """Every pool document: ``doc_hash``, ``shard``, ``offset``, ``length`` (int64) and ``domain`` (names,
    as an object array), shard by shard. Needs no Spark (it runs in a proxy task)."""
    done = Path(folder, DOCS_DONE)
    if not done.exists():
        raise FileNotFoundError(f"the pool at {folder} has no document index ({DOCS_DONE}): run `quadmix proxy` to build it")
    cols: dict[str, list] = {"doc_hash": [], "shard": [], "offset": [], "length": [], "domain": []}
    for shard in json.loads(done.read_text())["shards"]:
        with np.load(Path(folder, DOCS_DIR, f"shard-{shard:05d}.npz"), allow_pickle=False) as z:
            n = z["doc_hash"].shape[0]
            for k in ("doc_hash", "offset", "length"):
                cols[k].append(z[k])
            cols["shard"].append(np.full(n, shard, dtype=np.int64))
            cols["domain"].append(z["names"].astype(object)[z["domain"]])
    if not cols["doc_hash"]:
        return {k: np.zeros(0, dtype=object if k == "domain" else np.int64) for k in cols}
    return {k: np.concatenate(v) for k, v in cols.items()}
