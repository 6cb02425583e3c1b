"""Session fixtures of the cluster tests: a standalone Spark cluster (master + 2 workers) and an MLflow
tracking server, both real and on 127.0.0.1; a small corpus with bad rows; the local-mode reference run.

Everything started here is stopped by pid in ``finally``, whatever the tests did (a killed worker included).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.cluster.loopback import LoopbackCluster, MlflowServer
from tests.cluster.pipeline import PIPELINE, Context, run_in_process
from tests.conftest import DATA

CORPUS_DOCS = 400  # real pages from the shared sample (~3 KB each), plus the bad rows below


@pytest.fixture(scope="session", autouse=True)
def _requirements():
    if shutil.which("java") is None:
        pytest.skip("cluster tests need Java 17+ on PATH (the standalone master and workers are JVMs)")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, _requirements):
    """A Spark standalone master and two 1-core, 1 GiB workers on 127.0.0.1 (free ports)."""
    c = LoopbackCluster(tmp_path_factory.mktemp("spark-cluster"), python=sys.executable, workers=2,
                        worker_cores=1, worker_memory="1g", daemon_memory="384m", start_timeout=240)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, _requirements):
    """``mlflow server`` over HTTP on 127.0.0.1 with a SQLite store and proxied artifacts."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), python=sys.executable, start_timeout=240)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bad_rows(first: dict) -> list[str]:
    """One input line per reject reason JSONL can produce, plus a blank line."""
    dup = json.dumps(first)
    conflict = json.dumps({**first, "text": first["text"] + " (edited)", "id": "conflict-1"})
    return [
        "{not json",
        '["an", "array"]',
        json.dumps({"id": "no-text"}),
        json.dumps({"id": "null-text", "text": None}),
        json.dumps({"id": "number-text", "text": 42}),
        json.dumps({"id": "empty-text", "text": "  \n "}),
        json.dumps({"text": "a page without an id"}),
        dup,                                             # same id, same text: duplicate
        json.dumps({**first, "id": "conflict-1"}),       # same id, different texts: id_conflict (both)
        conflict,
        "",
    ]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A JSONL file: the first ``CORPUS_DOCS`` pages of the shared Common Crawl sample, then bad rows."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as src, open(path, "w") as out:
        first = None
        for i, line in enumerate(src):
            if i == CORPUS_DOCS:
                break
            first = first or json.loads(line)
            out.write(line)
        out.write("\n".join(bad_rows(first)) + "\n")
    return path


@pytest.fixture(scope="session")
def scorer_models(tmp_path_factory) -> Path:
    """Where the pipeline's ``train-scorers`` stage writes and every annotate run reads the scorer models."""
    path = tmp_path_factory.mktemp("models")
    os.environ["QUADMIX_TEST_MODELS"] = str(path)  # read by tests/cluster/pipeline.yaml, here and in spark-submit
    return path


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory, spark, corpus, scorer_models) -> tuple[Context, str]:
    """The whole ``PIPELINE`` run in-process on the local session: the expected output of the cluster runs."""
    ctx = Context(corpus=corpus, root=tmp_path_factory.mktemp("local-root"))
    uri = f"sqlite:///{ctx.root / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        for run in PIPELINE:
            run_in_process(run, ctx, uri)
    finally:  # configure_mlflow sets MLFLOW_TRACKING_URI for the process: do not leak it to later tests
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return ctx, uri
