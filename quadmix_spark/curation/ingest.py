"""Ingest: corpus files -> the ``documents`` Delta table, plus ``rejects`` (row, reason) for unusable rows.

Contract
- Every input record ends up in exactly one place: ``documents`` (new), ``rejects`` (with a reason), or
  counted as a blank JSONL line. The run's report states ``input = documents + rejects + blank``.
- ``doc_id`` is the configured id column (as a string) or, without one, the first 32 hex digits of the
  SHA-256 of the text (128 bits: no collisions at billions of documents).
- Idempotent and incremental: inputs are units (a file with its size and modification time, or a Delta
  table version) logged in ``ingest_log``; a rerun skips logged units, so the same input twice changes
  nothing and a new file adds only its new documents. A file seen again with a new modification time but
  the same path and size is read once for its content digest (JSONL: every line; Parquet: every row's text
  and id; and the reading settings); when that matches the logged one, the file is logged as unchanged and
  nothing else is written. The appends of one batch use Delta's
  ``txnAppId``/``txnVersion``, so a retried batch never appends twice.
- Duplicates: the same id with the same text is kept once (the others are rejected as ``duplicate``); the
  same id with different texts is ambiguous, so every row of that id is rejected as ``id_conflict``.
  Both rules also hold against documents ingested by earlier batches. They run on narrow rows (row id,
  doc_id, text hash, file, row hash, metadata): no shuffle carries a document's text; their rejections go
  back to the rows by a broadcast join (a shuffle join past ``ingest.broadcast_rejects_rows``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from quadmix_spark.core import faults
from quadmix_spark.core.config import QuadmixConfig, local_path
from quadmix_spark.curation.corpus_files import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    IngestInputError,
    InputFile,
    canonical,
    content_digest,
    delta_inputs,
    detect_format,
    digest_aggregates,
    failed_file,
    list_files,
    metadata_path,
    read_jsonl,
    read_table_input,
    unit_digests,
    whitespace_only,
)
from quadmix_spark.core.storage import read_table, table_exists, write_table
from quadmix_spark.core.tables import DOCUMENTS, INGEST_LOG, REJECTS

REJECT_REASONS = (
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "missing_text",
    "null_text",
    "non_string_text",
    "empty_text",
    "too_large",
    "missing_id",
    "invalid_id",
    "duplicate",
    "id_conflict",
)
PREVIEW_CHARS = 1000


@dataclass
class IngestReport:
    batch_id: str | None
    format: str
    files_new: int
    files_skipped: int
    files_unchanged: int = 0  # new modification time, same path, size and content: logged, nothing written
    input_rows: int = 0
    blank_lines: int = 0
    documents: int = 0
    rejects: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    token_counter: str | None = None  # what counted n_tokens: the fast byte-level BPE path, or tokenizers and why

    @property
    def balanced(self) -> bool:
        return self.input_rows == self.documents + self.rejects + self.blank_lines

    def summary(self) -> str:
        if self.batch_id is None:
            return f"ingest: nothing new ({self.files_skipped} input units already ingested)"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejects_by_reason.items())) or "none"
        unchanged = f", {self.files_unchanged} of them touched but unchanged" if self.files_unchanged else ""
        return (
            f"ingest batch {self.batch_id}: {self.files_new} new input units{unchanged} ({self.files_skipped} already ingested)\n"
            f"  input rows {self.input_rows} = documents {self.documents} + rejects {self.rejects}"
            f" + blank lines {self.blank_lines}  [{'OK' if self.balanced else 'MISMATCH'}]\n"
            f"  rejects by reason: {reasons}"
            + (f"\n  tokens counted by {self.token_counter}" if self.token_counter else "")
        )


# ---------------------------------------------------------------- pure DataFrame transforms


def classify_rows(rows: DataFrame, max_chars: int, id_column: str | None) -> DataFrame:
    """Add ``reason`` (null = usable) and ``detail`` to the rows of an input reader."""
    text, kind = F.col("text"), F.col("text_kind")
    n_chars = F.char_length(text)
    checks = [
        (F.col("parse_error").isNotNull(), F.col("parse_error"), F.lit(None)),
        (kind.isNull(), F.lit("missing_text"), F.lit("the record has no text field")),
        (kind == "VOID", F.lit("null_text"), F.lit("text is null")),
        (kind != "STRING", F.lit("non_string_text"), F.concat(F.lit("text is of JSON type "), kind)),
        (whitespace_only(text, unicode=True), F.lit("empty_text"), F.lit("text is empty or whitespace only")),
        # a text of at most max_chars bytes has at most max_chars characters: counted only past that
        ((F.octet_length(text) > max_chars) & (n_chars > max_chars), F.lit("too_large"),
         F.format_string(f"%d characters > ingest.max_chars={max_chars}", n_chars)),
    ]
    if id_column:
        id_kind = F.col("id_kind")
        checks += [
            (id_kind.isNull() | (id_kind == "VOID"), F.lit("missing_id"), F.lit(f"no {id_column!r} value")),
            (id_kind.startswith("OBJECT") | id_kind.startswith("ARRAY"), F.lit("invalid_id"), F.concat(F.lit("id is of JSON type "), id_kind)),
            (F.length(F.trim(F.col("id"))) == 0, F.lit("missing_id"), F.lit("id is empty")),
        ]
    reason, detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for cond, r, d in reversed(checks):
        reason = F.when(cond, r).otherwise(reason)
        detail = F.when(cond, d).otherwise(detail)
    return rows.withColumns({"reason": reason, "detail": detail})


def assign_doc_ids(rows: DataFrame, id_column: str | None) -> DataFrame:
    """``text_hash`` (SHA-256 hex of the text, usable rows) and ``doc_id`` (the given id, or the first 128 bits
    of the text's hash), also on rows rejected for their content whenever the id is known, so that a reject
    can be found again in its source."""
    usable = F.col("reason").isNull()
    if id_column:
        kind = F.col("id_kind")
        known = (
            F.col("parse_error").isNull() & kind.isNotNull() & (kind != "VOID")
            & ~kind.startswith("OBJECT") & ~kind.startswith("ARRAY") & (F.length(F.trim(F.col("id"))) > 0)
        )
        return rows.withColumns({"text_hash": F.when(usable, F.sha2(F.col("text"), 256)), "doc_id": F.when(known, F.col("id"))})
    sha = rows.withColumn("_sha", F.when(F.col("text_kind") == "STRING", F.sha2(F.col("text"), 256)))  # hashed once
    return sha.withColumns({"text_hash": F.when(usable, F.col("_sha")), "doc_id": F.substring(F.col("_sha"), 1, 32)}).drop("_sha")


ROW_ID = "_rid"


def duplicate_decisions(usable: DataFrame, existing: DataFrame | None, conflicted: DataFrame | None = None) -> DataFrame:
    """(``_rid``, ``_dup_reason``, ``_dup_detail``) for the usable rows the id rules reject: repeated ids among
    ``usable``, against ``existing`` (doc_id, text_hash, source) documents and against ``conflicted`` (doc_id):
    ids an earlier batch rejected as ``id_conflict`` stay untrusted.

    ``usable`` holds narrow rows only (``_rid``, doc_id, text_hash, unit, raw_hash, meta_json): the grouping by
    ``doc_id`` shuffles no text. The kept copy of an exact duplicate is the first by (source, row hash,
    metadata): deterministic whatever the partitioning (rows equal in all of these are interchangeable: the one
    kept gives the same document).
    """
    w = Window.partitionBy("doc_id")
    ordered = w.orderBy("unit", "raw_hash", "meta_json")
    out = usable.withColumns({
        "_n": F.row_number().over(ordered),
        "_conflict": F.min("text_hash").over(w) != F.max("text_hash").over(w),
        "_first": F.first("unit").over(ordered.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)),
    })
    if existing is not None:
        prior = existing.select("doc_id", F.col("text_hash").alias("_prior_hash"), F.col("source").alias("_prior_source"))
        out = out.join(prior, on="doc_id", how="left")
    else:
        out = out.withColumns({"_prior_hash": F.lit(None).cast("string"), "_prior_source": F.lit(None).cast("string")})
    if conflicted is not None:
        out = out.join(conflicted.select("doc_id", F.lit(True).alias("_was_conflict")).distinct(), on="doc_id", how="left")
    else:
        out = out.withColumn("_was_conflict", F.lit(None).cast("boolean"))
    rules = [  # the first that holds gives the reason
        (F.col("_conflict"), "id_conflict", F.format_string("id %s has different texts in this input", F.col("doc_id"))),
        (F.col("_prior_hash").isNotNull() & (F.col("_prior_hash") != F.col("text_hash")), "id_conflict",
         F.format_string("id %s already ingested from %s with a different text", F.col("doc_id"), F.col("_prior_source"))),
        (F.col("_prior_hash").isNotNull(), "duplicate", F.format_string("already ingested from %s", F.col("_prior_source"))),
        (F.col("_was_conflict").isNotNull(), "id_conflict",
         F.format_string("id %s was rejected as id_conflict by an earlier input", F.col("doc_id"))),
        (F.col("_n") > 1, "duplicate", F.format_string("same id and text as a row of %s", F.col("_first"))),
    ]
    reason, detail = F.lit(None).cast("string"), F.lit(None).cast("string")
    for cond, r, d in reversed(rules):
        reason = F.when(cond, F.lit(r)).otherwise(reason)
        detail = F.when(cond, d).otherwise(detail)
    return out.select(ROW_ID, reason.alias("_dup_reason"), detail.alias("_dup_detail")).where(F.col("_dup_reason").isNotNull())


def narrow_usable(rows: DataFrame) -> DataFrame:
    """The columns of the usable rows that :func:`duplicate_decisions` reads (no text)."""
    return rows.where(F.col("reason").isNull()).select(ROW_ID, "doc_id", "text_hash", "unit", "raw_hash",
                                                       F.to_json("meta").alias("meta_json"))


def apply_decisions(rows: DataFrame, decisions: DataFrame, broadcast: bool) -> DataFrame:
    """``rows`` with the rejections of :func:`duplicate_decisions` in ``reason``/``detail``, joined by row id: by
    broadcast when the decisions are few (the rows, with their text, stay where they are), else by a shuffle."""
    joined = rows.join(F.broadcast(decisions) if broadcast else decisions, on=ROW_ID, how="left")
    rejected = F.col("_dup_reason").isNotNull()
    return joined.withColumns({
        "reason": F.when(rejected, F.col("_dup_reason")).otherwise(F.col("reason")),
        "detail": F.when(rejected, F.col("_dup_detail")).otherwise(F.col("detail")),
    }).drop("_dup_reason", "_dup_detail", ROW_ID)


def documents_frame(staged: DataFrame, batch_id: str) -> DataFrame:
    """The ``documents`` rows of a staged batch (schema contract of the table)."""
    return staged.where(F.col("reason").isNull()).select(
        "doc_id",
        "text",
        "n_chars",  # counted with the tokens (stage_batch): Spark's char_length is a JVM pass over every text
        F.col("n_tokens").cast("bigint").alias("n_tokens"),
        "text_hash",
        "source",
        F.lit(batch_id).alias("ingest_batch"),
        "meta.*",
    )


def rejects_frame(staged: DataFrame, batch_id: str) -> DataFrame:
    """The ``rejects`` rows of a staged batch: where it came from, why, and a readable preview."""
    preview = F.coalesce(F.col("raw"), F.col("text"), F.to_json("meta"))
    return staged.where(F.col("reason").isNotNull() & (F.col("reason") != "blank_line")).select(
        "source",
        "reason",
        "detail",
        "doc_id",
        F.substring(preview, 1, PREVIEW_CHARS).alias("preview"),
        F.char_length(preview).alias("preview_source_chars"),
        F.lit(batch_id).alias("ingest_batch"),
    )


# ---------------------------------------------------------------- the stage


def batch_id_of(units: list[InputFile]) -> str:
    return hashlib.sha256("\n".join(sorted(u.key for u in units)).encode()).hexdigest()[:16]


def _input_units(spark: SparkSession, cfg: QuadmixConfig, fmt: str) -> list[InputFile]:
    if fmt == "jsonl":
        return list_files(spark, cfg.ingest.input, JSONL_SUFFIXES)
    if fmt == "parquet":
        return list_files(spark, cfg.ingest.input, PARQUET_SUFFIXES)
    return delta_inputs(spark, cfg.ingest.input)


def _logged(spark: SparkSession, log_table: str) -> tuple[set[str], dict[tuple[str, int], set[str]]]:
    """The logged unit keys, and the content digests logged for each (canonical path, size)."""
    if not table_exists(spark, log_table):
        return set(), {}
    log = read_table(spark, log_table)
    digest = F.col("content_digest") if "content_digest" in log.columns else F.lit(None).cast("string")
    keys, digests = set(), {}
    for r in log.select("unit_key", "path", "size", digest.alias("digest")).collect():
        keys.add(r.unit_key)
        if r.digest is not None:
            digests.setdefault((canonical(r.path), r.size), set()).add(r.digest)
    return keys, digests


def unchanged_units(spark: SparkSession, cfg: QuadmixConfig, fmt: str, new: list[InputFile],
                    digests: dict[tuple[str, int], set[str]], settings: str) -> dict[str, str]:
    """The ``new`` files that an earlier batch ingested with the same content (same path and size, a new
    modification time: copied or touched), as unit key -> digest. Only such files are read here."""
    if fmt == "delta":
        return {}
    suspects = [u for u in new if (canonical(u.path), u.size) in digests]
    if not suspects:
        return {}
    ic = cfg.ingest
    current = unit_digests(spark, fmt, suspects, ic.text_column, ic.id_column, settings)
    empty = content_digest(0, None, settings)  # an empty file has no rows to group
    read = {u: current.get(canonical(u.path), empty) for u in suspects}
    return {u.key: d for u, d in read.items() if d in digests[(canonical(u.path), u.size)]}


def reading_settings(cfg: QuadmixConfig) -> str:
    """A short fingerprint of the settings that decide what a file's rows become."""
    ic = cfg.ingest
    keys = (ic.text_column, ic.id_column, ic.metadata_columns, ic.max_chars, ic.invalid_utf8, ic.json_schema, ic.tokenizer)
    return hashlib.sha256(repr(keys).encode()).hexdigest()[:8]


def stage_batch(spark: SparkSession, cfg: QuadmixConfig, fmt: str, units: list[InputFile]) -> DataFrame:
    """Read, check and token-count one batch of input units; one row per input record, with a row id
    (``_rid``) for :func:`apply_decisions`. The tokens of a usable row are counted before the id rules run (a
    duplicate's count is dropped with it)."""
    ic = cfg.ingest
    if fmt == "jsonl":
        rows = read_jsonl(spark, [u.path for u in units], ic.text_column, ic.id_column, ic.metadata_columns, ic.json_schema, ic.invalid_utf8)
    else:
        rows = read_table_input(spark, fmt, units, ic.text_column, ic.id_column, ic.metadata_columns)
    rows = rows.withColumn("source", F.lit(ic.source_name) if ic.source_name else F.col("unit"))
    rows = assign_doc_ids(classify_rows(rows, ic.max_chars, ic.id_column), ic.id_column)

    from quadmix_udfs.tokens import text_counts_column

    text_to_count = F.when(F.col("reason").isNull(), F.col("text"))
    counts = text_counts_column(text_to_count, local_path(ic.tokenizer), ic.batch_size, ic.fast_tokenizer)
    rows = rows.withColumn("_counts", counts)
    rows = rows.withColumns({"n_tokens": F.col("_counts.n_tokens"), "n_chars": F.col("_counts.n_chars")}).drop("_counts")
    # unique within the batch; read once, from the persisted rows (see stage_and_write), so it is stable
    return rows.withColumn(ROW_ID, F.monotonically_increasing_id())


def prior_ids(spark: SparkSession, cfg: QuadmixConfig, batch_id: str) -> tuple[DataFrame | None, DataFrame | None]:
    """(documents of earlier batches, ids earlier batches rejected as id_conflict), or None where no table yet."""
    existing = conflicted = None
    docs_table = cfg.storage.table(DOCUMENTS)
    if table_exists(spark, docs_table):
        existing = read_table(spark, docs_table).where(F.col("ingest_batch") != batch_id)
    rejects_table = cfg.storage.table(REJECTS)
    if table_exists(spark, rejects_table):
        conflicted = read_table(spark, rejects_table).where(
            (F.col("reason") == "id_conflict") & (F.col("ingest_batch") != batch_id) & F.col("doc_id").isNotNull()
        )
    return existing, conflicted


# Ingest's scan is CPU-bound (parsing, hashing, token counting), unlike a copy. Spark packs small input files
# into as few tasks as one per core plus a remainder (16 files of 17 MB: 3 tasks on 2 cores, the third running
# alone); with at least this many tasks per core the cores finish together. A launcher's own
# spark.sql.files.minPartitionNum wins; inputs large next to the cluster are split as before.
SCAN_TASKS_PER_CORE = 4
MIN_PARTITION_NUM = "spark.sql.files.minPartitionNum"


@contextmanager
def cpu_bound_scan(spark: SparkSession) -> Iterator[None]:
    """File scans planned inside split into at least :data:`SCAN_TASKS_PER_CORE` tasks per core (a file is never
    split further than Spark allows: a gzip file stays one task)."""
    if spark.conf.get(MIN_PARTITION_NUM, None) is not None:
        yield
        return
    spark.conf.set(MIN_PARTITION_NUM, str(SCAN_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    try:
        yield
    finally:
        spark.conf.unset(MIN_PARTITION_NUM)


def run_ingest(spark: SparkSession, cfg: QuadmixConfig, run_id: str | None = None) -> IngestReport:
    """The ingest stage: new input units -> ``documents`` + ``rejects``, logged in ``ingest_log``."""
    if not cfg.ingest.input:
        raise IngestInputError("no input: set ingest.input (a path or glob, or a list of them)")
    fmt = detect_format(cfg.ingest.input, cfg.ingest.format, spark)
    units = _input_units(spark, cfg, fmt)
    log_table = cfg.storage.table(INGEST_LOG)
    done, digests = _logged(spark, log_table)
    new = [u for u in units if u.key not in done]
    report = IngestReport(batch_id=None, format=fmt, files_new=len(new), files_skipped=len(units) - len(new))
    if not new:
        return report
    report.token_counter = check_tokenizer(cfg.ingest.tokenizer, cfg.ingest.fast_tokenizer)
    batch_id = batch_id_of(new)
    report.batch_id = batch_id
    meta = {"stage": "ingest", "batch_id": batch_id, "run_id": run_id, "config": cfg.fingerprint()}
    txn = (f"quadmix-ingest-{batch_id}", 0)
    settings = reading_settings(cfg)
    unchanged = unchanged_units(spark, cfg, fmt, new, digests, settings)
    report.files_unchanged = len(unchanged)
    fresh = [u for u in new if u.key not in unchanged]
    with cpu_bound_scan(spark):
        per_file = stage_and_write(spark, cfg, fmt, fresh, batch_id, report, meta, txn) if fresh else {}
    log_rows = []
    for u in new:
        stats = per_file.get(canonical(f"{u.path}@v{u.mtime}" if fmt == "delta" else u.path))
        rows, docs, blank = (stats["rows"], stats["documents"], stats["blank_lines"]) if stats else (0, 0, 0)
        if fmt == "delta":
            digest = None  # a table version never changes: its key says it all
        elif u.key in unchanged:
            digest = unchanged[u.key]
        else:
            digest = content_digest(rows, stats["hash_sum"] if stats else None, settings)
        log_rows.append((batch_id, u.key, u.path, u.size, u.mtime, fmt, rows, docs, rows - docs - blank, blank, digest))
    log_df = spark.createDataFrame(
        log_rows,
        "ingest_batch string, unit_key string, path string, size bigint, mtime bigint, format string, "
        "input_rows bigint, documents bigint, rejects bigint, blank_lines bigint, content_digest string",
    )
    write_table(log_df, log_table, metadata=meta, txn=txn, merge_schema=True)
    return report


def stage_and_write(spark: SparkSession, cfg: QuadmixConfig, fmt: str, units: list[InputFile], batch_id: str,
                    report: IngestReport, meta: dict, txn: tuple[str, int]) -> dict[str, Row]:
    """Stage ``units``, append their documents and rejects, fill ``report``'s counts; per-file statistics
    (rows, documents, blank lines, the content digest's hash sum) keyed by canonical path."""
    rows = stage_batch(spark, cfg, fmt, units).persist(StorageLevel.MEMORY_AND_DISK)
    cached = [rows]
    try:
        try:
            decisions = duplicate_decisions(narrow_usable(rows), *prior_ids(spark, cfg, batch_id)).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(decisions)
            few = decisions.count() <= cfg.ingest.broadcast_rejects_rows
            staged = apply_decisions(rows, decisions, broadcast=few)
            if not few:  # a shuffle join: done once, not for each of the reads below
                staged = staged.persist(StorageLevel.MEMORY_AND_DISK)
                cached.append(staged)
            counts = {r["reason"]: r["count"] for r in staged.groupBy("reason").count().collect()}
        except Exception as e:  # a file that breaks while read (e.g. a truncated gzip with a configured schema)
            named = failed_file(e)
            if named:
                raise IngestInputError(f"cannot read input {named}") from e
            raise
        report.input_rows = sum(counts.values())
        report.blank_lines = counts.pop("blank_line", 0)
        report.documents = counts.pop(None, 0)
        report.rejects_by_reason = counts
        report.rejects = sum(counts.values())
        documents = faults.during(documents_frame(staged, batch_id), "ingest.documents.write")
        write_table(documents, cfg.storage.table(DOCUMENTS), metadata=meta, txn=txn, merge_schema=True)
        faults.point("ingest.documents.committed")
        write_table(rejects_frame(staged, batch_id), cfg.storage.table(REJECTS), metadata=meta, txn=txn, merge_schema=True)
        key = canonical if fmt == "delta" else metadata_path  # a table version's unit is ours; a file's is Spark's URI
        return {
            key(r["unit"]): r
            for r in staged.groupBy("unit").agg(
                *digest_aggregates(),
                F.sum(F.when(F.col("reason").isNull(), 1).otherwise(0)).alias("documents"),
                F.sum(F.when(F.col("reason") == "blank_line", 1).otherwise(0)).alias("blank_lines"),
            ).collect()
        }
    finally:
        for frame in cached:
            frame.unpersist()


def check_tokenizer(path: str, fast: bool = True) -> str:
    """Load ``ingest.tokenizer`` on the driver, so a wrong path or file fails before any Spark job; what will
    count the tokens (the fast byte-level BPE path, or ``tokenizers`` and why)."""
    from quadmix_udfs.tokens import load_encoder

    try:
        return load_encoder(local_path(path), fast).describe()
    except Exception as e:  # noqa: BLE001 - FileNotFoundError, or the tokenizers library's own errors
        raise IngestInputError(f"ingest.tokenizer {path!r} cannot be loaded: {str(e).strip()[:300]}") from None


def report_dict(report: IngestReport) -> dict:
    return {**asdict(report), "balanced": report.balanced}
