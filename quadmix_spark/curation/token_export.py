"""Tokenized training export (``sampling.export_format: tokens``): each selected document's token ids once,
the training order as pointers into them, in Megatron-LM's indexed-dataset layout.

A training output repeats documents (copies within an epoch, and again in later epochs): a 500B-token budget
drawn from 30B unique tokens holds most documents ~16 times. Trainers read token files through an index, so
the text of a copy need not be written again: this export writes every unique document's ids once and the
training order (every copy of every epoch, in ``order_key`` order) as an index whose pointers may repeat.

Files under ``<export folder>`` (one dataset prefix per shard; a document's copies all land in the shard of
``pmod(xxhash64(doc_id), shards)``, so each ``.bin`` holds its documents once):

- ``shard-00000.bin``: the token ids of the shard's unique documents (sorted by ``doc_id``), each followed by
  the end-of-document id; ``uint16`` when the vocabulary fits in 16 bits, else ``int32`` (Megatron's dtype
  codes have no unsigned 32-bit type);
- ``shard-00000.idx``: Megatron's ``MMIDIDX`` index: the magic ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version 1,
  ``<B`` dtype code (8 = uint16, 4 = int32), ``<Q`` sequence count ``n``, ``<Q`` document count ``n + 1``,
  then ``int32`` sizes ``[n]`` (tokens of each sequence, end-of-document included), ``int64`` pointers ``[n]``
  (byte offsets into the ``.bin``; a repeated document repeats its pointer) and ``int64`` document
  indices ``[n + 1]`` (``0..n``: every sequence is one document). Sequence ``i`` is the shard's ``i``-th copy
  in training order;
- ``manifest.json``: the format, dtype, end-of-document id, ``rows`` (copies), per shard its prefix, sequences, unique documents,
  tokens in training order and ``.bin`` bytes, and the tokens per domain and per epoch (end-of-document
  tokens not counted, as ``n_tokens``).

How a trainer reads it: Megatron-LM's ``IndexedDataset(prefix)`` (or GPT-NeoX's ``MMapIndexedDataset``) on each
``shard-XXXXX`` prefix, blending the shards with weights equal to their token counts from the manifest; the
shards are random subsets of the training order (a hash of the document), so reading them round-robin is a
shuffle of the whole, and reading one shard's sequences in index order follows ``order_key``.

The ``.bin`` and ``.idx`` of a shard are each written by one Spark task straight from its Python worker (a
temporary name, then a rename), so the export folder must be a path the executors can write as files: local,
or a mount (``/dbfs/...``); an ``s3://``-style URI is refused with that reason. A task holds one shard's
documents' ids while writing its ``.bin`` (bounded by the shard, not the corpus) and its sequences' sizes and
pointers (12 bytes a copy) while writing its ``.idx``: raise ``sampling.export_shards`` for larger budgets.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
FORMAT = "megatron-mmidx/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def prefix_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def shard_of_doc(doc_id: F.Column, n_shards: int) -> F.Column:
    """The shard of a document: every copy of it in the same one."""
    return F.pmod(F.xxhash64(doc_id), F.lit(n_shards)).cast("int")


def local_folder(folder: str) -> str:
    """``folder`` as a path the Python workers can open, or a clear error."""
    for scheme in ("file://", "file:"):
        if folder.startswith(scheme):
            return folder[len(scheme):]
    if "://" in folder:
        raise ValueError(
            f"export_format tokens writes its .bin/.idx files from the executors' Python workers, which cannot write "
            f"{folder!r}: point storage (or the export) at a local or mounted path (e.g. /dbfs/...), or use parquet/jsonl"
        )
    return folder


def write_index(path: str, sizes: np.ndarray, pointers: np.ndarray, dtype: np.dtype) -> None:
    """A Megatron ``MMIDIDX`` index of ``len(sizes)`` sequences, each its own document."""
    n = len(sizes)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", n))
        f.write(struct.pack("<Q", n + 1))
        f.write(np.asarray(sizes, dtype=np.int32).tobytes(order="C"))
        f.write(np.asarray(pointers, dtype=np.int64).tobytes(order="C"))
        f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))


def bin_partitions(folder: str, tokenizer: str, eod: int, dtype: str, fast: bool,
                   batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: rows ``(shard, doc_id, text)`` of one shard, sorted by ``doc_id`` -> the shard's
    ``.bin`` written, and ``(doc_id, pointer, size)`` of each document (byte offset, tokens with the EOD)."""
    from quadmix_udfs.tokens import load_encoder

    encoder = load_encoder(tokenizer, fast)
    dt = np.dtype(dtype)
    handle = tmp = final = None
    offset = 0
    shard = None
    try:
        for pdf in batches:
            if not len(pdf):
                continue
            shards = pdf["shard"].unique()
            if len(shards) != 1 or (shard is not None and shards[0] != shard):
                raise RuntimeError(f"one .bin per task: rows of shards {sorted(set(shards) | {shard} - {None})} met")
            if handle is None:
                shard = int(shards[0])
                final = os.path.join(folder, prefix_name(shard) + ".bin")
                tmp = final + f".tmp-{os.getpid()}"
                handle = open(tmp, "wb")
            ids = encoder.encode_batch(pdf["text"].tolist())
            pointers, sizes = np.empty(len(ids), dtype=np.int64), np.empty(len(ids), dtype=np.int32)
            for i, row in enumerate(ids):
                arr = np.asarray(row + [eod], dtype=dt)
                pointers[i], sizes[i] = offset, len(arr)
                handle.write(arr.tobytes())
                offset += arr.nbytes
            yield pd.DataFrame({"doc_id": pdf["doc_id"].to_numpy(), "pointer": pointers, "size": sizes})
        if handle is not None:
            handle.close()
            handle = None
            os.replace(tmp, final)
    finally:
        if handle is not None:
            handle.close()
            os.unlink(tmp)


