"""Per-domain ranks r̄, sampling values S and realized copies for one θ or many, in fixed passes.

For K parameter sets at once, over an annotations frame (doc_id, domain, n_tokens, q_<criterion>…):

- **pass A** (map-side, then a small aggregation): every document's σ (the kernel's knots mapping),
  q̄ for each θ (the kernel's Eq. 1), and a token-weighted histogram of q̄ per (θ, domain) with
  ``coarse_bins`` bins. From it, per (θ, domain), the last bin ``b*`` at which the cumulative share
  reaches ``max(rank_region, ω)``.
- **pass B**: documents whose q̄ falls in a bin <= b* ("the region": every document with r̄ <=
  max(rank_region, ω), plus the rest of b*'s bin; a proxy index, which stores no r̄, needs only r̄ <= ω)
  get their EXACT r̄ from a range-partitioned sort
  (:mod:`quadmix_spark.prefix`), so a domain is split over as many tasks as its size needs. Every other
  document has r̄ > ω, hence S = ε exactly; its reported r̄ is interpolated in its coarse bin (error at
  most that bin's token share, which only matters for display: S does not depend on it).
- S is the kernel's Eq. 3 and copies = ⌊S⌋ + [u < frac S] with u the kernel's hash of
  (doc_id, θ key, seed), bit-identical to Spark's ``xxhash64``. Nothing depends on partitioning.

The number of passes over the annotations is fixed (A, then B read twice: region and rest), whatever K.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from quadmix_spark.kernel.copies import hash_uniform_from_doc_hashes, realized_copies
from quadmix_spark.kernel.merge import merged_score
from quadmix_spark.kernel.sampling_fn import sampling_value
from quadmix_spark.kernel.sigma import Knots, map_scores
from quadmix_spark.kernel.theta import Theta
from quadmix_spark.normalize import SCORE_PREFIX
from quadmix_spark.prefix import within_group_cumulative

RANKED_SCHEMA = T.StructType(
    [
        T.StructField("theta_idx", T.IntegerType()),
        T.StructField("doc_id", T.StringType()),
        T.StructField("domain_idx", T.IntegerType()),
        T.StructField("n_tokens", T.LongType()),
        T.StructField("rbar", T.DoubleType()),
        T.StructField("rank_exact", T.BooleanType()),
        T.StructField("S", T.DoubleType()),
        T.StructField("copies", T.IntegerType()),
    ]
)


@dataclass(frozen=True)
class ThetaStack:
    """K parameter sets aligned to one (domains, criteria) order, as arrays for the UDFs."""

    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    alpha: np.ndarray  # (K, M, N)
    lam: np.ndarray  # (K, M)
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray
    keys: np.ndarray  # (K,) int64 θ keys for the hash
    ids: tuple[str, ...]

    @classmethod
    def of(cls, thetas: list[Theta], domains: list[str], criteria: list[str]) -> ThetaStack:
        aligned = [Theta.from_dict(t.to_dict(), domains=domains, criteria=criteria) for t in thetas]
        return cls(
            tuple(domains), tuple(criteria),
            np.stack([t.alpha for t in aligned]), np.stack([t.lam for t in aligned]),
            np.stack([t.omega for t in aligned]), np.stack([t.eta for t in aligned]),
            np.stack([t.eps for t in aligned]),
            np.array([t.theta_key for t in aligned], dtype=np.int64), tuple(t.theta_id for t in aligned),
        )

    @property
    def k(self) -> int:
        return self.alpha.shape[0]


@dataclass(frozen=True)
class RankSettings:
    seed: int = 0
    eta_mode: str = "exponent"
    coarse_bins: int = 1024
    rank_region: float = 0.2
    n_partitions: int | None = None


def prepare(annotations: DataFrame, domains: list[str], criteria: list[str]) -> DataFrame:
    """The columns the UDFs read: doc_id, its Spark xxhash64, domain index, tokens, raw scores."""
    index = F.create_map(*[x for i, d in enumerate(domains) for x in (F.lit(d), F.lit(i))])
    return annotations.select(
        "doc_id",
        F.xxhash64("doc_id").alias("doc_hash"),
        index[F.col("domain")].cast("int").alias("domain_idx"),
        F.col("n_tokens").cast("long").alias("n_tokens"),
        *[F.col(SCORE_PREFIX + c).cast("double").alias(SCORE_PREFIX + c) for c in criteria],
    )


def _sigma(pdf: pd.DataFrame, knots: list[Knots]) -> np.ndarray:
    """σ matrix (n, N); a missing score is the worst (σ = 1 for percentiles, the max z otherwise)."""
    cols = []
    for k in knots:
        s = map_scores(pdf[SCORE_PREFIX + k.criterion].to_numpy(np.float64), k)
        worst = 1.0 if k.method == "percentile" else np.nanmax(np.r_[s, 0.0])
        cols.append(np.where(np.isnan(s), worst, s))
    return np.stack(cols, axis=1)


def _unit(q: np.ndarray, method: str) -> np.ndarray:
    """A monotone map of q̄ into [0, 1] for binning (identity for percentile σ)."""
    return np.clip(q, 0.0, 1.0) if method == "percentile" else 1.0 / (1.0 + np.exp(-np.clip(q, -700, 700)))


def _bins(q: np.ndarray, method: str, n_bins: int) -> np.ndarray:
    return np.minimum((_unit(q, method) * n_bins).astype(np.int64), n_bins - 1)


def coarse_histograms(prepared: DataFrame, stack: ThetaStack, knots: list[Knots], s: RankSettings) -> DataFrame:
    """Pass A: token mass per (θ, domain, bin) of q̄, as rows (theta_idx, domain_idx, bin, mass)."""
    method, B, M = knots[0].method, s.coarse_bins, len(stack.domains)

    def hist(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        acc = np.zeros((stack.k, M * B), dtype=np.int64)
        for pdf in batches:
            sig, d, w = _sigma(pdf, knots), pdf["domain_idx"].to_numpy(np.int64), pdf["n_tokens"].to_numpy(np.float64)
            for k in range(stack.k):
                b = _bins(merged_score(sig, d, stack.alpha[k]), method, B)
                acc[k] += np.bincount(d * B + b, weights=w, minlength=M * B).astype(np.int64)
        acc = acc.ravel()
        nz = np.flatnonzero(acc)
        yield pd.DataFrame({"key": nz.astype(np.int64), "mass": acc[nz]})

    rows = prepared.mapInPandas(hist, "key long, mass long").groupBy("key").agg(F.sum("mass").alias("mass"))
    return rows.select(
        (F.col("key") / (M * B)).cast("int").alias("theta_idx"),
        ((F.col("key") / B).cast("long") % M).cast("int").alias("domain_idx"),
        (F.col("key") % B).cast("int").alias("bin"),
        "mass",
    )


def region_bins(hist: DataFrame, stack: ThetaStack, s: RankSettings) -> tuple[np.ndarray, np.ndarray, DataFrame]:
    """b* per (θ, domain) as a (K, M) array (-1 where the domain is empty), the domains' token totals
    (K, M), and the cumulative histogram."""
    M = len(stack.domains)
    target = np.maximum(stack.omega, s.rank_region)  # (K, M)
    target_col = F.element_at(
        F.array(*[F.lit(float(x)) for x in target.ravel()]), F.col("theta_idx") * M + F.col("domain_idx") + 1
    )
    w = Window.partitionBy("theta_idx", "domain_idx")  # one (θ, domain) histogram: at most coarse_bins rows
    cum = hist.withColumn("cum", F.sum("mass").over(w.orderBy("bin"))).withColumn("total", F.sum("mass").over(w))
    # conservative: a b* a rounding error too early would leave documents with r̄ <= target outside
    reached = cum.where((F.col("cum") >= F.col("total")) | (F.col("cum") >= target_col * F.col("total") * (1 + 1e-9)))
    stars = reached.groupBy("theta_idx", "domain_idx").agg(F.min("bin").alias("b"), F.max("total").alias("total")).collect()
    bstar = np.full((stack.k, M), -1, dtype=np.int64)
    totals = np.zeros((stack.k, M), dtype=np.int64)
    for r in stars:
        bstar[r.theta_idx, r.domain_idx] = r.b
        totals[r.theta_idx, r.domain_idx] = r.total
    return bstar, totals, cum


def _coarse_lookup(cum_rows, stack: ThetaStack, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense (K, M, B) arrays: mass before each bin, mass of the bin, domain total."""
    M = len(stack.domains)
    before = np.zeros((stack.k, M, B), dtype=np.int64)
    mass = np.zeros((stack.k, M, B), dtype=np.int64)
    total = np.zeros((stack.k, M), dtype=np.int64)
    for r in cum_rows:
        before[r.theta_idx, r.domain_idx, r.bin] = r.cum - r.mass
        mass[r.theta_idx, r.domain_idx, r.bin] = r.mass
        total[r.theta_idx, r.domain_idx] = r.total
    return before, mass, total


