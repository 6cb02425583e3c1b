"""Sample: annotations + θ -> the ``selection`` table, the training output fitted to a budget, an export.

Tables (each run is a slice, replaced as a whole, so a rerun gives the same tables):
- ``selection``: run, theta_id, doc_id, domain, n_tokens, rbar, rank_exact, S, copies (epoch 0, every
  document);
- ``training_output``: run, order_key, epoch, copy, doc_id, domain, n_tokens — the training order: the
  documents repeated by their copies and fitted to ``sampling.budget_tokens`` (spec §2.6): over budget, a
  uniform subsample of the copies; under budget, more epochs, each with fresh Bernoulli draws (seed +
  epoch), the last one subsampled. Shuffled deterministically by ``order_key`` (a hash of doc, epoch, copy).
  No text: a copy is a pointer to its document (tables written before kept a ``text`` column, now null);
- an export under ``<root>/export/<run>/`` with a ``manifest.json``: Parquet or JSONL shards of the text in
  training order (``sampling.export_format``: the text joined from ``documents`` as it is written), or
  ``tokens``: each unique document's token ids once and the order as pointers, in Megatron's indexed-dataset
  layout (:mod:`quadmix_spark.curation.token_export`).

Many θ at once (``sample_many``): ``proxy_index`` (theta_id, doc_id, domain, n_tokens, S, copies; rows
with copies > 0) and ``proxy_theta_tokens`` (theta_id, realized/unique/expected tokens): chunks of
``sampling.theta_chunk`` θ, each in the fixed two passes of :mod:`quadmix_spark.curation.ranking`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from quadmix_spark.core import faults
from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.kernel.copies import UNIFORM_SCALE as UNIFORM
from quadmix_spark.kernel.sampling_fn import expected_from_rank_knots
from quadmix_spark.kernel.theta import Theta
from quadmix_spark.curation.normalize import criteria_of, load_knots
from quadmix_spark.curation.prefilter import keep_passing
from quadmix_spark.curation.prefix import by_labels
from quadmix_spark.curation.ranking_sql import realized_copies
from quadmix_spark.curation.ranking import (
    RankSettings,
    ThetaStack,
    check_domains,
    coarse_histograms,
    narrow_batches,
    prepare,
    rank_and_sample,
)
from quadmix_spark.core.storage import read_table, replace_slice, table_version
from quadmix_spark.core.tables import (ANNOTATIONS, DOCUMENTS, PROXY_INDEX, PROXY_THETA_TOKENS, SCORE_KNOTS, SCORE_PREFIX,
                                  SELECTION, TRAINING_OUTPUT)
from quadmix_spark.curation.token_export import export_tokens

ORDER_COLUMNS = ("order_key", "epoch", "copy", "doc_id", "domain", "n_tokens")  # training_output, after its run


class Inputs:
    """The pinned annotations, their knots and criteria; ``domains`` (the data's, sorted) is computed on
    first use only (a scan): the sampler learns the domains from its histogram pass instead."""

    def __init__(self, annotations: DataFrame, annotations_version: int, knots: list, domains: list[str] | None,
                 criteria: list[str]):
        self.annotations, self.annotations_version, self.knots, self.criteria = annotations, annotations_version, knots, criteria
        self._domains = domains

    @property
    def domains(self) -> list[str]:
        if self._domains is None:
            self._domains = sorted(r[0] for r in self.annotations.select("domain").distinct().collect() if r[0] is not None)
        return self._domains


def load_inputs(spark: SparkSession, cfg: QuadmixConfig, where: F.Column | None = None) -> Inputs:
    """The current annotations (pinned to one version) and their knots; domains are the data's.

    Documents a ``text_stats`` pre-filter rejected are left out here, for every sampler (one θ, many θ,
    baselines, dry run): they get no copies and r̄ is computed among the others (:mod:`quadmix_spark.curation.prefilter`).
    ``where`` restricts the documents further (the proxy pool); ranks are then computed inside that subset,
    while σ stays the corpus-wide normalization."""
    table = cfg.storage.table(ANNOTATIONS)
    version = table_version(spark, table)
    if version is None:
        raise FileNotFoundError(f"no annotations table at {table}: run `quadmix annotate` first")
    annotations = keep_passing(read_table(spark, table, version=version))
    if where is not None:
        annotations = annotations.where(where)
    knots = load_knots(spark, cfg.storage.table(SCORE_KNOTS), annotations_version=version)
    criteria = criteria_of(annotations)
    by_name = {k.criterion: k for k in knots}
    if sorted(by_name) != sorted(criteria):
        raise ValueError(f"score knots cover {sorted(by_name)} but annotations have {criteria}: run `quadmix normalize`")
    return Inputs(annotations, version, [by_name[c] for c in criteria], None, criteria)


def theta_domains(inp: Inputs, thetas: list[Theta]) -> list[str]:
    """The domain order of a θ stack: the data's when already known, else θ's own names sorted (the
    histogram pass then checks that they are exactly the data's, see ``ranking.check_domains``)."""
    return inp._domains if inp._domains is not None else sorted(thetas[0].domains)


def settings(cfg: QuadmixConfig) -> RankSettings:
    sc = cfg.sampling
    return RankSettings(seed=sc.seed, eta_mode=sc.eta_mode, saturation=sc.sigma_saturation, coarse_bins=sc.coarse_bins,
                        rank_region=sc.rank_region)


def _with_domain_names(df: DataFrame, domains: list[str]) -> DataFrame:
    names = F.array(*[F.lit(d) for d in domains])
    return df.withColumn("domain", F.element_at(names, F.col("domain_idx") + 1)).drop("domain_idx")


# ---------------------------------------------------------------- budget fitting (spec §2.6)


def _epoch_copies(S: F.Column, theta_key: int, seed: int, epoch: int) -> F.Column:
    """⌊S⌋ + [u_e < frac S] with u_e the kernel's hash at seed + epoch (epoch 0 = the selection's copies)."""
    return realized_copies(S, theta_key, seed + epoch)


def plan_epochs(selection: DataFrame, theta_key: int, seed: int, budget: int | None, max_epochs: int) -> list[tuple[int, float]]:
    """[(epoch, keep probability)]: the epochs to emit and the share of copies kept in each.

    The realized tokens of candidate epochs are summed in one aggregation over the (narrow) selection.
    """
    return _plan_epochs(selection, theta_key, seed, budget, max_epochs)[0]


def _plan_epochs(selection: DataFrame, theta_key: int, seed: int, budget: int | None, max_epochs: int,
                 expected: float | None = None) -> tuple[list[tuple[int, float]], float | None]:
    """The plan and the expected number of emitted copies (None with no budget: the caller knows it)."""
    if budget is None:
        return [(0, 1.0)], None
    if expected is None:
        expected = selection.agg(F.sum(F.col("S") * F.col("n_tokens"))).first()[0] or 0.0
    if expected <= 0:
        raise ValueError("θ selects nothing (expected tokens 0): no budget can be met")
    n = int(min(max_epochs, np.ceil(budget / expected) + 2))
    aggs = []
    for e in range(n):
        c = _epoch_copies(F.col("S"), theta_key, seed, e)
        aggs += [F.sum(c * F.col("n_tokens")).alias(f"e{e}"), F.sum(c).alias(f"c{e}")]
    sums = selection.agg(*aggs).first()
    plan, total, copies = [], 0, 0.0
    for e in range(n):
        tokens = int(sums[f"e{e}"] or 0)
        if tokens == 0:
            continue
        if total + tokens >= budget:
            keep = (budget - total) / tokens
            plan.append((e, keep))
            return plan, copies + keep * int(sums[f"c{e}"] or 0)
        plan.append((e, 1.0))
        total += tokens
        copies += int(sums[f"c{e}"] or 0)
    raise ValueError(f"budget {budget} tokens not reached in {n} epochs ({total} tokens): raise sampling.max_epochs")


def instances(selection: DataFrame, plan: list[tuple[int, float]], theta_key: int, seed: int) -> DataFrame:
    """(doc_id, domain, n_tokens, epoch, copy, order_key) of every emitted copy, subsampled per the plan."""
    parts = []
    for epoch, keep in plan:
        c = _epoch_copies(F.col("S"), theta_key, seed, epoch)
        copies = F.when(c > 0, F.sequence(F.lit(0), c - 1))  # sequence(0, -1) would be [0, -1]
        rows = selection.select("doc_id", "domain", "n_tokens", F.lit(epoch).alias("epoch"), F.explode(copies).alias("copy"))
        key = F.xxhash64("doc_id", F.col("epoch").cast("bigint"), F.col("copy").cast("bigint"), F.lit(theta_key).cast("bigint"), F.lit(seed).cast("bigint"))
        rows = rows.withColumn("order_key", key)
        if keep < 1.0:
            rows = rows.where(F.shiftrightunsigned(F.xxhash64("order_key", F.lit(-1).cast("bigint")), 11) * F.lit(UNIFORM) < F.lit(keep))
        parts.append(rows)
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    return out


def training_rows(documents: DataFrame, inst: DataFrame, broadcast_rows: int, n_rows: float | None = None) -> DataFrame:
    """Copies joined with their text.

    The copies are narrow and usually few (about a tenth of the documents): up to ``broadcast_rows`` of
    them are broadcast, so the documents table is scanned but never shuffled (a sort-merge join would move
    all of its text to keep a small part). Above that, Spark's own join choice applies. ``n_rows`` (the
    number of copies, when the caller already knows it) saves counting them."""
    n = inst.count() if n_rows is None else n_rows
    copies = F.broadcast(inst) if n <= broadcast_rows else inst
    return documents.select("doc_id", "text").join(copies, "doc_id", "inner").select(
        "order_key", "epoch", "copy", "doc_id", "domain", "n_tokens", "text"
    )


# ---------------------------------------------------------------- reports


def selection_report(selection: DataFrame) -> pd.DataFrame:
    """Per domain, from the selection alone (one aggregation): input, expected (Σ S·len), realized
    (Σ copies·len) and unique tokens, selected and input documents, and ``copies`` (Σ copies)."""
    agg = selection.groupBy("domain").agg(
        F.sum("n_tokens").alias("input_tokens"),
        F.sum(F.col("S") * F.col("n_tokens")).alias("expected_tokens"),
        F.sum(F.col("copies") * F.col("n_tokens")).alias("realized_tokens"),
        F.sum(F.when(F.col("copies") > 0, F.col("n_tokens")).otherwise(0)).alias("unique_tokens"),
        F.sum(F.when(F.col("copies") > 0, 1).otherwise(0)).alias("selected_docs"),
        F.count("*").alias("input_docs"),
        F.sum("copies").alias("copies"),
    )
    return agg.toPandas().sort_values("domain").reset_index(drop=True)


def finish_report(pdf: pd.DataFrame, output_tokens: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add the output tokens per domain (``domain``, ``output_tokens``), repetition and shares."""
    pdf = pdf.drop(columns=["copies"], errors="ignore")
    if output_tokens is not None:
        pdf = pdf.merge(output_tokens, on="domain", how="left").fillna({"output_tokens": 0})
    pdf["repetition"] = pdf["realized_tokens"] / pdf["unique_tokens"].where(pdf["unique_tokens"] > 0)
    pdf["share_before"] = pdf["input_tokens"] / pdf["input_tokens"].sum()
    pdf["share_after"] = pdf["realized_tokens"] / max(pdf["realized_tokens"].sum(), 1)
    return pdf


def domain_report(selection: DataFrame, output: DataFrame | None = None) -> pd.DataFrame:
    """Per domain: input, expected (Σ S·len), realized (Σ copies·len), unique tokens, repetition, shares."""
    out = None
    if output is not None:
        out = output.groupBy("domain").agg(F.sum("n_tokens").alias("output_tokens")).toPandas()
    return finish_report(selection_report(selection), out)


def plot_report(report: pd.DataFrame, path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.3 * len(report) + 1.5)))
    y = np.arange(len(report))
    axes[0].barh(y - 0.2, report["share_before"], 0.4, label="input")
    axes[0].barh(y + 0.2, report["share_after"], 0.4, label="selected")
    axes[0].set_yticks(y, report["domain"])
    axes[0].set_xlabel("token share")
    axes[0].legend()
    axes[1].barh(y, report["repetition"].fillna(0))
    axes[1].set_yticks(y, [""] * len(y))
    axes[1].set_xlabel("repetition (realized / unique tokens)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def dry_run_report(spark: SparkSession, cfg: QuadmixConfig, theta: Theta) -> pd.DataFrame:
    """Analytic expected tokens, unique tokens and repetition per domain from the rank histogram alone.

    Reads only the annotations (no text). Each coarse bin contributes its tokens times S at the bin's
    middle rank; the exact expectation lies between the values at the bins' edges (see the kernel).
    """
    inp = load_inputs(spark, cfg)
    domains = theta_domains(inp, [theta])
    stack = ThetaStack.of([theta], domains, inp.criteria)
    s = settings(cfg)
    prepared = prepare(inp.annotations, domains, inp.criteria)
    with narrow_batches(spark):
        hist = coarse_histograms(prepared, stack, inp.knots, s)
    check_domains(hist, stack, prepared)
    d, b = np.nonzero(hist.mass[0])
    mass = hist.mass[0][d, b].astype(np.float64)
    rbar_mid = (hist.cum[0][d, b] - mass / 2) / hist.totals[0][d]
    args = (stack.lam[0], stack.omega[0], stack.eta[0], stack.eps[0], s.eta_mode)
    from quadmix_spark.kernel.sampling_fn import sampling_value

    S = sampling_value(rbar_mid, stack.lam[0][d], stack.omega[0][d], stack.eta[0][d], stack.eps[0][d], s.eta_mode)
    M = len(domains)
    expected = expected_from_rank_knots(pd.Series(rbar_mid), pd.Series(mass), *args[:4], eta_mode=s.eta_mode, domain_idx=d, n_domains=M)
    unique = np.bincount(d, weights=mass * np.minimum(S, 1.0), minlength=M)
    tokens = np.bincount(d, weights=mass, minlength=M)
    out = pd.DataFrame({"domain": domains, "input_tokens": tokens, "expected_tokens": expected, "expected_unique_tokens": unique})
    out["repetition"] = out["expected_tokens"] / out["expected_unique_tokens"].where(out["expected_unique_tokens"] > 0)
    return out


# ---------------------------------------------------------------- baselines (paper §4.1)


def baseline_key(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little", signed=True)


MIX_BINS = 1 << 16  # resolution of the mix baseline's cut-off on the best σ of a document


def baseline_selection(inp: Inputs, kind: str, fraction: float, seed: int) -> tuple[DataFrame, str, int]:
    """S per document for a baseline at the same machinery, every baseline a fixed set (S is 0 or 1, so a
    proxy reads the same documents every epoch, like θ's kept documents):

    - ``random``: each document with probability ``fraction``, by a hash of the document and the baseline
      (a random ``fraction`` of the tokens; the sample stage's draw of S = fraction);
    - ``topk:<criterion>``: the best ``fraction`` of tokens by that criterion (σ <= fraction);
    - ``mix``: the best ``fraction`` of tokens by each document's best criterion (smallest σ over the
      criteria), cut where the kept tokens reach ``fraction`` of the total (at most; :func:`mix_cutoff`).

    Returns (frame, baseline id, hash key)."""
    from quadmix_spark.curation.ranking import RANKED_SCHEMA, _sigma
    from quadmix_spark.kernel.copies import hash_uniform_from_doc_hashes, realized_copies

    if kind != "random" and kind != "mix" and not (kind.startswith("topk:") and kind[5:] in inp.criteria):
        raise ValueError(f"unknown baseline {kind!r}: use random, mix or topk:<criterion> with one of {inp.criteria}")
    name = f"baseline-{kind.replace(':', '-')}-{fraction:g}"
    key = baseline_key(name)
    knots, crit = inp.knots, inp.criteria
    if kind != "random" and any(k.method != "percentile" for k in knots):
        raise ValueError(f"baseline {kind!r} keeps the best {fraction:g} of tokens by σ <= {fraction:g}, which needs percentile "
                         "knots (normalize.method: percentile); z-score σ is not a share of tokens")
    cutoff = mix_cutoff(inp, fraction) if kind == "mix" else None

    def assign(batches):
        for pdf in batches:
            u = hash_uniform_from_doc_hashes(pdf["doc_hash"].to_numpy(np.int64), key, seed)
            if kind == "random":
                S = realized_copies(np.full(len(pdf), fraction), u).astype(np.float64)
            elif kind == "mix":
                S = (mix_bins(_sigma(pdf, knots)) <= cutoff).astype(np.float64)
            else:
                S = (_sigma(pdf, knots)[:, crit.index(kind[5:])] <= fraction).astype(np.float64)
            yield pd.DataFrame({
                "theta_idx": np.int32(0), "doc_id": pdf["doc_id"], "domain_idx": pdf["domain_idx"].astype(np.int32),
                "n_tokens": pdf["n_tokens"], "rbar": np.nan, "rank_exact": False, "S": S,
                "copies": S.astype(np.int32),
            })

    frame = prepare(inp.annotations, inp.domains, inp.criteria).mapInPandas(assign, RANKED_SCHEMA)
    return frame, name, key


def mix_bins(sigma: np.ndarray) -> np.ndarray:
    """The bin (0 .. MIX_BINS - 1) of each document's best σ (the smallest over its criteria)."""
    best = np.min(np.asarray(sigma, dtype=np.float64), axis=1)
    return np.minimum(np.floor(np.clip(best, 0.0, 1.0) * MIX_BINS), MIX_BINS - 1).astype(np.int64)


def mix_cutoff(inp: Inputs, fraction: float) -> int:
    """The largest bin b such that documents whose best σ falls in bins <= b hold at most ``fraction`` of the
    tokens (-1 when even the first bin holds more): one distributed pass summing tokens per bin, at most
    MIX_BINS rows to the driver. A document's best criterion puts it in the top sets of several criteria at
    once, so the union of the top-k sets at ``fraction`` would keep more than ``fraction`` of the tokens."""
    from quadmix_spark.curation.ranking import _sigma

    knots = inp.knots

    def bins(batches):
        for pdf in batches:
            yield pd.DataFrame({"bin": mix_bins(_sigma(pdf, knots)), "n_tokens": pdf["n_tokens"].astype(np.int64)})

    per_bin = (prepare(inp.annotations, inp.domains, inp.criteria).mapInPandas(bins, "bin long, n_tokens long")
               .groupBy("bin").agg(F.sum("n_tokens").alias("tokens")).collect())
    tokens = np.zeros(MIX_BINS, dtype=np.int64)
    for r in per_bin:
        tokens[int(r["bin"])] = int(r["tokens"])
    total = int(tokens.sum())
    if total <= 0:
        return -1
    within = np.flatnonzero(np.cumsum(tokens) <= fraction * total)
    return int(within[-1]) if len(within) else -1


# ---------------------------------------------------------------- export


def export_output(output: DataFrame, folder: str, fmt: str, n_shards: int) -> dict:
    """Write ``output`` (ordered by order_key) as ``n_shards`` files + ``manifest.json``; returns the manifest."""
    return _export(output, folder, fmt, n_shards)[0]


def shard_of(order_key: F.Column, n_shards: int) -> F.Column:
    """The shard of an order key: ``n_shards`` contiguous, equally wide ranges of the int64 keys (the keys
    are hashes, hence uniform: the shards are balanced without sampling the output to find bounds)."""
    return F.least(F.floor((order_key.cast("double") / 2.0**64 + 0.5) * n_shards), F.lit(n_shards - 1)).cast("int")


def _export(output: DataFrame, folder: str, fmt: str, n_shards: int) -> tuple[dict, pd.DataFrame]:
    """The export and its manifest, plus the output tokens per domain (``domain``, ``output_tokens``) read
    back from the written shards in the same aggregation as the manifest's counts."""
    spark = output.sparkSession
    sharded = by_labels(output.withColumn("_shard", shard_of(F.col("order_key"), n_shards)), "_shard", n_shards, n_shards)
    cols = ["doc_id", "domain", "epoch", "copy", "n_tokens", "text"]
    writer = sharded.sortWithinPartitions("order_key").select(*cols).write.mode("overwrite")
    writer.json(folder, compression="gzip") if fmt == "jsonl" else writer.parquet(folder)
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(folder)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    files = sorted(st.getPath().toString() for st in fs.listStatus(path) if st.getPath().getName().startswith("part-"))
    reader = spark.read.schema("domain string, n_tokens long")
    written = reader.json(folder) if fmt == "jsonl" else reader.parquet(folder)
    stats = written.groupBy(F.element_at(F.split(F.input_file_name(), "/"), -1).alias("file"), "domain").agg(
        F.count("*").alias("rows"), F.sum("n_tokens").alias("tokens")
    ).toPandas()
    per_file = stats.groupby("file")[["rows", "tokens"]].sum()
    shards = []
    for f in files:
        name = f.rsplit("/", 1)[-1]
        rows, tokens = (int(per_file.at[name, "rows"]), int(per_file.at[name, "tokens"])) if name in per_file.index else (0, 0)
        shards.append({"path": f, "rows": rows, "tokens": tokens})
    manifest = {"format": fmt, "shards": shards, "rows": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}
    out = jvm.org.apache.hadoop.fs.Path(folder + "/manifest.json")
    stream = fs.create(out, True)
    stream.write(bytearray(json.dumps(manifest, indent=1).encode()))
    stream.close()
    per_domain = stats.groupby("domain", as_index=False)["tokens"].sum().rename(columns={"tokens": "output_tokens"})
    return manifest, per_domain


# ---------------------------------------------------------------- the stage


@dataclass
class SampleResult:
    run: str
    theta_id: str
    annotations_version: int
    report: pd.DataFrame
    output_tokens: int
    epochs: list
    manifest: dict

    def summary(self) -> str:
        r = self.report
        lines = [
            f"sample run {self.run!r} (θ {self.theta_id}, annotations v{self.annotations_version}):",
            f"  input {int(r.input_tokens.sum()):,} tokens -> expected {r.expected_tokens.sum():,.0f}, realized "
            f"{int(r.realized_tokens.sum()):,}, unique {int(r.unique_tokens.sum()):,}; output {self.output_tokens:,} tokens "
            f"in {len(self.epochs)} epoch(s), {len(self.manifest.get('shards', []))} shards",
        ]
        return "\n".join(lines)


def run_sample(spark: SparkSession, cfg: QuadmixConfig, theta: Theta | None = None, baseline: str | None = None,
               run_id: str | None = None, inp: Inputs | None = None) -> SampleResult:
    """One θ (or one baseline) over the full annotations: selection, training output, export, report.
    ``inp``: the inputs θ's names were matched to (:func:`load_inputs`), so both see one annotations version."""
    sc = cfg.sampling
    inp = inp if inp is not None else load_inputs(spark, cfg)
    documents = read_table(spark, cfg.storage.table(DOCUMENTS))
    meta = {"stage": "sample", "run": sc.run, "run_id": run_id, "annotations_version": inp.annotations_version}
    selection_table = cfg.storage.table(SELECTION)
    predicate = f"run = '{sc.run}'"

    def write_selection(frame: DataFrame, theta_id: str, domains: list[str]) -> None:
        sel = _with_domain_names(frame, domains).select(
            F.lit(sc.run).alias("run"), F.lit(theta_id).alias("theta_id"), "doc_id", "domain", "n_tokens", "rbar",
            "rank_exact", "S", "copies",
        )
        replace_slice(faults.during(sel, "sample.selection.write"), selection_table, predicate, {**meta, "theta_id": theta_id})

    if baseline:
        frame, theta_id, key = baseline_selection(inp, baseline, sc.baseline_fraction, sc.seed)
        with narrow_batches(spark):
            write_selection(frame, theta_id, inp.domains)
    else:
        domains = theta_domains(inp, [theta])
        stack = ThetaStack.of([theta], domains, inp.criteria)
        theta_id, key = stack.ids[0], int(stack.keys[0])
        with narrow_batches(spark), rank_and_sample(inp.annotations, stack, inp.knots, settings(cfg), keep_all=True) as ranked:
            write_selection(ranked, theta_id, domains)
    faults.point("sample.selection.committed")

    selection = read_table(spark, selection_table).where(F.col("run") == sc.run)
    report = selection_report(selection)  # one pass over the narrow selection: the report, and what fits the budget
    plan, n_copies = _plan_epochs(selection, key, sc.seed, sc.budget_tokens, sc.max_epochs, float(report.expected_tokens.sum()))
    if n_copies is None:
        n_copies = int(report["copies"].sum())
    rows = instances(selection.where(F.col("S") > 0), plan, key, sc.seed).select(*ORDER_COLUMNS)
    out_table = cfg.storage.table(TRAINING_OUTPUT)
    rows = faults.during(rows.select(F.lit(sc.run).alias("run"), "*"), "sample.output.write")
    replace_slice(rows, out_table, predicate, {**meta, "theta_id": theta_id, "epochs": plan})
    output = read_table(spark, out_table).where(F.col("run") == sc.run).select(*ORDER_COLUMNS)
    folder = cfg.storage.path("export", sc.run)
    if sc.export_format == "tokens":
        manifest = export_tokens(output, documents, folder, sc.export_shards, cfg.ingest.tokenizer, cfg.ingest.fast_tokenizer)
        output_tokens = pd.DataFrame({"domain": list(manifest["tokens_by_domain"]),
                                      "output_tokens": list(manifest["tokens_by_domain"].values())})
    else:
        text = training_rows(documents, output, sc.broadcast_copies_rows, n_copies)
        manifest, output_tokens = _export(text, folder, sc.export_format, sc.export_shards)
    report = finish_report(report, output_tokens)
    return SampleResult(sc.run, theta_id, inp.annotations_version, report, int(manifest["tokens"]), plan, manifest)


@dataclass
class ManyResult:
    theta_ids: list[str]
    tokens: pd.DataFrame

    def summary(self) -> str:
        t = self.tokens
        return (f"proxy index for {len(self.theta_ids)} θ: realized tokens median {t.realized_tokens.median():,.0f} "
                f"(min {t.realized_tokens.min():,}, max {t.realized_tokens.max():,})")


def run_sample_many(spark: SparkSession, cfg: QuadmixConfig, thetas: list[Theta], run_id: str | None = None,
                    where: F.Column | None = None, inp: Inputs | None = None) -> ManyResult:
    """K θ: ``proxy_index`` and ``proxy_theta_tokens``, in chunks of ``sampling.theta_chunk`` θ.

    Each chunk is ranked in the fixed two passes of :func:`rank_and_sample` and its slice of ``proxy_index``
    replaced in one commit, so no task or driver structure grows with K beyond a chunk (the histogram is
    chunk × domains × coarse_bins) while the cost per θ stays that of one chunk. Every θ's rows are the same
    whatever the chunk size (a θ's copies depend on its own key only). The narrow annotations are cached
    while more than one chunk reads them.

    ``where`` restricts the documents to the proxy pool (see :func:`load_inputs`); or ``inp``, inputs already
    loaded (with their restriction), which θ's names were matched to."""
    if inp is not None and where is not None:
        raise ValueError("run_sample_many: give the inputs or the restriction to load them with, not both")
    inp = inp if inp is not None else load_inputs(spark, cfg, where)
    domains = theta_domains(inp, thetas)
    stack = ThetaStack.of(thetas, domains, inp.criteria)
    if len(set(stack.ids)) != len(stack.ids):
        raise ValueError("the parameter set holds the same θ twice")
    size = cfg.sampling.theta_chunk
    n_chunks = -(-stack.k // size)
    index_table = cfg.storage.table(PROXY_INDEX)
    annotations = inp.annotations.select("doc_id", "domain", "n_tokens", *[SCORE_PREFIX + c for c in inp.criteria])
    if n_chunks > 1:
        annotations = annotations.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        for i, chunk in enumerate(stack.chunks(size)):
            ids = F.array(*[F.lit(t) for t in chunk.ids])
            meta = {"stage": "sample-many", "run_id": run_id, "annotations_version": inp.annotations_version,
                    "n_theta": stack.k, "chunk": f"{i + 1}/{n_chunks}"}
            spark.sparkContext.setJobDescription(f"quadmix sample-many: θ chunk {i + 1}/{n_chunks} ({chunk.k} θ)")
            with narrow_batches(spark), rank_and_sample(annotations, chunk, inp.knots, settings(cfg), keep_all=False) as ranked:
                index = _with_domain_names(ranked, domains).select(
                    F.element_at(ids, F.col("theta_idx") + 1).alias("theta_id"), "doc_id", "domain", "n_tokens", "S", "copies"
                )
                replace_slice(faults.during(index, "sample-many.index.write"), index_table, _theta_predicate(chunk.ids), meta)
    finally:
        if n_chunks > 1:
            annotations.unpersist()
    faults.point("sample-many.index.committed")
    predicate = _theta_predicate(stack.ids)
    index = read_table(spark, index_table).where(F.expr(predicate))
    tokens = index.groupBy("theta_id").agg(
        F.sum(F.col("copies") * F.col("n_tokens")).alias("realized_tokens"), F.sum("n_tokens").alias("unique_tokens"),
        F.count("*").alias("selected_docs"),
    ).toPandas()
    tokens = pd.DataFrame({"theta_id": list(stack.ids)}).merge(tokens, on="theta_id", how="left").fillna(0)
    tokens[["realized_tokens", "unique_tokens", "selected_docs"]] = tokens[["realized_tokens", "unique_tokens", "selected_docs"]].astype("int64")
    tokens_table = cfg.storage.table(PROXY_THETA_TOKENS)
    meta = {"stage": "sample-many", "run_id": run_id, "annotations_version": inp.annotations_version, "n_theta": stack.k}
    replace_slice(spark.createDataFrame(tokens), tokens_table, predicate, meta)
    return ManyResult(list(stack.ids), tokens)


def _theta_predicate(ids) -> str:
    return "theta_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")"


def run_baseline_index(spark: SparkSession, cfg: QuadmixConfig, kinds: list[str], where: F.Column | None = None,
                       run_id: str | None = None, inp: Inputs | None = None) -> dict[str, tuple[str, int]]:
    """Baselines (``random``, ``topk:<criterion>``, ``mix``) written to ``proxy_index`` like θ, so proxies
    train on them through the same path. Returns {kind: (baseline id, hash key)}. ``where`` and ``inp`` as for
    :func:`run_sample_many`."""
    if inp is not None and where is not None:
        raise ValueError("run_baseline_index: give the inputs or the restriction to load them with, not both")
    inp = inp if inp is not None else load_inputs(spark, cfg, where)
    sc = cfg.sampling
    out = {}
    index_table = cfg.storage.table(PROXY_INDEX)
    for kind in kinds:
        frame, name, key = baseline_selection(inp, kind, sc.baseline_fraction, sc.seed)
        index = _with_domain_names(frame.where(F.col("copies") > 0), inp.domains).select(
            F.lit(name).alias("theta_id"), "doc_id", "domain", "n_tokens", "S", "copies"
        )
        meta = {"stage": "baseline-index", "run_id": run_id, "annotations_version": inp.annotations_version, "baseline": kind}
        with narrow_batches(spark):
            replace_slice(index, index_table, f"theta_id = '{name}'", meta)
        out[kind] = (name, key)
    return out
