"""core/tracking.stage_run, where every stage's MLflow run opens: a new run per invocation, or one resumed."""

from __future__ import annotations

import mlflow
import pytest

from quadmix_spark.core.runs import TAG_CONFIG_FINGERPRINT, TAG_FAILURE, TAG_LEASE, TAG_ROLE, TAG_STAGE
from quadmix_spark.core.run_guard import lease
from quadmix_spark.core.tracking import stage_run
from tests.conftest import make_config


def _find(role: str):
    def find(client, exp_id: str) -> str | None:
        runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = '{role}'")
        return runs[0].info.run_id if runs else None
    return find


def test_a_stage_run_is_new_unless_resumed_and_ends_like_its_block(tmp_path):
    cfg = make_config(tmp_path / "store")
    with pytest.raises(RuntimeError, match="mid-stage"):
        with stage_run(cfg, "evaluate", run_name="evaluate-s", tags={TAG_ROLE: "evaluate"}, resume=_find("evaluate")) as run:
            first = run.info.run_id
            raise RuntimeError("mid-stage")
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    assert client.get_run(first).info.status == "FAILED"

    with stage_run(cfg, "evaluate", run_name="evaluate-s", tags={TAG_ROLE: "evaluate"}, resume=_find("evaluate")) as run:
        assert run.info.run_id == first  # resumed, not a second run
        mlflow.log_metric("done", 1.0)
    again = client.get_run(first)
    assert again.info.status == "FINISHED" and again.data.metrics["done"] == 1.0
    assert again.data.tags[TAG_STAGE] == "evaluate" and again.data.tags[TAG_CONFIG_FINGERPRINT] == cfg.fingerprint()

    with stage_run(cfg, "search", tags={TAG_ROLE: "search-fit"}) as run:  # no resume: a run of its own each time
        assert run.info.run_id != first
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    assert len(client.search_runs([exp])) == 2


def test_a_run_a_dead_driver_left_running_is_ended_then_resumed_without_its_failure_tag(tmp_path):
    cfg = make_config(tmp_path / "store")
    with stage_run(cfg, "evaluate", tags={TAG_ROLE: "evaluate"}) as run:
        run_id = run.info.run_id
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    with lease(cfg, "evaluate", "evaluate") as held:
        key = held.key
    client.update_run(run_id, status="RUNNING")  # as a killed driver leaves it, holding the (now free) lease
    client.set_tag(run_id, TAG_LEASE, key)

    seen = {}

    def find(client_, exp_id):
        seen["status"] = client_.get_run(run_id).info.status  # what resume sees: ended by end_stale_runs
        seen["failure"] = client_.get_run(run_id).data.tags.get(TAG_FAILURE, "")
        return run_id

    with stage_run(cfg, "evaluate", tags={TAG_ROLE: "evaluate"}, resume=find):
        pass
    assert seen["status"] == "FAILED" and "interrupted" in seen["failure"]
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED" and TAG_FAILURE not in after.data.tags
