"""The search stage on a real (SQLite) MLflow store with synthetic proxy runs: no Spark, no proxies.

The proxies' ``target_loss`` is a known function of θ: it rises with ω̃ of domain ``d0`` and falls with
α[d1][q_a], plus small noise; the fit must find that, and θ* must move the right way.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from quadmix_spark.core import runs as R
from quadmix_spark.jobs import search_job
from quadmix_spark.search import candidates, regression, run_table
from quadmix_spark.kernel.theta import Theta, feature_names, load_theta, sample_theta_matrix
from tests.conftest import make_config

DOMAINS = ["d0", "d1", "d2", "d3"]
CRITERIA = ["q_a", "q_b", "q_c"]
EXPERIMENT = "quadmix-test-search"
N_MAIN = 80
FAST_LGB = {"learning_rate": 0.1, "n_estimators": 200, "min_child_samples": 5}


def true_loss(theta: Theta) -> float:
    return 3.0 + 1.0 * theta.omega[0] / 0.1 - 0.5 * theta.alpha[1, 0]


def _thetas(n, seed, domains=DOMAINS, criteria=CRITERIA):
    b = sample_theta_matrix(n, len(domains), len(criteria), seed)
    return [Theta(tuple(domains), tuple(criteria), b.alpha[i], b.lam[i], b.omega[i], b.eta[i], b.eps[i]) for i in range(n)]


def add_search(client, exp_id, name, thetas, *, loss=true_loss, status="FINISHED", noise_seed=0, drop_param=None,
               parent=True, log_metric=True):
    """A parent run and one child per θ, following the contract of quadmix_spark.search."""
    from mlflow.entities import Metric, Param, RunTag

    parent_id = None
    if parent:
        parent_id = client.create_run(exp_id, run_name=name, tags={R.TAG_SEARCH: name, R.TAG_ROLE: R.ROLE_SEARCH}).info.run_id
    noise = np.random.default_rng(noise_seed).normal(0, 0.01, len(thetas))
    statuses = [status] * len(thetas) if isinstance(status, str) else status
    ids = []
    for i, th in enumerate(thetas):
        tags = {R.TAG_SEARCH: name, R.TAG_ROLE: R.ROLE_PROXY, R.TAG_THETA_ID: th.theta_id,
                R.TAG_DOMAINS: json.dumps(list(th.domains)), R.TAG_CRITERIA: json.dumps(list(th.criteria))}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run_id = client.create_run(exp_id, run_name=f"{name}-{i}", tags=tags).info.run_id
        params = [Param(k, repr(float(v))) for k, v in zip(feature_names(th.domains, th.criteria), th.to_vector())
                  if not (drop_param and i == 0 and k == drop_param)]
        metrics = [Metric("target_loss", loss(th) + noise[i], 0, 0)] if log_metric else []
        client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("k", "v")])
        if statuses[i] != "RUNNING":
            client.set_terminated(run_id, statuses[i])
        ids.append(run_id)
    if parent_id:
        client.set_terminated(parent_id, "FINISHED")
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store: search ``main`` (80 finished + 3 failed + 2 running + 1 without the metric),
    ``other`` (another domain set), ``few`` (5 runs), ``gap`` (one run lacks a param)."""
    import mlflow

    root = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    main_thetas = _thetas(N_MAIN + 6, seed=1)
    add_search(client, exp_id, "main", main_thetas[:N_MAIN])
    # the same search's leftovers: failed / killed / running / no metric — all ignored
    parent = client.search_runs([exp_id], f"tags.`{R.TAG_SEARCH}` = 'main' AND tags.`{R.TAG_ROLE}` = 'search'")[0]
    for th, st in zip(main_thetas[N_MAIN:N_MAIN + 5], ["FAILED", "FAILED", "KILLED", "RUNNING", "RUNNING"]):
        ids = add_search(client, exp_id, "main", [th], status=st, parent=False, loss=lambda t: 0.0)
        client.set_tag(ids[0], "mlflow.parentRunId", parent.info.run_id)
    add_search(client, exp_id, "main", [main_thetas[-1]], parent=False, log_metric=False)
    add_search(client, exp_id, "other", _thetas(10, seed=2, domains=["d0", "d1", "x9"]))
    add_search(client, exp_id, "few", _thetas(5, seed=3))
    add_search(client, exp_id, "gap", _thetas(10, seed=4), drop_param="quadmix.omega.d2")
    return {"root": root, "uri": uri, "client": client, "exp_id": exp_id, "thetas": main_thetas[:N_MAIN]}


