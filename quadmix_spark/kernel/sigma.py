"""Per-criterion normalization σ (spec §2.2, §8): raw scores (higher = better) → σ (smaller = better).

Default σ is the token-weighted **flipped global percentile**::

    σ(x) = W({y : s_y >= x}) / W(all)        W = sum of weights (tokens)

so σ ∈ (0, 1] on the reference set, ties are inclusive, the best item gets the smallest σ and the
worst item gets exactly 1.  It is computed once per criterion over the whole corpus (or a reference
sample), not per domain.

At scale σ is shipped as a :class:`Knots` table (score values ``xs`` strictly increasing, σ values
``ys`` non-increasing) and any score is mapped by piecewise-linear interpolation
(:func:`map_scores`): a score below the smallest knot maps to 1.0, a score above the largest knot
maps to the smallest σ in the table, a score equal to a knot maps to that knot's exact σ.

**Approximation error of the knots mapping.**  Let ``h = 1/(n_knots-1)`` and ``p_max`` the largest
weight share of one distinct score value (a single item's share when scores are distinct; a whole
tie group's share otherwise).  :func:`percentile_knots` keeps every distinct value when there are at
most ``n_knots`` of them (then the map is exact on the reference set).  Otherwise it keeps, for each
level ``L_j = 1 - j·h``, the largest distinct value whose σ is still >= ``L_j`` (plus the minimum and
the maximum).  Two consecutive knots then differ in σ by less than ``h + p_max``; since both the
exact σ of a score between them and the interpolated value lie in that interval, for every score of
the reference set::

    |map_scores(s, knots) - flipped_percentile(s)| <= h + p_max     (= Knots.error_bound)

The alternative σ is a z-score of the flipped raw score, ``-(x - mean) / std`` with token-weighted
mean and std (:func:`zscore_params`, :func:`zscore_map`): also smaller = better, but unbounded.

**A missing score** (a document a scorer could not score) gets the worst σ of the reference set, fixed
by the knots alone (:meth:`Knots.missing_sigma`): 1.0 for percentiles, and for z-scores the σ of the
lowest score seen when the knots were made (stored as ``missing``), so a document's σ never depends on
which other documents share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quadmix_spark.kernel._arrays import as_1d_float, as_weights

METHODS = ("percentile", "zscore")


def _distinct_sigma(scores, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct sorted values, their exact σ, their weight share, and each item's value index."""
    s = as_1d_float(scores, "scores")
    w = as_weights(weights, s.shape[0])
    if s.shape[0] == 0:
        raise ValueError("scores is empty")
    values, inverse = np.unique(s, return_inverse=True)
    group_w = np.bincount(inverse, weights=w, minlength=values.shape[0])
    suffix = np.cumsum(group_w[::-1])[::-1]  # suffix[k] = W(values >= values[k])
    total = suffix[0]
    if not total > 0:
        raise ValueError("total weight must be > 0 to define a percentile")
    sigma = suffix / total  # sigma[0] == 1.0 exactly
    return values, sigma, group_w / total, inverse


def flipped_percentile(scores, weights) -> np.ndarray:
    """Exact token-weighted flipped percentile of every item of an in-memory array.

    ``σ_i = sum(w_j for s_j >= s_i) / sum(w)``: ties inclusive, σ ∈ (0, 1] for items with any
    weight at or above them (σ_i = 0 only if every item scoring >= s_i has weight 0), the item(s)
    with the lowest score get 1.0.  Raises ``ValueError`` on NaN/inf scores, negative weights or a
    total weight of 0.
    """
    _, sigma, _, inverse = _distinct_sigma(scores, weights)
    return sigma[inverse]


