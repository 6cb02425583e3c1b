"""The one place jobs get their SparkSession.

Two cases:
- a launcher already configured Spark (spark-submit, Databricks, a notebook): its master and every conf it
  set are kept; we only add what is missing (the Delta extension/catalog, Arrow). Under spark-submit the
  Delta jars must come from the launcher (``--packages`` or ``--jars``): a running JVM cannot take them;
- nothing did: the embedded default, ``local[*]`` with Delta, a warehouse under ``storage.root``, Arrow on,
  and ``PYSPARK_PYTHON`` pointing at this interpreter so Python workers see the same packages.
"""

from __future__ import annotations

import os
import sys

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.core.jars import DELTA_PACKAGE, cache_root, cached_delta_jars

DELTA_CONFS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
ARROW_CONFS = {
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
}


def _launched_by_spark_submit() -> bool:
    # spark-submit (and Databricks) start the JVM first and hand the Python driver its gateway port.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _delta_on_classpath(conf: SparkConf) -> bool:
    for key in ("spark.jars.packages", "spark.jars"):
        if "delta-spark" in (conf.get(key) or ""):
            return True
    return False


def embedded_confs(cfg: QuadmixConfig) -> dict[str, str]:
    """Confs of the embedded default session (each applied only where the launcher set nothing)."""
    confs = {
        **DELTA_CONFS,
        **ARROW_CONFS,
        "spark.app.name": cfg.spark.app_name,
        "spark.driver.memory": cfg.spark.driver_memory,
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        "spark.sql.warehouse.dir": cfg.storage.path("warehouse"),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
        # Delta commits carry our run metadata; keep the log small on tiny local tables.
        "spark.databricks.delta.snapshotPartitions": "2",
    }
    confs.update(cfg.spark.conf)
    return confs


def get_spark(cfg: QuadmixConfig) -> SparkSession:
    """The job's SparkSession: the active or launcher-configured one, completed with Delta; else the embedded default."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not _launched_by_spark_submit():
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if _launched_by_spark_submit():
        # connect to the launcher's JVM first, so SparkConf() sees what it passed (master, --conf, --jars)
        SparkContext._ensure_initialized()
    conf = SparkConf()
    if not conf.contains("spark.master"):
        conf.setMaster(cfg.spark.master)
    for key, value in embedded_confs(cfg).items():
        if not conf.contains(key):
            conf.set(key, value)
    if not _delta_on_classpath(conf):
        if _launched_by_spark_submit():
            # the driver JVM is already running: jars added now never reach its class loader
            raise RuntimeError(
                "spark-submit started this job without Delta Lake: pass `--packages "
                f"{DELTA_PACKAGE}` or `--jars $(python -m quadmix_spark.core.jars --submit-jars)`"
            )
        jars = cached_delta_jars()
        if jars:
            existing = conf.get("spark.jars")
            conf.set("spark.jars", ",".join(([existing] if existing else []) + jars))
        else:  # not resolved at set-up: let Spark's Ivy resolve it now (slower start, needs Maven Central)
            conf.set("spark.jars.packages", DELTA_PACKAGE)
            conf.set("spark.jars.ivy", str(cache_root() / "ivy"))
    spark = SparkSession.builder.config(conf=conf).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("QUADMIX_SPARK_LOG_LEVEL", "WARN"))
    return spark