def _cfg(store, *overrides):
    return make_config(
        store["root"] / "store",
        f"tracking.uri={store['uri']}",
        f"tracking.experiment={EXPERIMENT}",
        "search.name=main",
        "search.min_runs=40",
        "search.val_fraction=0.25",
        "search.n_candidates=5000",
        f"search.lightgbm={json.dumps(FAST_LGB)}",
        *overrides,
    )


def _fit_and_search(table, seed=0):
    fit = regression.fit_regressor(table.X, table.y, {**S_REGMIX(), **FAST_LGB}, 0.25, 3, seed)
    cands = candidates.search_candidates(fit.model, table.domains, table.criteria, 5000, 10, seed=7)
    return fit, cands


def S_REGMIX():
    from quadmix_spark.search.config import REGMIX_LIGHTGBM

    return dict(REGMIX_LIGHTGBM)


@pytest.fixture(scope="module")
def main_table(store):
    return run_table.collect_runs(store["client"], store["exp_id"], ["main"], "target_loss")


# ----------------------------------------------------------------------------------- collect
def test_collect_keeps_only_finished_runs_with_the_metric(main_table, store):
    t = main_table
    assert len(t) == N_MAIN
    assert list(t.X.columns) == feature_names(DOMAINS, CRITERIA)
    assert t.domains == tuple(DOMAINS) and t.criteria == tuple(CRITERIA)
    assert t.skipped["main"] == {"status:FAILED": 2, "status:KILLED": 1, "status:RUNNING": 2, "no_metric": 1}
    by_id = {th.theta_id: th for th in store["thetas"]}
    i = 17
    np.testing.assert_allclose(t.X.iloc[i].to_numpy(), by_id[t.theta_ids[i]].to_vector())
    assert t.theta_ids == sorted(t.theta_ids)  # rows in a store-independent order


def test_collect_pages_through_the_store(store, main_table, monkeypatch):
    monkeypatch.setattr(R, "PAGE_SIZE", 7)
    t = run_table.collect_runs(store["client"], store["exp_id"], ["main"], "target_loss")
    assert t.run_ids == main_table.run_ids


def test_collect_refuses_searches_over_different_domains(store):
    with pytest.raises(run_table.SearchInputError) as e:
        run_table.collect_runs(store["client"], store["exp_id"], ["main", "other"], "target_loss")
    msg = str(e.value)
    assert "'main'" in msg and "'other'" in msg and "x9" in msg and "d2" in msg


def test_collect_refuses_runs_of_different_proxy_settings(store):
    client, exp_id = store["client"], store["exp_id"]
    ids = add_search(client, exp_id, "fp_a", _thetas(4, seed=5))
    ids += add_search(client, exp_id, "fp_b", _thetas(4, seed=6))
    for run_id, fp in zip(ids, ["aaa"] * 4 + ["bbb"] * 4):
        client.set_tag(run_id, R.TAG_PROXY_FINGERPRINT, fp)
    assert len(run_table.collect_runs(client, exp_id, ["fp_a"], "target_loss").y) == 4  # one setting: fine
    with pytest.raises(run_table.SearchInputError, match="different proxy settings") as e:
        run_table.collect_runs(client, exp_id, ["fp_a", "fp_b"], "target_loss")
    assert "aaa" in str(e.value) and "bbb" in str(e.value)


def test_collect_names_the_missing_param(store):
    with pytest.raises(run_table.SearchInputError, match=r"quadmix\.omega\.d2"):
        run_table.collect_runs(store["client"], store["exp_id"], ["gap"], "target_loss")


def test_unknown_search_lists_the_known_ones(store):
    with pytest.raises(run_table.SearchInputError) as e:
        run_table.collect_runs(store["client"], store["exp_id"], ["nope"], "target_loss")
    for name in ("nope", "main", "other", "few", "gap"):
        assert name in str(e.value)


