"""The MLflow UI, as `make ui` serves it, lists the runs of an experiment: checked in headless Chromium.

Real parts only: an ingest run into a temporary store, `mlflow ui` with the Makefile's flags on a free
loopback port, Debian's Chromium. The screenshot is kept in ``$QUADMIX_TEST_ARTIFACTS`` (default
``build/test-artifacts/``, git-ignored) and its path printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.loopback import MlflowServer
from tests.conftest import DATA, REPO, make_config

pytestmark = [pytest.mark.cluster, pytest.mark.spark, pytest.mark.timeout(900)]

CHROMIUM = Path("/usr/bin/chromium")
EXPERIMENT = "quadmix-ui-test"
ARTIFACTS = Path(os.environ.get("QUADMIX_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with everything that would reach outside this machine turned off."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
             f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=15000"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def two_ingest_runs(spark, tmp_path, monkeypatch):
    """A store with two real ingest runs (two input files) and a proposed search in ``EXPERIMENT``;
    returns (root, experiment id, run ids to find listed)."""
    import gzip

    from quadmix_spark.jobs import ingest_job

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "store"
    inputs = tmp_path / "in"
    inputs.mkdir()
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as src:
        lines = [next(src) for _ in range(40)]
    (inputs / "a.jsonl").write_text("".join(lines[:20]))
    runs = []
    for part in ("a", "b"):
        if part == "b":
            (inputs / "b.jsonl").write_text("".join(lines[20:]))
        cfg = make_config(root, f"ingest.input={inputs}", f"tracking.experiment={EXPERIMENT}")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)  # configure_mlflow sets it; undone after
        report = ingest_job(cfg)
        assert report.documents == 20
    import mlflow

    from quadmix_spark.search.propose import propose

    # a search as `quadmix propose` makes it: a parent run with its θ nested under it
    search = propose(make_config(root, f"tracking.experiment={EXPERIMENT}", "search.name=ui"),
                     ["news", "science"], ["dclm", "edu"], 3)
    client = mlflow.MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`quadmix.stage` = 'ingest'")
    assert len(runs) == 2
    return root, exp.experiment_id, [r.info.run_id for r in runs] + [search.parent_run_id]


def test_mlflow_ui_lists_the_runs(two_ingest_runs, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium: apt-get update && apt-get install -y chromium")
    root, experiment_id, run_ids = two_ingest_runs
    # `make ui`: mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///<root>/mlflow.db
    server = MlflowServer(tmp_path / "ui", python=sys.executable, backend_store=root.resolve() / "mlflow.db",
                          subcommand="ui", serve_artifacts=False, start_timeout=240)
    server.start()
    try:
        url = f"{server.url}/#/experiments/{experiment_id}/runs"
        dom = chromium(tmp_path / "profile-dom", "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "mlflow-ui-runs.png"
        shot.unlink(missing_ok=True)
        png = chromium(tmp_path / "profile-shot", f"--screenshot={shot}", url)
        assert png.returncode == 0, png.stderr[-2000:]
    finally:
        server.stop()
    html = dom.stdout
    assert EXPERIMENT in html
    for run_id in run_ids:  # each run is a row linking to its page
        assert f"#/experiments/{experiment_id}/runs/{run_id}" in html, f"run {run_id} is not listed"
    assert len(re.findall(r">ingest</span>", html)) == 2
    assert ">search-ui<" in html  # the search's parent run, its proxies nested under it
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"\nMLflow UI screenshot: {shot}")
