"""Delta table access by identifier: a path (local folder or cloud URI) or a ``catalog.schema.table`` name."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pyspark.sql import DataFrame, SparkSession


T = TypeVar("T")
CONFLICT_RETRIES = 5


def retry_conflicts(write: Callable[[], T], what: str, attempts: int = CONFLICT_RETRIES) -> T:
    """Run ``write``, again (up to ``attempts`` in all) when Delta refuses its commit because a concurrent
    writer committed first; a refused commit has written nothing.

    Only for writes that give the same table whatever ran between two tries (a replaceWhere of the
    writer's own slice, a MERGE on a key, an append with ``txnAppId``). Each retry is reported on stderr."""
    from delta.exceptions import (
        ConcurrentAppendException,
        ConcurrentDeleteDeleteException,
        ConcurrentDeleteReadException,
        ConcurrentTransactionException,
        ConcurrentWriteException,
        DeltaConcurrentModificationException,
        MetadataChangedException,
        ProtocolChangedException,
    )

    conflicts = (ConcurrentAppendException, ConcurrentDeleteDeleteException, ConcurrentDeleteReadException,
                 ConcurrentTransactionException, ConcurrentWriteException, DeltaConcurrentModificationException,
                 MetadataChangedException, ProtocolChangedException)
    for attempt in range(2, attempts + 1):
        try:
            return write()
        except conflicts as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"{what}: a concurrent writer committed first ({type(e).__name__}: {first}); "
                  f"writing again ({attempt}/{attempts})", file=sys.stderr)
    return write()


def is_path(table: str) -> bool:
    return "/" in table or "://" in table


def table_exists(spark: SparkSession, table: str) -> bool:
    if is_path(table):
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(spark, table)
    return spark.catalog.tableExists(table)


def read_table(spark: SparkSession, table: str, version: int | None = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(table) if is_path(table) else reader.table(table)


def table_version(spark: SparkSession, table: str) -> int | None:
    """The latest commit version, or None when the table does not exist."""
    if not table_exists(spark, table):
        return None
    from delta.tables import DeltaTable

    dt = DeltaTable.forPath(spark, table) if is_path(table) else DeltaTable.forName(spark, table)
    return int(dt.history(1).select("version").first()[0])


def write_table(
    df: DataFrame,
    table: str,
    *,
    mode: str = "append",
    metadata: dict[str, Any] | None = None,
    txn: tuple[str, int] | None = None,
    merge_schema: bool = False,
    replace_where: str | None = None,
) -> None:
    """Write ``df`` as Delta.

    ``txn=(app_id, version)`` makes an append idempotent: Delta skips a write whose app id already
    committed that version, so a retried job does not append twice. ``metadata`` lands in the commit's
    ``userMetadata``. ``replace_where`` (with ``mode="overwrite"``) replaces only the rows matching it.
    """
    writer = df.write.format("delta").mode(mode)
    if metadata:
        writer = writer.option("userMetadata", json.dumps(metadata, sort_keys=True, default=str))
    if txn:
        writer = writer.option("txnAppId", txn[0]).option("txnVersion", str(txn[1]))
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
    if replace_where is not None:
        writer = writer.option("replaceWhere", replace_where)
    if is_path(table):
        writer.save(table)
    else:
        writer.saveAsTable(table)


def replace_slice(df: DataFrame, table: str, predicate: str, metadata: dict[str, Any] | None = None) -> None:
    """Overwrite the rows of ``table`` matching ``predicate`` (a run's or θ's slice) with ``df``: idempotent, and
    written again when a concurrent writer of another slice commits first. A path table is written with
    replaceWhere even when it does not exist yet: a plain overwrite would erase a slice another run committed
    meanwhile."""
    def write() -> None:
        where = predicate if is_path(table) or table_exists(df.sparkSession, table) else None
        write_table(df, table, mode="overwrite", metadata=metadata, replace_where=where)

    retry_conflicts(write, f"{table} [{predicate}]")