def test_too_few_runs_is_a_clear_error_and_leaves_no_run(store):
    before = len(store["client"].search_runs([store["exp_id"]]))
    with pytest.raises(run_table.SearchInputError, match=r"search few has only 5 finished proxy runs, need 40 .*quadmix proxy"):
        search_job(_cfg(store), ["few"])
    assert len(store["client"].search_runs([store["exp_id"]])) == before  # refused before any run opened


# ----------------------------------------------------------------------------------- fit + search
def test_fit_ranks_validation_runs(main_table):
    fit = regression.fit_regressor(main_table.X, main_table.y, {**S_REGMIX(), **FAST_LGB}, 0.25, 3, seed=0)
    assert (fit.n_train, fit.n_val) == (60, 20)
    assert fit.val_spearman > 0.5
    assert fit.importance().index[0] == "quadmix.omega.d0"


@pytest.mark.parametrize("n, val_fraction", [(4, 0.5), (5, 0.5), (4, 0.9), (7, 0.34)])
def test_fewest_runs_fit_every_fold_on_two_or_more(main_table, n, val_fraction):
    # the cluster pipeline's search: 4 runs, half held out; each fold must still fit on >= 2 runs
    fit = regression.fit_search(main_table.X.iloc[:n], main_table.y[:n], {**S_REGMIX(), **FAST_LGB}, 5, val_fraction, 3, seed=0)
    assert fit.folds == min(5, n) and np.isfinite(fit.oof_pred).all()
    tr, va = regression.split_indices(n - 1, val_fraction, 0)
    assert len(tr) >= 2 and len(va) >= 1 and not set(tr) & set(va)


def test_too_few_runs_to_cross_validate_is_a_clear_error(main_table):
    with pytest.raises(run_table.SearchInputError, match="need at least 4 runs to cross-validate"):
        regression.fit_search(main_table.X.iloc[:3], main_table.y[:3], {**S_REGMIX(), **FAST_LGB}, 5, 0.25, 3, seed=0)


def test_search_is_deterministic_and_moves_theta_the_right_way(main_table):
    fit, cands = _fit_and_search(main_table)
    fit2, cands2 = _fit_and_search(main_table)
    assert cands.theta_star == cands2.theta_star
    np.testing.assert_array_equal(fit.val_pred, fit2.val_pred)
    ts = cands.theta_star
    omega0 = np.median(cands.sample_features[:, feature_names(DOMAINS, CRITERIA).index("quadmix.omega.d0")])
    assert ts.omega[0] < omega0
    np.testing.assert_allclose(ts.alpha.sum(axis=1), 1.0, atol=1e-9)
    assert cands.top_pred[0] == cands.pred_quantiles[0.0]
    assert np.all(np.diff(cands.top_pred) >= 0)


def test_batched_candidates_keep_the_global_top_k(main_table):
    fit, _ = _fit_and_search(main_table)
    one = candidates.search_candidates(fit.model, DOMAINS, CRITERIA, 3000, 10, seed=5, batch=3000)
    # a single batch vs. the same draws scored in one predict call
    rng = np.random.default_rng(5)
    b = sample_theta_matrix(3000, 4, 3, rng)
    x = np.concatenate([b.alpha.reshape(3000, -1), b.lam, b.omega, b.eta, b.eps], axis=1)
    best = np.argsort(fit.model.predict(pd.DataFrame(x, columns=fit.feature_names)), kind="stable")[:10]
    np.testing.assert_array_equal(one.top_features, x[best])
    many = candidates.search_candidates(fit.model, DOMAINS, CRITERIA, 3000, 10, seed=5, batch=700)
    assert many.top_features.shape == (10, 28) and np.all(np.diff(many.top_pred) >= 0)


def test_batch_top_matches_a_stable_sort():
    s = np.array([3.0, 1.0, 2.0, 1.0, 1.0, 0.5, 2.0])
    for k in range(1, 8):
        np.testing.assert_array_equal(candidates._batch_top(s, k), np.argsort(s, kind="stable")[:k])


def test_active_criteria_zero_a_criterion(main_table):
    fit, _ = _fit_and_search(main_table)
    mask = candidates.active_mask(CRITERIA, ["q_a", "q_c"])
    c = candidates.search_candidates(fit.model, DOMAINS, CRITERIA, 2000, 5, seed=1, active_criteria=mask)
    assert np.all(c.theta_star.alpha[:, 1] == 0)
    with pytest.raises(run_table.SearchInputError, match="q_zz"):
        candidates.active_mask(CRITERIA, ["q_zz"])


