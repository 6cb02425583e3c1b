"""Two runs of a stage on one store at once: both succeed with correct tables (``sample`` of two runs), or the
second stops at once with a message naming the first (ingest, annotate, proxy of one search): never a
repeated key, never a table that differs from a single run's.

Each pair is started together, every process armed to wait at a fault point until the test releases it, so
the overlap is certain rather than a matter of timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from quadmix_spark.core.run_guard import BUSY_EXIT_CODE
from quadmix_spark.core.runs import TAG_PID
from quadmix_spark.core.storage import read_table
from tests.faults.pipeline import SEARCH
from tests.faults.harness import (
    KEYS,
    Attempt,
    all_runs,
    assert_runs_settled,
    assert_same_store,
    copy_store,
    export_digest,
    frame_digest,
    hits,
    run_ok,
    search_state,
    start,
    wait_for_hit,
)

pytestmark = [pytest.mark.faults, pytest.mark.spark]


def race(commands: list[list[str]], store: Path, tmp_path: Path, point: str) -> tuple[Attempt, Attempt]:
    """Start both commands together, each waiting at ``point`` (inside its stage run, lease held) until released.

    Exactly one gets there; the other must stop at once with the busy exit code and a message naming the
    first one's MLflow run and pid. Then the first is released and must succeed. Returns (winner, loser)."""
    go, hit_dir, logs = tmp_path / "go", tmp_path / "hits", tmp_path / "logs"
    attempts = [start(cmd, store, logs, fault=f"{point}:wait={go}", fault_dir=hit_dir, name=f"{cmd[0]}-{i}")
                for i, cmd in enumerate(commands)]
    try:
        hit = wait_for_hit(hit_dir, point, attempts)
        winner = next(a for a in attempts if hit.name == f"{point}.{a.pid}")
        loser = next(a for a in attempts if a is not winner)
        rc = loser.wait()
        assert rc == BUSY_EXIT_CODE, f"the second run exited {rc}:\n{loser.output()[-4000:]}"
        go.touch()
        rc = winner.wait()
        assert rc == 0, f"the first run exited {rc}:\n{winner.output()[-4000:]}"
    finally:
        go.touch()
        for a in attempts:
            a.stop()
    assert len(hits(hit_dir, point)) == 1
    first = all_runs(store, f"tags.`{TAG_PID}` = '{winner.pid}'")
    assert len(first) == 1 and first[0].info.status == "FINISHED"
    message = loser.output()
    assert first[0].info.run_id in message and f"pid {winner.pid}" in message, message[-2000:]
    assert not all_runs(store, f"tags.`{TAG_PID}` = '{loser.pid}'"), "the stopped run opened an MLflow run"
    return winner, loser


@pytest.mark.ci
def test_ingest_of_overlapping_inputs_at_once(pipeline, spark, tmp_path):
    store = copy_store(pipeline.before("ingest"), tmp_path / "store")
    a, b = pipeline.inputs
    _, loser = race([["ingest", "--input", str(a)], ["ingest", "--input", str(b)]], store, tmp_path, "ingest.start")
    run_ok(loser.args[:3], store, tmp_path / "logs")  # the stopped one, again: ingests what the other did not

    # the same documents as one ingest of both files (which file keeps a shared page depends on the order)
    same = ["doc_id", "text_hash", "n_tokens", "text"]
    docs = read_table(spark, str(store / "tables" / "documents")).select(*same)
    want = read_table(spark, str(pipeline.after("ingest") / "tables" / "documents")).select(*same)
    assert frame_digest(docs, ("doc_id",)) == frame_digest(want, ("doc_id",))
    log = read_table(spark, str(store / "tables" / "ingest_log"))
    balance = F.col("input_rows") == F.col("documents") + F.col("rejects") + F.col("blank_lines")
    assert log.count() == 2 and log.where(~balance).count() == 0
    assert log.agg(F.sum("input_rows")).first()[0] == 361  # 200 + 11 bad lines in a.jsonl, 150 in b.jsonl
    assert_runs_settled(store, None)


def test_annotate_twice_at_once(pipeline, spark, tmp_path):
    store = copy_store(pipeline.before("annotate"), tmp_path / "store")
    _, loser = race([["annotate"], ["annotate"]], store, tmp_path, "annotate.start")
    assert_same_store(spark, store, pipeline.after("annotate"))
    assert "nothing to do" in run_ok(loser.args[:1], store, tmp_path / "logs")
    assert_same_store(spark, store, pipeline.after("annotate"))
    assert_runs_settled(store, None)


@pytest.mark.ci
def test_proxy_of_one_search_twice_at_once(pipeline, spark, tmp_path):
    store = copy_store(pipeline.before("proxy"), tmp_path / "store")
    race([["proxy"], ["proxy"]], store, tmp_path, "proxy.start")
    assert_same_store(spark, store, pipeline.after("proxy"))
    got = search_state(store, SEARCH)
    assert got == search_state(pipeline.after("proxy"), SEARCH)
    assert all(v[1] == "FINISHED" and len(v[3]) == 1 for k, v in got.items() if k != "parent"), got
    assert_runs_settled(store, None)


@pytest.mark.parametrize("tables", ["new", pytest.param("existing", marks=pytest.mark.ci)])
def test_two_sample_runs_at_once_both_succeed(tables, pipeline, spark, tmp_path):
    """Run c1 is held inside its selection write (its Delta transaction open) until run c2 has committed
    everything and ended; c1's commit then conflicts (with the tables' creation, or with c2's slice of
    existing tables), is written again, and both runs equal the reference's run t1, which stays as it was."""
    reference = pipeline.after("sample")
    store = copy_store(pipeline.before("sample") if tables == "new" else reference, tmp_path / "store")
    go, hit_dir, logs = tmp_path / "go", tmp_path / "hits", tmp_path / "logs"
    theta = ["sample", "--random-theta", "7"]
    held = start([*theta, "--set", "sampling.run=c1"], store, logs, fault=f"sample.selection.write:wait={go}",
                 fault_dir=hit_dir, name="sample-c1")
    free = start([*theta, "--set", "sampling.run=c2"], store, logs, name="sample-c2")
    try:
        wait_for_hit(hit_dir, "sample.selection.write", [held])
        assert free.wait() == 0, free.output()[-4000:]
        go.touch()
        assert held.wait() == 0, held.output()[-4000:]
    finally:
        go.touch()
        held.stop()
        free.stop()
    assert "a concurrent writer committed first" in held.output(), held.output()[-3000:]

    runs = ("c1", "c2") if tables == "new" else ("t1", "c1", "c2")
    for table, key in (("selection", ("run", "doc_id")), ("training_output", KEYS["training_output"])):
        got = read_table(spark, str(store / "tables" / table))
        assert frame_digest(got, key).repeated_keys == 0
        assert {r.run for r in got.select("run").distinct().collect()} == set(runs)
        want = frame_digest(read_table(spark, str(reference / "tables" / table)).where(F.col("run") == "t1").drop("run"), None)
        for run in runs:
            assert frame_digest(got.where(F.col("run") == run).drop("run"), None) == want, (table, run)
    want = export_digest(spark, reference / "export" / "t1")
    for run in runs:
        assert export_digest(spark, store / "export" / run) == want, run
    stages = {r.data.tags.get("quadmix.run"): r.info.status for r in all_runs(store, "tags.`quadmix.stage` = 'sample'")}
    assert stages == {run: "FINISHED" for run in runs}
    assert_runs_settled(store, None)
