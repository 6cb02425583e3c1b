"""Evaluate θ* against the baselines at proxy scale (the paper's comparison, spec §4).

Fresh proxies on the same pool and the same token budget (the trainer cycles each arm's data to
``proxy.train.tokens``): θ* from the search's latest fit, and the baselines ``random``,
``topk:<criterion>`` (each criterion, the best one marked) and ``mix``.

- **Held-out target text**: every proxy here is scored on the target set's *evaluation* part
  (``proxy.target.holdout_fraction`` of the examples, by a hash of task and text), which the search's
  proxies never saw, so a win is out of sample; the loss on the search part is logged beside it
  (``search_part.target_loss``) for reference.
- **Equal size**: the baselines keep as many of the pool's tokens as θ* keeps (``evaluate.baseline_fraction:
  match``), so the arms differ in which tokens they select, not how many.
- **Paired seeds**: every arm is trained with the same ``evaluate.seeds``, each seed fixing the
  initialisation and the data order, so arms are compared seed by seed: for each baseline the mean of
  (baseline loss − θ* loss) over seeds (positive = θ* better), its standard error, and the seeds θ* wins.

Results go to an MLflow run ``evaluate-<search>`` with one child run per (arm, seed), the per-arm table
(mean ± std), the paired table and a plot. Rerunning reuses finished child runs (same θ*, arm and seed)
and retrains only the missing ones.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.kernel.theta import Theta
from quadmix_spark.core.runs import (PENDING, ROLE_EVALUATE, ROLE_EVALUATE_PROXY, TAG_ARM, TAG_BASELINE_FRACTION,
                                TAG_BASELINES_VERSION, TAG_PARENT, TAG_PROXY_FINGERPRINT, TAG_PROXY_STATUS, TAG_ROLE,
                                TAG_SEARCH, TAG_SEARCH_FIT_RUN, TAG_SEED, TAG_THETA_ID, TAG_THETA_STAR,
                                THETA_STAR_ARTIFACT, child_runs, experiment_id, latest_theta_star, quote, require_search)


def expand_baselines(names: list[str], criteria: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for kind in ([f"topk:{c}" for c in criteria] if n == "topk:*" else [n]):
            if kind not in out:
                out.append(kind)
    return out


REFERENCE_ARM = "theta_star"
SEARCH_PART_NAME = "search_part"  # the extra target set's name on the evaluate proxies' runs
SEARCH_PART_METRIC = f"{SEARCH_PART_NAME}.target_loss"


@dataclass
class EvaluateResult:
    search: str
    run_id: str
    table: pd.DataFrame
    outcomes: pd.DataFrame
    paired: pd.DataFrame | None = None
    baseline_fraction: float | None = None

    def summary(self) -> str:
        t = self.table
        lines = [f"evaluate, search {self.search!r} (MLflow run {self.run_id}): target loss on the held-out evaluation part "
                 "at equal token budget, mean ± std over seeds (search part for reference)"
                 + (f"; baselines keep {self.baseline_fraction:.4g} of the pool's tokens" if self.baseline_fraction else "")]
        for _, r in t.iterrows():
            mark = "  <- best top-k" if r.get("best_topk") else ""
            ref = f"   search part {r['search_part_mean']:.4f}" if pd.notna(r.get("search_part_mean")) else ""
            lines.append(f"  {r['arm']:<22} {r['mean']:.4f} ± {r['std']:.4f}  (n={int(r['n'])}){ref}{mark}")
        if self.paired is not None and len(self.paired):
            lines.append("paired against θ* (baseline − θ*, same seeds; positive = θ* better):")
            for _, r in self.paired.iterrows():
                se = f"± {r['se']:.4f} SE ({r['z']:+.1f} SE)" if np.isfinite(r["se"]) else "(one seed: no SE)"
                lines.append(f"  {r['arm']:<22} {r['mean']:+.4f} {se}, θ* better on {int(r['wins'])} of {int(r['n'])} seeds")
        return "\n".join(lines)


def summarize(outcomes: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean, std and count of the target loss over finished seeds (and the search part's mean)."""
    ok = outcomes[outcomes["status"] == "finished"]
    table = ok.groupby("label", sort=False)["target_loss"].agg(["mean", "std", "count"]).reset_index()
    table = table.rename(columns={"label": "arm", "count": "n"})
    table["std"] = table["std"].fillna(0.0)
    if SEARCH_PART_METRIC in ok.columns:
        ref = ok.groupby("label", sort=False)[SEARCH_PART_METRIC].mean()
        table["search_part_mean"] = table["arm"].map(ref)
    topk = table[table["arm"].str.startswith("topk:")]
    table["best_topk"] = False
    if len(topk):
        table.loc[topk["mean"].idxmin(), "best_topk"] = True
    return table


