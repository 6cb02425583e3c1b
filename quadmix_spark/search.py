"""The search (spec §3.3-3.4, RegMix §6.3-6.4): fit LightGBM from θ to the proxies' target loss, draw
candidates with Algorithm 1, average the best predicted ones into θ*.

Input: the MLflow contract
--------------------------
The runs are read from the experiment ``cfg.tracking.experiment`` of the store ``cfg.tracking_uri``.
Other stages (``quadmix propose``, ``quadmix proxy``) write them, and a user's own trainer may too:

- a **search** is a parent run tagged ``quadmix.search=<name>`` and ``quadmix.role=search``;
- each **θ** is a child run tagged ``quadmix.search=<name>``, ``quadmix.role=proxy``,
  ``quadmix.theta_id=<id>``, ``quadmix.domains=<JSON list>``, ``quadmix.criteria=<JSON list>`` and
  ``mlflow.parentRunId=<parent run id>``, carrying θ as params under the names of
  :func:`quadmix_spark.kernel.theta.feature_names` (``quadmix.alpha.<domain>.<criterion>``,
  ``quadmix.lambda.<domain>``, ``quadmix.omega.<domain>``, ``quadmix.eta.<domain>``,
  ``quadmix.epsilon.<domain>``; values are strings of floats, the rescaled λ̃, ω̃, η̃, ε̃);
- a proxy that finished has run status ``FINISHED`` and the metric named ``cfg.search.metric``
  (default ``target_loss``; the last logged value is used).

Only finished proxy runs with a finite metric enter the fit; running, failed and killed runs, and
runs without the metric, are counted and skipped. Features are built **by name** from the params (never
by position), in the canonical order of ``feature_names(domains, criteria)``. The fit refuses, with
:class:`SearchInputError`, runs that disagree on the domain or criterion names (for example two searches
over different domain sets), runs lacking a feature param or the name tags, and params that are not
numbers; an unknown search name is an error listing the searches the experiment holds.

Output
------
:func:`run_search` logs ONE new run in the same experiment: run name ``search-fit-<names>``, tags
``quadmix.role=search-fit``, ``quadmix.stage=search``, ``quadmix.search=<comma-joined names>``,
``quadmix.theta_id=<θ* id>``; params (``n_runs``, ``search_names``, ``n_candidates``, ``top_k``, ``cv_folds``,
``lightgbm.<param>``, ``theta_star.<feature name>``); metrics ``cv_mae``, ``cv_spearman`` (out of sample:
K-fold cross-validation over θ, see :class:`SearchFit`), ``cv_folds``, ``n_trees`` (of the final model,
fitted on every run), ``top_pred_mean`` (and ``pred_*`` quantiles of the candidates' predicted loss); the
LightGBM model (``model``, MLflow LightGBM flavour); artifacts ``theta_star.json`` (the
:func:`~quadmix_spark.kernel.theta.save_theta` format), ``cv_predictions.csv`` (every run's out-of-fold
prediction), ``top_candidates.csv``, ``config.yaml`` and the plots under ``plots/``.

The candidates are drawn with the settings the searches' θ were drawn with: a fit whose
``search.lambda_mode`` or ``search.criteria`` differs from what a search's parent run recorded is refused
(:func:`check_draw_settings`).

The pure parts (:func:`fit_regressor`, :func:`search_candidates`, the plots) take arrays and models
and touch no store; :func:`collect_runs` only reads an ``MlflowClient``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quadmix_spark.kernel.theta import (
    Theta,
    average_top_k,
    feature_names,
    save_theta,
    sample_theta_matrix,
    unflatten,
)
from quadmix_spark.plots import pyplot, save
from quadmix_spark.runs import (DOMAIN_TOKENS_ARTIFACT, ROLE_FIT, ROLE_PROXY, ROLE_SEARCH, TAG_CONFIG_FINGERPRINT,
                                TAG_CRITERIA, TAG_DOMAINS, TAG_PROXY_FINGERPRINT, TAG_ROLE, TAG_SEARCH, TAG_SEARCH_RUN_ID,
                                TAG_SEARCH_WARNINGS, TAG_STAGE, TAG_THETA_ID, THETA_STAR_ARTIFACT, names_tag, quote,
                                search_all)

PLOT_SAMPLE = 2000
QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
_LIST_LIMIT = 10  # names/run ids shown in an error message before "... and n more"


class SearchInputError(ValueError):
    """The runs cannot be fitted as they are: unknown search, disagreeing names, missing params, too few runs."""


def _short(items: Sequence[Any], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------- collect runs
@dataclass
class RunTable:
    """The finished proxy runs of one or more searches, as a feature matrix.

    ``X`` has the columns ``feature_names(domains, criteria)`` in that order; row i belongs to
    ``run_ids[i]`` (θ ``theta_ids[i]`` of search ``search_of_run[i]``) with target ``y[i]``. Rows are
    sorted by (search, θ id, run id), so the table does not depend on the store's listing order.
    ``skipped`` counts, per search, runs left out and why (``status:<STATUS>``, ``no_metric``).
    """

    X: pd.DataFrame
    y: np.ndarray
    run_ids: list[str]
    theta_ids: list[str]
    search_of_run: list[str]
    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict[str, int]:
        """Finished proxy runs per search."""
        out: dict[str, int] = {}
        for s in self.search_of_run:
            out[s] = out.get(s, 0) + 1
        return out


def search_names_in(client, experiment_id: str) -> list[str]:
    """The search names that appear in the experiment (on search parents and proxy runs), sorted."""
    names: set[str] = set()
    for role in (ROLE_SEARCH, ROLE_PROXY):
        for run in search_all(client, experiment_id, f"tags.`{TAG_ROLE}` = '{role}'"):
            name = run.data.tags.get(TAG_SEARCH)
            if name:
                names.add(name)
    return sorted(names)


def collect_runs(client, experiment_id: str, search_names: Sequence[str], metric: str) -> RunTable:
    """The finished proxy runs (status FINISHED, role ``proxy``, metric present and finite) of the named
    searches, features built by name from the params (see the module docstring for the contract).

    Raises :class:`SearchInputError` for an unknown search name (listing those the experiment holds),
    runs without the ``quadmix.domains``/``quadmix.criteria`` tags, runs that disagree on those names
    (naming the searches and the differing names), missing feature params (naming them) and params that
    are not numbers.
    """
    if isinstance(search_names, str):
        search_names = [search_names]
    names = list(dict.fromkeys(search_names))
    if not names:
        raise SearchInputError("no search names given")

    finished: dict[str, list] = {}
    skipped: dict[str, dict[str, int]] = {}
    unknown = []
    for name in names:
        runs = search_all(
            client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_PROXY}'"
        )
        if not runs and not search_all(
            client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"
        ):
            unknown.append(name)
            continue
        keep, skip = [], {}
        for run in runs:
            if run.info.status != "FINISHED":
                reason = f"status:{run.info.status}"
            elif metric not in run.data.metrics or not math.isfinite(run.data.metrics[metric]):
                reason = "no_metric"
            else:
                keep.append(run)
                continue
            skip[reason] = skip.get(reason, 0) + 1
        finished[name], skipped[name] = keep, skip
    if unknown:
        found = search_names_in(client, experiment_id)
        raise SearchInputError(
            f"unknown search name(s) {unknown} in experiment {experiment_id}: no runs tagged "
            f"{TAG_SEARCH}=<name>; searches found there: {found or 'none'}"
        )

    # -- domain and criterion names: every run must carry them, and all must agree (as sets)
    untagged = [r.info.run_id for rs in finished.values() for r in rs
                if names_tag(r, TAG_DOMAINS) is None or names_tag(r, TAG_CRITERIA) is None]
    if untagged:
        raise SearchInputError(
            f"{len(untagged)} finished proxy run(s) lack a JSON list in the tags {TAG_DOMAINS} / {TAG_CRITERIA}: "
            f"{_short(untagged)}"
        )
    variants: dict[tuple[frozenset, frozenset], dict[str, Any]] = {}
    for name, rs in finished.items():
        for r in rs:
            doms, crits = names_tag(r, TAG_DOMAINS), names_tag(r, TAG_CRITERIA)
            key = (frozenset(doms), frozenset(crits))
            v = variants.setdefault(key, {"domains": doms, "criteria": crits, "searches": {}, "runs": 0})
            v["searches"][name] = v["searches"].get(name, 0) + 1
            v["runs"] += 1
    if len(variants) > 1:
        vs = list(variants.values())
        ref = vs[0]
        lines = []
        for v in vs:
            where = ", ".join(f"{s!r} ({n} runs)" for s, n in v["searches"].items())
            line = f"  searches {where}: {len(v['domains'])} domains, criteria {list(v['criteria'])}"
            if v is not ref:
                diffs = []
                for label, key in (("domains", "domains"), ("criteria", "criteria")):
                    extra = sorted(set(v[key]) - set(ref[key]))
                    missing = sorted(set(ref[key]) - set(v[key]))
                    if extra:
                        diffs.append(f"extra {label} {_short(extra)}")
                    if missing:
                        diffs.append(f"missing {label} {_short(missing)}")
                line += f"; against the first: {'; '.join(diffs)}"
            lines.append(line)
        raise SearchInputError(
            "the runs disagree on domain/criterion names, so their θ are not the same features; "
            "fit each set of searches separately:\n" + "\n".join(lines)
        )
    # losses from proxies trained differently (model, tokens, target set) are not one regression target
    prints: dict[str, list[str]] = {}
    for name, rs in finished.items():
        for r in rs:
            fp = r.data.tags.get(TAG_PROXY_FINGERPRINT)
            if fp:
                prints.setdefault(fp, []).append(name)
    if len(prints) > 1:
        detail = "; ".join(f"{fp}: {len(v)} runs of {sorted(set(v))}" for fp, v in prints.items())
        raise SearchInputError(
            f"the runs were trained with different proxy settings (tag {TAG_PROXY_FINGERPRINT}: {detail}); "
            "their losses are not comparable: fit runs of one proxy setting at a time"
        )

    # canonical order: the first run's (no finished run at all: an empty table, check_enough reports it)
    first = next((r for rs in finished.values() for r in rs), None)
    domains = names_tag(first, TAG_DOMAINS) if first is not None else ()
    criteria = names_tag(first, TAG_CRITERIA) if first is not None else ()

    # -- features by name
    cols = feature_names(domains, criteria) if domains else []
    rows, ys, run_ids, theta_ids, of_search = [], [], [], [], []
    lacking: dict[str, list[str]] = {}
    bad_values: list[str] = []
    for name, rs in finished.items():
        for r in rs:
            params = r.data.params
            missing = [c for c in cols if c not in params]
            if missing:
                lacking[r.info.run_id] = missing
                continue
            try:
                rows.append([float(params[c]) for c in cols])
            except ValueError:
                bad = [c for c in cols if not _is_float(params[c])]
                bad_values.append(f"{r.info.run_id}: {_short([f'{c}={params[c]!r}' for c in bad], 3)}")
                continue
            ys.append(float(r.data.metrics[metric]))
            run_ids.append(r.info.run_id)
            theta_ids.append(r.data.tags.get(TAG_THETA_ID, ""))
            of_search.append(name)
    if lacking:
        all_missing = sorted({c for m in lacking.values() for c in m}, key=cols.index)
        raise SearchInputError(
            f"{len(lacking)} finished proxy run(s) lack feature params {_short(all_missing)} "
            f"(runs {_short(list(lacking))}); every θ param {cols[0]!r}... must be logged"
        )
    if bad_values:
        raise SearchInputError(f"feature params that are not numbers: {_short(bad_values, 5)}")

    order = sorted(range(len(ys)), key=lambda i: (names.index(of_search[i]), theta_ids[i], run_ids[i]))
    X = pd.DataFrame(np.array([rows[i] for i in order], dtype=np.float64).reshape(len(order), len(cols)), columns=cols)
    return RunTable(
        X=X,
        y=np.array([ys[i] for i in order], dtype=np.float64),
        run_ids=[run_ids[i] for i in order],
        theta_ids=[theta_ids[i] for i in order],
        search_of_run=[of_search[i] for i in order],
        domains=tuple(domains),
        criteria=tuple(criteria),
        skipped=skipped,
    )


def _is_float(s: Any) -> bool:
    try:
        float(s)
    except (TypeError, ValueError):
        return False
    return True


def check_enough(n: int | Mapping[str, int], min_runs: int, names: Sequence[str] | str) -> None:
    """Raise :class:`SearchInputError` when fewer than ``min_runs`` finished proxy runs are available.

    ``n`` is the total, or a mapping search name -> count (the message then names each search's count).
    """
    label = names if isinstance(names, str) else ", ".join(names)
    total = sum(n.values()) if isinstance(n, Mapping) else int(n)
    if total >= min_runs:
        return
    per = ""
    if isinstance(n, Mapping) and len(n) > 1:
        per = " (" + ", ".join(f"{k}: {v}" for k, v in n.items()) + ")"
    raise SearchInputError(
        f"search {label} has only {total} finished proxy runs{per}, need {min_runs} "
        "(run `quadmix proxy` or lower search.min_runs)"
    )


# ------------------------------------------------------------------------------- candidate settings
# What `quadmix propose` records on a search's parent run (the settings its θ were drawn with), against the
# config setting the fit's candidates are drawn with. A fit over θ drawn one way and candidates drawn another
# would search outside the region its regressor was fitted on (an ablation's θ*, for instance, gaining weight
# on the ablated criterion).
DRAW_SETTINGS = {"search.lambda_mode": "search.lambda_mode", "search.criteria": "search.criteria",
                 "search.sampler": "the candidate sampler"}


def check_draw_settings(client, experiment_id: str, names: Sequence[str], cfg, table: RunTable) -> None:
    """Refuse a fit whose candidates would be drawn with other settings than any included search's θ were
    (``search.lambda_mode``, ``search.criteria``, the sampler's version), or over other domains or criteria.
    A search whose parent run records none (a user's own trainer) is not checked."""
    from quadmix_spark.propose import sampler_version

    now = {"search.lambda_mode": cfg.search.lambda_mode, "search.criteria": json.dumps(cfg.search.criteria),
           "search.sampler": sampler_version(cfg.search), "search.domains": json.dumps(list(table.domains)),
           "search.all_criteria": json.dumps(list(table.criteria))}
    for name in names:
        parents = search_all(client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        for parent in parents:
            recorded = parent.data.params
            for key, value in now.items():
                have = recorded.get(key)
                if have is None or _same_setting(key, have, value):
                    continue
                raise SearchInputError(
                    f"search {name!r} drew its θ with {key}={have}, but this fit would draw its candidates with {value}: "
                    f"the regressor would be searched outside the region it was fitted on; fit with "
                    + ("the search.shared_omega / search.omega_spread it was proposed with" if key == "search.sampler"
                       else f"--set {key}={have}")
                    + (" (or fit the searches separately)" if len(names) > 1 else "")
                )


def _same_setting(key: str, recorded: str, now: str) -> bool:
    if key in ("search.criteria", "search.domains", "search.all_criteria"):
        a, b = json.loads(recorded), json.loads(now)
        return (a is None and b is None) or (a is not None and b is not None and sorted(a) == sorted(b))
    return recorded == now


# ------------------------------------------------------------------------------- features
FEATURE_SETS = ("theta", "mix", "both")


@dataclass(frozen=True)
class Featurizer:
    """What LightGBM sees of a θ (rows of the canonical ``feature_names`` vector).

    ``theta``: the θ vector itself (the paper's 182 features). ``mix``: what θ implies for the data, given the
    pool's tokens per domain T_m (recorded by ``quadmix propose``): each domain's share of the kept tokens
    ω_m·T_m / Σ ω·T (``mix.share.<domain>``, RegMix's mixture weights), each criterion's weight averaged over the
    kept tokens (``mix.alpha.<criterion>``), and the log of the kept tokens (``mix.log_kept_tokens``). ``both``:
    the two side by side. Measured on the demo's 256 screening proxies: cross-validated Spearman 0.59 with
    ``theta``, 0.80 with ``mix``, 0.78 with ``both`` (a few domain and criterion shares decide the loss, and
    168 raw features hide them from a few hundred runs)."""

    kind: str
    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    domain_tokens: tuple[float, ...] | None = None

    @property
    def names(self) -> list[str]:
        theta = feature_names(self.domains, self.criteria)
        mix = [*(f"mix.share.{d}" for d in self.domains), *(f"mix.alpha.{c}" for c in self.criteria), "mix.log_kept_tokens"]
        return {"theta": theta, "mix": mix, "both": theta + mix}[self.kind]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "theta":
            return x
        b = unflatten(x, len(self.domains), len(self.criteria))
        kept = b.omega * np.asarray(self.domain_tokens, dtype=np.float64)[None, :]
        total = kept.sum(axis=1)
        safe = np.where(total > 0, total, 1.0)
        share = kept / safe[:, None]
        alpha = np.einsum("nmc,nm->nc", b.alpha, share)
        mix = np.concatenate([share, alpha, np.log1p(total)[:, None]], axis=1)
        return mix if self.kind == "mix" else np.concatenate([x, mix], axis=1)


def search_domain_tokens(client, experiment_id: str, names: Sequence[str], domains: Sequence[str]) -> tuple[float, ...] | None:
    """The pool's tokens per domain recorded on the searches' parent runs (in ``domains`` order), or None when
    a search has none (proposed before it was recorded, or by a user's own tooling). Searches over different
    pools are refused: their domain mixes would not be comparable."""

    found = {}
    for name in names:
        for parent in search_all(client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"):
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    tokens = json.loads(Path(client.download_artifacts(parent.info.run_id, DOMAIN_TOKENS_ARTIFACT, tmp)).read_text())
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                return None
            found[name] = tuple(float(tokens.get(d, 0.0)) for d in domains)
    if not found:
        return None
    values = set(found.values())
    if len(values) > 1:
        raise SearchInputError(f"searches {sorted(found)} were proposed over pools with other tokens per domain: fit them apart")
    return values.pop()


def featurizer_for(kind: str, domains: Sequence[str], criteria: Sequence[str], tokens: tuple[float, ...] | None) -> Featurizer:
    """``search.features`` as a :class:`Featurizer`; without recorded domain tokens only ``theta`` is possible."""
    if kind not in FEATURE_SETS:
        raise SearchInputError(f"search.features must be one of {FEATURE_SETS}, got {kind!r}")
    if kind != "theta" and tokens is None:
        kind = "theta"
    return Featurizer(kind, tuple(domains), tuple(criteria), tokens)


# ------------------------------------------------------------------------------- regression
@dataclass
class FitResult:
    """A fitted regressor and its held-out quality (MAE and Spearman ρ on the validation runs)."""

    model: Any  # lightgbm.LGBMRegressor
    feature_names: list[str]
    val_mae: float
    val_spearman: float
    n_train: int
    n_val: int
    best_iteration: int
    val_pred: np.ndarray
    val_true: np.ndarray
    val_index: np.ndarray  # rows of X held out, in the order of val_pred
    train_index: np.ndarray

    def importance(self, kind: str = "gain") -> pd.Series:
        """Feature importance (``gain`` or ``split``) by canonical feature name, largest first."""
        return importance(self.model, self.feature_names, kind)


def importance(model, names: Sequence[str], kind: str = "gain") -> pd.Series:
    """A LightGBM model's feature importance (``gain`` or ``split``) by feature name, largest first."""
    imp = model.booster_.feature_importance(importance_type=kind)
    return pd.Series(imp, index=list(names), dtype=np.float64).sort_values(ascending=False, kind="stable")


# LightGBM's thread settings. When lgb_params name none, the fit runs on ONE thread: with a few thousand
# rows each boosting round is a few ms of work, OpenMP's fork/join per histogram costs more than it saves,
# and on a shared machine a descheduled thread stalls every barrier (measured, 2800 x 182, 1,000 rounds on
# a loaded 2-core box: 18 s on one thread, 109-275 s on two).  Prediction of the candidates (millions of
# rows, split in large chunks) keeps every core the process may use.
THREAD_KEYS = {"n_jobs", "num_threads", "num_thread", "nthread", "nthreads"}


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def predict(model, x: np.ndarray, num_threads: int | None = None) -> np.ndarray:
    """Predictions for a float matrix in feature order: through the LightGBM booster (best iteration) for
    an ``LGBMRegressor`` (no per-call column-name checks; ``num_threads`` default: every usable core),
    else ``model.predict``."""
    booster = getattr(model, "booster_", None)
    if booster is None:
        return np.asarray(model.predict(x), dtype=np.float64)
    best = getattr(model, "best_iteration_", None) or None
    if num_threads is None:
        num_threads = _cores()
    return np.asarray(booster.predict(x, num_iteration=best, num_threads=num_threads), dtype=np.float64)


_LGB_FORBIDDEN = set('[]{}":,')


def _lgb_names(names: Sequence[str]) -> list[str]:
    """The names LightGBM is given: the feature names, unless one has a character it rejects."""
    if any(_LGB_FORBIDDEN & set(n) or " " in n for n in names):
        return [f"f{i}" for i in range(len(names))]
    return list(names)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: a permutation from ``seed``; at least one validation row and two
    training rows (LightGBM refuses to fit one)."""
    if n < 3:
        raise SearchInputError(f"need at least 3 runs to fit on 2 and hold 1 out, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(1, int(round(n * val_fraction))), n - 2)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def fit_regressor(
    X: pd.DataFrame | np.ndarray,
    y: Sequence[float] | np.ndarray,
    lgb_params: Mapping[str, Any],
    val_fraction: float,
    early_stopping_rounds: int,
    seed: int,
    feature_names_: Sequence[str] | None = None,
) -> FitResult:
    """RegMix's regression (spec §6.3): ``LGBMRegressor(**lgb_params)`` on a seeded train/validation split,
    early stopping (``stopping_rounds=early_stopping_rounds``, L2) on the validation runs; reports MAE and
    Spearman ρ of the predictions on those runs.  Unless ``lgb_params`` name a thread setting, the fit runs
    on one thread (see :data:`THREAD_KEYS`)."""
    import lightgbm as lgb

    if isinstance(X, pd.DataFrame):
        names = list(X.columns)
        x = X.to_numpy(dtype=np.float64)
    else:
        x = np.asarray(X, dtype=np.float64)
        names = list(feature_names_) if feature_names_ is not None else [f"f{i}" for i in range(x.shape[1])]
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"X must be (n, F) with one y per row; got X {x.shape}, y {y.shape}")
    tr, va = split_indices(len(y), val_fraction, seed)
    params = dict(lgb_params)
    if not THREAD_KEYS & set(params):
        params["n_jobs"] = 1  # see THREAD_KEYS: threads do not pay on a few thousand rows
    model = lgb.LGBMRegressor(**params)
    model.fit(
        x[tr],
        y[tr],
        eval_X=(x[va],),
        eval_y=(y[va],),
        eval_metric="l2",
        feature_name=_lgb_names(names),
        callbacks=[lgb.early_stopping(stopping_rounds=early_stopping_rounds, verbose=False)],
    )
    pred = predict(model, x[va])
    mae = float(np.mean(np.abs(pred - y[va])))
    rho = _spearman(pred, y[va])
    best = int(model.best_iteration_ or model.n_estimators_)
    return FitResult(model, names, mae, rho, len(tr), len(va), best, pred, y[va], va, tr)


def _spearman(pred: np.ndarray, true: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(true) >= 2 and np.ptp(pred) > 0 and np.ptp(true) > 0:
        return float(spearmanr(pred, true).statistic)
    return float("nan")


@dataclass
class SearchFit:
    """The stage's regression: K-fold cross-validation over θ for an honest out-of-sample error, then one
    model on every run.

    Each fold's model is fitted by :func:`fit_regressor` on the other folds (early stopping on a
    ``val_fraction`` share of *those* runs), and predicts its fold, which it never saw: ``oof_pred`` holds
    every run's out-of-fold prediction, ``cv_mae`` / ``cv_spearman`` compare them with ``y``. The final
    ``model`` is fitted on all runs with ``n_trees`` = the median of the folds' early-stopped tree counts
    (no run is held out of it, and none is used twice to choose and to judge)."""

    model: Any
    feature_names: list[str]
    y: np.ndarray
    oof_pred: np.ndarray
    fold_of: np.ndarray
    fold_trees: list[int]
    n_trees: int
    cv_mae: float
    cv_spearman: float

    @property
    def folds(self) -> int:
        return len(self.fold_trees)

    @property
    def n_runs(self) -> int:
        return len(self.y)

    def importance(self, kind: str = "gain") -> pd.Series:
        return importance(self.model, self.feature_names, kind)


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold of each of ``n`` runs: a seeded permutation dealt round-robin, so fold sizes differ by at most one.

    At most ``n`` folds, so every fold's training side keeps at least 3 runs for :func:`split_indices`
    when ``n >= 4``."""
    if n < 4:
        raise SearchInputError(f"need at least 4 runs to cross-validate (3 to fit each fold on), got {n}")
    folds = min(folds, n)
    out = np.empty(n, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return out


def fit_search(
    X: pd.DataFrame,
    y: Sequence[float] | np.ndarray,
    lgb_params: Mapping[str, Any],
    folds: int,
    val_fraction: float,
    early_stopping_rounds: int,
    seed: int,
) -> SearchFit:
    """K-fold cross-validated fit and the final model on all runs (see :class:`SearchFit`)."""
    import lightgbm as lgb

    names = list(X.columns)
    x = X.to_numpy(dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    fold_of = fold_assignment(len(y), folds, seed)
    oof = np.empty(len(y))
    trees = []
    for k in range(int(fold_of.max()) + 1):
        test = fold_of == k
        fit = fit_regressor(x[~test], y[~test], lgb_params, val_fraction, early_stopping_rounds, seed + 1 + k, names)
        oof[test] = predict(fit.model, x[test])
        trees.append(fit.best_iteration)
    n_trees = max(1, int(np.median(trees)))
    params = {**dict(lgb_params), "n_estimators": n_trees}
    if not THREAD_KEYS & set(params):
        params["n_jobs"] = 1
    model = lgb.LGBMRegressor(**params)
    model.fit(x, y, feature_name=_lgb_names(names))
    mae = float(np.mean(np.abs(oof - y)))
    return SearchFit(model, names, y, oof, fold_of, trees, n_trees, mae, _spearman(oof, y))


# Below this out-of-sample Spearman ρ the regressor is said not to rank runs it has not seen.
WEAK_SPEARMAN = 0.3


def fit_warnings(fit: SearchFit | FitResult) -> list[str]:
    """Why θ* may be no better than a random draw, read off the regressor's out-of-sample evidence (empty when
    the fit looks sound).  Printed with the search's summary and logged as the ``quadmix.search.warnings`` tag."""
    out = []
    trees = fit.n_trees if isinstance(fit, SearchFit) else fit.best_iteration
    if trees <= 1:
        out.append("early stopping kept 1 tree: the regressor is nearly constant and the best candidates mostly tie")
    if isinstance(fit, SearchFit):
        rho, what = fit.cv_spearman, f"{fit.folds}-fold cross-validated Spearman ρ {fit.cv_spearman:.2f} over {fit.n_runs} runs"
    else:
        rho, what = fit.val_spearman, f"validation Spearman ρ {fit.val_spearman:.2f} on {fit.n_val} held-out runs"
    if not np.isfinite(rho) or rho < WEAK_SPEARMAN:
        out.append(f"{what}: the regressor does not rank runs it has not seen; train more proxies (the paper fits "
                   "3,000) before trusting θ*")
    return out


# ------------------------------------------------------------------------------- candidates
@dataclass
class CandidateResult:
    """θ* and what it came from.

    ``top_features`` (k, F) and ``top_pred`` (k,) are the k best candidates, best first;
    ``pred_quantiles`` maps a quantile (0, 0.01, ..., 1) to the candidates' predicted loss there;
    ``sample_features`` / ``sample_pred`` are the first ``PLOT_SAMPLE`` candidates (for plots).
    """

    theta_star: Theta
    top_features: np.ndarray
    top_pred: np.ndarray
    pred_quantiles: dict[float, float]
    sample_features: np.ndarray
    sample_pred: np.ndarray
    n_candidates: int
    top_k: int
    seed: int


def _batch_top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores, best first, ties in index order (as a full stable sort would)."""
    if k >= scores.shape[0]:
        return np.argsort(scores, kind="stable")
    thr = np.partition(scores, k - 1)[k - 1]
    idx = np.flatnonzero(scores <= thr)
    return idx[np.argsort(scores[idx], kind="stable")[:k]]


def search_candidates(
    model,
    domains: Sequence[str],
    criteria: Sequence[str],
    n_candidates: int,
    top_k: int,
    seed: int,
    lambda_mode: str = "log",
    active_criteria: Sequence[bool] | None = None,
    batch: int = 100_000,
    num_threads: int | None = None,
    featurize: Callable[[np.ndarray], np.ndarray] | None = None,
    shared_omega: float = 0.0,
    omega_spread: float = 0.25,
) -> CandidateResult:
    """Draw ``n_candidates`` θ with Algorithm 1 (one Generator from ``seed``, ``batch`` rows at a time, so
    memory stays bounded for millions), predict each with ``model``, keep a running top-k and return θ* =
    :func:`~quadmix_spark.kernel.theta.average_top_k` of the ``top_k`` lowest predicted losses. ``featurize``
    maps the candidates' θ vectors to the model's features (see :class:`Featurizer`); θ* is averaged in θ.

    The candidates depend on (``seed``, ``batch``, ``lambda_mode``, ``active_criteria``, ``shared_omega``,
    ``omega_spread``: drawn as the proposals were, see ``sample_theta_matrix``); ``num_threads``
    (LightGBM prediction threads) defaults to every core the process may use."""
    domains, criteria = tuple(domains), tuple(criteria)
    m, nc = len(domains), len(criteria)
    if not 1 <= top_k <= n_candidates:
        raise ValueError(f"top_k must be in [1, n_candidates={n_candidates}], got {top_k}")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    rng = np.random.default_rng(seed)
    n_feat = (nc + 4) * m
    top_x = np.empty((0, n_feat))
    top_s = np.empty(0)
    preds = np.empty(n_candidates)
    sample_x = None
    done = 0
    while done < n_candidates:
        b = min(batch, n_candidates - done)
        cand = sample_theta_matrix(b, m, nc, rng, lambda_mode, active_criteria, shared_omega, omega_spread)
        x = np.concatenate([cand.alpha.reshape(b, -1), cand.lam, cand.omega, cand.eta, cand.eps], axis=1)
        s = predict(model, featurize(x) if featurize is not None else x, num_threads)
        preds[done : done + b] = s
        if sample_x is None:
            sample_x = x[: min(PLOT_SAMPLE, b)].copy()
        idx = _batch_top(s, top_k)
        # earlier candidates first, so ties keep the global draw order
        merged_x = np.concatenate([top_x, x[idx]])
        merged_s = np.concatenate([top_s, s[idx]])
        keep = _batch_top(merged_s, top_k)
        top_x, top_s = merged_x[keep], merged_s[keep]
        done += b
    tb = unflatten(top_x, m, nc)
    theta_star = average_top_k(*tb, top_s, top_k, domains=domains, criteria=criteria)
    n_sample = min(PLOT_SAMPLE, n_candidates)
    return CandidateResult(
        theta_star=theta_star,
        top_features=top_x,
        top_pred=top_s,
        pred_quantiles={q: float(v) for q, v in zip(QUANTILES, np.quantile(preds, QUANTILES))},
        sample_features=sample_x if sample_x is not None else np.empty((0, n_feat)),
        sample_pred=preds[:n_sample].copy(),
        n_candidates=n_candidates,
        top_k=top_k,
        seed=seed,
    )


def active_mask(criteria: Sequence[str], active: Sequence[str] | None) -> list[bool] | None:
    """``search.criteria`` (names with non-zero weight; None = all) as Algorithm 1's boolean mask."""
    if active is None:
        return None
    unknown = sorted(set(active) - set(criteria))
    if unknown:
        raise SearchInputError(f"search.criteria names {unknown} are not criteria of the runs ({list(criteria)})")
    return [c in set(active) for c in criteria]


# ------------------------------------------------------------------------------- plots


def plot_pred_vs_actual(fit: SearchFit, path: str | Path, metric: str = "target_loss") -> Path:
    """Out-of-fold predicted against actual loss of every run, with y = x, MAE and ρ in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(fit.y, fit.oof_pred, s=14, alpha=0.8)
    both = np.concatenate([fit.y, fit.oof_pred])
    lo, hi = float(both.min()), float(both.max())
    pad = (hi - lo) * 0.05 or 0.01
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--")
    ax.set_xlabel(f"actual {metric}")
    ax.set_ylabel(f"predicted {metric} (out of fold)")
    ax.set_title(f"{fit.folds}-fold CV: n={fit.n_runs}, MAE={fit.cv_mae:.4g}, Spearman ρ={fit.cv_spearman:.3f}")
    return save(fig, path)


def plot_importance(fit: SearchFit, path: str | Path, top: int = 30) -> Path:
    """The ``top`` features by total gain."""
    plt = pyplot()
    imp = fit.importance("gain").head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(imp) + 1)))
    ax.barh(range(len(imp)), imp.to_numpy())
    ax.set_yticks(range(len(imp)))
    ax.set_yticklabels([n.removeprefix("quadmix.") for n in imp.index], fontsize=7)
    ax.set_xlabel("gain")
    ax.set_title(f"feature importance (top {len(imp)} by gain)")
    return save(fig, path)


def plot_theta_star(cands: CandidateResult, path: str | Path) -> Path:
    """Per domain: the candidates' spread of ω̃, λ̃, η̃ (box) with the top-k (dots) and θ* (red marker),
    and θ*'s α as stacked bars."""
    plt = pyplot()
    ts = cands.theta_star
    m, nc = ts.n_domains, ts.n_criteria
    sample = unflatten(cands.sample_features, m, nc)
    top = unflatten(cands.top_features, m, nc)
    xs = np.arange(m)
    fig, axes = plt.subplots(4, 1, figsize=(max(7, 0.45 * m + 2), 12), sharex=True)
    for ax, label, s_vals, t_vals, star, logy in (
        (axes[0], "ω̃ (top share kept)", sample.omega, top.omega, ts.omega, False),
        (axes[1], "λ̃ (steepness)", sample.lam, top.lam, ts.lam, True),
        (axes[2], "η̃", sample.eta, top.eta, ts.eta, False),
    ):
        if s_vals.shape[0]:
            ax.boxplot([s_vals[:, i] for i in range(m)], positions=xs, widths=0.6, showfliers=False,
                       medianprops={"color": "grey"})
        for j in range(t_vals.shape[0]):
            ax.scatter(xs, t_vals[j], s=6, color="tab:blue", alpha=0.4, label="top-k" if j == 0 else None)
        ax.scatter(xs, star, marker="D", s=28, color="tab:red", zorder=3, label="θ*")
        ax.set_ylabel(label)
        if logy:
            ax.set_yscale("log")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[0].set_title(f"θ* vs {cands.sample_features.shape[0]} candidates (box) and the top {cands.top_k} (dots)")
    bottom = np.zeros(m)
    for j, crit in enumerate(ts.criteria):
        axes[3].bar(xs, ts.alpha[:, j], bottom=bottom, label=crit)
        bottom += ts.alpha[:, j]
    axes[3].set_ylabel("θ* α")
    axes[3].set_ylim(0, 1)
    axes[3].legend(loc="upper right", fontsize=7, ncol=min(nc, 4))
    axes[3].set_xticks(xs)
    axes[3].set_xticklabels(ts.domains, rotation=60, ha="right", fontsize=7)
    return save(fig, path)


def make_plots(fit: SearchFit, cands: CandidateResult, folder: str | Path, metric: str = "target_loss") -> list[Path]:
    """All three plots into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_pred_vs_actual(fit, folder / "pred_vs_actual.png", metric),
        plot_importance(fit, folder / "feature_importance.png"),
        plot_theta_star(cands, folder / "theta_star.png"),
    ]


# ------------------------------------------------------------------------------- MLflow stage
@dataclass
class SearchOutcome:
    run_id: str
    experiment_id: str
    search_names: list[str]
    theta_star: Theta
    metrics: dict[str, float]
    runs: RunTable
    fit: SearchFit
    candidates: CandidateResult
    out_path: Path | None = None
    features: str = "theta"

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
            f"  θ* {self.theta_star.theta_id} ({self.theta_star.n_domains} domains × {self.theta_star.n_criteria} criteria)"
            f", MLflow run {self.run_id}" + (f", written to {self.out_path}" if self.out_path else ""),
        ]
        lines += [f"  warning: {w}" for w in fit_warnings(self.fit)]
        return "\n".join(lines)


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list, tuple, bool)) or v is None else str(v)
    return s[:500]


def run_search(cfg, search_names: Sequence[str] | None = None, out_path: str | Path | None = None) -> SearchOutcome:
    """The ``search`` stage: collect the named searches' finished proxy runs (default ``[cfg.search.name]``),
    fit LightGBM, score ``cfg.search.n_candidates`` Algorithm-1 candidates, average the top k into θ*, and
    log it all as one MLflow run (see the module docstring). ``out_path`` (.json/.yaml) also gets θ*."""
    import mlflow

    sc = cfg.search
    names = list(dict.fromkeys(search_names or [sc.name]))
    uri = cfg.tracking_uri
    mlflow.set_tracking_uri(uri)
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
    fit = fit_search(X, table.y, sc.lightgbm, sc.cv_folds, sc.val_fraction, sc.early_stopping_rounds, sc.seed)
    threads = next((sc.lightgbm[k] for k in THREAD_KEYS if k in sc.lightgbm), None)
    cands = search_candidates(
        fit.model, table.domains, table.criteria, sc.n_candidates, sc.top_k, sc.candidate_seed, sc.lambda_mode, active,
        num_threads=threads, featurize=features, shared_omega=sc.shared_omega, omega_spread=sc.omega_spread,
    )
    theta = cands.theta_star
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
        TAG_STAGE: "search",
        TAG_THETA_ID: theta.theta_id,
        TAG_DOMAINS: json.dumps(list(table.domains)),
        TAG_CRITERIA: json.dumps(list(table.criteria)),
        TAG_CONFIG_FINGERPRINT: cfg.fingerprint(),
    }
    warnings = fit_warnings(fit)
    if warnings:
        tags[TAG_SEARCH_WARNINGS] = " | ".join(warnings)[:5000]
    if len(names) == 1:
        parents = search_all(client, exp.experiment_id,
                              f"tags.`{TAG_SEARCH}` = {quote(names[0])} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        if len(parents) == 1:
            tags[TAG_SEARCH_RUN_ID] = parents[0].info.run_id

    written = None
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(
        experiment_id=exp.experiment_id, run_name=f"search-fit-{'+'.join(names)}", tags=tags
    ) as run:
        tmp = Path(tmp)
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        mlflow.log_metrics(metrics)  # NaN (ρ of constant predictions) is stored as NaN: the key is always there
        mlflow.log_dict(cfg.resolved(), "config.yaml")
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
        for p in make_plots(fit, cands, tmp / "plots", sc.metric):
            mlflow.log_artifact(str(p), artifact_path="plots")
        import lightgbm
        import mlflow.lightgbm

        mlflow.lightgbm.log_model(fit.model, name="model", pip_requirements=[f"lightgbm=={lightgbm.__version__}"])
        if out_path is not None:
            written = save_theta(theta, out_path)
        run_id = run.info.run_id
    return SearchOutcome(run_id, exp.experiment_id, names, theta, metrics, table, fit, cands, written, features.kind)