# ----------------------------------------------------------------------------------- the stage
def test_run_search_logs_one_run_with_theta_star(store, tmp_path):
    import mlflow

    out = tmp_path / "theta_star.yaml"
    outcome = search_job(_cfg(store), out_path=out)
    client = store["client"]
    run = client.get_run(outcome.run_id)
    assert run.data.tags[R.TAG_ROLE] == "search-fit" and run.data.tags[R.TAG_SEARCH] == "main"
    assert run.data.tags[R.TAG_STAGE] == "search" and run.data.tags[R.TAG_CONFIG_FINGERPRINT] == _cfg(store).fingerprint()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "search-fit-main"
    assert run.data.params["n_runs"] == str(N_MAIN)
    assert run.data.metrics["cv_spearman"] > 0.5 and run.data.metrics["cv_folds"] == 5 and "n_trees" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"theta_star.json", "cv_predictions.csv", "plots", "config.yaml"} <= arts
    assert {a.path for a in client.list_artifacts(outcome.run_id, "plots")} == {
        "plots/pred_vs_actual.png", "plots/feature_importance.png", "plots/theta_star.png"}
    local = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, artifact_path="theta_star.json", dst_path=str(tmp_path))
    back = load_theta(local, domains=DOMAINS[::-1], criteria=CRITERIA)  # names, not positions
    assert back.theta_id == outcome.theta_star.theta_id
    assert load_theta(out) == outcome.theta_star
    assert float(run.data.params["theta_star.quadmix.omega.d0"]) == outcome.theta_star.omega[0]
    assert "main: 80 finished proxy runs" in outcome.summary()
    assert "warning" not in outcome.summary() and "quadmix.search.warnings" not in run.data.tags  # a sound fit
    model = mlflow.lightgbm.load_model(f"runs:/{outcome.run_id}/model")
    x = outcome.runs.X.iloc[:3]
    np.testing.assert_allclose(model.predict(x), outcome.fit.model.predict(x))


def test_fit_inputs_key_names_what_the_fit_reads(main_table):
    """The digest `propose --refine` knows a fit by: θ* (an output) leaves it alone; a setting, the pool's tokens
    or one run's metric changes it."""
    from dataclasses import replace

    from quadmix_spark.search.theta_star import fit_inputs_key

    params = {"n_runs": len(main_table), "top_k": 10, "lightgbm.num_leaves": 31, "theta_star.quadmix.omega.d0": "0.1"}
    key = fit_inputs_key(params, main_table, None)
    assert fit_inputs_key({**params, "theta_star.quadmix.omega.d0": "0.2"}, main_table, None) == key
    assert fit_inputs_key({**params, "top_k": 11}, main_table, None) != key
    assert fit_inputs_key(params, main_table, (1.0, 2.0)) != key
    y = main_table.y.copy()
    y[3] = np.nextafter(y[3], np.inf)  # one bit of one run's loss
    assert fit_inputs_key(params, replace(main_table, y=y), None) != key


def test_tiny_fit_still_reports_spearman(store):
    """A handful of runs (one per fold) and stumps: ρ may be undefined (constant predictions) but is always logged."""
    outcome = search_job(_cfg(store, "search.min_runs=5", "search.val_fraction=0.34", "search.n_candidates=500",
                                "search.top_k=3", 'search.lightgbm={"n_estimators": 5, "min_child_samples": 1, "num_leaves": 3}'),
                           ["few"])
    run = store["client"].get_run(outcome.run_id)
    assert {"cv_mae", "cv_spearman", "n_trees", "top_pred_mean"} <= set(run.data.metrics)
    assert outcome.fit.folds == 5 and outcome.fit.n_runs == 5 and outcome.theta_star.n_domains == len(DOMAINS)
    if regression.fit_warnings(outcome.fit):  # 2 held-out runs: ρ is ±1 or undefined; a weak fit says so
        assert "warning:" in outcome.summary() and run.data.tags["quadmix.search.warnings"]