def _copies(stack: ThetaStack, k: int, d: np.ndarray, rbar: np.ndarray, doc_hash: np.ndarray, s: RankSettings):
    S = sampling_value(rbar, stack.lam[k, d], stack.omega[k, d], stack.eta[k, d], stack.eps[k, d], s.eta_mode)
    u = hash_uniform_from_doc_hashes(doc_hash, int(stack.keys[k]), s.seed)
    return S, realized_copies(S, u).astype(np.int32)


@contextmanager
def rank_and_sample(
    annotations: DataFrame, stack: ThetaStack, knots: list[Knots], s: RankSettings, keep_all: bool
) -> Iterator[DataFrame]:
    """Yield (theta_idx, doc_id, domain_idx, n_tokens, rbar, rank_exact, S, copies) for every θ.

    ``keep_all`` keeps every document (a selection table); otherwise only rows with copies > 0 (a proxy
    index). The frame is valid while the context is open (the exact-rank sort is persisted).
    """
    criteria, method, B, M = list(stack.criteria), knots[0].method, s.coarse_bins, len(stack.domains)
    if [k.criterion for k in knots] != criteria:
        raise ValueError(f"knots criteria {[k.criterion for k in knots]} do not match θ criteria {criteria}")
    prepared = prepare(annotations, list(stack.domains), criteria)
    bad = prepared.where(F.col("domain_idx").isNull()).select(F.col("doc_id")).limit(3).collect()
    if bad:
        raise ValueError(f"documents {[r.doc_id for r in bad]} have a domain that θ does not name (θ domains: {stack.domains})")
    # r̄ is stored (and must be exact up to rank_region) only in a selection; a proxy index needs the
    # exact ranks where S depends on them, i.e. up to ω
    region_settings = s if keep_all else replace(s, rank_region=0.0)
    bstar, domain_total, cum = region_bins(coarse_histograms(prepared, stack, knots, s), stack, region_settings)
    before, mass, total = _coarse_lookup(cum.collect(), stack, B) if keep_all else (None, None, None)

    def split(batches: Iterator[pd.DataFrame], want_region: bool) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            sig, d = _sigma(pdf, knots), pdf["domain_idx"].to_numpy(np.int64)
            ids, h, w = pdf["doc_id"].to_numpy(), pdf["doc_hash"].to_numpy(np.int64), pdf["n_tokens"].to_numpy(np.int64)
            parts: list[dict] = []
            for k in range(stack.k):
                q = merged_score(sig, d, stack.alpha[k])
                b = _bins(q, method, B)
                inside = b <= bstar[k, d]
                idx = np.flatnonzero(inside if want_region else ~inside)
                if idx.size == 0:
                    continue
                ds = d[idx]
                if want_region:
                    parts.append({"group": k * M + ds, "qbar": q[idx], "n_tokens": w[idx], "doc_id": ids[idx], "doc_hash": h[idx]})
                    continue
                rbar = np.ones(idx.size)
                if keep_all:
                    frac = _unit(q[idx], method) * B - b[idx]
                    rbar = (before[k, ds, b[idx]] + mass[k, ds, b[idx]] * np.clip(frac, 0, 1)) / np.maximum(total[k, ds], 1)
                S, c = _copies(stack, k, ds, rbar, h[idx], s)
                if not keep_all:  # a proxy index keeps only documents with copies (the ε tail is rare)
                    kept = c > 0
                    idx, ds, rbar, S, c = idx[kept], ds[kept], rbar[kept], S[kept], c[kept]
                parts.append({"theta_idx": np.full(idx.size, k, np.int32), "doc_id": ids[idx], "domain_idx": ds.astype(np.int32),
                              "n_tokens": w[idx], "rbar": rbar, "rank_exact": np.zeros(idx.size, bool), "S": S, "copies": c})
            if parts:
                yield pd.DataFrame({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})

    region = prepared.mapInPandas(lambda it: split(it, True), "group long, qbar double, n_tokens long, doc_id string, doc_hash long")
    rest = prepared.mapInPandas(lambda it: split(it, False), RANKED_SCHEMA)

    def finish(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            g = pdf["group"].to_numpy(np.int64)
            ks, ds = (g // M).astype(np.int64), (g % M).astype(np.int64)
            # the sort holds only the region: r̄ is over the whole domain's tokens
            rbar = pdf["cum_weight"].to_numpy(np.float64) / domain_total[ks, ds].astype(np.float64)
            S = np.empty(len(g))
            c = np.empty(len(g), dtype=np.int32)
            for k in np.unique(ks):
                m = ks == k
                S[m], c[m] = _copies(stack, int(k), ds[m], rbar[m], pdf["doc_hash"].to_numpy(np.int64)[m], s)
            out = pd.DataFrame({
                "theta_idx": ks.astype(np.int32), "doc_id": pdf["doc_id"].to_numpy(), "domain_idx": ds.astype(np.int32),
                "n_tokens": pdf["n_tokens"].to_numpy(np.int64), "rbar": rbar, "rank_exact": True, "S": S, "copies": c,
            })
            yield out if keep_all else out[out["copies"] > 0]

    with within_group_cumulative(region, "group", "qbar", "n_tokens", s.n_partitions) as ranked:
        yield ranked.mapInPandas(finish, RANKED_SCHEMA).unionByName(rest)


@contextmanager
def narrow_batches(spark, rows: int = 20000) -> Iterator[None]:
    """Larger Arrow batches while the UDFs read annotations only (no text): fewer per-batch costs."""
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    old = spark.conf.get(key)
    spark.conf.set(key, str(rows))
    try:
        yield
    finally:
        spark.conf.set(key, old)
