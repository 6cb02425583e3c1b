"""A killed driver: each stage SIGKILLed (its whole process group) at named points before, during and right
after its Delta commits, then the same command run again: every table equals the uninterrupted run's, no
key is repeated, and no MLflow run is left RUNNING (the killed attempt's stage run ends FAILED, saying why).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from tests.faults.pipeline import SEARCH
from tests.faults.harness import assert_runs_settled, assert_same_store, copy_store, hits, run_ok, search_state, start

pytestmark = [pytest.mark.faults, pytest.mark.spark]


@dataclass(frozen=True)
class KillPoint:
    stage: str  # the pipeline stage whose command is run (tests/faults/conftest.py)
    point: str  # QUADMIX_FAULT: the fault point, @n for its n-th hit
    state: str  # what the store holds when the driver dies
    ci: bool = False  # in the subset `.ci/run` runs (`make test-faults-ci`): one point per stage that writes

    @property
    def name(self) -> str:
        return self.point.partition("@")[0]


KILL_POINTS = [
    KillPoint("ingest", "ingest.start", "nothing: the MLflow run is open, Spark not started"),
    KillPoint("ingest", "ingest.documents.write", "documents append running in tasks, nothing committed"),
    KillPoint("ingest", "ingest.documents.committed", "documents committed; rejects and ingest_log not", ci=True),
    KillPoint("ingest", "ingest.end", "every commit made (ingest_log last); the MLflow run not ended"),
    KillPoint("annotate", "annotate.created", "the empty annotations table committed, no score"),
    KillPoint("annotate", "annotate.scores.write", "the scores' append running in tasks (models scoring)", ci=True),
    KillPoint("annotate", "annotate.end", "annotations committed; the MLflow run not ended"),
    KillPoint("normalize", "normalize.start", "nothing: the MLflow run is open"),
    KillPoint("normalize", "normalize.knots.compute", "the knots' distributed passes running, nothing committed", ci=True),
    KillPoint("normalize", "normalize.end", "score_knots committed; the MLflow run not ended"),
    KillPoint("sample", "sample.selection.write", "the selection write running in tasks"),
    KillPoint("sample", "sample.selection.committed", "selection committed; training_output and export not", ci=True),
    KillPoint("sample", "sample.output.write", "the training_output write running in tasks"),
    KillPoint("sample", "sample.end", "every commit and the export made; the MLflow run not ended"),
    KillPoint("sample-many", "sample-many.index.write", "the proxy_index write running in tasks", ci=True),
    KillPoint("sample-many", "sample-many.index.committed", "proxy_index committed; proxy_theta_tokens not"),
    KillPoint("sample-many", "sample-many.end", "both tables committed; the MLflow run not ended"),
    KillPoint("propose", "propose.parent.created", "the search's parent run made, without its settings"),
    KillPoint("propose", "propose.child.created@2", "the second θ run made, without its θ", ci=True),
    KillPoint("propose", "propose.end", "every θ run made; the parent run not ended"),
    KillPoint("proxy", "proxy.pool.write", "the pool's tokenization running in tasks (shards half written)"),
    KillPoint("proxy", "proxy.index.committed", "the pool built and proxy_index committed; no proxy trained"),
    KillPoint("proxy", "proxy.trained", "in a training task: one θ's target_loss logged, its run not ended", ci=True),
    KillPoint("proxy", "proxy.end", "every proxy finished; the stage's MLflow run not ended"),
]


@pytest.mark.parametrize("kill", [pytest.param(k, marks=[pytest.mark.ci] if k.ci else []) for k in KILL_POINTS],
                         ids=lambda k: k.point)
def test_killed_driver_then_rerun(kill, pipeline, spark, tmp_path):
    store = copy_store(pipeline.before(kill.stage), tmp_path / "store")
    args, logs, fault_dir = pipeline.command(kill.stage), tmp_path / "logs", tmp_path / "hits"

    killed = start(args, store, logs, fault=kill.point, fault_dir=fault_dir)
    rc = killed.wait()
    assert rc == -signal.SIGKILL, f"expected the driver SIGKILLed at {kill.point}, it exited {rc}:\n{killed.output()[-4000:]}"
    assert hits(fault_dir, kill.name), f"the driver died, but not at {kill.point}"

    run_ok(args, store, logs)
    assert_same_store(spark, store, pipeline.after(kill.stage))
    assert_runs_settled(store, None if kill.stage == "propose" else killed.pid)  # propose opens no stage run
    if kill.stage in ("propose", "proxy"):
        got, want = search_state(store, SEARCH), search_state(pipeline.after(kill.stage), SEARCH)
        assert got == want
        if kill.stage == "proxy":
            assert all(v[1] == "FINISHED" and len(v[3]) == 1 for k, v in got.items() if k != "parent"), got