def test_a_fit_without_signal_is_warned_about():
    rng = np.random.default_rng(3)
    X = rng.uniform(size=(200, 6))
    sound = regression.fit_regressor(X, X[:, 0] + 0.01 * rng.normal(size=200), FAST_LGB, 0.25, 3, seed=0)
    assert regression.fit_warnings(sound) == []
    noise = regression.fit_regressor(X, rng.normal(size=200), FAST_LGB, 0.25, 3, seed=0)
    warned = regression.fit_warnings(noise)
    assert warned and any("Spearman" in w or "1 tree" in w for w in warned)


def test_cross_validation_is_out_of_sample(main_table):
    """Every run's reported prediction comes from a model that never saw it: on a target of pure noise the final
    model (fitted on all runs) follows its training data, the cross-validated ρ does not."""
    rng = np.random.default_rng(11)
    y = rng.normal(size=len(main_table.y))
    lgb = {"learning_rate": 0.3, "n_estimators": 50, "min_child_samples": 2, "num_leaves": 15}
    fit = regression.fit_search(main_table.X, y, lgb, folds=5, val_fraction=0.25, early_stopping_rounds=50, seed=0)
    in_sample = regression._spearman(regression.predict(fit.model, main_table.X.to_numpy()), y)
    assert in_sample > 0.5 and fit.cv_spearman < 0.3
    assert np.bincount(fit.fold_of).tolist() == [16] * 5 and fit.n_trees == int(np.median(fit.fold_trees))
    assert regression.fit_warnings(fit)  # no signal: said so

    signal = regression.fit_search(main_table.X, main_table.y, {**S_REGMIX(), **FAST_LGB}, 5, 0.25, 3, seed=0)
    assert signal.cv_spearman > 0.5 and not regression.fit_warnings(signal)
    again = regression.fit_search(main_table.X, main_table.y, {**S_REGMIX(), **FAST_LGB}, 5, 0.25, 3, seed=0)
    np.testing.assert_array_equal(signal.oof_pred, again.oof_pred)  # deterministic
    # a run's out-of-fold prediction is the model of the other folds: refit that fold by hand
    k = 2
    test = signal.fold_of == k
    x = main_table.X.to_numpy()
    alone = regression.fit_regressor(x[~test], main_table.y[~test], {**S_REGMIX(), **FAST_LGB}, 0.25, 3, 0 + 1 + k, list(main_table.X.columns))
    np.testing.assert_array_equal(regression.predict(alone.model, x[test]), signal.oof_pred[test])


def test_folds_keep_the_runs_of_one_theta_together():
    """A θ trained with several seeds is one group: all its runs in one fold (so no run is predicted from its own
    θ's other runs); with one run per θ the assignment is the one without groups."""
    plain = regression.fold_assignment(40, 5, seed=3)
    np.testing.assert_array_equal(regression.fold_assignment(40, 5, 3, [f"t{i}" for i in range(40)]), plain)
    groups = [f"t{i}" for i in range(30)] + [f"t{i}" for i in range(10)] + ["", ""]  # 10 θ raced; 2 runs without id
    fold_of = regression.fold_assignment(len(groups), 5, 3, groups)
    for i in range(10):
        assert fold_of[i] == fold_of[30 + i]
    per_group = np.bincount(np.concatenate([fold_of[:30], fold_of[40:]]), minlength=5)  # 32 groups: 30 θ, 2 lone runs
    assert sorted(per_group.tolist()) == [6, 6, 6, 7, 7]  # dealt round-robin
    with pytest.raises(run_table.SearchInputError, match="2 distinct θ"):
        regression.fold_assignment(5, 5, 0, ["a"] * 5)


