"""Evaluate θ* against the baselines at proxy scale (the paper's comparison, spec §4).

Fresh proxies, several seeds each, on the same pool and the same token budget (the trainer cycles
each arm's data to ``proxy.train.tokens``): θ* from the search's latest fit, and the baselines
``random``, ``topk:<criterion>`` (each criterion, the best one marked) and ``mix``. Results go to an
MLflow run ``evaluate-<search>`` with one child run per (arm, seed) and a table of mean ± std.
Rerunning reuses finished child runs (same θ*, arm and seed) and retrains only the missing ones.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession

from quadmix_spark.config import QuadmixConfig
from quadmix_spark.kernel.theta import Theta
from quadmix_spark.propose import experiment_id, require_search

ROLE_EVALUATE, ROLE_EVALUATE_PROXY = "evaluate", "evaluate-proxy"
THETA_STAR_ARTIFACT = "theta_star.json"


class ThetaStarMissing(LookupError):
    """A search has no fitted θ* yet."""


def latest_theta_star(client, exp_id: str, search: str) -> tuple[str, dict]:
    """(run id, θ* dict) of the newest search fit of ``search``."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`quadmix.role` = 'search-fit' and tags.`quadmix.search` = '{search}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ThetaStarMissing(f"search {search!r} has no fitted θ*: run `quadmix search --search {search}` first")
    run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, THETA_STAR_ARTIFACT, tmp)
        return run_id, json.loads(Path(local).read_text())


def expand_baselines(names: list[str], criteria: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for kind in ([f"topk:{c}" for c in criteria] if n == "topk:*" else [n]):
            if kind not in out:
                out.append(kind)
    return out


@dataclass
class EvaluateResult:
    search: str
    run_id: str
    table: pd.DataFrame
    outcomes: pd.DataFrame

    def summary(self) -> str:
        t = self.table
        lines = [f"evaluate, search {self.search!r} (MLflow run {self.run_id}): target loss at equal token budget, mean ± std"]
        for _, r in t.iterrows():
            mark = "  <- best top-k" if r.get("best_topk") else ""
            lines.append(f"  {r['arm']:<22} {r['mean']:.4f} ± {r['std']:.4f}  (n={int(r['n'])}){mark}")
        return "\n".join(lines)


def summarize(outcomes: pd.DataFrame) -> pd.DataFrame:
    ok = outcomes[outcomes["status"] == "finished"]
    table = ok.groupby("label", sort=False)["target_loss"].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"label": "arm", "count": "n"})
    table["std"] = table["std"].fillna(0.0)
    topk = table[table["arm"].str.startswith("topk:")]
    table["best_topk"] = False
    if len(topk):
        table.loc[topk["mean"].idxmin(), "best_topk"] = True
    return table


def run_evaluate(spark: SparkSession, cfg: QuadmixConfig) -> EvaluateResult:
    import mlflow

    from quadmix_spark.propose import STATUS_TAG, child_runs
    from quadmix_spark.proxy import (FINGERPRINT_TAG, ProxyTask, ensure_eval_set, execute, is_finished, outcomes_frame,
                                     prepare_pool, proxy_fingerprint, task_env, write_plans)
    from quadmix_spark.proxy_pool import pool_predicate
    from quadmix_spark.sample import run_baseline_index, run_sample_many

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    search = cfg.search.name
    require_search(client, exp_id, search)
    fit_run, star_dict = latest_theta_star(client, exp_id, search)
    inp, pool = prepare_pool(spark, cfg)
    star = Theta.from_dict(star_dict, domains=inp.domains, criteria=inp.criteria)
    kinds = expand_baselines(cfg.evaluate.baselines, inp.criteria)
    fingerprint = proxy_fingerprint(cfg)  # results of other proxy settings are not reused

    parent = next(iter(client.search_runs(
        [exp_id], filter_string=f"tags.`quadmix.role` = '{ROLE_EVALUATE}' and tags.`quadmix.search` = '{search}' "
                                f"and tags.`quadmix.theta_star` = '{star.theta_id}' "
                                f"and tags.`{FINGERPRINT_TAG}` = '{fingerprint}'", max_results=1)), None)
    if parent is None:
        parent = client.create_run(exp_id, run_name=f"evaluate-{search}", tags={
            "quadmix.role": ROLE_EVALUATE, "quadmix.search": search, "quadmix.theta_star": star.theta_id,
            "quadmix.search_fit_run": fit_run, "quadmix.stage": "evaluate", FINGERPRINT_TAG: fingerprint})
        client.log_dict(parent.info.run_id, star.to_dict(), THETA_STAR_ARTIFACT)
    parent_id = parent.info.run_id
    have = {(r.data.tags.get("quadmix.arm"), r.data.tags.get("quadmix.seed")): r for r in child_runs(client, exp_id, parent_id)}

    run_sample_many(spark, cfg, [star], run_id=parent_id, where=pool_predicate(cfg))
    ids = {"theta_star": (star.theta_id, star.theta_key)}
    ids.update({k: v for k, v in run_baseline_index(spark, cfg, kinds, where=pool_predicate(cfg), run_id=parent_id).items()})
    plans_dir = write_plans(spark, cfg, pool, [v[0] for v in ids.values()])

    tasks, reused = [], []
    for arm, (theta_id, key) in ids.items():
        for seed in cfg.evaluate.seeds:
            run = have.get((arm, str(seed)))
            if run is not None and is_finished(run, cfg.search.metric):
                reused.append({"theta_id": theta_id, "run_id": run.info.run_id, "status": "finished", "label": arm, "seed": seed,
                               "target_loss": run.data.metrics[cfg.search.metric]})
                continue
            if run is None:
                run = client.create_run(exp_id, run_name=f"{arm}-seed{seed}", tags={
                    "mlflow.parentRunId": parent_id, "quadmix.role": ROLE_EVALUATE_PROXY, "quadmix.search": search,
                    "quadmix.arm": arm, "quadmix.seed": str(seed), "quadmix.theta_id": theta_id, STATUS_TAG: "pending"})
            tasks.append(ProxyTask(theta_id, key, run.info.run_id, seed, arm))
    env = task_env(cfg, pool, plans_dir, ensure_eval_set(cfg, pool))
    outcomes = outcomes_frame(execute(spark, cfg, tasks, env))
    frame = pd.concat([outcomes, pd.DataFrame(reused)], ignore_index=True) if reused else outcomes
    table = summarize(frame)
    for _, r in table.iterrows():
        arm = r["arm"].replace(":", "_")
        client.log_metric(parent_id, f"{cfg.search.metric}.{arm}.mean", float(r["mean"]))
        client.log_metric(parent_id, f"{cfg.search.metric}.{arm}.std", float(r["std"]))
    client.log_table(parent_id, table, "evaluate_table.json")
    if parent.info.status == "RUNNING":
        client.set_terminated(parent_id, "FINISHED")
    return EvaluateResult(search, parent_id, table, frame)
