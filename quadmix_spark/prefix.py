"""Exact within-group cumulative weights at scale: a range-partitioned sort plus per-partition offsets.

For every row, ``cum_weight`` = sum of ``weight`` over the rows of the same ``group`` whose ``value`` is
<= this row's value (ties inclusive), and ``group_weight`` = the group's total. This is the token-weighted
percentile numerator of QuaDMix's Eq. 2 (and of σ's flipped percentile), computed exactly without a
window partitioned by group (which would put a whole domain into one task):

1. ``repartitionByRange(P, group, value)`` splits every group, however large, over as many partitions as
   its share of the rows; equal (group, value) keys always land in the same partition, so a tie group is
   never split across partitions;
2. one aggregation gives each (partition, group) weight; on the driver these become offsets (weight of
   the group in earlier partitions) — at most P + groups numbers;
3. one ``mapInPandas`` pass adds the running sum inside each partition to its offset, holding back the
   last tie group of an Arrow batch until the next batch so ties get the cumulative weight at their end.

Weights are integers (token counts), so every sum is exact and the result does not depend on the number
of partitions.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

_PID = "_qm_pid"


@contextmanager
def within_group_cumulative(
    df: DataFrame, group: str, value: str, weight: str, n_partitions: int | None = None
) -> Iterator[DataFrame]:
    """Yield ``df`` plus ``cum_weight`` and ``group_weight`` (bigint), sorted by (group, value).

    ``group`` must be an integer column, ``weight`` a non-negative integer column, ``value`` any
    orderable column without nulls. The sorted input is persisted while the context is open.
    """
    spark = df.sparkSession
    parts = n_partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    ordered = (
        df.repartitionByRange(parts, group, value)
        .sortWithinPartitions(group, value)
        .withColumn(_PID, F.spark_partition_id())
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        sums = ordered.groupBy(_PID, group).agg(F.sum(weight).alias("w")).collect()
        offsets, totals = _offsets([(r[_PID], r[group], int(r["w"])) for r in sums])
        out_schema = T.StructType(
            [f for f in ordered.schema.fields]
            + [T.StructField("cum_weight", T.LongType()), T.StructField("group_weight", T.LongType())]
        )

        def add_cumulative(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            running: dict[int, int] = {}
            held: pd.DataFrame | None = None
            for batch in batches:
                if held is not None:
                    batch = pd.concat([held, batch], ignore_index=True)
                    held = None
                if batch.empty:
                    continue
                g = batch[group].to_numpy(np.int64)
                v = batch[value].to_numpy()
                last = (g == g[-1]) & (v == v[-1])
                # rows tied with the batch's last row may continue in the next batch: hold them back
                cut = len(batch) - int(np.argmin(last[::-1])) if not last.all() else 0
                done, held = batch.iloc[:cut], batch.iloc[cut:]
                if len(done):
                    yield _cumulate(done, group, value, weight, running, offsets, totals)
            if held is not None and len(held):
                yield _cumulate(held, group, value, weight, running, offsets, totals)

        yield ordered.mapInPandas(add_cumulative, out_schema)
    finally:
        ordered.unpersist()


def _offsets(sums: list[tuple[int, int, int]]) -> tuple[dict[tuple[int, int], int], dict[int, int]]:
    """(partition, group, weight) -> weight of the group in earlier partitions, and group totals."""
    by_group: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for pid, g, w in sums:
        by_group[g].append((pid, w))
    offsets, totals = {}, {}
    for g, items in by_group.items():
        acc = 0
        for pid, w in sorted(items):
            offsets[(pid, g)] = acc
            acc += w
        totals[g] = acc
    return offsets, totals


def _cumulate(batch, group, value, weight, running, offsets, totals) -> pd.DataFrame:
    """Cumulative weights of a sorted batch that ends at a tie-group boundary (updates ``running``)."""
    pid = int(batch[_PID].iloc[0])
    g = batch[group].to_numpy(np.int64)
    v = batch[value].to_numpy()
    w = batch[weight].to_numpy(np.int64)
    cum = np.cumsum(w)
    new_group = np.r_[True, g[1:] != g[:-1]]
    starts = np.flatnonzero(new_group)
    base = np.empty(len(starts), dtype=np.int64)
    for i, s in enumerate(starts):
        gi = int(g[s])
        prior = running.get(gi, offsets[(pid, gi)])
        base[i] = prior - (cum[s - 1] if s > 0 else 0)
    group_of = np.cumsum(new_group) - 1
    within = cum + base[group_of]
    ends = np.r_[(g[1:] != g[:-1]) | (v[1:] != v[:-1]), True]
    tie_of = np.cumsum(np.r_[True, ends[:-1]]) - 1
    tied = within[np.flatnonzero(ends)][tie_of]
    for i, s in enumerate(starts):
        e = starts[i + 1] - 1 if i + 1 < len(starts) else len(g) - 1
        running[int(g[s])] = int(within[e])
    out = batch.copy()
    out["cum_weight"] = tied
    out["group_weight"] = pd.Series(g).map(totals).to_numpy(np.int64)
    return out
