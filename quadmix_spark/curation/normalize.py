"""Normalize (σ): per-criterion knots of the token-weighted flipped global percentile, as a Delta table.

σ does not depend on θ, so it is computed once per annotations version and stored in ``score_knots``
(one row per criterion). The knots are exactly those of the numpy kernel's
:func:`quadmix_spark.kernel.sigma.percentile_knots` on the same data, computed without collecting the
scores: distinct (criterion, score) values with their token weight, the exact suffix weights from
:mod:`quadmix_spark.curation.prefix` (sorted by descending score), then a per-row test of whether the value is the
last one at or above one of the ``n_knots`` σ levels. The z-score alternative stores the token-weighted
mean and standard deviation.

Criteria are the annotations' ``q_<criterion>`` columns (raw scores, higher = better). A null score is
left out of the knots and maps to the worst σ, stored with the knots (``missing_sigma``: 1 for percentiles,
the σ of the lowest score for z-scores).
"""

from __future__ import annotations

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from quadmix_spark.core import faults
from quadmix_spark.kernel.sigma import Knots, zscore_missing
from quadmix_spark.curation.prefix import within_group_cumulative
from quadmix_spark.core.storage import read_table, table_exists, table_version, write_table
from quadmix_spark.core.tables import SCORE_PREFIX


class KnotsMissingError(RuntimeError):
    """The sampler needs knots of the current annotations: run ``quadmix normalize``."""


def criteria_of(annotations: DataFrame) -> list[str]:
    """Quality criteria present in an annotations frame, in column order."""
    names = [c[len(SCORE_PREFIX):] for c in annotations.columns if c.startswith(SCORE_PREFIX)]
    if not names:
        raise ValueError(f"annotations have no {SCORE_PREFIX}<criterion> columns (columns: {annotations.columns})")
    return names


def _long_scores(annotations: DataFrame, criteria: list[str]) -> DataFrame:
    """(crit, score, w) rows: one per document and criterion with a non-null score."""
    stacked = F.explode(
        F.array(*[F.struct(F.lit(i).cast("long").alias("crit"), F.col(SCORE_PREFIX + c).cast("double").alias("score")) for i, c in enumerate(criteria)])
    )
    return (
        annotations.select(F.col("n_tokens").cast("long").alias("w"), stacked.alias("s"))
        .select("s.crit", "s.score", "w")
        .where(F.col("score").isNotNull() & ~F.isnan("score"))
    )


def percentile_knots_distributed(annotations: DataFrame, criteria: list[str], n_knots: int = 1001) -> list[Knots]:
    """Knots of every criterion, equal to the kernel's ``percentile_knots`` on the same data."""
    if n_knots < 2:
        raise ValueError(f"n_knots must be >= 2, got {n_knots}")
    distinct = _long_scores(annotations, criteria).groupBy("crit", "score").agg(F.sum("w").alias("w"))
    distinct = distinct.withColumn("neg_score", -F.col("score"))
    h = 1.0 / (n_knots - 1)
    with within_group_cumulative(distinct, "crit", "neg_score", "w") as ranked:
        sigma = F.col("cum_weight") / F.col("group_weight")
        sigma_next = (F.col("cum_weight") - F.col("w")) / F.col("group_weight")
        j0 = F.floor((F.lit(1.0) - sigma) / F.lit(h))
        is_level_end = F.lit(False)
        for dj in (-1, 0, 1):  # the level just at or below σ, checked with the kernel's own arithmetic
            j = j0 + dj
            level = F.lit(1.0) - F.lit(h) * j
            is_level_end = is_level_end | ((j >= 0) & (j <= n_knots - 1) & (level <= sigma) & (level > sigma_next))
        counts = ranked.groupBy("crit").agg(
            F.count("*").alias("n"), F.max(F.col("w") / F.col("group_weight")).alias("max_share"),
            F.max("score").alias("max_score"),
        )
        ranked = ranked.join(F.broadcast(counts), "crit")
        keep = (F.col("n") <= n_knots) | (sigma == 1.0) | (F.col("score") == F.col("max_score")) | is_level_end
        rows = ranked.where(keep).select("crit", "score", sigma.alias("sigma"), "n", "max_share").collect()
    out = []
    for i, name in enumerate(criteria):
        mine = sorted((r.score, r.sigma, r.n, r.max_share) for r in rows if r.crit == i)
        if not mine:
            raise ValueError(f"criterion {name!r} has no non-null scores")
        n_distinct, max_share = mine[0][2], mine[0][3]
        bound = 0.0 if n_distinct <= n_knots else h + max_share
        out.append(Knots(name, "percentile", np.array([m[0] for m in mine]), np.array([m[1] for m in mine]), error_bound=bound))
    return out


# Each row's term is a double computed the same way on any executor; cast to a decimal and summed there, the
# total does not depend on the order Spark adds the partitions in (a double sum does, in its last bits).
_EXACT_SUM = "decimal(38,12)"


