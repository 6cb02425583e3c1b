"""The MLflow contract's queries (quadmix_spark.core.runs) on a real SQLite store."""

from __future__ import annotations

import pytest

from quadmix_spark.core import runs as R


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Search ``s1`` (a parent and 9 children created out of proposal order), search ``s2`` (a parent and two
    fits, the newer with θ* {"v": 2}), and a fit-less search ``s3``."""
    import time

    import mlflow

    root = tmp_path_factory.mktemp("runs")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp_id = client.create_experiment("quadmix-test-runs", artifact_location=(root / "artifacts").as_uri())
    ids = {}
    for name in ("s1", "s2", "s3"):
        ids[name] = client.create_run(exp_id, tags={R.TAG_SEARCH: name, R.TAG_ROLE: R.ROLE_SEARCH}).info.run_id
    for i in (4, 0, 8, 2, 6, 1, 7, 3, 5):
        client.create_run(exp_id, run_name=f"theta-{i}", tags={
            R.TAG_PARENT: ids["s1"], R.TAG_SEARCH: "s1", R.TAG_ROLE: R.ROLE_PROXY, R.TAG_PROPOSAL_INDEX: str(i)})
    for v in (1, 2):
        fit = client.create_run(exp_id, start_time=int(time.time() * 1000) + v, tags={R.TAG_SEARCH: "s2", R.TAG_ROLE: R.ROLE_FIT})
        client.log_dict(fit.info.run_id, {"v": v}, R.THETA_STAR_ARTIFACT)
    return client, exp_id, ids


def test_child_runs_come_in_proposal_order_across_pages(store, monkeypatch):
    client, exp_id, ids = store
    monkeypatch.setattr(R, "PAGE_SIZE", 4)  # 9 children: three pages
    got = [r.data.tags[R.TAG_PROPOSAL_INDEX] for r in R.child_runs(client, exp_id, ids["s1"])]
    assert got == [str(i) for i in range(9)]


def test_a_search_is_found_by_name_and_a_missing_one_names_the_others(store):
    client, exp_id, ids = store
    assert R.require_search(client, exp_id, "s2").info.run_id == ids["s2"]
    assert R.find_search(client, exp_id, "nope") is None
    with pytest.raises(R.SearchNotFound, match=r"'nope'.*\['s1', 's2', 's3'\]"):
        R.require_search(client, exp_id, "nope")


def test_theta_star_is_the_newest_fits(store):
    client, exp_id, _ = store
    run_id, star = R.latest_theta_star(client, exp_id, "s2")
    assert star == {"v": 2} and run_id == R.latest_fit(client, exp_id, "s2").info.run_id
    with pytest.raises(R.ThetaStarMissing, match="s3"):
        R.latest_theta_star(client, exp_id, "s3")


def test_a_name_with_a_quote_is_refused_not_spliced_into_a_filter(store):
    client, exp_id, _ = store
    with pytest.raises(ValueError, match="quote"):
        R.find_search(client, exp_id, "x' or tags.`quadmix.role` = 'proxy")


def test_names_tag_reads_json_lists_only():
    from types import SimpleNamespace

    run = lambda v: SimpleNamespace(data=SimpleNamespace(tags={} if v is None else {R.TAG_DOMAINS: v}))
    assert R.names_tag(run('["a", "b"]'), R.TAG_DOMAINS) == ("a", "b")
    for bad in (None, "a,b", '{"a": 1}', "[1, 2]"):
        assert R.names_tag(run(bad), R.TAG_DOMAINS) is None