@dataclass(frozen=True, eq=False)
class Knots:
    """A θ-independent σ mapping for one criterion.

    ``method == "percentile"``: ``xs`` (strictly increasing raw scores) and ``ys`` (their σ,
    non-increasing, ``ys[0] == 1``); ``error_bound`` is the guaranteed max error on the
    reference set (see module docstring).  ``method == "zscore"``: ``mean`` and ``std`` are used,
    ``xs``/``ys`` are empty, and ``missing`` is the σ of a missing score (that of the lowest score of the
    reference set).
    """

    criterion: str
    method: str
    xs: np.ndarray = field(default_factory=lambda: np.empty(0))
    ys: np.ndarray = field(default_factory=lambda: np.empty(0))
    mean: float | None = None
    std: float | None = None
    error_bound: float = 0.0
    missing: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Knots.method must be one of {METHODS}, got {self.method!r}")
        xs = np.asarray(self.xs, dtype=np.float64).copy()
        ys = np.asarray(self.ys, dtype=np.float64).copy()
        xs.setflags(write=False)
        ys.setflags(write=False)
        object.__setattr__(self, "xs", xs)
        object.__setattr__(self, "ys", ys)
        where = f"knots of criterion {self.criterion!r}"
        if self.method == "percentile":
            if xs.ndim != 1 or xs.shape != ys.shape or xs.size == 0:
                raise ValueError(f"{where}: xs and ys must be non-empty 1-D arrays of equal length")
            if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
                raise ValueError(f"{where}: xs and ys must be finite")
            if (np.diff(xs) <= 0).any():
                raise ValueError(f"{where}: xs must be strictly increasing")
            if (np.diff(ys) > 0).any() or ys[0] != 1.0 or ys[-1] < 0:
                raise ValueError(f"{where}: ys must be non-increasing in [0, 1] starting at 1")
        else:
            if self.mean is None or self.std is None:
                raise ValueError(f"{where}: zscore knots need mean and std")
            if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std >= 0):
                raise ValueError(f"{where}: mean must be finite and std finite and >= 0")
            if self.missing is not None and not np.isfinite(self.missing):
                raise ValueError(f"{where}: the σ of a missing score must be finite")

    def missing_sigma(self) -> float:
        """σ of a missing score: the worst σ of the reference set (see the module docstring)."""
        if self.method == "percentile":
            return 1.0
        if self.missing is None:
            raise ValueError(
                f"z-score knots of criterion {self.criterion!r} lack the σ of a missing score (made by an older "
                "version): run `quadmix normalize` again"
            )
        return float(self.missing)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON/YAML dict; exact round trip through :meth:`from_dict`."""
        d: dict[str, Any] = {"criterion": self.criterion, "method": self.method}
        if self.method == "percentile":
            d["xs"] = [float(v) for v in self.xs]
            d["ys"] = [float(v) for v in self.ys]
            d["error_bound"] = float(self.error_bound)
        else:
            d["mean"] = float(self.mean)  # type: ignore[arg-type]
            d["std"] = float(self.std)  # type: ignore[arg-type]
            if self.missing is not None:
                d["missing"] = float(self.missing)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Knots:
        return cls(
            criterion=str(d["criterion"]),
            method=str(d["method"]),
            xs=np.asarray(d.get("xs", []), dtype=np.float64),
            ys=np.asarray(d.get("ys", []), dtype=np.float64),
            mean=None if d.get("mean") is None else float(d["mean"]),
            std=None if d.get("std") is None else float(d["std"]),
            error_bound=float(d.get("error_bound", 0.0)),
            missing=None if d.get("missing") is None else float(d["missing"]),
        )


def percentile_knots(scores, weights, n_knots: int = 1001, criterion: str = "") -> Knots:
    """Knot table of the token-weighted flipped percentile of ``scores``.

    Exact at every kept knot; at most ``n_knots`` knots (``n_knots >= 2``); the map error on the
    reference set is at most ``Knots.error_bound = 1/(n_knots-1) + p_max`` (0 when every distinct
    value is kept).  See the module docstring.
    """
    if int(n_knots) != n_knots or n_knots < 2:
        raise ValueError(f"n_knots must be an integer >= 2, got {n_knots}")
    n_knots = int(n_knots)
    values, sigma, share, _ = _distinct_sigma(scores, weights)
    if values.shape[0] <= n_knots:
        return Knots(criterion, "percentile", values, sigma, error_bound=0.0)
    h = 1.0 / (n_knots - 1)
    levels = 1.0 - h * np.arange(n_knots)
    # largest k with sigma[k] >= level; sigma is non-increasing, so -sigma is non-decreasing
    idx = np.searchsorted(-sigma, -levels, side="right") - 1
    idx[0], idx[-1] = 0, values.shape[0] - 1  # always keep the minimum and the maximum
    idx = np.unique(idx)
    bound = h + float(share.max())
    return Knots(criterion, "percentile", values[idx], sigma[idx], error_bound=bound)


def zscore_params(scores, weights) -> tuple[float, float]:
    """Token-weighted mean and (population) standard deviation of ``scores``."""
    s = as_1d_float(scores, "scores")
    w = as_weights(weights, s.shape[0])
    total = w.sum()
    if not total > 0:
        raise ValueError("total weight must be > 0 to define a z-score")
    mean = float(np.dot(w, s) / total)
    var = float(np.dot(w, (s - mean) ** 2) / total)
    return mean, float(np.sqrt(max(var, 0.0)))


def zscore_map(scores, mean: float, std: float) -> np.ndarray:
    """Flipped z-score ``-(x - mean) / std`` (smaller = better).

    ``std == 0`` (a constant criterion) maps every score to 0.0: the criterion carries no
    information.  NaN scores stay NaN.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not (np.isfinite(mean) and np.isfinite(std)) or std < 0:
        raise ValueError(f"invalid z-score parameters mean={mean}, std={std}")
    if std == 0:
        return np.where(np.isnan(s), np.nan, 0.0)
    return -(s - mean) / std


def zscore_knots(scores, weights, criterion: str = "") -> Knots:
    """:class:`Knots` for the z-score alternative (token-weighted mean/std; a missing score gets the σ of
    the lowest score)."""
    mean, std = zscore_params(scores, weights)
    return Knots(criterion, "zscore", mean=mean, std=std, missing=zscore_missing(float(np.min(scores)), mean, std))


def zscore_missing(lowest: float, mean: float, std: float) -> float:
    """σ of a missing score under z-score knots: the σ of the lowest score of the reference set."""
    return float(zscore_map(np.array([lowest]), mean, std)[0])


def map_scores(scores, knots: Knots) -> np.ndarray:
    """Vectorized σ of raw ``scores`` through ``knots`` (any shape; NaN in → NaN out)."""
    s = np.asarray(scores, dtype=np.float64)
    if knots.method == "zscore":
        return zscore_map(s, knots.mean, knots.std)  # type: ignore[arg-type]
    return np.interp(s, knots.xs, knots.ys)
