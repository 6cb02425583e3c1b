"""The pipeline on a real standalone cluster (2 workers on 127.0.0.1) gives the local-mode output, tracked
on a real MLflow server; and it still does when a worker dies in the middle of a job."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.cluster.loopback import descendants, free_port, http_json, wait_until
from tests.cluster.pipeline import EXPERIMENT, PIPELINE, VOLATILE_COLUMNS, Context, StageRun, finish, stop_submission, submit_stage

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

SUBMIT_TIMEOUT = 900  # seconds for one stage on the loopback cluster (a busy 2-core machine is slow)


def read_table(spark, root: Path, name: str):
    from quadmix_spark.core.storage import read_table as read

    return read(spark, f"{root}/tables/{name}")


def assert_same_tables(spark, run: StageRun, got_root: Path, want_root: Path) -> None:
    from pyspark.testing import assertDataFrameEqual

    for name in run.tables:
        got, want = read_table(spark, got_root, name), read_table(spark, want_root, name)
        drop = VOLATILE_COLUMNS.get(name, ())
        assert want.count() > 0, f"{run.stage}: the local run wrote no {name} rows"
        assertDataFrameEqual(got.drop(*drop), want.drop(*drop), checkRowOrder=False)


def stage_runs(tracking_uri: str, stage: str, root: Path) -> list:
    """Finished MLflow runs of ``stage`` in the test experiment whose logged config has storage root ``root``."""
    import tempfile

    import yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no experiment {EXPERIMENT!r} at {tracking_uri}"
    out = []
    for r in client.search_runs([exp.experiment_id], filter_string=f"tags.`quadmix.stage` = '{stage}'"):
        with tempfile.TemporaryDirectory() as d:  # the artifact comes back through the server's proxy
            config = yaml.safe_load(Path(client.download_artifacts(r.info.run_id, "config.yaml", d)).read_text())
        if config["storage"]["root"] == str(root):
            out.append(r)
    return out


def assert_tracked_like_local(run: StageRun, server_uri: str, cluster_root: Path, local_uri: str, local_root: Path) -> None:
    remote = stage_runs(server_uri, run.stage, cluster_root)
    assert len(remote) == 1, f"{run.stage}: expected one run on the MLflow server for {cluster_root}, got {len(remote)}"
    local = stage_runs(local_uri, run.stage, local_root)
    assert len(local) == 1
    r, l = remote[0], local[0]
    assert r.info.status == "FINISHED"
    for key in run.metrics:
        assert key in r.data.metrics, f"{run.stage}: metric {key} missing on the server run"
        assert r.data.metrics[key] == l.data.metrics[key], f"{run.stage}: {key} {r.data.metrics[key]} != local {l.data.metrics[key]}"


def search_results(tracking_uri: str, root: Path) -> tuple[dict[str, float], str]:
    """({θ id: target_loss} of the search's proxies, θ* id) in the store of ``root``."""
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    parents = stage_runs(tracking_uri, "propose", root)
    assert len(parents) == 1, f"one search parent run expected for {root}, got {len(parents)}"
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    losses = {r.data.tags["quadmix.theta_id"]: r.data.metrics.get("target_loss") for r in children}
    fits = client.search_runs([exp.experiment_id],
                              filter_string="tags.`quadmix.role` = 'search-fit' and tags.`quadmix.search` = 'cluster'")
    assert len(fits) == 1, f"one search fit expected at {tracking_uri}, got {len(fits)}"
    with tempfile.TemporaryDirectory() as d:
        star = json.loads(Path(client.download_artifacts(fits[0].info.run_id, "theta_star.json", d)).read_text())
    return losses, star["theta_id"]


def test_pipeline_on_cluster_equals_local(cluster, mlflow_server, local_reference, spark, tmp_path):
    local_ctx, local_uri = local_reference
    ctx = Context(corpus=local_ctx.corpus, root=tmp_path / "cluster-root")
    on_cluster = [run for run in PIPELINE if run.cluster]
    for run in on_cluster:
        sub = submit_stage(run, ctx, cluster.url, mlflow_server.url, tmp_path / "logs")
        finish(sub, SUBMIT_TIMEOUT)
    # the applications ran on the cluster's two workers and finished
    apps = cluster.master_state()["completedapps"]
    assert {f"quadmix-{run.stage}" for run in on_cluster if run.spark_app} <= {a["name"] for a in apps}
    for run in on_cluster:
        assert_same_tables(spark, run, ctx.root, local_ctx.root)
        if run.metrics:
            assert_tracked_like_local(run, mlflow_server.url, ctx.root, local_uri, local_ctx.root)
    # the ingest report's bookkeeping holds on the cluster run
    docs = read_table(spark, ctx.root, "documents").count()
    rejects = read_table(spark, ctx.root, "rejects").count()
    assert docs >= 390 and rejects >= 10
    # the proxies trained on the executors logged to the server the same losses as the local run, and the
    # search derived the same θ*
    got_losses, got_star = search_results(mlflow_server.url, ctx.root)
    want_losses, want_star = search_results(local_uri, local_ctx.root)
    assert len(want_losses) == 4 and all(v is not None for v in want_losses.values())
    assert got_losses.keys() == want_losses.keys()
    for theta_id, loss in want_losses.items():
        assert got_losses[theta_id] == pytest.approx(loss, rel=1e-6), theta_id
    assert got_star and got_star == want_star


# ---------------------------------------------------------------- a worker dies mid-job


def _events(log_dir: Path, app_id: str) -> list[dict]:
    """The application's Spark event log: one file, or the parts of a rolling log (``eventlog_v2_<app>/``)."""
    single = log_dir / app_id
    if single.exists():
        parts = [single]
    else:
        rolling = log_dir / f"eventlog_v2_{app_id}"
        index = lambda p: int(p.name.split("_")[1])  # noqa: E731 - events_<n>_<app id>
        parts = sorted(rolling.glob("events_*"), key=index) if rolling.is_dir() else []
    assert parts, f"no event log of {app_id} in {sorted(p.name for p in log_dir.iterdir())}"
    return [json.loads(line) for p in parts for line in p.read_text().splitlines() if line.strip()]


def _busy_executor_with_state(cluster, ui: str, app_id: str) -> tuple[int, dict] | None:
    """(worker index, driver's record) of an executor that runs a task now *and* holds state the rest of
    the job needs (shuffle output or cached blocks), so losing it forces recomputation; else None."""
    for ex in http_json(f"{ui}/api/v1/applications/{app_id}/executors"):
        if ex["id"] == "driver" or not ex.get("isActive") or ex.get("activeTasks", 0) < 1:
            continue
        if ex.get("totalShuffleWrite", 0) <= 0 and ex.get("rddBlocks", 0) <= 0:
            continue
        for i, w in enumerate(cluster.workers):
            if w.killed:
                continue
            running = cluster.worker_state(i).get("executors", [])
            if any(str(e.get("id")) == ex["id"] and e.get("appid") == app_id for e in running):
                return i, ex
    return None


def test_worker_killed_mid_job_same_output(cluster, mlflow_server, local_reference, spark, tmp_path):
    local_ctx, _ = local_reference
    run = PIPELINE[0]  # ingest: reads, shuffles (duplicate checks), tokenizes in Python, caches, writes
    ctx = Context(corpus=local_ctx.corpus, root=tmp_path / "cluster-root")
    events_dir = tmp_path / "events"
    events_dir.mkdir()
    ui_port = free_port()
    confs = {
        "spark.ui.port": str(ui_port),
        "spark.port.maxRetries": "0",  # the UI is on ui_port or the job fails: we never watch another app
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": events_dir.as_uri(),
        "spark.eventLog.compress": "false",
        "spark.eventLog.rolling.enabled": "false",
    }
    assert len(cluster.alive_workers()) == 2
    sub = submit_stage(run, ctx, cluster.url, mlflow_server.url, tmp_path / "logs", confs=confs)
    victim = None
    try:
        ui = f"http://127.0.0.1:{ui_port}"
        app_id = wait_until("the application on the driver UI", lambda: http_json(f"{ui}/api/v1/applications")[0]["id"],
                            SUBMIT_TIMEOUT, alive=lambda: None if sub.proc.poll() is None else "spark-submit exited")
        # both executors up, then: the first moment an executor runs a task, crash its worker
        wait_until("two executors", lambda: len([e for e in http_json(f"{ui}/api/v1/applications/{app_id}/executors")
                                                  if e["id"] != "driver"]) == 2,
                   SUBMIT_TIMEOUT, alive=lambda: None if sub.proc.poll() is None else "spark-submit exited")
        i, seen = wait_until(
            "an executor holding shuffle output or cached blocks to run a task",
            lambda: _busy_executor_with_state(cluster, ui, app_id), SUBMIT_TIMEOUT, interval=0.05,
            alive=lambda: None if sub.proc.poll() is None else "spark-submit exited before that was seen")
        executor_id = seen["id"]
        app_running = http_json(f"{ui}/api/v1/applications/{app_id}")["attempts"][0]["completed"] is False
        killed_at_ms = int(time.time() * 1000)
        victim = cluster.kill_worker(i)
        assert app_running and sub.proc.poll() is None, "the application had ended before the kill"
        finish(sub, SUBMIT_TIMEOUT)
    finally:
        stop_submission(sub)
        if victim is not None:
            cluster.restart_worker(i)  # the session's cluster has two workers again for any later test

    events = _events(events_dir, app_id)
    by = lambda name: [e for e in events if e["Event"] == name]  # noqa: E731
    app_end = by("SparkListenerApplicationEnd")[0]["Timestamp"]
    removed = [e for e in by("SparkListenerExecutorRemoved") if e["Executor ID"] == executor_id]
    assert removed, f"executor {executor_id} on the killed worker was never removed"
    removed_at = removed[0]["Timestamp"]
    assert killed_at_ms - 1000 <= removed_at < app_end, "the executor was not lost while the application ran"
    # the work went on without it: tasks started after the loss, all on the surviving executor, all jobs succeeded
    later = [e["Task Info"] for e in by("SparkListenerTaskStart") if e["Task Info"]["Launch Time"] > removed_at]
    assert later and all(t["Executor ID"] != executor_id for t in later)
    assert all(e["Job Result"]["Result"] == "JobSucceeded" for e in by("SparkListenerJobEnd"))
    lost = [e for e in by("SparkListenerTaskEnd") if e["Task End Reason"].get("Reason") == "ExecutorLostFailure"]
    retried = [e for e in by("SparkListenerStageSubmitted") if e["Stage Info"]["Stage Attempt ID"] > 0]
    print(f"\nkilled worker {i + 1} while its executor {executor_id} ran {seen['activeTasks']} task(s) and held "
          f"{seen['totalShuffleWrite']} bytes of shuffle output and {seen['rddBlocks']} cached blocks; "
          f"{len(lost)} task(s) lost with it, {len(retried)} stage(s) re-attempted, {len(later)} tasks after the loss")
    # and the output is exactly the local one
    assert_same_tables(spark, run, ctx.root, local_ctx.root)


# ---------------------------------------------------------------- the packed environment


def _packed_python_workers(cluster) -> list[str]:
    """Command lines of the executors' Python processes started from the shipped ``./environment``."""
    found = []
    for w in cluster.workers:
        for pid in descendants(w.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "environment/bin/python" in cmdline:
                found.append(cmdline)
    return found


@pytest.mark.skipif(os.environ.get("QUADMIX_TEST_PACKED_ENV") != "1",
                    reason="builds the packed environment (minutes, once per lock file): set QUADMIX_TEST_PACKED_ENV=1")
def test_packed_environment_on_cluster(cluster, mlflow_server, local_reference, spark, tmp_path):
    """The production path: submit.sh builds the wheel and the venv-pack archive, ships it with --archives,
    and the executors' Python workers run ./environment/bin/python; the output is the local one."""
    local_ctx, _ = local_reference
    run = PIPELINE[0]
    ctx = Context(corpus=local_ctx.corpus, root=tmp_path / "cluster-root")
    sub = submit_stage(run, ctx, cluster.url, mlflow_server.url, tmp_path / "logs", python_env="packed")
    try:
        workers = wait_until("a Python worker started from the packed environment", lambda: _packed_python_workers(cluster),
                             2 * SUBMIT_TIMEOUT, interval=0.1,
                             alive=lambda: None if sub.proc.poll() is None else f"submit.sh exited:\n{sub.output()[-3000:]}")
        finish(sub, 2 * SUBMIT_TIMEOUT)
    finally:
        stop_submission(sub)
    print(f"\nexecutor Python workers: {sorted(set(workers))}")
    assert_same_tables(spark, run, ctx.root, local_ctx.root)
