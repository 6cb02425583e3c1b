"""The regression from θ to proxy loss (spec §3.3, RegMix §6.3): what LightGBM sees of a θ, the fit with
early stopping, K-fold cross-validation over θ for an honest out-of-sample error, and the warnings read
off it. Pure: arrays in, models out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from quadmix_spark.kernel.theta import feature_names, unflatten
from quadmix_spark.search.run_table import SearchInputError

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


def split_indices(n: int, val_fraction: float, seed: int, groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: a permutation from ``seed``; at least one validation row and two
    training rows (LightGBM refuses to fit one). With ``groups`` (a θ id per run) whole groups are held out, so
    early stopping never watches a θ whose other runs it trains on; the groups are dealt as the runs would be
    (in order of first appearance), which with one run per group is the split without ``groups``."""
    if n < 3:
        raise SearchInputError(f"need at least 3 runs to fit on 2 and hold 1 out, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    group_of, n_groups = _group_of_runs(n, groups, "split_indices")
    perm = np.random.default_rng(seed).permutation(n_groups)
    sizes = np.bincount(group_of, minlength=n_groups)[perm]
    n_val = max(1, int(round(n_groups * val_fraction)))
    while n_val > 1 and n - int(sizes[:n_val].sum()) < 2:
        n_val -= 1
    if n - int(sizes[:n_val].sum()) < 2:
        raise SearchInputError(f"need at least 2 runs outside the held-out θ to fit on, got {n_groups} θ over {n} runs")
    held = np.isin(group_of, perm[:n_val])
    return np.flatnonzero(~held), np.flatnonzero(held)


def fit_regressor(
    X: pd.DataFrame | np.ndarray,
    y: Sequence[float] | np.ndarray,
    lgb_params: Mapping[str, Any],
    val_fraction: float,
    early_stopping_rounds: int,
    seed: int,
    feature_names_: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> FitResult:
    """RegMix's regression (spec §6.3): ``LGBMRegressor(**lgb_params)`` on a seeded train/validation split,
    early stopping (``stopping_rounds=early_stopping_rounds``, L2) on the validation runs (whole θ with
    ``groups``, :func:`split_indices`); reports MAE and Spearman ρ of the predictions on those runs.  Unless ``lgb_params`` name a thread setting, the fit runs
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
    tr, va = split_indices(len(y), val_fraction, seed, groups)
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


def group_numbers(ids: Sequence[str]) -> np.ndarray:
    """The number of each run's θ (its id), in order of first appearance; a run without an id is a θ of its own."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(t or f"\0run {i}", len(index)) for i, t in enumerate(ids)], dtype=np.int64)


def _group_of_runs(n: int, groups: Sequence[str] | None, caller: str) -> tuple[np.ndarray, int]:
    """(group number of each run, number of groups): each run its own group without ``groups``."""
    if groups is None:
        return np.arange(n), n
    if len(groups) != n:
        raise ValueError(f"{caller}: {len(groups)} groups for {n} runs")
    group_of = group_numbers(groups)
    return group_of, int(group_of.max()) + 1


def fold_assignment(n: int, folds: int, seed: int, groups: Sequence[str] | None = None) -> np.ndarray:
    """Fold of each of ``n`` runs: a seeded permutation dealt round-robin, so fold sizes differ by at most one.

    At most ``n`` folds, so every fold's training side keeps at least 3 runs for :func:`split_indices`
    when ``n >= 4``. With ``groups`` (a θ id per run) the runs of one group share a fold, so a θ trained with
    several seeds is never predicted from its own other runs; the groups are dealt as the runs would be (in
    order of first appearance), which with one run per group is the assignment without ``groups``."""
    if n < 4:
        raise SearchInputError(f"need at least 4 runs to cross-validate (3 to fit each fold on), got {n}")
    group_of, n_groups = _group_of_runs(n, groups, "fold_assignment")
    if n_groups < 2:
        raise SearchInputError(f"need at least 2 distinct θ to cross-validate over θ, got {n_groups}")
    folds = min(folds, n_groups)
    out = np.empty(n_groups, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n_groups)] = np.arange(n_groups) % folds
    return out[group_of]


def fit_search(
    X: pd.DataFrame,
    y: Sequence[float] | np.ndarray,
    lgb_params: Mapping[str, Any],
    folds: int,
    val_fraction: float,
    early_stopping_rounds: int,
    seed: int,
    groups: Sequence[str] | None = None,
) -> SearchFit:
    """K-fold cross-validated fit and the final model on all runs (see :class:`SearchFit`); ``groups`` (the θ id
    of each run) keeps the runs of one θ in one fold (:func:`fold_assignment`) and, inside each fold's training
    side, on one side of the early-stopping split (:func:`split_indices`)."""
    import lightgbm as lgb

    names = list(X.columns)
    x = X.to_numpy(dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    fold_of = fold_assignment(len(y), folds, seed, groups)
    oof = np.empty(len(y))
    trees = []
    for k in range(int(fold_of.max()) + 1):
        test = fold_of == k
        inner = None if groups is None else [g for g, t in zip(groups, test) if not t]
        fit = fit_regressor(x[~test], y[~test], lgb_params, val_fraction, early_stopping_rounds, seed + 1 + k, names, inner)
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
