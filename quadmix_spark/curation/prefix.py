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

:func:`cell_cumulative` is the variant for when a histogram of the values is already known (the sampler's
pass A): rows carry a cell (a (group, bin) index) whose preceding weight is known, so neither the range
bounds (a sampling pass over the input) nor the per-partition offsets (an aggregation pass) are needed;
runs of whole cells are placed on partitions by :func:`by_labels` (plain hash partitioning on labels chosen
so that run i lands in partition i mod P).
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
            for done in _tie_complete(batches, group, value):
                yield _cumulate(done, group, value, weight, running, offsets, totals)

        yield ordered.mapInPandas(add_cumulative, out_schema)
    finally:
        ordered.unpersist()


def _tie_complete(batches: Iterator[pd.DataFrame], key: str, value: str) -> Iterator[pd.DataFrame]:
    """The batches of a partition sorted by (key, value), re-cut so that rows tied on (key, value) are
    never split across two batches: rows tied with a batch's last row are held back for the next one."""
    held: pd.DataFrame | None = None
    for batch in batches:
        if held is not None:
            batch = pd.concat([held, batch], ignore_index=True)
            held = None
        if batch.empty:
            continue
        k = batch[key].to_numpy(np.int64)
        v = batch[value].to_numpy()
        last = (k == k[-1]) & (v == v[-1])
        cut = len(batch) - int(np.argmin(last[::-1])) if not last.all() else 0
        done, held = batch.iloc[:cut], batch.iloc[cut:]
        if len(done):
            yield done
    if held is not None and len(held):
        yield held


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


# ---------------------------------------------------------------- cells known in advance (no sampling pass)

_M32 = 0xFFFFFFFF


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``hash(CAST(value AS INT))`` (Murmur3 x86 32-bit of one 4-byte int, seed 42), a signed int."""
    k = (value & _M32) * 0xCC9E2D51 & _M32
    k = _rotl32(k, 15) * 0x1B873593 & _M32
    h = (seed & _M32) ^ k
    h = (_rotl32(h, 13) * 5 + 0xE6546B64) & _M32
    h ^= 4
    h ^= h >> 16
    h = h * 0x85EBCA6B & _M32
    h ^= h >> 13
    h = h * 0xC2B2AE35 & _M32
    h ^= h >> 16
    return h - (1 << 32) if h & 0x80000000 else h


def partition_labels(n_labels: int, n_partitions: int) -> list[int]:
    """Distinct int labels such that ``repartition(n_partitions, label)`` sends label i to partition
    ``i % n_partitions`` (Spark's hash partitioning is ``pmod(hash(label), n)``). Placement only balances
    the work: nothing computed downstream depends on it."""
    labels, nxt = [], 0
    for i in range(n_labels):
        want = i % n_partitions
        while spark_hash_int(nxt) % n_partitions != want:  # Python's % is pmod
            nxt += 1
        labels.append(nxt)
        nxt += 1
    return labels


def by_labels(df: DataFrame, index: str | F.Column, n_labels: int, n_partitions: int) -> DataFrame:
    """``df`` hash-repartitioned so that rows with ``index`` = i land in partition i % n_partitions."""
    labels = partition_labels(n_labels, n_partitions)
    col = F.col(index) if isinstance(index, str) else index
    label = F.element_at(F.array(*[F.lit(v) for v in labels]), col.cast("int") + 1)
    return df.repartition(n_partitions, label)


def balanced_cuts(cell_mass: np.ndarray, n_parts: int) -> np.ndarray:
    """Start cells of ``n_parts`` runs of consecutive cells with about equal mass (a cell is never split)."""
    mass = np.asarray(cell_mass, dtype=np.int64)
    total = int(mass.sum())
    if total <= 0 or n_parts <= 1:
        return np.zeros(1, dtype=np.int64)
    part = (np.cumsum(mass) - mass) * n_parts // total  # mass before the cell, in parts: monotone
    return np.flatnonzero(np.r_[True, part[1:] != part[:-1]]).astype(np.int64)


def cell_cumulative(
    df: DataFrame,
    cell: str,
    value: str,
    weight: str,
    known,
    cuts: np.ndarray,
    n_partitions: int | None = None,
    finish=None,
    out_schema: T.StructType | str | None = None,
) -> DataFrame:
    """``df`` plus ``cum_weight`` = ``cell_base`` of the row's cell + the weight of the rows of the same cell
    whose ``value`` is <= this row's (ties inclusive).

    The cells (integers, e.g. a (group, histogram bin) index, ordered so that a group's cells follow its
    values) and the weight before each of them are known in advance (``known`` = (cells sorted, cell_base
    aligned), int64 arrays, or a broadcast of that pair when they are large), so no pass is needed to find bounds or offsets: runs of whole cells (``cuts``: the first cell
    of each run, from :func:`balanced_cuts`) go to partitions round-robin, each is sorted by (cell, value)
    and summed in one ``mapInPandas``. Every row's cell must be in ``cells``. Integer weights: exact, and
    independent of the partitioning. ``finish`` (pandas -> pandas, with ``out_schema``) post-processes each
    output batch in the same Python pass.
    """
    spark = df.sparkSession
    parts = n_partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    cuts = np.asarray(cuts, dtype=np.int64)
    # the run index of a cell, in SQL: how many cuts are <= cell, minus one
    run_col = F.size(F.filter(F.array(*[F.lit(int(c)) for c in cuts]), lambda x: x <= F.col(cell))) - 1
    ordered = by_labels(df, run_col, len(cuts), parts).sortWithinPartitions(cell, value)
    if out_schema is None:
        out_schema = T.StructType(list(df.schema.fields) + [T.StructField("cum_weight", T.LongType())])

    def add_cumulative(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        cells, cell_base = (np.asarray(a, dtype=np.int64) for a in (known.value if hasattr(known, "value") else known))
        carry: tuple[int, int] | None = None  # (cell, weight so far) of the cell that ended the last batch
        for done in _tie_complete(batches, cell, value):
            out, carry = _cumulate_cells(done, cell, value, weight, cells, cell_base, carry)
            yield finish(out) if finish else out

    return ordered.mapInPandas(add_cumulative, out_schema)


def _cumulate_cells(batch, cell, value, weight, cells, cell_base, carry):
    """Cumulative weights of a batch sorted by (cell, value) that ends at a tie boundary."""
    c = batch[cell].to_numpy(np.int64)
    v = batch[value].to_numpy()
    w = batch[weight].to_numpy(np.int64)
    cum = np.cumsum(w)
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    pos = np.searchsorted(cells, c[starts])
    if (pos >= len(cells)).any() or (cells[np.minimum(pos, len(cells) - 1)] != c[starts]).any():
        raise ValueError("a row's cell is not among the known cells")
    prior = cell_base[pos].copy()
    if carry is not None and carry[0] == c[0]:
        prior[0] = carry[1]  # the batch continues the previous batch's last cell
    base = prior - np.r_[0, cum[starts[1:] - 1]]
    within = cum + base[np.cumsum(np.r_[True, c[1:] != c[:-1]]) - 1]
    ends = np.r_[(c[1:] != c[:-1]) | (v[1:] != v[:-1]), True]
    tie_of = np.cumsum(np.r_[True, ends[:-1]]) - 1
    out = batch.copy()
    out["cum_weight"] = within[np.flatnonzero(ends)][tie_of]
    return out, (int(c[-1]), int(within[-1]))