def idx_partitions(folder: str, dtype: str, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: rows ``(shard, order_key, pointer, size)`` of one shard, sorted by ``order_key`` ->
    the shard's ``.idx`` written, and one row ``(shard, sequences, tokens)``."""
    sizes, pointers, shard = [], [], None
    for pdf in batches:
        if len(pdf):
            shard = int(pdf["shard"].iloc[0])
            sizes.append(pdf["size"].to_numpy(np.int32))
            pointers.append(pdf["pointer"].to_numpy(np.int64))
    if shard is None:
        return
    s, p = np.concatenate(sizes), np.concatenate(pointers)
    final = os.path.join(folder, prefix_name(shard) + ".idx")
    tmp = final + f".tmp-{os.getpid()}"
    write_index(tmp, s, p, np.dtype(dtype))
    os.replace(tmp, final)
    yield pd.DataFrame({"shard": [shard], "sequences": [len(s)], "tokens": [int(s.astype(np.int64).sum())]})


def export_tokens(order: DataFrame, documents: DataFrame, folder: str, n_shards: int, tokenizer: str,
                  fast: bool = True) -> dict:
    """Write the tokenized export of ``order`` (the training output: doc_id, domain, n_tokens, epoch,
    order_key) with the text of ``documents`` under ``folder``; returns the manifest (also written there)."""
    import shutil

    from quadmix_spark.curation.prefix import by_labels
    from quadmix_udfs.tokens import eos_id
    from quadmix_udfs.tokens import load_tokenizer

    local = local_folder(folder)
    tok = load_tokenizer(tokenizer)
    eod = eos_id(tok)
    dtype = token_dtype(tok.get_vocab_size(with_added_tokens=True))
    shutil.rmtree(local, ignore_errors=True)
    Path(local).mkdir(parents=True)

    order = order.withColumn("shard", shard_of_doc(F.col("doc_id"), n_shards))
    unique = order.select("doc_id", "shard").distinct()
    texts = documents.select("doc_id", "text").join(unique, "doc_id", "inner")
    texts = by_labels(texts, "shard", n_shards, n_shards).sortWithinPartitions("doc_id")
    bins = functools.partial(bin_partitions, local, tokenizer, eod, dtype.name, fast)
    pointers = texts.select("shard", "doc_id", "text").mapInPandas(bins, "doc_id string, pointer long, size int")
    pointers = pointers.persist()
    try:
        seqs = order.select("shard", "order_key", "doc_id").join(pointers, "doc_id", "inner")
        seqs = by_labels(seqs, "shard", n_shards, n_shards).sortWithinPartitions("order_key")
        idx = functools.partial(idx_partitions, local, dtype.name)
        written = {int(r["shard"]): r for r in seqs.select("shard", "order_key", "pointer", "size").mapInPandas(
            idx, "shard int, sequences long, tokens long").collect()}  # one row per shard
        unique_docs = {int(r["shard"]): (int(r["docs"]), int(r["bytes"])) for r in pointers.join(unique, "doc_id").groupBy("shard").agg(
            F.count("*").alias("docs"), (F.sum("size") * dtype.itemsize).alias("bytes")).collect()}
    finally:
        pointers.unpersist()
    shards = []
    for s in range(n_shards):
        if s not in written:  # a shard no document hashed to: an empty dataset, so every prefix opens
            write_index(os.path.join(local, prefix_name(s) + ".idx"), np.zeros(0, np.int32), np.zeros(0, np.int64), dtype)
            Path(local, prefix_name(s) + ".bin").write_bytes(b"")
        docs, nbytes = unique_docs.get(s, (0, 0))
        shards.append({"prefix": prefix_name(s), "sequences": int(written[s]["sequences"]) if s in written else 0,
                       "unique_docs": docs, "tokens": int(written[s]["tokens"]) if s in written else 0, "bin_bytes": nbytes})
    by_domain = {r["domain"]: int(r["t"]) for r in order.groupBy("domain").agg(F.sum("n_tokens").alias("t")).collect()}
    by_epoch = {str(r["epoch"]): int(r["t"]) for r in order.groupBy("epoch").agg(F.sum("n_tokens").alias("t")).collect()}
    manifest = {"format": FORMAT, "dtype": dtype.name, "eod_id": eod, "tokenizer": os.path.basename(tokenizer),
                "shards": shards, "sequences": sum(s["sequences"] for s in shards),
                "rows": sum(s["sequences"] for s in shards),  # copies, as the text formats' rows
                "tokens": sum(by_epoch.values()), "tokens_with_eod": sum(s["tokens"] for s in shards),
                "bin_bytes": sum(s["bin_bytes"] for s in shards),
                "tokens_by_domain": dict(sorted(by_domain.items())), "tokens_by_epoch": dict(sorted(by_epoch.items(), key=lambda kv: int(kv[0])))}
    Path(local, "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------- reading


class IndexedTokens:
    """A reader of one ``MMIDIDX`` prefix (``.idx`` + ``.bin``), memory-mapped: ``len``, ``[i]`` -> ids."""

    def __init__(self, prefix: str):
        with open(prefix + ".idx", "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{prefix}.idx is not a Megatron MMIDIDX index")
            (version,) = struct.unpack("<Q", f.read(8))
            (code,) = struct.unpack("<B", f.read(1))
            (n,) = struct.unpack("<Q", f.read(8))
            (n_docs,) = struct.unpack("<Q", f.read(8))
            header = f.tell()
        if version != VERSION:
            raise ValueError(f"{prefix}.idx: version {version}, expected {VERSION}")
        codes = {v: k for k, v in DTYPE_CODES.items()}
        self.dtype = codes[code]
        idx = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n, offset=header)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n, offset=header + 4 * n)
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=n_docs, offset=header + 12 * n)
        size = os.path.getsize(prefix + ".bin")
        self.bin = np.memmap(prefix + ".bin", mode="r", dtype=np.uint8) if size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self.bin, dtype=self.dtype, count=int(self.sizes[i]), offset=int(self.pointers[i]))
