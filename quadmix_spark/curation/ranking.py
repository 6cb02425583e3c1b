"""Per-domain ranks r̄, sampling values S and realized copies for one θ or many, in fixed passes.

For K parameter sets at once, over an annotations frame (doc_id, domain, n_tokens, q_<criterion>…):

- **pass A** (map-side, then a small aggregation, collected once: K × M × ``coarse_bins`` integers at
  most): every document's σ (the kernel's knots mapping), q̄ for each θ (the kernel's Eq. 1), and a
  token-weighted histogram of q̄ per (θ, domain) with ``coarse_bins`` bins, plus the documents per domain
  and the count of documents in a domain θ does not name (so no separate check pass). On the driver, per
  (θ, domain), the first bin ``b*`` at which the cumulative share reaches ``max(rank_region, ω)``, the
  mass before every bin and the domain totals.
- **pass B** (one evaluation, persisted, read twice): documents whose q̄ falls in a bin <= b* ("the
  region": every document with r̄ <= max(rank_region, ω), plus the rest of b*'s bin; a proxy index, which
  stores no r̄, needs only r̄ <= ω) get their EXACT r̄: r̄ = (mass before the bin, from the histogram +
  the tokens of the same bin with q̄ <= own) / domain total, from a sort by (cell = (θ, domain, bin), q̄)
  where runs of whole cells of about equal mass are spread over the partitions
  (:func:`quadmix_spark.curation.prefix.cell_cumulative`): a domain is split over as many tasks as its size needs,
  and neither bounds nor offsets need another pass. Every other document has r̄ > ω, hence S = ε
  exactly; its reported r̄ is interpolated in its coarse bin (error at most that bin's token share, which
  only matters for display: S does not depend on it).
- S is the kernel's Eq. 3 and copies = ⌊S⌋ + [u < frac S] with u the kernel's hash of
  (doc_id, θ key, seed), bit-identical to Spark's ``xxhash64``. Nothing depends on partitioning.

The number of passes over the annotations is fixed (A, then B), whatever K. What the tasks and the driver hold
grows with K (the histogram is K × M × ``coarse_bins``), so callers with many θ pass chunks of them
(:func:`quadmix_spark.curation.sample.run_sample_many`, ``sampling.theta_chunk``); the arrays every task reads (b*, the
lookup, the region's cells) go by broadcast.

With ONE θ and percentile σ (``quadmix sample``), :mod:`quadmix_spark.curation.ranking_sql` does both passes in Spark
SQL instead of pandas UDFs: σ, q̄ and the bins are computed on the JVM and cached, the histogram is an
aggregation, and the rows outside the region get S = ε and their copies in SQL, so only the region crosses into
Python. The numbers are the same bit for bit (a test holds both paths to identical rows).
"""

from __future__ import annotations

import functools

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from quadmix_spark.curation import ranking_sql
from quadmix_spark.kernel.copies import hash_uniform_from_doc_hashes, realized_copies
from quadmix_spark.kernel.merge import check_saturation, merged_score
from quadmix_spark.kernel.sampling_fn import sampling_value
from quadmix_spark.kernel.sigma import Knots, map_scores
from quadmix_spark.kernel.theta import Theta, ThetaMismatchError
from quadmix_spark.curation.prefix import balanced_cuts, cell_cumulative
from quadmix_spark.core.tables import SCORE_PREFIX

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

    def chunks(self, size: int) -> Iterator[ThetaStack]:
        """The stack cut into consecutive stacks of at most ``size`` θ (same order, same keys)."""
        if size <= 0:
            raise ValueError(f"a θ chunk holds at least one θ (got {size})")
        for lo in range(0, self.k, size):
            hi = lo + size
            yield replace(self, alpha=self.alpha[lo:hi], lam=self.lam[lo:hi], omega=self.omega[lo:hi],
                          eta=self.eta[lo:hi], eps=self.eps[lo:hi], keys=self.keys[lo:hi], ids=self.ids[lo:hi])


