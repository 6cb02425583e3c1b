"""The session factory: embedded default with Delta, and a launcher's settings left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONF, REPO

pytestmark = pytest.mark.spark


def test_embedded_session_has_delta_and_arrow(spark, tmp_path):
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.sql.extensions") == "io.delta.sql.DeltaSparkSessionExtension"
    assert conf.get("spark.sql.execution.arrow.pyspark.enabled") == "true"
    assert "delta-spark" in conf.get("spark.jars", "")  # from the set-up cache, not resolved at start
    spark.range(3).write.format("delta").save(str(tmp_path / "t"))
    assert spark.read.format("delta").load(str(tmp_path / "t")).count() == 3


LAUNCHED = """
import json, sys
from quadmix_spark.core.config import load_config
from quadmix_spark.core.session import get_spark
cfg = load_config([sys.argv[1]], ["storage.root=" + sys.argv[2]])
s = get_spark(cfg)
c = s.sparkContext.getConf()
s.range(2).write.format("delta").save(sys.argv[2] + "/t")
print(json.dumps({k: c.get(k, None) for k in ["spark.master", "spark.sql.shuffle.partitions", "spark.app.name",
      "spark.sql.extensions"]} | {"rows": s.read.format("delta").load(sys.argv[2] + "/t").count()}))
"""


def spark_submit(tmp_path, *args):
    import pyspark

    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    return subprocess.run(
        [str(submit), "--master", "local[1]", "--conf", "spark.sql.shuffle.partitions=3", "--name", "launched",
         *args, str(script), str(DEFAULT_CONF), str(tmp_path / "root")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_spark_submit_settings_are_kept(tmp_path):
    import json

    from quadmix_spark.core.jars import cached_delta_jars

    out = spark_submit(tmp_path, "--jars", ",".join(cached_delta_jars()))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["spark.master"] == "local[1]" and got["spark.sql.shuffle.partitions"] == "3"
    assert got["spark.app.name"] == "launched"
    assert got["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension" and got["rows"] == 2


def test_spark_submit_without_delta_is_a_clear_error(tmp_path):
    out = spark_submit(tmp_path)
    assert out.returncode != 0 and "spark-submit started this job without Delta Lake" in out.stdout + out.stderr
