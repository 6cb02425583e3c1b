"""Generated ``documents`` + ``annotations`` Delta tables for the sampler benchmarks (cached, built with Spark).

The shared web corpus (``data/web/weborganizer_dev.jsonl.gz``, 8,712 pages, read with Python gzip + json) is
replicated to ``docs`` rows inside Spark: row ``j`` is copy ``k = j // n`` of page ``j % n`` (copy-major, like
``bench.bench_ingest``), with ``doc_id = "<id>-r<k>"`` and ``text = text + "\\n[copy k]"`` (so ids and text
hashes never repeat).

- ``documents`` (``with_documents``): doc_id, text, n_chars, n_tokens, text_hash (SHA-256 hex), source,
  ingest_batch, url, topic: the columns ``quadmix ingest`` writes, with one difference: **n_tokens is
  estimated as n_chars // 4** instead of being counted with the GPT-NeoX tokenizer (these benchmarks measure
  the sampler, not ingest; a real tokenizer gives ~0.25 tokens per character on this corpus too).
- ``annotations``: doc_id, domain, domain_conf, n_tokens and three quality scores, all deterministic functions
  of the doc id (``xxhash64(doc_id, i)`` read as uniforms u_i) and the text length:

  * ``domain``: the page's WebOrganizer ``topic`` (24 domains), except that a share ``BIG_EXTRA`` of the rows
    (u_0 < BIG_EXTRA) is moved to ``BIG_DOMAIN``, which then holds ~50% of the documents (realistic skew);
  * ``q_edu``: regression-like, ``round(clip(1.6 + 0.5 log10(n_chars/1000) + 0.9 z, 0, 5), 1)`` with z a
    Box-Muller normal of (u_1, u_2): 0-5 with ties at 0.1 resolution (51 distinct values);
  * ``q_dclm``: a probability piling up near 0 and 1: the arcsine law ``sin²(π u_3 / 2)`` tilted by length on
    the logit scale (``+0.8 log10(n_chars/1000)``);
  * ``q_ref``: uniform, u_4.

Both tables are written with ``files`` partitions (the documents ~3.2 GB of text at 1M rows) under
``$QUADMIX_BENCH_DIR/inputs/<name>/tables/`` and reused while intact (``bench.common.cached_input``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from bench.common import cached_input, log, shared_dir

CRITERIA = ("edu", "dclm", "ref")
BIG_DOMAIN = "Science & Technology"
BIG_EXTRA = 0.476  # share of rows moved to BIG_DOMAIN: 0.476 + 0.524 * 399/8712 ≈ 0.50 of the documents
GENERATOR_VERSION = 1  # bump when the scheme changes (invalidates cached inputs)
UNIFORM = 2.0**-53


def source_path() -> Path:
    return shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz"


def read_source(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".crc"))


def _build(spark, folder: Path, source: Path, docs: int, files: int, with_documents: bool) -> dict[str, Any]:
    import pandas as pd
    from pyspark.sql import functions as F

    records = read_source(source)
    n = len(records)
    log(f"generating {docs} documents ({math.ceil(docs / n)} copies of {n} pages) in {files} partitions"
        + ("" if with_documents else " (annotations only)"))
    pages = spark.createDataFrame(pd.DataFrame({
        "page": range(n),
        "id": [r["id"] for r in records],
        "url": [r.get("url") for r in records],
        "topic": [r.get("topic") for r in records],
        "topic_confidence": [float(r.get("topic_confidence") or 0.0) for r in records],
        "page_text": [r["text"] for r in records] if with_documents else [None] * n,
        "page_chars": [len(r["text"]) for r in records],
    }))
    rows = spark.range(0, docs, 1, files).select(
        (F.col("id") % n).alias("page"), (F.col("id") / n).cast("long").alias("k")
    ).join(F.broadcast(pages), "page")
    marker = F.concat(F.lit("\n[copy "), F.col("k").cast("string"), F.lit("]"))
    rows = rows.select(
        F.concat("id", F.lit("-r"), F.col("k").cast("string")).alias("doc_id"),
        F.concat("page_text", marker).alias("text"),
        (F.col("page_chars") + F.char_length(marker)).alias("n_chars"),
        "url", "topic", "topic_confidence",
    )

    def u(i: int):
        return F.shiftrightunsigned(F.xxhash64("doc_id", F.lit(i).cast("bigint")), 11) * F.lit(UNIFORM)

    length = F.log10(F.col("n_chars") / F.lit(1000.0))
    z = F.sqrt(F.lit(-2.0) * F.log(F.lit(1.0) - u(1))) * F.cos(F.lit(2 * math.pi) * u(2))
    edu = F.round(F.least(F.greatest(F.lit(1.6) + F.lit(0.5) * length + F.lit(0.9) * z, F.lit(0.0)), F.lit(5.0)), 1)
    p = F.least(F.greatest(F.pow(F.sin(F.lit(math.pi / 2) * u(3)), 2), F.lit(1e-9)), F.lit(1 - 1e-9))
    logit = F.log(p / (F.lit(1.0) - p)) + F.lit(0.8) * length
    dclm = F.lit(1.0) / (F.lit(1.0) + F.exp(-logit))
    domain = F.when(u(0) < F.lit(BIG_EXTRA), F.lit(BIG_DOMAIN)).otherwise(F.col("topic"))
    n_tokens = (F.col("n_chars") / 4).cast("long")  # estimate (see the module docstring)

    tables = folder / "tables"
    if with_documents:
        rows.select(
            "doc_id", "text", F.col("n_chars").cast("int").alias("n_chars"), n_tokens.alias("n_tokens"),
            F.sha2("text", 256).alias("text_hash"), F.lit(str(source)).alias("source"),
            F.lit("bench-generated").alias("ingest_batch"), "url", "topic",
        ).write.format("delta").mode("overwrite").save(str(tables / "documents"))
    rows.select(
        "doc_id", domain.alias("domain"), F.col("topic_confidence").alias("domain_conf"), n_tokens.alias("n_tokens"),
        edu.alias("q_edu"), dclm.alias("q_dclm"), u(4).alias("q_ref"),
    ).write.format("delta").mode("overwrite").save(str(tables / "annotations"))

    ann = spark.read.format("delta").load(str(tables / "annotations"))
    by_domain = {r.domain: (int(r.docs), int(r.tokens)) for r in ann.groupBy("domain").agg(
        F.count("*").alias("docs"), F.sum("n_tokens").alias("tokens")).collect()}
    return {
        "source": str(source),
        "source_rows": n,
        "rows": docs,
        "partitions": files,
        "with_documents": with_documents,
        "domains": sorted(by_domain),
        "domain_docs": {d: v[0] for d, v in sorted(by_domain.items())},
        "tokens": sum(v[1] for v in by_domain.values()),
        "big_domain_share": by_domain[BIG_DOMAIN][0] / docs,
        "criteria": list(CRITERIA),
        "generator_version": GENERATOR_VERSION,
        "scheme": 'row j = copy k=j//n of page j%n: doc_id="<id>-r<k>", text=text+"\\n[copy k]"; '
                  "n_tokens=n_chars//4 (estimate); domain=topic, BIG_EXTRA of rows moved to BIG_DOMAIN; "
                  "q_* = hash-of-doc_id functions (see bench/sample_data.py)",
        "files": _files_under(folder),
    }


def generate_tables(spark, docs: int, files: int, with_documents: bool = True) -> tuple[Path, dict[str, Any]]:
    """The cached input folder (tables under ``<folder>/tables``) and its manifest."""
    source = source_path()
    st = source.stat()
    key = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{GENERATOR_VERSION}|{BIG_DOMAIN}|{BIG_EXTRA}"
    fp = hashlib.sha256(key.encode()).hexdigest()[:10]
    kind = "docs+ann" if with_documents else "ann"
    name = f"sample-{kind}-{docs}rows-{files}parts-{fp}"
    folder, manifest = cached_input(name, lambda tmp: _build(spark, tmp, source, docs, files, with_documents))
    if manifest["rows"] != docs:
        raise RuntimeError(f"cached input {folder} has {manifest['rows']} rows, expected {docs}")
    return folder, manifest


def link_inputs(root: Path, folder: Path, tables: tuple[str, ...] = ("annotations", "documents")) -> None:
    """Make ``<root>/tables/<name>`` a symbolic link to the cached ``<folder>/tables/<name>`` (read only)."""
    (root / "tables").mkdir(parents=True, exist_ok=True)
    for t in tables:
        link = root / "tables" / t
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(folder / "tables" / t, link, target_is_directory=True)
