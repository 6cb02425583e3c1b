"""propose → proxy → search → sample θ* → evaluate through the CLI, on generated annotations and tiny proxies.

Real Spark tasks train real (tiny) torch models and log to a real MLflow SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from quadmix_spark.cli import app
from tests.conftest import DEFAULT_CONF, make_config
from tests.sampling_data import make_corpus

pytestmark = pytest.mark.spark

TINY = [
    "proxy.pool.shards=2",
    "proxy.model={vocab_size: 128, n_layer: 1, n_head: 2, d_model: 16, ffn: 32, seq_len: 32}",
    "proxy.train={tokens: 2048, batch_size: 4, micro_batch_size: 4, warmup_steps: 2, log_every: 4}",
    "proxy.target={kind: bmk, max_examples_per_task: 2, tasks: [arc_easy, hellaswag]}",
    "search.min_runs=4",
    "search.val_fraction=0.34",
    "search.lightgbm={min_child_samples: 1, num_leaves: 3, n_estimators: 20}",
    "search.n_candidates=2000",
    "search.top_k=5",
    "sampling.coarse_bins=64",
]


def invoke(*args, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def runs_of(cfg, role: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`quadmix.role` = '{role}'", max_results=1000)


@pytest.fixture
def search_env(spark, tmp_path):
    root = tmp_path / "store"
    sets = [f"storage.root={root}", *TINY]
    cfg = make_config(root, *TINY)
    make_corpus(spark, cfg, n=300, n_domains=3, big_share=0.6)
    base = ["-c", str(DEFAULT_CONF), *[x for s in sets for x in ("--set", s)]]
    invoke("normalize", *base)
    return cfg, base


def test_search_pipeline_end_to_end(search_env, tmp_path):
    cfg, base = search_env
    out = invoke("propose", *base, "-n", "6", "--search", "t1")
    assert "6 θ, 6 new" in out
    assert "6 θ, 0 new" in invoke("propose", *base, "-n", "6", "--search", "t1")  # idempotent
    children = runs_of(cfg, "proxy")
    assert len(children) == 6 and all(r.info.status == "SCHEDULED" for r in children)
    theta_ids = sorted(r.data.tags["quadmix.theta_id"] for r in children)
    assert len(set(theta_ids)) == 6
    assert any(k.startswith("quadmix.alpha.dom0.") for k in children[0].data.params)

    # one θ crashes mid-training: recorded as failed, the others finish, the command says so; the 6 θ are ranked
    # and trained in chunks of 4 (two index commits, two Spark jobs), which changes no loss's comparability
    crash = theta_ids[0]
    out = invoke("proxy", *base, "--search", "t1", "--set", f"proxy.fail_theta_ids=[{crash}]", "--set", "proxy.fail_at_step=2",
                 "--set", "sampling.theta_chunk=4", "--set", "proxy.submit_chunk=4", code=1)
    assert "5 trained, 1 failed" in out and "injected failure" in out
    by_theta = {r.data.tags["quadmix.theta_id"]: r for r in runs_of(cfg, "proxy")}
    assert by_theta[crash].info.status == "FAILED" and by_theta[crash].data.tags["quadmix.proxy.status"] == "failed"
    assert "target_loss" not in by_theta[crash].data.metrics
    assert "injected failure at step 2" in by_theta[crash].data.tags["quadmix.proxy.error"]
    finished = [r for t, r in by_theta.items() if t != crash]
    assert all(r.info.status == "FINISHED" and r.data.metrics["target_loss"] > 0 for r in finished)
    for r in finished:  # what each proxy records about itself: its status, seed, device and settings
        tags = r.data.tags
        assert tags["quadmix.proxy.status"] == "finished" and tags["quadmix.seed"] == str(cfg.proxy.train.seed)
        assert tags["quadmix.proxy.device"] == "cpu" and len(tags["quadmix.proxy.fingerprint"]) == 12
        assert "quadmix.proxy.error" not in tags

    # the rerun trains only the failed one; every θ ends with exactly one target_loss
    out = invoke("proxy", *base, "--search", "t1")
    assert "1 trained, 0 failed, 5 already finished" in out
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    for r in runs_of(cfg, "proxy"):
        assert r.info.status == "FINISHED"
        assert len(client.get_metric_history(r.info.run_id, "target_loss")) == 1
    assert "0 trained, 0 failed, 6 already finished" in invoke("proxy", *base, "--search", "t1")
    # other proxy settings would make the losses incomparable: refused
    err = invoke("proxy", *base, "--search", "t1", "--set", "proxy.train.tokens=1024", code=1)
    assert "other proxy settings" in err

    # search: LightGBM over the 6 runs, θ* readable by `sample --params <run id>`
    out = invoke("search", *base, "--search", "t1")
    fits = runs_of(cfg, "search-fit")
    assert len(fits) == 1
    fit = fits[0]
    arts = {a.path for a in client.list_artifacts(fit.info.run_id)}
    assert "theta_star.json" in arts and "plots" in arts
    models = mlflow.search_logged_models(experiment_ids=[fit.info.experiment_id], output_format="list")
    assert any(m.source_run_id == fit.info.run_id for m in models)  # the LightGBM model (MLflow 3 logged model)
    assert {"cv_mae", "cv_spearman", "n_trees"} <= set(fit.data.metrics)
    out = invoke("sample", *base, "--set", "sampling.run=star", "--params", fit.info.run_id)
    assert "sample run 'star'" in out

    # evaluate: θ* and two baselines, one seed each
    out = invoke("evaluate", *base, "--search", "t1", "--set", "evaluate.seeds=[0]", "--set", "evaluate.baselines=[random, mix]")
    for arm in ("theta_star", "random", "mix"):
        assert arm in out
    local = client.download_artifacts(runs_of(cfg, "evaluate")[0].info.run_id, "evaluate_table.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert len(table["data"]) == 3
    assert "paired against θ*" in out and "held-out evaluation part" in out and "baselines keep" in out
    eval_run = runs_of(cfg, "evaluate")[0]
    fraction = float(eval_run.data.tags["quadmix.baseline_fraction"])  # θ*'s kept share (ω <= 0.1 in every domain)
    assert 0 < fraction <= 0.1 and f"baseline-random-{fraction:g}" in {r.data.tags["quadmix.theta_id"] for r in runs_of(cfg, "evaluate-proxy")}
    arts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert "evaluate_paired.json" in arts and "plots" in arts and "paired.random.mean" in eval_run.data.metrics
    for r in runs_of(cfg, "evaluate-proxy"):  # scored on the held-out part, the search part beside it
        assert {"target_loss", "search_part.target_loss"} <= set(r.data.metrics)
    # rerun reuses the finished proxies
    assert "theta_star" in invoke("evaluate", *base, "--search", "t1", "--set", "evaluate.seeds=[0]",
                                  "--set", "evaluate.baselines=[random, mix]")
    assert len(runs_of(cfg, "evaluate-proxy")) == 3
    again = runs_of(cfg, "evaluate")  # the same θ* and proxy settings: the first run, resumed
    assert [r.info.run_id for r in again] == [eval_run.info.run_id]
    assert again[0].info.status == "FINISHED" and again[0].data.tags["quadmix.stage"] == "evaluate"


def test_refinement_rounds(search_env, tmp_path):
    """propose --refine adds the newest fit's best candidates (not the θ the search has), proxy trains them,
    search fits over all; a second round starts from the new fit; reruns and -n keep every θ."""
    from quadmix_spark.core.runs import experiment_id, find_search, latest_fit
    from quadmix_spark.search.theta_star import ranked_candidates

    cfg, base = search_env
    base = [*base, "--set", "proxy.model.kind=ngram", "--search", "r"]
    invoke("propose", *base, "-n", "8")
    invoke("proxy", *base)
    err = invoke("propose", *base, "--refine", "3", code=1)
    assert "has no fit to refine" in err
    invoke("search", *base)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    fit1 = latest_fit(client, exp_id, "r")
    best = ranked_candidates(client, exp_id, fit1, 3)

    out = invoke("propose", *base, "--refine", "3")
    assert "3 refined θ" in out and "3 new" in out and fit1.info.run_id in out
    refined = [r for r in runs_of(cfg, "proxy") if "quadmix.refine.fit" in r.data.tags]
    assert sorted((r.data.tags["quadmix.refine.rank"], r.data.tags["quadmix.theta_id"]) for r in refined) == \
        [(str(j), t.theta_id) for j, t in enumerate(best)]
    assert {r.data.tags["quadmix.refine.round"] for r in refined} == {"1"}
    assert all("quadmix.proposal_index" not in r.data.tags for r in refined)
    assert "3 refined θ" in invoke("propose", *base, "--refine", "3") and "0 new" in invoke("propose", *base, "--refine", "3")
    invoke("search", *base)  # the same 8 finished runs: the same fit under another run id, not a new round
    refit = latest_fit(client, exp_id, "r")
    assert refit.info.run_id != fit1.info.run_id
    assert refit.data.tags["quadmix.fit.inputs"] == fit1.data.tags["quadmix.fit.inputs"]
    out = invoke("propose", *base, "--refine", "3")
    assert "3 refined θ" in out and "0 new" in out
    assert "8 θ, 0 new" in invoke("propose", *base, "-n", "8")  # Algorithm 1's θ again: the refined ones stay listed
    parent = find_search(client, exp_id, "r")
    doc = json.loads(Path(client.download_artifacts(parent.info.run_id, "thetas.json", str(tmp_path))).read_text())
    assert len(doc["thetas"]) == 11 and doc["refined"] == [t.theta_id for t in best]
    assert doc["thetas"][8:] == [t.to_dict() for t in best]

    assert "3 trained, 0 failed, 8 already finished" in invoke("proxy", *base)
    invoke("search", *base)
    fit2 = latest_fit(client, exp_id, "r")
    assert fit2.info.run_id != fit1.info.run_id and fit2.data.params["n_runs"] == "11"
    assert fit2.data.tags["quadmix.fit.inputs"] != fit1.data.tags["quadmix.fit.inputs"]
    out = invoke("propose", *base, "--refine", "2")  # round 2: the new fit's best θ the search lacks
    rounds = {}
    for r in runs_of(cfg, "proxy"):
        if "quadmix.refine.fit" in r.data.tags:
            rounds.setdefault(r.data.tags["quadmix.refine.round"], set()).add(r.data.tags["quadmix.theta_id"])
    assert len(rounds["1"]) == 3 and len(rounds["2"]) == 2 and not rounds["1"] & rounds["2"]
    have = {r.data.tags["quadmix.theta_id"] for r in runs_of(cfg, "proxy")}
    assert len(have) == 13
    ranked = [t.theta_id for t in ranked_candidates(client, exp_id, fit2, 13)]
    assert [i for i in ranked if i not in have - rounds["2"]][:2] == sorted(rounds["2"], key=ranked.index)


def test_a_search_seeded_from_another_fit(search_env):
    """propose --refine N --from S puts S's fit's N best candidates into a search of their own (S's domains, pool
    and draw settings, refused when they differ), trained with another proxy; its fit with search.theta_star=trained
    averages its best trained θ."""
    import numpy as np

    from quadmix_spark.core.runs import child_runs, experiment_id, find_search, latest_fit, latest_theta_star
    from quadmix_spark.kernel.theta import Theta
    from quadmix_spark.search.theta_star import ranked_candidates

    cfg, base = search_env
    screen = [*base, "--set", "proxy.model.kind=ngram", "--search", "screen"]
    invoke("propose", *screen, "-n", "8")
    invoke("proxy", *screen)
    top = [*base, "--search", "top"]  # the transformer proxy (the default kind)
    assert "no fit to refine" in invoke("propose", *top, "--refine", "4", "--from", "screen", code=1)
    assert "--from names the search" in invoke("propose", *top, "--from", "screen", code=2)
    invoke("search", *screen)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    fit = latest_fit(client, exp_id, "screen")
    err = invoke("propose", *top, "--set", "search.lambda_mode=linear", "--refine", "4", "--from", "screen", code=1)
    assert "search.lambda_mode" in err and find_search(client, exp_id, "top") is None
    assert "no search named 'nosuch'" in invoke("propose", *top, "--refine", "4", "--from", "nosuch", code=1)

    out = invoke("propose", *top, "--refine", "4", "--from", "screen")
    assert "4 refined θ" in out and "4 new" in out and fit.info.run_id in out
    assert "0 new" in invoke("propose", *top, "--refine", "4", "--from", "screen")
    invoke("search", *screen)  # the source fitted again from the same runs: still the same 4 θ
    assert "0 new" in invoke("propose", *top, "--refine", "4", "--from", "screen")
    parent = find_search(client, exp_id, "top")
    assert parent.info.status == "FINISHED" and parent.data.params["search.seeded_from"] == "screen"
    assert parent.data.params["search.domains"] == fit.data.tags["quadmix.domains"]
    assert "domain_tokens.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = child_runs(client, exp_id, parent.info.run_id)
    assert [r.data.tags["quadmix.theta_id"] for r in children] == [t.theta_id for t in ranked_candidates(client, exp_id, fit, 4)]

    assert "4 trained, 0 failed" in invoke("proxy", *top)
    out = invoke("search", *top, "--set", "search.theta_star=trained", "--set", "search.top_k=2")
    assert "the mean of the 2 best trained θ" in out
    runs = sorted(child_runs(client, exp_id, parent.info.run_id), key=lambda r: r.data.metrics["target_loss"])
    best = [Theta.from_dict(json.loads(Path(client.download_artifacts(r.info.run_id, "theta.json")).read_text()))
            for r in runs[:2]]
    _, star = latest_theta_star(client, exp_id, "top")
    star = Theta.from_dict(star)
    assert np.allclose(star.to_vector(), (best[0].to_vector() + best[1].to_vector()) / 2)
    assert star.theta_id not in {t.theta_id for t in best}

    # a race among the best: the 2 θ whose first run measured best, trained again with 2 more seeds
    assert "three ways to add runs" in invoke("propose", *top, "--replicate", "2", "-n", "3", code=2)
    out = invoke("propose", *top, "--replicate", "2", "--seeds", "2")
    assert "the 2 best θ again with seeds [1, 2], 4 new run(s)" in out
    assert "0 new" in invoke("propose", *top, "--replicate", "2", "--seeds", "2")
    assert "4 trained, 0 failed" in invoke("proxy", *top)
    assert "0 new" in invoke("propose", *top, "--replicate", "2", "--seeds", "2")  # ranked by first runs: the same θ
    children = child_runs(client, exp_id, parent.info.run_id)
    reps = [r for r in children if "quadmix.replicate.of" in r.data.tags]
    raced = [r.data.tags["quadmix.theta_id"] for r in runs[:2]]
    assert sorted((r.data.tags["quadmix.theta_id"], r.data.tags["quadmix.seed"]) for r in reps) == \
        sorted((t, s) for t in raced for s in ("1", "2"))
    by_theta = {t: [r.data.metrics["target_loss"] for r in children if r.data.tags["quadmix.theta_id"] == t] for t in raced}
    assert all(len(v) == 3 and len(set(v)) == 3 for v in by_theta.values())  # another seed, another loss
    out = invoke("search", *top, "--set", "search.theta_star=trained", "--set", "search.top_k=1")
    _, star = latest_theta_star(client, exp_id, "top")
    assert Theta.from_dict(star).theta_id == min(raced, key=lambda t: np.mean(by_theta[t]))
    assert {r.data.tags["quadmix.seed"] for r in children} == {"0", "1", "2"}  # every run says its training seed
    # θ* is a raced θ: its proxies with seeds 0-2 chose it, so evaluating with those seeds is refused
    err = invoke("evaluate", *top, "--set", "evaluate.seeds=[2, 3]", code=1)
    assert "shares [2]" in err and "evaluate.seeds=[4, 5]" in err


def test_search_refuses_too_few_runs_and_unknown_search(search_env):
    cfg, base = search_env
    invoke("propose", *base, "-n", "2", "--search", "few")
    err = invoke("search", *base, "--search", "few", code=1)
    assert "few" in err and "need" in err
    err = invoke("proxy", *base, "--search", "nosuch", code=1)
    assert "no search named 'nosuch'" in err
    err = invoke("evaluate", *base, "--search", "few", code=1)
    assert "search 'few' has no fitted θ*" in err


@pytest.mark.parametrize("stage", [
    ["ingest"], ["train-scorers"], ["annotate"], ["normalize"], ["sample", "--baseline", "random"],
    ["sample", "--params", "theta.yaml", "--dry-run"], ["propose", "-n", "2"], ["proxy"], ["search"], ["evaluate"],
])
def test_unreachable_tracking_uri_fails_before_spark(tmp_path, stage):
    out = invoke(stage[0], "-c", str(DEFAULT_CONF), "--set", f"storage.root={tmp_path}", "--set",
                 "tracking.uri=http://127.0.0.1:9", *stage[1:], code=1)
    assert "unreachable" in out and "127.0.0.1:9" in out
    assert not (tmp_path / "tables").exists()