@dataclass(frozen=True)
class RankSettings:
    seed: int = 0
    eta_mode: str = "exponent"
    saturation: float | None = None  # sampling.sigma_saturation (kernel.merge.saturate)
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
    """σ matrix (n, N); a missing score gets the knots' worst σ (:meth:`Knots.missing_sigma`), whatever the batch."""
    cols = []
    for k in knots:
        s = map_scores(pdf[SCORE_PREFIX + k.criterion].to_numpy(np.float64), k)
        cols.append(np.where(np.isnan(s), k.missing_sigma(), s))
    return np.stack(cols, axis=1)


def _unit(q: np.ndarray, method: str) -> np.ndarray:
    """A monotone map of q̄ into [0, 1] for binning (identity for percentile σ)."""
    return np.clip(q, 0.0, 1.0) if method == "percentile" else 1.0 / (1.0 + np.exp(-np.clip(q, -700, 700)))


def _bins(q: np.ndarray, method: str, n_bins: int) -> np.ndarray:
    return np.minimum((_unit(q, method) * n_bins).astype(np.int64), n_bins - 1)


@dataclass(frozen=True)
class Histogram:
    """Pass A's result, collected once (small: K × M × coarse_bins integers)."""

    mass: np.ndarray  # (K, M, B) token mass per (θ, domain, bin of q̄)
    docs: np.ndarray  # (M,) documents per domain
    unknown: int  # documents whose domain θ does not name (domain_idx null)

    @property
    def cum(self) -> np.ndarray:
        return np.cumsum(self.mass, axis=2)

    @property
    def totals(self) -> np.ndarray:
        return self.mass.sum(axis=2)


