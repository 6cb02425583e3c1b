"""Passes A and B of :mod:`quadmix_spark.curation.ranking` for ONE θ in Spark SQL: no Python worker touches the rows.

With one θ and percentile σ, everything the passes compute per document is a short SQL expression:

- σ of a raw score: the knots' piecewise-linear map, with the knot interval found by a binary search on the
  JVM (Spark's internal ``array_binary_search``, ``java.util.Arrays.binarySearch``), then the same operations
  as ``numpy.interp`` in the same order (slope · (x − x_j) + y_j, slopes precomputed as numpy computes them),
  so σ is bit-identical to :func:`quadmix_spark.kernel.sigma.map_scores`; a missing score is the worst, 1;
- q̄ = Σ_n α[d, n] · σ_n (each σ saturated first when ``sampling.sigma_saturation`` is set), summed in
  criterion order as the kernel's ``merged_score`` does, and its coarse bin;
- pass A: the token mass per (domain, bin) and the documents per domain, one aggregation;
- pass B: the region's rows (bin <= b*) for the exact cumulative sort, and for every other row r̄ > ω, so
  S = ε and copies = ⌊S⌋ + [u < frac S] with u Spark's xxhash64 of (doc_id, θ key, seed), the expression the
  kernel's hash is bit-identical to.

The caller caches the binned rows (doc_id, doc hash, domain, tokens, q̄, bin: narrow) and reads them three
times: the histogram, the region, the rest. Without the cache Spark would push the region filter below the
projection and evaluate σ inside the filter again, several times over (measured: 4-5x slower).

The arrays these expressions index (knots, α per domain, b*, the histogram) enter the plan as one JSON
literal each, which Spark folds into a constant once (an ``array(...)`` of thousands of literals costs
seconds to analyse). K > 1 θ or z-score σ stay on the pandas path of :mod:`quadmix_spark.curation.ranking`, which
computes the same numbers; tests hold the two paths to identical outputs.
"""

from __future__ import annotations

import json

import numpy as np
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from quadmix_spark.kernel.copies import spark_uniform_expr_sql
from quadmix_spark.kernel.sigma import Knots
from quadmix_spark.core.tables import SCORE_PREFIX

try:  # Spark >= 4.0 (SPARK-49203); internal, so its absence only disables this path
    from pyspark.sql.internal import InternalFunction as _Internal

    _binary_search = _Internal.array_binary_search
except (ImportError, AttributeError):  # pragma: no cover - older Spark
    _binary_search = None


def supported(k: int, knots: list[Knots]) -> bool:
    """Whether the SQL passes apply: one θ, percentile σ, and Spark's binary search available."""
    return k == 1 and _binary_search is not None and all(kn.method == "percentile" for kn in knots)


def array_literal(values, element: str) -> Column:
    """A constant array column (``element``: ``double`` or ``bigint``) from a NumPy array or list."""
    items = [float(v) for v in np.ravel(values)] if element == "double" else [int(v) for v in np.ravel(values)]
    return F.from_json(F.lit(json.dumps(items)), f"array<{element}>")


def _at(array: Column, index: Column) -> Column:
    return F.element_at(array, (index + 1).cast("int"))  # element_at is 1-based, takes an int


def knot_position(score: Column, knots: Knots) -> Column:
    """``java.util.Arrays.binarySearch`` of the score in the knots' xs (-0.0 read as 0.0: the search orders
    -0.0 before 0.0, numpy does not)."""
    return _binary_search(array_literal(knots.xs, "double"), score + F.lit(0.0))


def sigma(score: Column, knots: Knots, pos: Column | None = None) -> Column:
    """σ of ``score`` through percentile ``knots``, as ``numpy.interp(score, xs, ys)``; null/NaN -> 1.
    ``pos``: :func:`knot_position` of the score, when already a column (it is then searched once)."""
    xs, ys = np.asarray(knots.xs, np.float64), np.asarray(knots.ys, np.float64)
    n = xs.size
    missing = score.isNull() | F.isnan(score)
    if n == 1:
        return F.when(missing, F.lit(1.0)).otherwise(F.lit(float(ys[0])))
    x = score + F.lit(0.0)
    xs_a, ys_a, slopes = array_literal(xs, "double"), array_literal(ys, "double"), array_literal(np.diff(ys) / np.diff(xs), "double")
    pos = knot_position(score, knots) if pos is None else pos
    j = F.when(pos >= 0, pos).otherwise(-pos - 2)  # the last knot <= x; -1 below the first
    inside = _at(slopes, j) * (x - _at(xs_a, j)) + _at(ys_a, j)
    return (
        F.when(missing, F.lit(1.0))
        .when(j < 0, F.lit(float(ys[0])))
        .when(j >= n - 1, F.lit(float(ys[-1])))
        .when(pos >= 0, _at(ys_a, j))
        .otherwise(inside)
    )


def saturate(sig: Column, c: float | None) -> Column:
    """(1 + c)·σ / (σ + c), as :func:`quadmix_spark.kernel.merge.saturate` (σ itself when ``c`` is None)."""
    if c is None:
        return sig
    return (sig * F.lit(1.0 + c)) / (sig + F.lit(float(c)))


