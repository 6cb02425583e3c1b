"""The ``search`` stage (spec §3.3-3.4, RegMix §6.3-6.4): read the searches' runs, fit LightGBM from θ to the
proxies' target loss, draw candidates with Algorithm 1, average the best predicted ones into θ*, and log it
all as one MLflow run. The input contract is in :mod:`quadmix_spark.search.run_table`.

Output
------
:func:`fit_theta_star` computes, :func:`log_search` logs ONE new run in the same experiment (the runner
``jobs.search_job`` opens it): run name ``search-fit-<names>``, tags
``quadmix.role=search-fit``, ``quadmix.stage=search``, ``quadmix.search=<comma-joined names>``,
``quadmix.theta_id=<θ* id>``, ``quadmix.fit.inputs`` (:func:`fit_inputs_key`: the same for a refit of the same
inputs); params (``n_runs``, ``search_names``, ``n_candidates``, ``top_k``, ``cv_folds``,
``lightgbm.<param>``, ``theta_star.<feature name>``); metrics ``cv_mae``, ``cv_spearman`` (out of sample:
K-fold cross-validation over θ, see :class:`~quadmix_spark.search.regression.SearchFit`), ``cv_folds``, ``n_trees`` (of the final model,
fitted on every run), ``top_pred_mean`` (and ``pred_*`` quantiles of the candidates' predicted loss); the
LightGBM model (``model``, MLflow LightGBM flavour); artifacts ``theta_star.json`` (the
:func:`~quadmix_spark.kernel.theta.save_theta` format), ``cv_predictions.csv`` (every run's out-of-fold
prediction), ``top_candidates.csv``, ``config.yaml`` and the plots under ``plots/``.

With ``search.theta_star: trained`` θ* is instead the mean of the best trained θ (:func:`best_trained`): for a
search seeded with another fit's best candidates (``quadmix propose --refine N --from <search>``).

The candidates are drawn with the settings the searches' θ were drawn with: a fit whose
``search.lambda_mode`` or ``search.criteria`` differs from what a search's parent run recorded is refused
(:func:`~quadmix_spark.search.run_table.check_draw_settings`).

The pure parts (:mod:`~quadmix_spark.search.regression`, :mod:`~quadmix_spark.search.candidates`,
:mod:`~quadmix_spark.search.fit_plots`) take arrays and models and touch no store;
:func:`~quadmix_spark.search.run_table.collect_runs` only reads an ``MlflowClient``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quadmix_spark.core.runs import (ROLE_FIT, ROLE_SEARCH, TAG_CRITERIA, TAG_DOMAINS, TAG_FIT_INPUTS, TAG_ROLE,
                                     TAG_SEARCH, TAG_SEARCH_RUN_ID, TAG_SEARCH_WARNINGS, TAG_THETA_ID,
                                     THETA_STAR_ARTIFACT, names_tag, quote, search_all)
from quadmix_spark.kernel.theta import Theta, average_top_k, save_theta, unflatten
from quadmix_spark.search.candidates import CandidateResult, active_mask, search_candidates
from quadmix_spark.search.fit_plots import make_plots
from quadmix_spark.search.regression import (THREAD_KEYS, SearchFit, featurizer_for, fit_search, fit_warnings,
                                             group_numbers)
from quadmix_spark.search.run_table import (RunTable, SearchInputError, check_draw_settings, check_enough, collect_runs,
                                            search_domain_tokens)

@dataclass
class SearchOutcome:
    """A fit and its θ*: made by :func:`fit_theta_star` (touching no store), logged by :func:`log_search`, which
    sets ``run_id`` (and ``out_path``)."""

    experiment_id: str
    search_names: list[str]
    theta_star: Theta
    metrics: dict[str, float]
    runs: RunTable
    fit: SearchFit
    candidates: CandidateResult
    features: str = "theta"
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    out_path: Path | None = None

    @property
    def run_name(self) -> str:
        return f"search-fit-{'+'.join(self.search_names)}"

    def summary(self) -> str:
        mt = self.metrics
        skipped = {s: d for s, d in self.runs.skipped.items() if d}
        lines = [
            f"search {', '.join(self.search_names)}: {len(self.runs)} finished proxy runs"
            + (f" (skipped: {skipped})" if skipped else ""),
            f"  LightGBM on {self.features} features ({len(self.fit.feature_names)}): {self.fit.folds}-fold cross-validation over θ, out of sample MAE {mt['cv_mae']:.4g}, Spearman ρ "
            f"{mt['cv_spearman']:.3f}; final model on all {self.fit.n_runs} runs, {self.fit.n_trees} trees "
            f"(median of the folds' early stopping)",
            f"  candidates: {self.candidates.n_candidates:,} from Algorithm 1, predicted loss median "
            f"{self.candidates.pred_quantiles[0.5]:.4g}, best {self.candidates.pred_quantiles[0.0]:.4g}; "
            f"top {self.candidates.top_k} mean {mt['top_pred_mean']:.4g}",
            f"  θ* {self.theta_star.theta_id} ({self.theta_star.n_domains} domains × {self.theta_star.n_criteria} criteria"
            + (f"; the mean of the {min(self.params['top_k'], len(self.runs))} best trained θ, search.theta_star: trained"
               if self.params.get("theta_star_from") == "trained" else "")
            + f"), MLflow run {self.run_id}" + (f", written to {self.out_path}" if self.out_path else ""),
        ]
        lines += [f"  warning: {w}" for w in fit_warnings(self.fit)]
        return "\n".join(lines)


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list, tuple, bool)) or v is None else str(v)
    return s[:500]


def fit_theta_star(cfg, search_names: Sequence[str] | None = None) -> SearchOutcome:
    """The ``search`` stage's work: collect the named searches' finished proxy runs (default ``[cfg.search.name]``),
    check them (enough runs, the settings their θ were drawn with), fit LightGBM, score ``cfg.search.n_candidates``
    Algorithm-1 candidates and average the top k into θ* (or, with ``search.theta_star: trained``, the top k trained θ:
    :func:`best_trained`). Reads the tracking store, writes nothing: the runner
    (``jobs.search_job``) opens the stage's run and calls :func:`log_search`."""
    import mlflow

    sc = cfg.search
    names = list(dict.fromkeys(search_names or [sc.name]))
    uri = cfg.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        raise SearchInputError(
            f"MLflow experiment {cfg.tracking.experiment!r} not found at {uri}; "
            "run `quadmix propose` and `quadmix proxy` first"
        )
    table = collect_runs(client, exp.experiment_id, names, sc.metric)
    counts = table.counts()
    check_enough({n: counts.get(n, 0) for n in names}, sc.min_runs, names)
    check_draw_settings(client, exp.experiment_id, names, cfg, table)
    active = active_mask(table.criteria, sc.criteria)
    tokens = search_domain_tokens(client, exp.experiment_id, names, table.domains)
    features = featurizer_for(sc.features, table.domains, table.criteria, tokens)
    X = pd.DataFrame(features(table.X.to_numpy()), columns=features.names)
    fit = fit_search(X, table.y, sc.lightgbm, sc.cv_folds, sc.val_fraction, sc.early_stopping_rounds, sc.seed,
                     groups=table.theta_ids)
    threads = next((sc.lightgbm[k] for k in THREAD_KEYS if k in sc.lightgbm), None)
    cands = search_candidates(
        fit.model, table.domains, table.criteria, sc.n_candidates, sc.top_k, sc.candidate_seed, sc.lambda_mode, active,
        num_threads=threads, featurize=features, shared_omega=sc.shared_omega, omega_spread=sc.omega_spread,
    )
    theta = cands.theta_star if sc.theta_star == "candidates" else best_trained(table, sc.top_k)
    metrics = {
        "cv_mae": fit.cv_mae,
        "cv_spearman": fit.cv_spearman,
        "cv_folds": float(fit.folds),
        "n_trees": float(fit.n_trees),
        "top_pred_mean": float(cands.top_pred.mean()),
        **{f"pred_q{int(round(q * 100)):02d}": v for q, v in cands.pred_quantiles.items()},
    }
    params = {
        "n_runs": len(table),
        "search_names": ",".join(names),
        "n_candidates": sc.n_candidates,
        "top_k": sc.top_k,
        "theta_star_from": sc.theta_star,
        "candidate_seed": sc.candidate_seed,
        "split_seed": sc.seed,
        "cv_folds": sc.cv_folds,
        "features": features.kind,
        "val_fraction": sc.val_fraction,
        "early_stopping_rounds": sc.early_stopping_rounds,
        "lambda_mode": sc.lambda_mode,
        "shared_omega": sc.shared_omega,
        "omega_spread": sc.omega_spread,
        "metric": sc.metric,
        "active_criteria": sc.criteria,
        **{f"lightgbm.{k}": v for k, v in sc.lightgbm.items()},
        **{f"theta_star.{k}": repr(float(v)) for k, v in zip(table.X.columns, theta.to_vector())},
    }
    tags = {
        TAG_ROLE: ROLE_FIT,
        TAG_SEARCH: ",".join(names),
        TAG_THETA_ID: theta.theta_id,
        TAG_DOMAINS: json.dumps(list(table.domains)),
        TAG_CRITERIA: json.dumps(list(table.criteria)),
        TAG_FIT_INPUTS: fit_inputs_key(params, table, tokens),
    }
    warnings = fit_warnings(fit)
    if warnings:
        tags[TAG_SEARCH_WARNINGS] = " | ".join(warnings)[:5000]
    if len(names) == 1:
        parents = search_all(client, exp.experiment_id,
                              f"tags.`{TAG_SEARCH}` = {quote(names[0])} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        if len(parents) == 1:
            tags[TAG_SEARCH_RUN_ID] = parents[0].info.run_id

    return SearchOutcome(exp.experiment_id, names, theta, metrics, table, fit, cands, features.kind, params, tags)


def fit_inputs_key(params: dict[str, Any], table: RunTable, domain_tokens: Sequence[float] | None) -> str:
    """A digest of everything a fit is made from: its settings (``params`` less θ*, which they determine), the
    pool's tokens per domain, and every run it reads (run, θ and search ids, the metric's exact value; a run's θ
    is fixed by its id). The fit is deterministic, so two fits with the same key are the same fit under two run
    ids (``quadmix search`` run again with nothing new): ``quadmix propose --refine`` treats them as one."""
    settings = {k: _param_value(v) for k, v in params.items() if not k.startswith("theta_star.")}
    runs = [[r, t, s, float(y).hex()] for r, t, s, y in zip(table.run_ids, table.theta_ids, table.search_of_run, table.y)]
    doc = {"settings": settings, "domains": list(table.domains), "criteria": list(table.criteria),
           "domain_tokens": None if domain_tokens is None else [float(v).hex() for v in domain_tokens], "runs": runs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def best_trained(table: RunTable, k: int) -> Theta:
    """θ* from the trained θ themselves (``search.theta_star: trained``): the element-wise mean of the ``k`` θ
    of lowest measured metric (all of them when fewer), averaged as the paper averages its best candidates. For a
    search whose θ are already a fit's best candidates judged by a costlier proxy, where a fit of that narrow
    region would be asked about the whole prior; averaging k runs damps the luck of any one run's seed.

    A θ trained with several seeds (``quadmix propose --replicate``) counts once, by the mean of its runs, and
    only the θ with the most runs compete: the race's finalists, whose means are the ones comparable with
    each other (see :func:`trained_means`)."""
    ids, means, rows = trained_means(table)
    b = unflatten(table.X.to_numpy()[rows], len(table.domains), len(table.criteria))
    return average_top_k(b.alpha, b.lam, b.omega, b.eta, b.eps, means, min(k, len(ids)),
                         domains=table.domains, criteria=table.criteria)


def trained_means(table: RunTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(θ ids, mean metric, index of each θ's first run in ``table``) of the θ with the most finished runs, in
    order of first appearance. With one run per θ: every θ, its own metric and row, in the table's order."""
    y = np.asarray(table.y, dtype=np.float64)
    of_run = group_numbers(table.theta_ids)
    _, first = np.unique(of_run, return_index=True)
    counts = np.bincount(of_run)
    keep = np.flatnonzero(counts == counts.max())
    # fsum: the exact sum, whatever order the runs of a θ come in (their run ids differ from one store to another);
    # the runs grouped by one sort, not one scan of the table per θ
    by_theta = np.split(y[np.argsort(of_run, kind="stable")], np.cumsum(counts)[:-1])
    means = np.array([math.fsum(by_theta[j]) / counts[j] for j in keep], dtype=np.float64)
    return [table.theta_ids[first[j]] for j in keep], means, first[keep]


def log_search(outcome: SearchOutcome, run_id: str, out_path: str | Path | None = None) -> SearchOutcome:
    """Log a fit into the active MLflow run ``run_id``, opened with ``outcome.tags`` (see the module docstring; the
    stage's run carries the config and its fingerprint); ``out_path`` (.json/.yaml) also gets θ*."""
    import lightgbm
    import mlflow
    import mlflow.lightgbm

    fit, cands, table, theta = outcome.fit, outcome.candidates, outcome.runs, outcome.theta_star
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlflow.log_params({k: _param_value(v) for k, v in outcome.params.items()})
        mlflow.log_metrics(outcome.metrics)  # NaN (ρ of constant predictions) is stored as NaN: the key is always there
        save_theta(theta, tmp / THETA_STAR_ARTIFACT)
        mlflow.log_artifact(str(tmp / THETA_STAR_ARTIFACT))
        oof = pd.DataFrame({
            "run_id": table.run_ids, "theta_id": table.theta_ids, "search": table.search_of_run, "fold": fit.fold_of,
            "actual": fit.y, "predicted_out_of_fold": fit.oof_pred,
        })
        oof.to_csv(tmp / "cv_predictions.csv", index=False)
        mlflow.log_artifact(str(tmp / "cv_predictions.csv"))
        top = pd.DataFrame(cands.top_features, columns=table.X.columns)
        top.insert(0, "predicted", cands.top_pred)
        top.to_csv(tmp / "top_candidates.csv", index=False)
        mlflow.log_artifact(str(tmp / "top_candidates.csv"))
        for p in make_plots(fit, cands, tmp / "plots", outcome.params["metric"]):
            mlflow.log_artifact(str(p), artifact_path="plots")
        mlflow.lightgbm.log_model(fit.model, name="model", pip_requirements=[f"lightgbm=={lightgbm.__version__}"])
    outcome.run_id = run_id
    if out_path is not None:
        outcome.out_path = save_theta(theta, out_path)
    return outcome


def ranked_candidates(client, experiment_id: str, fit_run, k: int) -> list[Theta]:
    """The ``k`` candidates a logged fit predicts best, best first: its model (``runs:/<id>/model``) over the
    candidates it drew itself (its ``n_candidates``, ``candidate_seed`` and sampler settings, read from its
    params), so each is a draw from the distribution every later fit of the search searches too.

    What ``quadmix propose --refine`` proposes: training the fit's favourites shows the next fit where it was
    wrong about the region θ* comes from (RegMix and QuaDMix fit once; this is the cheap sequential step)."""
    import mlflow.lightgbm

    p = fit_run.data.params
    domains, criteria = names_tag(fit_run, TAG_DOMAINS), names_tag(fit_run, TAG_CRITERIA)
    if domains is None or criteria is None or "n_candidates" not in p:
        raise SearchInputError(f"run {fit_run.info.run_id} is not a search fit of quadmix (no domains, criteria or "
                               "candidate settings recorded)")
    n_candidates = int(p["n_candidates"])
    if not 1 <= k <= n_candidates:
        raise SearchInputError(f"asked for the {k} best candidates of a fit that drew {n_candidates}: at most that many "
                               "(raise search.n_candidates and fit again)")
    names = p.get("search_names", fit_run.data.tags.get(TAG_SEARCH, "")).split(",")
    tokens = search_domain_tokens(client, experiment_id, names, domains)
    features = featurizer_for(p.get("features", "theta"), domains, criteria, tokens)
    if features.kind != p.get("features", "theta"):
        raise SearchInputError(f"fit {fit_run.info.run_id} used features {p.get('features')!r}, which need the pool's "
                               "tokens per domain its searches no longer record")
    model = mlflow.lightgbm.load_model(f"runs:/{fit_run.info.run_id}/model")
    active = json.loads(p.get("active_criteria", "null"))
    cands = search_candidates(model, domains, criteria, n_candidates, k, int(p["candidate_seed"]), p["lambda_mode"],
                              active_mask(criteria, active), featurize=features,
                              shared_omega=float(p.get("shared_omega", 0.0)), omega_spread=float(p.get("omega_spread", 0.25)))
    b = unflatten(cands.top_features, len(domains), len(criteria))
    return [Theta(tuple(domains), tuple(criteria), b.alpha[i], b.lam[i], b.omega[i], b.eta[i], b.eps[i])
            for i in range(len(cands.top_pred))]