def coarse_histograms(prepared: DataFrame, stack: ThetaStack, knots: list[Knots], s: RankSettings) -> Histogram:
    """Pass A: token mass per (θ, domain, bin) of q̄, documents per domain and the count of documents in a
    domain θ does not name, in one pass over the narrow columns (no doc ids cross into Python)."""
    method, B, M, K = knots[0].method, s.coarse_bins, len(stack.domains), stack.k
    cols = ["domain_idx", "n_tokens", *[SCORE_PREFIX + c for c in stack.criteria]]

    def hist(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        acc = np.zeros((K, M * B), dtype=np.int64)
        docs = np.zeros(M, dtype=np.int64)
        unknown = 0
        for pdf in batches:
            known = pdf["domain_idx"].notna().to_numpy()
            if not known.all():
                unknown += int((~known).sum())
                pdf = pdf[known]
                if pdf.empty:
                    continue
            sig, d, w = _sigma(pdf, knots), pdf["domain_idx"].to_numpy(np.int64), pdf["n_tokens"].to_numpy(np.float64)
            docs += np.bincount(d, minlength=M)
            for k in range(K):
                b = _bins(merged_score(sig, d, stack.alpha[k], s.saturation), method, B)
                acc[k] += np.bincount(d * B + b, weights=w, minlength=M * B).astype(np.int64)
        acc = acc.ravel()
        nz = np.flatnonzero(acc)
        nd = np.flatnonzero(docs)
        keys = np.r_[nz, -2 - nd, [-1] if unknown else []].astype(np.int64)
        yield pd.DataFrame({"key": keys, "mass": np.r_[acc[nz], docs[nd], [unknown] if unknown else []].astype(np.int64)})

    rows = prepared.select(*cols).mapInPandas(hist, "key long, mass long").groupBy("key").agg(F.sum("mass").alias("mass")).toPandas()
    key, val = rows["key"].to_numpy(np.int64), rows["mass"].to_numpy(np.int64)
    mass = np.zeros(K * M * B, dtype=np.int64)
    mass[key[key >= 0]] = val[key >= 0]
    docs = np.zeros(M, dtype=np.int64)
    docs[-2 - key[key <= -2]] = val[key <= -2]
    return Histogram(mass.reshape(K, M, B), docs, int(val[key == -1].sum()))


def region_bins(hist: Histogram, stack: ThetaStack, s: RankSettings) -> tuple[np.ndarray, np.ndarray]:
    """b* per (θ, domain) as a (K, M) array (-1 where the domain is empty): the first non-empty bin at which
    the cumulative share reaches ``max(rank_region, ω)``; and the domains' token totals (K, M)."""
    target = np.maximum(stack.omega, s.rank_region)  # (K, M)
    cum, total = hist.cum, hist.totals
    # conservative: a b* a rounding error too early would leave documents with r̄ <= target outside
    reached = (hist.mass > 0) & ((cum >= total[..., None]) | (cum >= (target * total)[..., None] * (1 + 1e-9)))
    bstar = np.where(reached.any(axis=2), reached.argmax(axis=2), -1).astype(np.int64)
    return bstar, total


def check_domains(hist: Histogram, stack: ThetaStack, prepared: DataFrame) -> None:
    """θ's domains must be exactly the data's: no document outside them, none of them without documents."""
    if hist.unknown:
        bad = prepared.where(F.col("domain_idx").isNull()).select(F.col("doc_id")).limit(3).collect()
        raise ValueError(f"documents {[r.doc_id for r in bad]} have a domain that θ does not name (θ domains: {stack.domains})")
    empty = [d for d, n in zip(stack.domains, hist.docs) if n == 0]
    if empty:
        raise ThetaMismatchError(f"theta domains do not match: missing [], extra {empty} (no documents in these domains)")


def _realize(stack: ThetaStack, k: int, S: np.ndarray, doc_hash: np.ndarray, s: RankSettings) -> np.ndarray:
    """Copies ⌊S⌋ + [u < frac S] with u the kernel's hash of (doc, θ key, seed)."""
    u = hash_uniform_from_doc_hashes(doc_hash, int(stack.keys[k]), s.seed)
    return realized_copies(S, u).astype(np.int32)


def _copies(stack: ThetaStack, k: int, d: np.ndarray, rbar: np.ndarray, doc_hash: np.ndarray, s: RankSettings):
    S = sampling_value(rbar, stack.lam[k, d], stack.omega[k, d], stack.eta[k, d], stack.eps[k, d], s.eta_mode)
    return S, _realize(stack, k, S, doc_hash, s)


SPLIT_SCHEMA = T.StructType(
    list(RANKED_SCHEMA.fields)
    + [T.StructField("cell", T.LongType()), T.StructField("qbar", T.DoubleType()), T.StructField("doc_hash", T.LongType())]
)


def _split_rows(
    stack: ThetaStack, knots: list[Knots], s: RankSettings, shared, keep_all: bool, batches: Iterator[pd.DataFrame],
) -> Iterator[pd.DataFrame]:
    """The pandas pass B (any K): σ, q̄ and bins per θ; region rows carry their cell and q̄ for the sort, the
    rest get S = ε and their copies (and, with ``lookup`` = (mass before, mass, total), an interpolated r̄).
    ``shared`` is a broadcast of (b* (K, M), lookup | None)."""
    method, B, M = knots[0].method, s.coarse_bins, len(stack.domains)
    bstar, lookup = shared.value
    before, mass, total = lookup if lookup is not None else (None, None, None)
    for pdf in batches:
        sig, d = _sigma(pdf, knots), pdf["domain_idx"].to_numpy(np.int64)
        ids, h, w = pdf["doc_id"].to_numpy(), pdf["doc_hash"].to_numpy(np.int64), pdf["n_tokens"].to_numpy(np.int64)
        parts_: list[dict] = []
        for k in range(stack.k):
            q = merged_score(sig, d, stack.alpha[k], s.saturation)
            b = _bins(q, method, B)
            inside = b <= bstar[k, d]
            idx = np.flatnonzero(inside)
            if idx.size:
                ds = d[idx]
                n = idx.size
                parts_.append({"theta_idx": np.full(n, k, np.int32), "doc_id": ids[idx], "domain_idx": ds.astype(np.int32),
                               "n_tokens": w[idx], "rbar": np.zeros(n), "rank_exact": np.ones(n, bool), "S": np.zeros(n),
                               "copies": np.zeros(n, np.int32), "cell": (k * M + ds) * B + b[idx], "qbar": q[idx], "doc_hash": h[idx]})
            idx = np.flatnonzero(~inside)
            if idx.size == 0:
                continue
            ds = d[idx]
            rbar = np.ones(idx.size)
            if keep_all:
                frac = _unit(q[idx], method) * B - b[idx]
                rbar = (before[k, ds, b[idx]] + mass[k, ds, b[idx]] * np.clip(frac, 0, 1)) / np.maximum(total[k, ds], 1)
            # outside the region r̄ > max(rank_region, ω) >= ω, so S = ε exactly (Eq. 3): no need to evaluate S
            S = stack.eps[k, ds] + 0.0
            c = _realize(stack, k, S, h[idx], s)
            if not keep_all:  # a proxy index keeps only documents with copies (the ε tail is rare)
                kept = c > 0
                idx, ds, rbar, S, c = idx[kept], ds[kept], rbar[kept], S[kept], c[kept]
            n = idx.size
            parts_.append({"theta_idx": np.full(n, k, np.int32), "doc_id": ids[idx], "domain_idx": ds.astype(np.int32),
                           "n_tokens": w[idx], "rbar": rbar, "rank_exact": np.zeros(n, bool), "S": S, "copies": c,
                           "cell": np.full(n, -1, np.int64), "qbar": np.zeros(n), "doc_hash": h[idx]})
        if parts_:
            yield pd.DataFrame({key: np.concatenate([p[key] for p in parts_]) for key in parts_[0]})


def _finish_region(
    stack: ThetaStack, s: RankSettings, domain_total: np.ndarray, keep_all: bool, pdf: pd.DataFrame
) -> pd.DataFrame:
    """Region rows with their cumulative weight -> r̄ (over the whole domain), S and copies."""
    ks = pdf["theta_idx"].to_numpy(np.int64)
    ds = pdf["domain_idx"].to_numpy(np.int64)
    # the sort holds only the region: r̄ is over the whole domain's tokens
    rbar = pdf["cum_weight"].to_numpy(np.float64) / domain_total[ks, ds].astype(np.float64)
    S = np.empty(len(ks))
    c = np.empty(len(ks), dtype=np.int32)
    h = pdf["doc_hash"].to_numpy(np.int64)
    for k in np.unique(ks):
        m = ks == k
        S[m], c[m] = _copies(stack, int(k), ds[m], rbar[m], h[m], s)
    out = pd.DataFrame({
        "theta_idx": ks.astype(np.int32), "doc_id": pdf["doc_id"].to_numpy(), "domain_idx": ds.astype(np.int32),
        "n_tokens": pdf["n_tokens"].to_numpy(np.int64), "rbar": rbar, "rank_exact": True, "S": S, "copies": c,
    })
    return out if keep_all else out[out["copies"] > 0]


@contextmanager
def rank_and_sample(
    annotations: DataFrame, stack: ThetaStack, knots: list[Knots], s: RankSettings, keep_all: bool
) -> Iterator[DataFrame]:
    """Yield (theta_idx, doc_id, domain_idx, n_tokens, rbar, rank_exact, S, copies) for every θ.

    ``keep_all`` keeps every document (a selection table); otherwise only rows with copies > 0 (a proxy
    index). The frame is valid while the context is open (pass B's output is persisted).

    Passes over the annotations: A (the histogram, collected) and B (σ, q̄, the region split and, outside
    the region, S and copies), whose output is persisted and read twice: the region through a sort by
    histogram cell (runs of whole cells spread over the partitions from the histogram: no sampling pass,
    no offsets pass), the rest as is.
    """
    criteria, B, M = list(stack.criteria), s.coarse_bins, len(stack.domains)
    if [k.criterion for k in knots] != criteria:
        raise ValueError(f"knots criteria {[k.criterion for k in knots]} do not match θ criteria {criteria}")
    check_saturation(s.saturation)
    if s.saturation is not None and any(k.method != "percentile" for k in knots):
        raise ValueError("sampling.sigma_saturation shapes percentile σ in [0, 1]; these knots are z-scores "
                         "(normalize.method: zscore): use percentile knots or leave sigma_saturation unset")
    prepared = prepare(annotations, list(stack.domains), criteria)
    on_jvm = ranking_sql.supported(stack.k, knots)  # one θ: both passes in SQL, same numbers
    cached: list[DataFrame] = []
    shipped: list = []  # broadcasts: constant arrays read by every task go once per executor, not in each closure

    def broadcast(value):
        shipped.append(annotations.sparkSession.sparkContext.broadcast(value))
        return shipped[-1]

    try:
        if on_jvm:
            # computed once on the JVM and cached (narrow: ids, q̄, bin): read by pass A and by both branches
            binned = ranking_sql.with_bins(prepared, criteria, knots, stack.alpha[0], B, s.saturation).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(binned)
            mass0, docs0, unknown0 = ranking_sql.histogram(binned, M, B)
            hist = Histogram(mass0[None], docs0, unknown0)
        else:
            hist = coarse_histograms(prepared, stack, knots, s)
        check_domains(hist, stack, prepared)
        # r̄ is stored (and must be exact up to rank_region) only in a selection; a proxy index needs the
        # exact ranks where S depends on them, i.e. up to ω
        region_settings = s if keep_all else replace(s, rank_region=0.0)
        bstar, domain_total = region_bins(hist, stack, region_settings)
        all_before = hist.cum - hist.mass  # (K, M, B) mass before each bin
        in_region = (np.arange(B)[None, None, :] <= bstar[..., None]) & (hist.mass > 0)
        cells = np.flatnonzero(in_region.ravel()).astype(np.int64)  # cell = (k * M + d) * B + bin
        cell_base = all_before.ravel()[cells]
        parts = s.n_partitions or int(annotations.sparkSession.conf.get("spark.sql.shuffle.partitions"))
        cuts = cells[balanced_cuts(hist.mass.ravel()[cells], 4 * parts)] if cells.size else np.zeros(1, np.int64)
        # the interpolated r̄ outside the region is stored only in a selection (one θ): ship the lookup only then
        lookup = (all_before, hist.mass, domain_total) if keep_all else None

        if on_jvm:
            in_region, region = ranking_sql.split(binned, bstar[0], B)
            first = tuple(a[0] for a in lookup) if lookup is not None else None
            rest = ranking_sql.rest_rows(binned, in_region, stack.eps[0], int(stack.keys[0]), s.seed, B, first, keep_all)
        else:
            # one evaluation, read twice (measured: cheaper than evaluating the split for each branch)
            split = functools.partial(_split_rows, stack, knots, s, broadcast((bstar, lookup)), keep_all)
            split_rows = prepared.mapInPandas(split, SPLIT_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
            cached.append(split_rows)
            region = split_rows.where(F.col("rank_exact")).select("theta_idx", "doc_id", "domain_idx", "n_tokens", "cell", "qbar", "doc_hash")
            rest = split_rows.where(~F.col("rank_exact")).select(*RANKED_SCHEMA.names)
        finish = functools.partial(_finish_region, stack, s, domain_total, keep_all)
        ranked = cell_cumulative(region, "cell", "qbar", "n_tokens", broadcast((cells, cell_base)), cuts, parts,
                                 finish=finish, out_schema=RANKED_SCHEMA)
        yield ranked.unionByName(rest)
    finally:
        for frame in cached:
            frame.unpersist()
        for b in shipped:
            b.unpersist()


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