def paired_differences(outcomes: pd.DataFrame, reference: str = REFERENCE_ARM, value: str = "target_loss") -> pd.DataFrame:
    """For every other arm: the paired differences (arm − ``reference``) over the seeds both finished:
    ``mean``, ``se`` (sample std / √n; NaN for one seed), ``z`` = mean / se, ``wins`` (seeds where the
    reference's loss is lower) and ``n``. Positive = the reference is better."""
    ok = outcomes[outcomes["status"] == "finished"]
    wide = ok.pivot_table(index="seed", columns="label", values=value, aggfunc="first")
    rows = []
    if reference in wide.columns:
        for arm in [a for a in dict.fromkeys(ok["label"]) if a != reference]:
            d = (wide[arm] - wide[reference]).dropna().to_numpy(np.float64)
            n = len(d)
            se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            mean = float(d.mean()) if n else float("nan")
            z = mean / se if n > 1 and se > 0 else (float("inf") * np.sign(mean) if n > 1 and mean else float("nan"))
            rows.append({"arm": arm, "mean": mean, "se": se, "z": z, "wins": int((d > 0).sum()), "n": n})
    return pd.DataFrame(rows, columns=["arm", "mean", "se", "z", "wins", "n"])


def plot_evaluation(table: pd.DataFrame, paired: pd.DataFrame, path: str | Path) -> Path:
    """Two panels: each arm's mean loss with its std over seeds; each baseline's paired difference with ±2 SE."""
    from quadmix_spark.core.plots import pyplot, save

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(table), 4) + 1.5))
    y = np.arange(len(table))
    colors = ["tab:red" if arm == REFERENCE_ARM else "tab:blue" for arm in table["arm"]]
    a.errorbar(table["mean"], y, xerr=table["std"], fmt="none", ecolor="gray", capsize=3)
    a.scatter(table["mean"], y, c=colors, zorder=3)
    a.set_yticks(y, table["arm"])
    a.invert_yaxis()
    a.set_xlabel("target loss, held-out part (mean ± std over seeds)")
    if len(paired):
        yp = np.arange(len(paired))
        se = paired["se"].fillna(0.0)
        b.errorbar(paired["mean"], yp, xerr=2 * se, fmt="o", capsize=3)
        b.set_yticks(yp, paired["arm"])
        b.invert_yaxis()
    b.axvline(0.0, color="black", lw=0.8)
    b.set_xlabel("baseline − θ* (paired by seed, ± 2 SE); right of 0 = θ* better")
    return save(fig, path, dpi=110)


# The baselines' definition: runs of another version are not reused. 2: every baseline a fixed set of
# documents (random was S = fraction for every document, a fresh draw each epoch, which read several times
# θ*'s unique tokens), and mix cut to the fraction (it was the union of the top-k sets, larger than θ*'s).
BASELINES_VERSION = "2"


def baseline_defaults(domains: list[str]) -> dict[str, float]:
    """The S of a baseline's pool documents its index does not list: 0, every baseline being a fixed set
    (:func:`~quadmix_spark.curation.sample.baseline_selection`)."""
    return {d: 0.0 for d in domains}


def baseline_fraction(spark: SparkSession, cfg: QuadmixConfig, inp, theta_id: str) -> float:
    """``evaluate.baseline_fraction``, or with ``match`` the share of the pool's tokens θ* keeps (its proxy index
    rows with S >= 1), rounded to 4 significant digits (it names the baselines' runs)."""
    from pyspark.sql import functions as F

    from quadmix_spark.core.tables import PROXY_INDEX
    from quadmix_spark.core.storage import read_table

    setting = cfg.evaluate.baseline_fraction
    if setting != "match":
        return float(setting)
    kept = read_table(spark, cfg.storage.table(PROXY_INDEX)).where((F.col("theta_id") == theta_id) & (F.col("S") >= 1.0))
    kept_tokens = kept.agg(F.sum("n_tokens")).first()[0] or 0
    total = inp.annotations.agg(F.sum("n_tokens")).first()[0] or 0
    if kept_tokens <= 0 or total <= 0:
        raise ValueError(f"θ* {theta_id} keeps no document of the pool: no baseline fraction to match")
    return float(f"{min(kept_tokens / total, 1.0):.4g}")