def test_early_stopping_holds_out_whole_theta():
    """The early-stopping split inside a fit holds out whole θ: no run is watched while another run of its θ is
    trained on; with one run per θ it is the split without groups."""
    for n, vf, seed in [(40, 0.25, 0), (7, 0.34, 3), (3, 0.5, 1)]:
        plain = regression.split_indices(n, vf, seed)
        grouped = regression.split_indices(n, vf, seed, [f"t{i}" for i in range(n)])
        for a, b in zip(plain, grouped):
            np.testing.assert_array_equal(a, b)
    groups = [f"t{i}" for i in range(30)] + [f"t{i}" for i in range(10)] * 2  # 10 θ raced with 2 more seeds
    tr, va = regression.split_indices(len(groups), 0.25, 5, groups)
    assert sorted([*tr, *va]) == list(range(len(groups)))
    held = {groups[i] for i in va}
    assert held and not held & {groups[i] for i in tr}
    assert len(held) == round(30 * 0.25)  # a quarter of the θ, not of the runs
    with pytest.raises(run_table.SearchInputError, match="2 runs outside the held-out θ"):
        regression.split_indices(3, 0.5, 0, ["a", "a", "a"])


def test_trained_theta_star_ranks_raced_theta_by_their_mean(main_table):
    """search.theta_star=trained with replicates: each θ counts once, by the mean of its runs, and only the θ with
    the most runs (the race's finalists) compete; without replicates, the k best runs as before."""
    from dataclasses import replace

    from quadmix_spark.search.theta_star import best_trained, trained_means

    t = replace(main_table, X=main_table.X.iloc[:6].reset_index(drop=True), y=np.array([4.0, 3.0, 3.1, 3.2, 5.0, 2.0]),
                run_ids=[f"r{i}" for i in range(6)], theta_ids=[f"t{i}" for i in range(6)], search_of_run=["s"] * 6)
    ids, means, rows = trained_means(t)
    assert ids == [f"t{i}" for i in range(6)] and means.tolist() == t.y.tolist() and rows.tolist() == list(range(6))
    np.testing.assert_allclose(best_trained(t, 1).to_vector(), t.X.iloc[5].to_numpy())
    # t1, t2, t3 raced with two more seeds each: t3 (3.2, 3.0, 3.0) now beats t1 (3.0, 3.6, 3.3) and t2; t5 (2.0,
    # one lucky run, not raced) no longer competes
    extra_y = [3.6, 3.3, 3.3, 3.2, 3.0, 3.0]
    order = [0, 1, 6, 7, 2, 8, 9, 3, 10, 11, 4, 5]  # the table's order: by θ id, then run id
    X = pd.concat([t.X, t.X.iloc[[1, 1, 2, 2, 3, 3]]], ignore_index=True).iloc[order].reset_index(drop=True)
    y = np.concatenate([t.y, extra_y])[order]
    ids_all = (t.theta_ids + ["t1", "t1", "t2", "t2", "t3", "t3"])
    raced = replace(t, X=X, y=y, run_ids=[f"r{i}" for i in order], theta_ids=[ids_all[i] for i in order],
                    search_of_run=["s"] * 12)
    ids, means, rows = trained_means(raced)
    assert ids == ["t1", "t2", "t3"]
    np.testing.assert_allclose(means, [(3.0 + 3.6 + 3.3) / 3, (3.1 + 3.3 + 3.2) / 3, (3.2 + 3.0 + 3.0) / 3])
    assert [raced.theta_ids[i] for i in rows] == ids
    winner = Theta.from_vector(t.X.iloc[3].to_numpy(), t.domains, t.criteria)
    assert best_trained(raced, 1).theta_id == winner.theta_id  # k = 1: the θ itself, bit for bit
    shuffled = replace(raced, y=raced.y[::-1].copy(), X=raced.X.iloc[::-1].reset_index(drop=True),
                       theta_ids=raced.theta_ids[::-1], run_ids=raced.run_ids[::-1])
    assert trained_means(shuffled)[1].tolist() == [means[2], means[1], means[0]]  # exact whatever the run order


