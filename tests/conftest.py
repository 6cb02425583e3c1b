"""Shared fixtures: one local SparkSession with Delta for the whole run, config builders, data paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUADMIX_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
TOKENIZER = DATA / "models" / "tokenizers" / "gpt_neox_20b.json"
DEFAULT_CONF = REPO / "conf" / "default.yaml"

os.environ.setdefault("QUADMIX_SHARED", str(SHARED))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def make_config(root: Path | str, *overrides: str):
    from quadmix_spark.core.config import load_config

    return load_config([DEFAULT_CONF], [f"storage.root={root}", *overrides])


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from quadmix_spark.core.session import get_spark

    cfg = make_config(
        tmp_path_factory.mktemp("spark"),
        "spark.master=local[2]",
        "spark.shuffle_partitions=4",
        "spark.driver_memory=2g",
        "spark.conf={spark.ui.enabled: 'false', spark.sql.adaptive.coalescePartitions.enabled: 'false'}",
    )
    session = get_spark(cfg)
    yield session
    session.stop()


@pytest.fixture
def cfg_factory(tmp_path):
    """``cfg_factory(*overrides)``: a config whose tables live in this test's temporary folder."""
    return lambda *overrides: make_config(tmp_path / "store", *overrides)