@dataclass
class EvaluateTarget:
    """What an evaluation is of, read before its run opens: the search, its newest fit and θ*, and the proxy
    settings' fingerprint. One MLflow run per target (:meth:`find_run`), resumed by every invocation."""

    search: str
    fit_run: str
    star: dict
    theta_id: str
    fingerprint: str

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_ROLE: ROLE_EVALUATE, TAG_SEARCH: self.search, TAG_THETA_STAR: self.theta_id,
                TAG_SEARCH_FIT_RUN: self.fit_run, TAG_PROXY_FINGERPRINT: self.fingerprint,
                TAG_BASELINES_VERSION: BASELINES_VERSION}

    def find_run(self, client, exp_id: str) -> str | None:
        """The run of an earlier evaluation of this target (any status: an interrupted one is resumed), or None."""
        t = self.tags
        found = client.search_runs([exp_id], max_results=1, filter_string=" and ".join(
            f"tags.`{k}` = {quote(t[k])}" for k in (TAG_ROLE, TAG_SEARCH, TAG_THETA_STAR, TAG_PROXY_FINGERPRINT,
                                                    TAG_BASELINES_VERSION)))
        return found[0].info.run_id if found else None


def evaluate_target(cfg: QuadmixConfig) -> EvaluateTarget:
    """The up-front checks of ``evaluate``: the search exists and has a fitted θ* (the newest fit's)."""
    import mlflow

    from quadmix_spark.search.proxy import proxy_fingerprint

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    search = cfg.search.name
    require_search(client, exp_id, search)
    fit_run, star = latest_theta_star(client, exp_id, search)
    theta_id = Theta.from_dict(star).theta_id
    check_fresh_seeds(client, exp_id, cfg, search, theta_id)
    # results of other proxy settings are not reused
    return EvaluateTarget(search, fit_run, star, theta_id, proxy_fingerprint(cfg))


def check_fresh_seeds(client, exp_id: str, cfg: QuadmixConfig, search: str, theta_id: str) -> None:
    """Refuse to judge θ* with a seed it was chosen with. When θ* is itself a trained θ of the search
    (``search.theta_star: trained`` with ``top_k`` 1, or a race: ``quadmix propose --replicate``), its proxy with
    seed s is the very model whose loss on the search part picked it; trained again with seed s it is the same
    model (same θ, same data, same initialisation), and its luck would carry over to the evaluation part."""
    from quadmix_spark.core.runs import ROLE_PROXY, search_all
    from quadmix_spark.search.proxy import is_finished, train_seed

    runs = search_all(client, exp_id, f"tags.`{TAG_THETA_ID}` = {quote(theta_id)} and tags.`{TAG_SEARCH}` = {quote(search)} "
                                      f"and tags.`{TAG_ROLE}` = '{ROLE_PROXY}'")
    used = sorted({train_seed(r, cfg) for r in runs if is_finished(r, cfg.search.metric)})
    clash = sorted(set(used) & set(cfg.evaluate.seeds))
    if clash:
        start = max([*used, *cfg.evaluate.seeds]) + 1
        free = list(range(start, start + len(cfg.evaluate.seeds)))
        raise ValueError(f"θ* {theta_id} is a θ search {search!r} trained with seeds {used}, which chose it; "
                         f"evaluate.seeds {list(cfg.evaluate.seeds)} shares {clash} with them, and a proxy trained "
                         f"again with such a seed is the same model: set other seeds (e.g. --set 'evaluate.seeds={free}')")


