"""Exact within-group cumulative weights: equal to the numpy kernel for any partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from quadmix_spark.kernel.rank import within_domain_rank
from quadmix_spark.curation.prefix import within_group_cumulative

pytestmark = pytest.mark.spark


def test_cumulative_weights_match_the_kernel_for_any_partitioning_and_batching(spark):
    rng = np.random.default_rng(7)
    n = 3000
    group = np.where(rng.random(n) < 0.9, 0, rng.integers(1, 6, n))  # one group holds ~90% of the rows
    value = np.round(rng.random(n), 2)  # many ties
    weight = rng.integers(1, 500, n)
    rows = [(i, int(g), float(v), int(w)) for i, (g, v, w) in enumerate(zip(group, value, weight))]
    df = spark.createDataFrame(rows, "id long, g long, v double, w long").repartition(3)
    expected = within_domain_rank(value, group, weight)

    old = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "37")  # tie groups straddle batches
    try:
        for parts in (1, 7):
            with within_group_cumulative(df, "g", "v", "w", n_partitions=parts) as ranked:
                got = {r.id: r.cum_weight / r.group_weight for r in ranked.select("id", "cum_weight", "group_weight").collect()}
            assert np.array_equal(np.array([got[i] for i in range(n)]), expected)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", old)


def test_spark_hash_int_and_partition_labels_match_spark(spark):
    from pyspark.sql import functions as F

    from quadmix_spark.curation.prefix import partition_labels, spark_hash_int

    values = [0, 1, 2, 7, 42, -1, -123456, 2**31 - 1, -(2**31), 99991]
    got = spark.createDataFrame([(v,) for v in values], "v int").select(F.hash("v").alias("h")).collect()
    assert [r.h for r in got] == [spark_hash_int(v) for v in values]
    labels = partition_labels(12, 5)
    df = spark.createDataFrame([(i, lab) for i, lab in enumerate(labels)], "i int, lab int").repartition(5, "lab")
    placed = {r.i: r.p for r in df.select("i", F.spark_partition_id().alias("p")).collect()}
    assert placed == {i: i % 5 for i in range(12)}


def test_cell_cumulative_matches_the_kernel_for_any_partitioning_and_batching(spark):
    from quadmix_spark.curation.prefix import balanced_cuts, cell_cumulative

    rng = np.random.default_rng(11)
    n, bins = 3000, 16
    group = np.where(rng.random(n) < 0.9, 0, rng.integers(1, 6, n))  # one group holds ~90% of the rows
    value = np.round(rng.random(n), 2)  # many ties
    weight = rng.integers(1, 500, n)
    cell = group * bins + np.minimum((value * bins).astype(np.int64), bins - 1)
    mass = np.bincount(cell, weights=weight, minlength=6 * bins).astype(np.int64)
    before_in_group = (np.cumsum(mass.reshape(6, bins), axis=1) - mass.reshape(6, bins)).ravel()
    cells = np.flatnonzero(mass)
    expected = within_domain_rank(value, group, weight) * np.bincount(group, weights=weight)[group]
    rows = [(i, int(c), float(v), int(w)) for i, (c, v, w) in enumerate(zip(cell, value, weight))]
    df = spark.createDataFrame(rows, "id long, c long, v double, w long").repartition(3)

    old = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "37")  # tie groups and cells straddle batches
    try:
        shipped = spark.sparkContext.broadcast((cells, before_in_group[cells]))
        for parts, runs, known in ((1, 1, (cells, before_in_group[cells])), (7, 5, shipped), (4, 40, shipped)):
            cuts = cells[balanced_cuts(mass[cells], runs)]
            ranked = cell_cumulative(df, "c", "v", "w", known, cuts, n_partitions=parts)
            got = {r.id: r.cum_weight for r in ranked.select("id", "cum_weight").collect()}
            assert np.allclose(np.array([got[i] for i in range(n)], dtype=np.float64), expected, rtol=0, atol=1e-6)
    finally:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", old)
