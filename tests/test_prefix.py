"""Exact within-group cumulative weights: equal to the numpy kernel for any partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from quadmix_spark.kernel.rank import within_domain_rank
from quadmix_spark.prefix import within_group_cumulative

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