def merged(criteria: list[str], knots: list[Knots], alpha: np.ndarray, domain_idx: Column,
           positions: list[Column | None] | None = None, saturation: float | None = None) -> Column:
    """q̄ = Σ_n α[d, n] g(σ_n) for one θ's ``alpha`` (M, N), in criterion order (null for an unknown domain);
    g is the saturation of ``sampling.sigma_saturation`` (identity when None)."""
    q = None
    for n, (c, kn) in enumerate(zip(criteria, knots)):
        pos = positions[n] if positions else None
        sig = saturate(sigma(F.col(SCORE_PREFIX + c), kn, pos), saturation)
        term = sig * _at(array_literal(alpha[:, n], "double"), domain_idx)
        q = term if q is None else q + term
    return q


def unit(q: Column) -> Column:
    return F.least(F.greatest(q, F.lit(0.0)), F.lit(1.0))


def coarse_bin(q: Column, n_bins: int) -> Column:
    """min(⌊clip(q̄, 0, 1) · B⌋, B − 1), as the pandas path's ``_bins``."""
    return F.least((unit(q) * F.lit(float(n_bins))).cast("long"), F.lit(n_bins - 1))


def with_bins(prepared: DataFrame, criteria: list[str], knots: list[Knots], alpha: np.ndarray, n_bins: int,
              saturation: float | None = None) -> DataFrame:
    """``prepared`` (doc_id, doc_hash, domain_idx, n_tokens, q_…) plus ``qbar`` and ``bin``."""
    pos = [f"_pos{n}" for n in range(len(criteria))]
    searched = prepared.select(
        "doc_id", "doc_hash", "domain_idx", "n_tokens", *[SCORE_PREFIX + c for c in criteria],
        *[knot_position(F.col(SCORE_PREFIX + c), kn).alias(p) for c, kn, p in zip(criteria, knots, pos)],
    )
    q = merged(criteria, knots, alpha, F.col("domain_idx"), [F.col(p) for p in pos], saturation)
    return searched.select("doc_id", "doc_hash", "domain_idx", "n_tokens", q.alias("qbar")).withColumn(
        "bin", coarse_bin(F.col("qbar"), n_bins)
    )


def histogram(binned: DataFrame, n_domains: int, n_bins: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pass A: (token mass (M, B), documents per domain (M,), documents of unknown domains)."""
    rows = binned.groupBy("domain_idx", "bin").agg(F.sum("n_tokens").alias("mass"), F.count(F.lit(1)).alias("docs")).collect()
    mass = np.zeros((n_domains, n_bins), dtype=np.int64)
    docs = np.zeros(n_domains, dtype=np.int64)
    unknown = 0
    for r in rows:
        if r["domain_idx"] is None:
            unknown += int(r["docs"])
            continue
        mass[r["domain_idx"], r["bin"]] = int(r["mass"] or 0)
        docs[r["domain_idx"]] += int(r["docs"])
    return mass, docs, unknown


def split(binned: DataFrame, bstar: np.ndarray, n_bins: int) -> tuple[Column, DataFrame]:
    """(the region predicate, the region's rows with their cell) of pass B; ``bstar`` (M,) for the one θ."""
    in_region = F.col("bin") <= _at(array_literal(bstar, "bigint"), F.col("domain_idx"))
    region = binned.where(in_region).select(
        F.lit(0).cast("int").alias("theta_idx"), "doc_id", F.col("domain_idx").cast("int").alias("domain_idx"), "n_tokens",
        (F.col("domain_idx").cast("long") * n_bins + F.col("bin")).alias("cell"), "qbar", "doc_hash",
    )
    return in_region, region


def realized_copies(S: Column, theta_key: int, seed: int) -> Column:
    """⌊S⌋ + [u < frac S] as an int, u = Spark's hash of (doc_id, θ key, seed): the kernel's copies, in SQL."""
    u = F.expr(spark_uniform_expr_sql("doc_id", theta_key, seed))
    return (F.floor(S) + F.when(u < S - F.floor(S), 1).otherwise(0)).cast("int")


def rest_rows(
    binned: DataFrame, in_region: Column, eps: np.ndarray, theta_key: int, seed: int, n_bins: int,
    lookup: tuple[np.ndarray, np.ndarray, np.ndarray] | None, keep_all: bool,
) -> DataFrame:
    """Rows outside the region (r̄ > ω, so S = ε): r̄ interpolated in the coarse bin when ``lookup`` = (mass
    before each bin, bin mass (M, B); domain totals (M,)) is given (a selection), else 1; S, copies; only rows
    with copies unless ``keep_all``."""
    d = F.col("domain_idx")
    if lookup is not None:
        before, mass, total = lookup
        b = F.col("bin")
        cell = d.cast("long") * n_bins + b
        frac = F.least(F.greatest(unit(F.col("qbar")) * F.lit(float(n_bins)) - b.cast("double"), F.lit(0.0)), F.lit(1.0))
        num = _at(array_literal(before, "bigint"), cell).cast("double") + _at(array_literal(mass, "bigint"), cell).cast("double") * frac
        rbar = num / F.greatest(_at(array_literal(total, "bigint"), d), F.lit(1)).cast("double")
    else:
        rbar = F.lit(1.0)
    S = _at(array_literal(eps, "double"), d) + F.lit(0.0)
    out = binned.where(~in_region).select(
        F.lit(0).cast("int").alias("theta_idx"), "doc_id", d.cast("int").alias("domain_idx"), "n_tokens",
        rbar.alias("rbar"), F.lit(False).alias("rank_exact"), S.alias("S"), realized_copies(S, theta_key, seed).alias("copies"),
    )
    return out if keep_all else out.where(F.col("copies") > 0)