def run_evaluate(spark: SparkSession, cfg: QuadmixConfig, target: EvaluateTarget, parent_id: str) -> EvaluateResult:
    """Train the missing (arm, seed) proxies of ``target`` as children of its run ``parent_id`` (the runner's,
    ``jobs.evaluate_job``), reuse the finished ones, and log the tables and the plot to that run."""
    import mlflow

    from quadmix_spark.search.proxy import (ProxyTask, ensure_eval_set, execute, is_finished, outcomes_frame,
                                     prepare_pool, task_env, tail_defaults, write_plans)
    from quadmix_spark.search.proxy_data import EVALUATE_PART, SEARCH_PART
    from quadmix_spark.curation.sample import run_baseline_index, run_sample_many

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    search = target.search
    inp, pool = prepare_pool(spark, cfg)
    star = Theta.from_dict(target.star, domains=inp.domains, criteria=inp.criteria)
    kinds = expand_baselines(cfg.evaluate.baselines, inp.criteria)
    if THETA_STAR_ARTIFACT not in {a.path for a in client.list_artifacts(parent_id)}:
        client.log_dict(parent_id, star.to_dict(), THETA_STAR_ARTIFACT)
    have = {(r.data.tags.get(TAG_ARM), r.data.tags.get(TAG_SEED)): r for r in child_runs(client, exp_id, parent_id)}

    run_sample_many(spark, cfg, [star], run_id=parent_id, inp=inp)
    fraction = baseline_fraction(spark, cfg, inp, star.theta_id)
    client.set_tag(parent_id, TAG_BASELINE_FRACTION, repr(fraction))
    base_cfg = cfg.model_copy(deep=True)
    base_cfg.sampling.baseline_fraction = fraction
    ids = {REFERENCE_ARM: (star.theta_id, star.theta_key)}
    ids.update({k: v for k, v in run_baseline_index(spark, base_cfg, kinds, run_id=parent_id, inp=inp).items()})
    defaults = {star.theta_id: tail_defaults(star)}
    defaults.update({ids[k][0]: baseline_defaults(inp.domains) for k in kinds})
    plans_dir = write_plans(spark, cfg, pool, defaults)

    metric = cfg.search.metric
    tasks, reused = [], []
    for arm, (theta_id, key) in ids.items():
        for seed in cfg.evaluate.seeds:
            run = have.get((arm, str(seed)))
            if run is not None and is_finished(run, metric):
                m = run.data.metrics
                reused.append({"theta_id": theta_id, "run_id": run.info.run_id, "status": "finished", "label": arm, "seed": seed,
                               "target_loss": m[metric], SEARCH_PART_METRIC: m.get(f"{SEARCH_PART_NAME}.{metric}", np.nan)})
                continue
            if run is None:
                run = client.create_run(exp_id, run_name=f"{arm}-seed{seed}", tags={
                    TAG_PARENT: parent_id, TAG_ROLE: ROLE_EVALUATE_PROXY, TAG_SEARCH: search,
                    TAG_ARM: arm, TAG_SEED: str(seed), TAG_THETA_ID: theta_id, TAG_PROXY_STATUS: PENDING})
            tasks.append(ProxyTask(theta_id, key, run.info.run_id, seed, arm))
    env = task_env(cfg, pool, plans_dir, ensure_eval_set(cfg, pool, EVALUATE_PART),
                   extra_evals={SEARCH_PART_NAME: ensure_eval_set(cfg, pool, SEARCH_PART)})
    outcomes = outcomes_frame(execute(spark, cfg, tasks, env))
    frame = pd.concat([outcomes, pd.DataFrame(reused)], ignore_index=True) if reused else outcomes
    table = summarize(frame)
    paired = paired_differences(frame)
    for _, r in table.iterrows():
        arm = r["arm"].replace(":", "_")
        client.log_metric(parent_id, f"{metric}.{arm}.mean", float(r["mean"]))
        client.log_metric(parent_id, f"{metric}.{arm}.std", float(r["std"]))
    for _, r in paired.iterrows():
        arm = r["arm"].replace(":", "_")
        for k in ("mean", "se", "wins", "n"):
            client.log_metric(parent_id, f"paired.{arm}.{k}", float(r[k]))
    client.log_table(parent_id, table, "evaluate_table.json")
    client.log_table(parent_id, paired, "evaluate_paired.json")
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(parent_id, str(plot_evaluation(table, paired, Path(tmp) / "evaluate.png")), "plots")
    return EvaluateResult(search, parent_id, table, frame, paired, fraction)
