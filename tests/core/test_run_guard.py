"""The stage guards on their own (the fault suite, tests/faults, drives them through real stages): leases held by
another process and freed by its death, stale MLflow runs ended, Delta conflicts retried, fault points parsed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import mlflow
import pytest

from quadmix_spark.core import faults
from quadmix_spark.core.run_guard import (
    StageBusy,
    end_stale_runs,
    lease,
    process_start,
    settle_children,
)
from quadmix_spark.core.runs import (TAG_CRITERIA, TAG_DOMAINS, TAG_FAILURE, TAG_HOST, TAG_LEASE, TAG_PID, TAG_PID_START,
                                     TAG_REFINE_FIT, TAG_REFINE_ROUND, TAG_SEARCH)
from quadmix_spark.core.storage import retry_conflicts
from tests.conftest import REPO, make_config

HOLDER = textwrap.dedent("""
    import sys
    from quadmix_spark.core.run_guard import lease
    from tests.conftest import make_config
    with lease(make_config(sys.argv[1]), "ingest", "ingest") as held:
        held.record("run-of-the-holder")
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_lease_names_its_holder_and_dies_with_it(tmp_path):
    cfg = make_config(tmp_path / "store")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "store")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageBusy) as busy:
            with lease(cfg, "ingest", "ingest"):
                pass
        assert "MLflow run run-of-the-holder" in str(busy.value) and f"pid {holder.pid}" in str(busy.value)
        with lease(cfg, "annotate", "annotate"):  # another scope is free
            pass
        holder.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops the lock
        holder.wait(timeout=30)
        with lease(cfg, "ingest", "ingest") as held:
            assert held.fd is not None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)


def test_stale_runs_end_failed_and_live_ones_stay(tmp_path):
    cfg = make_config(tmp_path / "store")
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.create_experiment("quadmix", artifact_location=(tmp_path / "artifacts").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    host = socket.gethostname()

    def running(pid: int, lease_key: str) -> str:
        tags = {TAG_HOST: host, TAG_PID: str(pid), TAG_PID_START: process_start(pid) or "", TAG_LEASE: lease_key}
        return client.create_run(exp, tags=tags).info.run_id

    other_store = make_config(tmp_path / "other")
    with lease(other_store, "ingest", "ingest") as theirs:  # a store sharing the tracking server
        live_elsewhere = running(os.getpid(), theirs.key)
    with lease(cfg, "ingest", "ingest") as held:
        dead, alive, same_scope = running(gone.pid, "annotate"), running(os.getpid(), "annotate"), running(os.getpid(), held.key)
        assert sorted(end_stale_runs(client, exp, held)) == sorted([dead, same_scope])
    for run_id, status in ((dead, "FAILED"), (same_scope, "FAILED"), (alive, "RUNNING"), (live_elsewhere, "RUNNING")):
        run = client.get_run(run_id)
        assert run.info.status == status
        assert ("interrupted" in run.data.tags.get(TAG_FAILURE, "")) == (status == "FAILED")


def test_an_incomplete_proposal_names_the_command_that_made_it(tmp_path):
    """A θ run that ``propose`` died while making (RUNNING, no θ params) is deleted under repair; otherwise the
    error names the command to run again: ``propose --refine`` for a refinement round's run."""
    cfg = make_config(tmp_path / "store")
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.create_experiment("quadmix", artifact_location=(tmp_path / "artifacts").as_uri())
    common = {TAG_SEARCH: "s", TAG_DOMAINS: '["a"]', TAG_CRITERIA: '["q"]'}
    plain = client.create_run(exp, run_name="theta-0003", tags=common)
    refined = client.create_run(exp, run_name="refine-r2-0001", tags={**common, TAG_REFINE_FIT: "fit9", TAG_REFINE_ROUND: "2"})
    with pytest.raises(ValueError) as err:
        settle_children(client, [plain], "target_loss", repair=False)
    assert "theta-0003" in str(err.value) and "run `quadmix propose` for this search" in str(err.value)
    assert "--refine" not in str(err.value)
    with pytest.raises(ValueError) as err:
        settle_children(client, [refined], "target_loss", repair=False)
    assert "refine-r2-0001" in str(err.value) and "round 2, from fit run fit9" in str(err.value)
    assert "run `quadmix propose --refine N` for this search" in str(err.value)
    assert settle_children(client, [client.get_run(plain.info.run_id), client.get_run(refined.info.run_id)],
                           "target_loss", repair=True) == []
    assert {client.get_run(r.info.run_id).info.lifecycle_stage for r in (plain, refined)} == {"deleted"}


def test_conflicts_are_retried_a_bounded_number_of_times(capsys):
    from delta.exceptions import ConcurrentAppendException

    calls = []

    def write(fail: int):
        calls.append(1)
        if len(calls) <= fail:
            raise ConcurrentAppendException("a concurrent WRITE added data")
        return "written"

    assert retry_conflicts(lambda: write(2), "selection [run = 'a']") == "written" and len(calls) == 3
    assert capsys.readouterr().err.count("selection [run = 'a']: a concurrent writer committed first") == 2
    calls.clear()
    with pytest.raises(ConcurrentAppendException):
        retry_conflicts(lambda: write(99), "t", attempts=3)
    assert len(calls) == 3


def test_fault_points_fire_at_their_nth_hit_only(tmp_path, monkeypatch):
    release = tmp_path / "go"
    release.touch()
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(faults.FAULT_ENV, f"stage.point@2:wait={release}")
    monkeypatch.setattr(faults, "_hits", {})
    faults.point("stage.other")
    faults.point("stage.point")
    assert not list(tmp_path.glob("stage.point.*"))
    faults.point("stage.point")  # the second hit: recorded, then waits for the (existing) release file
    assert [p.name for p in tmp_path.glob("stage.point.*")] == [f"stage.point.{os.getpid()}"]
    monkeypatch.setenv(faults.FAULT_ENV, "stage.point:explode")
    monkeypatch.setattr(faults, "_hits", {})
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        faults.point("stage.point")
    monkeypatch.delenv(faults.FAULT_ENV)
    sentinel = object()
    assert faults.during(sentinel, "stage.point") is sentinel  # unarmed: the frame itself, no extra stage


SETUP = textwrap.dedent("""
    import pathlib, sys, time
    from quadmix_spark.core.tracking import configure_mlflow
    from tests.conftest import make_config
    cfg = make_config(sys.argv[1])
    go = pathlib.Path(sys.argv[2])
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:  # every driver starts the store's set-up at once
        time.sleep(0.005)
    configure_mlflow(cfg)
    print("configured", flush=True)
""")


def test_several_drivers_set_up_one_new_mlflow_store_at_once(tmp_path):
    """MLflow creates a SQLite store's tables (and migrates them) without a guard: unguarded, two processes at
    once fail with 'table ... already exists' or a failed migration. configure_mlflow serializes it."""
    store, go = tmp_path / "store", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SETUP, str(store), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO) for _ in range(3)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        go.touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert all(p.returncode == 0 and "configured" in out for p, out in zip(procs, outputs)), outputs
    client = mlflow.MlflowClient(tracking_uri=make_config(store).tracking_uri)
    assert [e.name for e in client.search_experiments()].count("quadmix") == 1