def test_a_fit_with_other_candidate_settings_than_the_proposals_is_refused(store):
    from mlflow.entities import Param

    client = store["client"]
    add_search(client, store["exp_id"], "drawn", _thetas(12, seed=9))
    (parent,) = client.search_runs([store["exp_id"]], f"tags.`{R.TAG_SEARCH}` = 'drawn' AND tags.`{R.TAG_ROLE}` = 'search'")
    client.log_batch(parent.info.run_id, params=[Param("search.lambda_mode", "log"), Param("search.criteria", '["q_a", "q_c"]')])
    base = ("search.name=drawn", "search.min_runs=5", "search.n_candidates=500", "search.top_k=3")
    with pytest.raises(run_table.SearchInputError, match=r"search.lambda_mode=log, but this fit would draw its candidates with linear"):
        search_job(_cfg(store, *base, "search.lambda_mode=linear", "search.criteria=[q_a, q_c]"))
    with pytest.raises(run_table.SearchInputError, match=r'search.criteria=\["q_a", "q_c"\], but .* with null'):
        search_job(_cfg(store, *base))
    outcome = search_job(_cfg(store, *base, "search.criteria=[q_c, q_a]"))  # the recorded settings (any order)
    assert np.all(outcome.theta_star.alpha[:, 1] == 0)
    # the sampler: a search proposed with shared-ω̃ draws is fitted only with the same share and spread
    from quadmix_spark.search.propose import SAMPLER_VERSION

    client.log_batch(parent.info.run_id, params=[Param("search.sampler", f"{SAMPLER_VERSION}+shared-omega/0.5/0.25")])
    ok = (*base, "search.criteria=[q_a, q_c]")
    with pytest.raises(run_table.SearchInputError, match=r"shared-omega/0\.5/0\.25, but .* with algorithm1/1: .*search\.shared_omega"):
        search_job(_cfg(store, *ok))
    with pytest.raises(run_table.SearchInputError, match=r"shared-omega/0\.5/0\.25, but .*with algorithm1/1\+shared-omega/0\.5/0\.5"):
        search_job(_cfg(store, *ok, "search.shared_omega=0.5", "search.omega_spread=0.5"))
    shared = search_job(_cfg(store, *ok, "search.shared_omega=0.5"))
    assert shared.theta_star.omega.max() <= 0.1


def test_mix_features_are_the_domain_shares_criterion_weights_and_size_theta_implies():
    thetas = _thetas(5, seed=21)
    X = np.stack([t.to_vector() for t in thetas])
    tokens = (1000.0, 3000.0, 0.0, 500.0)
    mix = regression.Featurizer("mix", tuple(DOMAINS), tuple(CRITERIA), tokens)
    F = mix(X)
    assert F.shape == (5, len(DOMAINS) + len(CRITERIA) + 1) and len(mix.names) == F.shape[1]
    for t, row in zip(thetas, F):
        kept = t.omega * np.array(tokens)
        np.testing.assert_allclose(row[:4], kept / kept.sum())
        np.testing.assert_allclose(row[4:7], (t.alpha * (kept / kept.sum())[:, None]).sum(axis=0))
        assert row[7] == pytest.approx(np.log1p(kept.sum()))
    np.testing.assert_allclose(F[:, 4:7].sum(axis=1), 1.0)  # α on the simplex stays there
    both = regression.Featurizer("both", tuple(DOMAINS), tuple(CRITERIA), tokens)
    np.testing.assert_array_equal(both(X), np.concatenate([X, F], axis=1))
    assert regression.featurizer_for("both", DOMAINS, CRITERIA, None).kind == "theta"  # no recorded tokens: θ only


def test_a_search_with_recorded_domain_tokens_is_fitted_on_its_domain_mix(store):
    client = store["client"]
    add_search(client, store["exp_id"], "mixed", _thetas(40, seed=31))
    (parent,) = client.search_runs([store["exp_id"]], f"tags.`{R.TAG_SEARCH}` = 'mixed' AND tags.`{R.TAG_ROLE}` = 'search'")
    client.log_dict(parent.info.run_id, {"d0": 1000, "d1": 2000, "d2": 3000, "d3": 4000}, "domain_tokens.json")
    outcome = search_job(_cfg(store, "search.name=mixed", "search.min_runs=20", "search.n_candidates=500", "search.top_k=3",
                                "search.features=mix"))
    assert outcome.features == "mix" and outcome.fit.feature_names[0] == "mix.share.d0"
    assert client.get_run(outcome.run_id).data.params["features"] == "mix" and "on mix features" in outcome.summary()
    # the candidates are scored through the same features: θ* is the average of the k best under the mix model
    feats = regression.Featurizer("mix", tuple(DOMAINS), tuple(CRITERIA), (1000.0, 2000.0, 3000.0, 4000.0))
    pred = regression.predict(outcome.fit.model, feats(outcome.candidates.top_features))
    np.testing.assert_allclose(pred, outcome.candidates.top_pred)
