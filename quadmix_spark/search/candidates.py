"""θ* from a fitted regressor (spec §3.4): draw candidates with Algorithm 1 as the proposals were drawn,
predict each, average the best predicted ones. Pure: a model in, θ* out, memory bounded for millions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from quadmix_spark.kernel.theta import Theta, average_top_k, sample_theta_matrix, unflatten
from quadmix_spark.search.regression import predict
from quadmix_spark.search.run_table import SearchInputError

PLOT_SAMPLE = 2000
QUANTILES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)

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
