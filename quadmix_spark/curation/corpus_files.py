"""Finding and reading corpus inputs: JSONL (plain or gzip), Parquet and Delta, by path or glob.

Readers return one row per input record with the *unchecked* fields ingest needs:
``unit`` (the file path, or ``table@vN`` for Delta), ``raw`` (the JSONL line where parsing rejected it, else null),
``raw_hash`` (a hash of the line, to order exact duplicates deterministically), ``text_kind`` (JSON type of the
text field: ``STRING``, ``BIGINT``, ``VOID`` for JSON null, null when missing), ``text``, ``id_kind``, ``id``,
``meta`` (a struct of passthrough columns), ``parse_error`` (a reject reason found while parsing, or null).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet",)
# Columns ingest writes itself; an input column with one of these names is kept as ``input_<name>``.
RESERVED = {"doc_id", "text", "n_chars", "n_tokens", "text_hash", "source", "ingest_batch"}


class IngestInputError(ValueError):
    """An input that cannot be used at all (no files, unreadable file, wrong schema)."""


@dataclass(frozen=True)
class InputFile:
    """One unit of input: a file (path, size, modification time) or a Delta table version (size = -1)."""

    path: str
    size: int
    mtime: int

    @property
    def key(self) -> str:
        return f"{self.path}|{self.size}|{self.mtime}"


def detect_format(patterns: list[str], fmt: str, spark: SparkSession) -> str:
    if fmt != "auto":
        return fmt
    kinds = set()
    for p in patterns:
        low = p.lower().rstrip("/")
        if low.endswith(JSONL_SUFFIXES):
            kinds.add("jsonl")
        elif low.endswith(PARQUET_SUFFIXES):
            kinds.add("parquet")
        elif _is_delta(spark, p):
            kinds.add("delta")
        elif found := _kinds_inside(spark, p):
            kinds |= found
        else:
            raise IngestInputError(
                f"cannot tell the format of input {p!r}: name files *.jsonl[.gz]/*.parquet, point at a Delta "
                "table folder, or set ingest.format"
            )
    if len(kinds) > 1:
        raise IngestInputError(f"inputs mix formats {sorted(kinds)}; ingest one format per run")
    return kinds.pop()


def _kinds_inside(spark: SparkSession, pattern: str) -> set[str]:
    """Formats of the files under a folder (or glob), judged by their names."""
    try:
        files = list_files(spark, [pattern], JSONL_SUFFIXES + PARQUET_SUFFIXES)
    except IngestInputError:
        return set()
    return {"jsonl" if f.path.lower().endswith(JSONL_SUFFIXES) else "parquet" for f in files}


def _is_delta(spark: SparkSession, path: str) -> bool:
    from delta.tables import DeltaTable

    try:
        return bool(DeltaTable.isDeltaTable(spark, path))
    except Exception:  # noqa: BLE001 - any failure to open means "not a Delta table"
        return False


def list_files(spark: SparkSession, patterns: list[str], suffixes: tuple[str, ...]) -> list[InputFile]:
    """Files matching the paths/globs (folders are searched recursively), hidden files skipped."""
    jvm = spark.sparkContext._jvm
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    found: dict[str, InputFile] = {}
    for pattern in patterns:
        path = jvm.org.apache.hadoop.fs.Path(pattern)
        fs = path.getFileSystem(hconf)
        statuses = fs.globStatus(path) or []
        if not statuses:
            raise IngestInputError(f"input {pattern!r} matches no file")
        for st in statuses:
            if st.isDirectory():
                it = fs.listFiles(st.getPath(), True)
                while it.hasNext():
                    _add(found, it.next(), suffixes)
            else:
                _add(found, st, suffixes, explicit=True)
    if not found:
        raise IngestInputError(f"no {'/'.join(suffixes)} files under {patterns}")
    return sorted(found.values(), key=lambda f: f.path)


def _add(found: dict[str, InputFile], st, suffixes: tuple[str, ...], explicit: bool = False) -> None:
    name = st.getPath().getName()
    if name.startswith(("_", ".")):
        return
    if not explicit and not name.lower().endswith(suffixes):
        return
    p = st.getPath().toString()
    found[p] = InputFile(p, int(st.getLen()), int(st.getModificationTime()))


def delta_inputs(spark: SparkSession, paths: list[str]) -> list[InputFile]:
    from quadmix_spark.core.storage import table_version

    out = []
    for p in paths:
        version = table_version(spark, p)
        if version is None:
            raise IngestInputError(f"input {p!r} is not a Delta table")
        out.append(InputFile(p, -1, version))
    return out


# ---------------------------------------------------------------- JSONL


def _json_path(name: str) -> str:
    return "$['" + name.replace("\\", "\\\\").replace("'", "\\'") + "']"


def _safe_name(name: str) -> str:
    clean = re.sub(r"[^0-9A-Za-z_]", "_", name) or "_"
    return f"input_{clean}" if clean in RESERVED else clean


def infer_json_schema(spark: SparkSession, files: list[str]) -> T.StructType:
    """The top-level fields of the JSON objects in ``files`` (Spark's inference, corrupt lines ignored)."""
    try:
        schema = spark.read.option("mode", "PERMISSIVE").json(files).schema
    except Exception as e:  # noqa: BLE001
        raise IngestInputError(f"cannot read JSONL input {read_error(e, files)}") from e
    return T.StructType([f for f in schema.fields if f.name != "_corrupt_record"])


def whitespace_only(column: Column, unicode: bool = False) -> Column:
    """True where a string column is empty or white space only: Java's regex ``^\\s*$`` (with ``unicode``,
    ``(?U)``: Unicode white space), null where it is null. The regex runs on a Java copy of the whole value, so
    it is asked only where the first character is white space or a line terminator (``$`` also matches before a
    final one: ``"\\u2028"`` is blank to it), the only values it can match."""
    flag = "(?U)" if unicode else ""
    first_is_space = F.substring(column, 1, 1).rlike(f"^{flag}[\\s\\u0085\\u2028\\u2029]$")
    return (F.octet_length(column) == 0) | (first_is_space & column.rlike(f"^{flag}\\s*$"))


def read_jsonl(
    spark: SparkSession,
    files: list[str],
    text_column: str,
    id_column: str | None,
    metadata_columns: list[str] | None,
    json_schema: str | None,
    invalid_utf8: str,
) -> DataFrame:
    schema = T._parse_datatype_string(json_schema) if json_schema else infer_json_schema(spark, files)
    names = {f.name for f in schema.fields}
    if text_column not in names:
        raise IngestInputError(
            f"JSONL input {files[:3]}: no field {text_column!r} in any record (fields: {sorted(names)}); "
            "set ingest.text_column"
        )
    if id_column and id_column not in names:
        raise IngestInputError(
            f"JSONL input {files[:3]}: no field {id_column!r} (fields: {sorted(names)}); "
            "set ingest.id_column, or null to derive ids from the text"
        )
    meta_fields = _meta_fields(schema, text_column, id_column, metadata_columns, files)

    lines = spark.read.text(files).select(F.col("value").alias("raw"), F.col("_metadata.file_path").alias("unit"))
    valid = F.is_valid_utf8("raw")
    replace = F.lit(invalid_utf8 == "replace")
    parsed = lines.select(
        "unit",
        "raw",
        whitespace_only(F.col("raw")).alias("blank"),
        F.when(valid | replace, F.try_parse_json(F.make_valid_utf8("raw"))).alias("v"),
        F.when(~valid & ~replace, F.lit("invalid_utf8")).alias("utf8_error"),
    )
    v = F.col("v")
    text_v = F.variant_get(v, _json_path(text_column), "variant")
    id_v = F.variant_get(v, _json_path(id_column), "variant") if id_column else F.lit(None).cast("variant")
    parse_error = (
        F.when(F.col("blank"), F.lit("blank_line"))  # not a record: counted, never written as a reject
        .when(F.col("utf8_error").isNotNull(), F.col("utf8_error"))
        .when(v.isNull(), F.lit("malformed_json"))
        .when(~F.schema_of_variant(v).startswith("OBJECT"), F.lit("not_an_object"))
    )
    meta = F.struct(*[F.try_variant_get(v, _json_path(f.name), f.dataType.simpleString()).alias(_safe_name(f.name)) for f in meta_fields])
    return parsed.select(
        "unit",
        # the line itself is kept only where it is rejected while parsing (a readable preview)
        F.when(parse_error.isNotNull(), F.make_valid_utf8("raw")).alias("raw"),
        F.xxhash64("raw").alias("raw_hash"),
        parse_error.alias("parse_error"),
        F.schema_of_variant(text_v).alias("text_kind"),
        F.try_variant_get(text_v, "$", "string").alias("text"),
        F.schema_of_variant(id_v).alias("id_kind"),
        F.try_variant_get(id_v, "$", "string").alias("id"),
        meta.alias("meta"),
    )


def _meta_fields(schema: T.StructType, text_column: str, id_column: str | None, wanted: list[str] | None, where) -> list[T.StructField]:
    fields = [f for f in schema.fields if f.name not in (text_column, id_column)]
    if wanted is None:
        return fields
    by_name = {f.name: f for f in fields}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise IngestInputError(f"input {where if isinstance(where, str) else where[:3]}: metadata columns {missing} not found (have: {sorted(by_name)})")
    return [by_name[w] for w in wanted]


# ---------------------------------------------------------------- Parquet / Delta


def read_table_input(
    spark: SparkSession,
    fmt: str,
    units: list[InputFile],
    text_column: str,
    id_column: str | None,
    metadata_columns: list[str] | None,
) -> DataFrame:
    if fmt == "parquet":
        try:
            df = spark.read.parquet(*[u.path for u in units])
        except Exception as e:  # noqa: BLE001
            raise IngestInputError(f"cannot read Parquet input {read_error(e, [u.path for u in units])}") from e
        df = df.withColumn("unit", F.col("_metadata.file_path"))
        where = units[0].path
    else:
        from quadmix_spark.core.storage import read_table

        frames = [read_table(spark, u.path, u.mtime).withColumn("unit", F.lit(f"{u.path}@v{u.mtime}")) for u in units]
        df = frames[0]
        for other in frames[1:]:
            df = df.unionByName(other, allowMissingColumns=True)
        where = units[0].path
    schema = T.StructType([f for f in df.schema.fields if f.name != "unit"])
    types = {f.name: f.dataType for f in schema.fields}
    if text_column not in types:
        raise IngestInputError(f"input {where}: no column {text_column!r} (columns: {sorted(types)}); set ingest.text_column")
    if not isinstance(types[text_column], T.StringType):
        raise IngestInputError(f"input {where}: column {text_column!r} is {types[text_column].simpleString()}, expected string")
    if id_column and id_column not in types:
        raise IngestInputError(
            f"input {where}: no column {id_column!r} (columns: {sorted(types)}); set ingest.id_column, or null to hash the text"
        )
    meta_fields = _meta_fields(schema, text_column, id_column, metadata_columns, where)
    id_col = F.col(id_column) if id_column else F.lit(None)
    id_is_struct = id_column and isinstance(types[id_column], (T.StructType, T.ArrayType, T.MapType))
    return df.select(
        "unit",
        F.lit(None).cast("string").alias("raw"),
        table_row_hash(types, text_column, id_column).alias("raw_hash"),
        F.lit(None).cast("string").alias("parse_error"),
        F.when(F.col(text_column).isNull(), F.lit("VOID")).otherwise(F.lit("STRING")).alias("text_kind"),
        F.col(text_column).alias("text"),
        (F.lit("OBJECT") if id_is_struct else F.when(id_col.isNull(), F.lit("VOID")).otherwise(F.lit("STRING"))).alias("id_kind"),
        (F.lit(None) if id_is_struct else id_col).cast("string").alias("id"),
        F.struct(*[F.col(f"`{f.name}`").alias(_safe_name(f.name)) for f in meta_fields]).alias("meta"),
    )


# ---------------------------------------------------------------- content digests of input files


def table_row_hash(types: dict[str, T.DataType], text_column: str, id_column: str | None) -> Column:
    """A Parquet row's hash (its text and its id as a string; null for a nested id, which is rejected):
    what a file's content digest sums for table inputs."""
    nested = id_column and isinstance(types.get(id_column), (T.StructType, T.ArrayType, T.MapType))
    id_col = F.col(f"`{id_column}`").cast("string") if id_column and not nested else F.lit(None).cast("string")
    return F.xxhash64(F.col(f"`{text_column}`"), id_col)


def digest_aggregates() -> list[Column]:
    """Per-file aggregates of ``raw_hash`` (a hash of each JSONL line, or of each Parquet row's text and id):
    the row count and the hash sum. Order-independent, so any partitioning of the file gives the same."""
    return [F.count("*").alias("rows"), F.sum(F.col("raw_hash").cast("decimal(38,0)")).alias("hash_sum")]


def content_digest(rows: int, hash_sum, settings: str) -> str:
    """A file's digest: its row count, the sum of its rows' hashes, and the reading settings it was read with
    (``settings``), so that a touched file is read again after those change."""
    return f"{rows}:{hash_sum if hash_sum is not None else 0}:{settings}"


def unit_digests(spark: SparkSession, fmt: str, units: list[InputFile], text_column: str, id_column: str | None,
                 settings: str) -> dict[str, str]:
    """The content digest of each file of ``units`` (keyed by canonical path; an empty file has none),
    reading nothing but the lines (JSONL) or the text and id columns (Parquet): no parsing, no joins, no
    tokenizing. A file that cannot be read so (a bad gzip, a missing column) is left out: the full read
    that follows reports it."""
    paths = [u.path for u in units]
    try:
        if fmt == "jsonl":
            df = spark.read.text(paths).select(F.xxhash64("value").alias("raw_hash"), F.col("_metadata.file_path").alias("unit"))
        else:
            df = spark.read.parquet(*paths)
            types = {f.name: f.dataType for f in df.schema.fields}
            df = df.select(table_row_hash(types, text_column, id_column).alias("raw_hash"), F.col("_metadata.file_path").alias("unit"))
        rows = df.groupBy("unit").agg(*digest_aggregates()).collect()
    except Exception:  # noqa: BLE001 - see the docstring
        return {}
    return {metadata_path(r["unit"]): content_digest(r["rows"], r["hash_sum"], settings) for r in rows}


def canonical(path: str) -> str:
    """``file:/x``, ``file:///x`` and ``/x`` name the same file."""
    if path.startswith("file:"):
        path = "/" + path.removeprefix("file:").lstrip("/")
    return path


def metadata_path(uri: str) -> str:
    """The canonical path of a ``_metadata.file_path``, which is URL-encoded (a space is ``%20``) where a
    file listing's path is not."""
    from urllib.parse import unquote

    return canonical(unquote(uri))


def java_causes(e: BaseException) -> list[str]:
    """The messages of a Py4J error's Java exception and its causes, outermost first (empty for other errors)."""
    out, je = [], getattr(e, "java_exception", None)
    while je is not None and len(out) < 20:
        out.append(str(je.toString()).replace("  SQLSTATE", " SQLSTATE").split(" SQLSTATE:")[0].strip())
        je = je.getCause()
    return out


_FAILED_FILE = re.compile(r"Encountered error while reading file (\S+?)\.?$")


def failed_file(e: BaseException) -> str | None:
    """``<file>: <root cause>`` when ``e`` is Spark failing to read an input file (for example a truncated
    gzip), else ``None``."""
    causes = java_causes(e)
    for msg in causes:
        m = _FAILED_FILE.search(msg)
        if m:
            return f"{m.group(1)}: {causes[-1] if causes[-1] != msg else 'unreadable'}"
    return None


def read_error(e: BaseException, files: list[str]) -> str:
    """What failed reading ``files``: the file and its root cause where Spark names one, else the first
    files and the deepest cause."""
    named = failed_file(e)
    if named:
        return named
    causes = java_causes(e)
    return f"{files[:3]}{'...' if len(files) > 3 else ''}: {causes[-1] if causes else _first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