def _exact_sum(term: Column) -> Column:
    return F.sum(term.cast(_EXACT_SUM))


def zscore_knots_distributed(annotations: DataFrame, criteria: list[str]) -> list[Knots]:
    """Token-weighted mean and std of every criterion (the z-score alternative), the same bits for any
    partitioning (sums of per-row terms in exact decimal arithmetic: each term must stay below 1e26), and
    the σ a missing score gets (that of each criterion's lowest score)."""
    long = _long_scores(annotations, criteria)
    stats = long.groupBy("crit").agg(
        F.sum("w").alias("W"), _exact_sum(F.col("w") * F.col("score")).alias("S1"), F.min("score").alias("low")
    ).collect()
    means = {r.crit: float(r.S1) / r.W for r in stats}
    lows = {r.crit: float(r.low) for r in stats}
    # second pass for a numerically stable variance, with each criterion's mean as a literal
    mean_col = F.coalesce(*[F.when(F.col("crit") == i, F.lit(float(m))) for i, m in means.items()])
    var = {r.crit: float(r.S2) / r.W for r in long.groupBy("crit").agg(
        _exact_sum(F.col("w") * (F.col("score") - mean_col) ** 2).alias("S2"), F.sum("w").alias("W")).collect()}
    out = []
    for i, name in enumerate(criteria):
        if i not in means:
            raise ValueError(f"criterion {name!r} has no non-null scores")
        std = float(np.sqrt(max(var[i], 0.0)))
        out.append(Knots(name, "zscore", mean=means[i], std=std, missing=zscore_missing(lows[i], means[i], std)))
    return out


def knots_frame(spark: SparkSession, knots: list[Knots], annotations_version: int | None, n_knots: int) -> DataFrame:
    rows = [
        (k.criterion, k.method, [float(x) for x in k.xs], [float(y) for y in k.ys], k.mean, k.std, float(k.error_bound),
         annotations_version, n_knots, k.missing_sigma())
        for k in knots
    ]
    return spark.createDataFrame(
        rows,
        "criterion string, method string, xs array<double>, ys array<double>, mean double, std double, "
        "error_bound double, annotations_version bigint, n_knots int, missing_sigma double",
    )


def run_normalize(spark: SparkSession, annotations_table: str, knots_table: str, method: str, n_knots: int,
                  run_id: str | None = None) -> tuple[list[Knots], bool]:
    """Compute and store the knots of the current annotations version; returns (knots, written).

    Idempotent: when ``knots_table`` already holds knots of this annotations version with the same
    method and knot count, nothing is recomputed or written.
    """
    version = table_version(spark, annotations_table)
    if version is None:
        raise FileNotFoundError(f"no annotations table at {annotations_table}: run `quadmix annotate` first")
    if table_exists(spark, knots_table):
        current = load_knots(spark, knots_table)
        stored = read_table(spark, knots_table)
        row = stored.select("annotations_version", "n_knots", "method").first()
        current_format = "missing_sigma" in stored.columns  # older tables lack it: made again
        if row and current_format and row.annotations_version == version and row.method == method and row.n_knots == n_knots:
            by_name = {k.criterion: k for k in current}  # stored rows come back in any order: the columns' order
            return [by_name[c] for c in criteria_of(read_table(spark, annotations_table, version=version)) if c in by_name], False
    annotations = faults.during(read_table(spark, annotations_table, version=version), "normalize.knots.compute")
    criteria = criteria_of(annotations)
    if method == "percentile":
        knots = percentile_knots_distributed(annotations, criteria, n_knots)
    else:
        knots = zscore_knots_distributed(annotations, criteria)
    meta = {"stage": "normalize", "run_id": run_id, "annotations_version": version}
    write_table(knots_frame(spark, knots, version, n_knots), knots_table, mode="overwrite", metadata=meta, merge_schema=True)
    return knots, True


def load_knots(spark: SparkSession, knots_table: str, annotations_version: int | None = None) -> list[Knots]:
    """The stored knots; with ``annotations_version``, an error when they belong to another version."""
    if not table_exists(spark, knots_table):
        raise KnotsMissingError(f"no score knots at {knots_table}: run `quadmix normalize`")
    rows = read_table(spark, knots_table).collect()
    if annotations_version is not None and any(r.annotations_version != annotations_version for r in rows):
        raise KnotsMissingError(
            f"score knots were computed on annotations version {rows[0].annotations_version}, the table is now at "
            f"version {annotations_version}: run `quadmix normalize` again"
        )
    return [
        Knots(r.criterion, r.method, np.array(r.xs or []), np.array(r.ys or []), mean=r.mean, std=r.std, error_bound=r.error_bound,
              missing=r.asDict().get("missing_sigma") if r.method == "zscore" else None)
        for r in rows
    ]
