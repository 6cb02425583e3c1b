"""``bench.bench_scale``: what one point measures (bytes shuffled, peak RSS, the shipped functions) on real Spark,
and the whole benchmark end to end at toy sizes (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.spark


def test_a_point_measures_shuffle_memory_and_the_largest_shipped_function(spark):
    from pyspark.sql import functions as F

    from bench.bench_scale import measure

    big = np.arange(300_000, dtype=np.int64)  # 2.4 MB captured by the function below

    def touch(batches):
        for pdf in batches:
            yield pdf.assign(x=pdf["id"] + int(big[-1]))

    def job():
        df = spark.range(200_000, numPartitions=4).mapInPandas(touch, "id long, x long")
        return df.groupBy((F.col("x") % 97).alias("k")).count().collect()

    small = measure(spark, "no shuffle", lambda: spark.range(10).collect())
    point = measure(spark, "test point", job)
    assert point["wall_s"] > 0 and small["shuffle_bytes"] == 0
    assert point["shuffle_bytes"] > 0
    assert point["largest_function_bytes"] > big.nbytes > small["largest_function_bytes"]
    assert point["peak_rss_driver_jvm_bytes"] > 100e6 and point["peak_rss_driver_python_bytes"] > 10e6
    assert point["peak_rss_worker_python_bytes"] > 10e6  # the Python workers that ran the function


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_at_toy_sizes(tmp_path):
    env = {**os.environ, "QUADMIX_BENCH_DIR": str(tmp_path / "scratch")}
    results = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "bench.bench_scale", "--scale-rows", "2000,4000", "--scale-thetas", "2,3",
                    "--scale-theta-rows", "2000", "--scale-row-thetas", "2", "--scale-docs-rows", "2000",
                    "--results-dir", str(results)], cwd=REPO, env=env, check=True)
    scale = json.loads((results / "scale.json").read_text())
    assert [p["rows"] for p in scale["points"]["rows"]] == [2000, 4000]
    assert "sample_docs" in scale["points"]["rows"][0] and "sample_docs" not in scale["points"]["rows"][1]
    assert [p["k"] for p in scale["points"]["thetas"]] == [2, 3] and (results / "scale.png").exists()
    rows = json.loads((results / "scale_rows_growth.json").read_text())
    assert rows["value"] == max(rows["details"]["growth"].values()) and rows["ratio"] == rows["value"]
    theta = json.loads((results / "scale_theta_growth.json").read_text())
    per = [p["s_per_theta"] for p in theta["details"]["points"]]
    assert theta["value"] == pytest.approx(per[-1] / per[0], abs=1e-3)
