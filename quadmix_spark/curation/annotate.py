"""Annotate: ``documents`` -> the ``annotations`` Delta table (domain, quality scores, scorer versions).

Table ``annotations``, one row per ``doc_id``: ``n_tokens`` (from documents), ``domain``, ``domain_conf``,
``q_<criterion>`` (raw score, higher = better, as the model gives it, not rounded), a ``text_stats`` scorer's
``<criterion>_stats`` (struct) and ``<criterion>_rejected`` (array of failed pre-filter rules; see
:mod:`quadmix_spark.curation.prefilter`), and ``scorer_versions`` (map: ``domain`` / ``q_<criterion>`` ->
``<scorer>@<version>``) saying which scorer version made each column of the row (a scorer's extra columns go
with its ``q_`` key).

Contract
- Incremental: a document is scored by a scorer only when its row lacks that column's current version (a
  new document, or a scorer newly added to the config). Results are merged on ``doc_id`` (Delta MERGE, one
  atomic commit; into an empty table, an append carrying a Delta ``txnAppId``, which is the same in one
  pass), so a failed or retried task or job never leaves duplicates; a rerun with nothing to do commits
  nothing (the table version stays).
- A scorer whose version changed (new model file, new settings, new ``version``) is an error naming the
  column, the old and the new version, unless rescoring it is explicit (``rescore=[name]`` /
  ``annotate.rescore``); then only that scorer's columns are recomputed.
- Deterministic whatever the partitioning: each document's scores are the same bits whatever documents share
  its batch, since every model call has a shape fixed by the document alone (:mod:`quadmix_udfs.scoring`);
  files and row order of the table may differ.
- Scalable: documents are scored where they are read (``mapInArrow``), nothing but small aggregates
  (version counts, histogram bins) reaches the driver.
- GPU scorers (``onnx_transformer``) with ``annotate.stage_level_scheduling`` on a cluster whose executors
  declare GPUs run in their own stage, each task asking for ``annotate.task_gpus`` GPUs, so CPU stages do not
  hold GPUs; in local mode (no GPU resources) the flag is ignored and the reason reported.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from quadmix_spark.core import faults
from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.curation.prefilter import prefilter_counts
from quadmix_spark.curation.scorers import ScorerError, ScorerSet, resolve_scorers
from quadmix_spark.core.tables import ANNOTATIONS, DOCUMENTS, SCORE_PREFIX
from quadmix_spark.core.storage import is_path, read_table, table_exists, table_version
from quadmix_udfs.scoring import need_column, score_partitions

VERSIONS = "scorer_versions"


class AnnotationVersionError(ScorerError):
    """Existing annotations were made by another version of a scorer and rescoring it was not asked for."""


@dataclass
class AnnotateReport:
    documents: int = 0
    new_documents: int = 0
    scored: dict[str, int] = field(default_factory=dict)  # scorer name -> rows it scored
    rescored: dict[str, int] = field(default_factory=dict)  # scorer name -> existing rows it rescored
    versions: dict[str, str] = field(default_factory=dict)  # column key -> scorer@version
    table_version_before: int | None = None
    table_version_after: int | None = None
    seconds_scoring: float = 0.0
    rows: int = 0
    domains: int = 0
    gpu_profile: str = "not used"
    histograms: pd.DataFrame | None = field(default=None, repr=False)
    prefilter: dict[str, dict[str, int]] = field(default_factory=dict)  # scorer -> {rule | "rejected": rows}
    implementations: dict[str, str] = field(default_factory=dict)  # scorer -> which implementation (driver's view)

    @property
    def changed(self) -> bool:
        return self.table_version_after != self.table_version_before

    @property
    def docs_per_s(self) -> float:
        n = max(self.scored.values(), default=0)
        return n / self.seconds_scoring if self.seconds_scoring > 0 else 0.0

    def summary(self) -> str:
        if not self.changed:
            head = f"annotate: nothing to do ({self.rows} documents annotated with the current scorer versions)"
            return head + "\n" + "\n".join(f"  {k:<16} {v}" for k, v in self.versions.items())
        else:
            per = ", ".join(f"{k}={v}" for k, v in self.scored.items())
            head = (
                f"annotate: {self.new_documents} new documents; rows scored per scorer: {per}"
                + (f"; rescored: {', '.join(f'{k}={v}' for k, v in self.rescored.items())}" if self.rescored else "")
                + f"\n  {self.seconds_scoring:.1f} s scoring + merge"
                + (f" ({self.docs_per_s:.0f} docs/s)" if self.docs_per_s else "")
                + "; annotations "
                + (f"v{self.table_version_before}" if self.table_version_before is not None else "(new table)")
                + f" -> v{self.table_version_after}"
            )
        versions = "\n".join(f"  {k:<16} {v}" for k, v in self.versions.items())
        prefilter = "".join(
            f"\n  prefilter {name}: {counts['rejected']} of {self.rows} documents rejected"
            + "".join(f", {rule} {n}" for rule, n in counts.items() if rule != "rejected" and n)
            for name, counts in self.prefilter.items()
        )
        impl = "".join(f"\n  {name} computed by {how}" for name, how in self.implementations.items())
        return f"{head}\n  rows {self.rows}, domains {self.domains}; GPU stage: {self.gpu_profile}{prefilter}{impl}\n{versions}"

    def metrics(self) -> dict[str, float]:
        out = {
            "documents": self.documents,
            "new_documents": self.new_documents,
            "rows": self.rows,
            "domains": self.domains,
            "seconds_scoring": self.seconds_scoring,
            "docs_per_s": self.docs_per_s,
        }
        out.update({f"scored.{k}": v for k, v in self.scored.items()})
        out.update({f"rescored.{k}": v for k, v in self.rescored.items()})
        out.update({f"prefilter.{name}.{rule}": n for name, counts in self.prefilter.items() for rule, n in counts.items()})
        return out


# ---------------------------------------------------------------- versions and work


def version_counts(annotations: DataFrame) -> dict[str, dict[str, int]]:
    """Column key -> {scorer@version: rows} over an annotations table (a small aggregate)."""
    rows = (
        annotations.select(F.explode(VERSIONS).alias("key", "tag")).groupBy("key", "tag").count().collect()
    )
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["key"], {})[r["tag"]] = r["count"]
    return out


def check_versions(existing: dict[str, dict[str, int]], scorers: ScorerSet, rescore: set[str]) -> dict[str, int]:
    """Rows to rescore per scorer; raises :class:`AnnotationVersionError` for a change not made explicit."""
    out: dict[str, int] = {}
    problems, names = [], []
    for key, scorer in scorers.by_key().items():
        stale = {tag: n for tag, n in existing.get(key, {}).items() if tag != scorer.tag}
        if not stale:
            continue
        if "all" in rescore or scorer.name in rescore:
            out[scorer.name] = sum(stale.values())
            continue
        old = ", ".join(f"{tag} ({n} rows)" for tag, n in sorted(stale.items()))
        problems.append(f"column {key}: annotated by {old}; scorer {scorer.name!r} is now {scorer.tag}")
        names.append(scorer.name)
    if problems:
        raise AnnotationVersionError(
            "annotations were made by other scorer versions:\n  "
            + "\n  ".join(problems)
            + f"\nrescore explicitly: rescore={names} (quadmix annotate --rescore {' --rescore '.join(names)},"
            f" or annotate.rescore: {names})"
        )
    return out


def flag_documents(documents: DataFrame, annotations: DataFrame | None, scorers: ScorerSet) -> DataFrame:
    """Every document with ``doc_id, text, n_tokens, _new`` and one ``_need_<scorer>`` flag per scorer.

    A row needs a scorer when it has no annotation row, or its recorded version for the scorer's column key
    differs from the current one (new scorer, or an allowed rescore; see :func:`check_versions`).
    """
    docs = documents.select("doc_id", "text", F.col("n_tokens").cast("bigint").alias("n_tokens"))
    if annotations is None:
        joined = docs.withColumn("_versions", F.lit(None).cast(T.MapType(T.StringType(), T.StringType())))
    else:
        ann = annotations.select("doc_id", F.col(VERSIONS).alias("_versions"))
        joined = docs.join(ann, on="doc_id", how="left")
    needs = []
    for key, scorer in scorers.by_key().items():
        recorded = F.col("_versions").getItem(key)
        needs.append(F.coalesce(recorded != F.lit(scorer.tag), F.lit(True)).alias(need_column(scorer.name)))
    return joined.select("doc_id", "text", "n_tokens", F.col("_versions").isNull().alias("_new"), *needs)


def uniform_work(documents: DataFrame, scorers: ScorerSet, n_documents: int, new_documents: int,
                 scored: dict[str, int]) -> DataFrame | None:
    """The documents to score when every document has the same flags (none new, each scorer needed by all or
    by none: a scorer added or rescored over a whole corpus): ``documents`` with literal flags, no join with
    the annotations, so the text is not shuffled. None when the flags differ between documents."""
    if new_documents or any(n not in (0, n_documents) for n in scored.values()) or not any(scored.values()):
        return None
    needs = [F.lit(scored[s.name] == n_documents).alias(need_column(s.name)) for s in scorers.by_key().values()]
    return documents.select("doc_id", "text", F.col("n_tokens").cast("bigint").alias("n_tokens"), F.lit(False).alias("_new"),
                            *needs)


def _any_need(scorers: ScorerSet) -> Column:
    return functools.reduce(lambda a, b: a | b, [F.col(need_column(s.name)) for s in scorers.by_key().values()])


def plan_work(documents: DataFrame, annotations: DataFrame | None, scorers: ScorerSet) -> DataFrame:
    """The documents some scorer must score (see :func:`flag_documents`)."""
    return flag_documents(documents, annotations, scorers).where(_any_need(scorers))


def work_counts(flagged: DataFrame, scorers: ScorerSet) -> tuple[int, int, dict[str, int]]:
    """(documents, new documents, rows to score per scorer) of flagged documents, in one pass that reads no text."""
    names = [s.name for s in scorers.by_key().values()]
    aggs = [F.count(F.lit(1)).alias("_docs"), F.sum(F.col("_new").cast("long")).alias("_new")]
    aggs += [F.sum(F.col(need_column(n)).cast("long")).alias(n) for n in names]
    row = flagged.select("_new", *[need_column(n) for n in names]).agg(*aggs).first()
    return int(row["_docs"]), int(row["_new"] or 0), {n: int(row[n] or 0) for n in names}


# ---------------------------------------------------------------- scoring


def _value_fields(scorers: ScorerSet) -> list[T.StructField]:
    fields = [T.StructField("domain", T.StringType()), T.StructField("domain_conf", T.DoubleType())]
    return fields + scorers.quality_fields()


def _pass_fields(scorers: ScorerSet) -> list[T.StructField]:
    flags = [T.StructField(need_column(s.name), T.BooleanType()) for s in scorers.by_key().values()]
    return [T.StructField("doc_id", T.StringType()), T.StructField("n_tokens", T.LongType()), T.StructField("_new", T.BooleanType()), *flags]


def text_limit(runs) -> int | None:
    """The longest text prefix any scorer reads (the largest ``max_chars`` of the runs' adapters), or None
    when some adapter has no ``max_chars`` (it may read whole texts).  Spark's ``substring`` counts characters
    (code points) as Python's slicing does, so cutting there first changes no score."""
    limits = [getattr(r.adapter, "max_chars", None) for r in runs]
    if not limits or any(not isinstance(m, int) or m <= 0 for m in limits):
        return None
    return max(limits)


def cut_text(text: Column, limit: int) -> Column:
    """``text[:limit]`` in Spark (``substring`` counts code points, as Python does), applied only to texts with
    more bytes than ``limit``: the usual page is neither scanned nor copied."""
    return F.when(F.octet_length(text) > limit, F.substring(text, 1, limit)).otherwise(text)


def spread_work(work: DataFrame, partitions: int | None, source_files: int | None = None) -> DataFrame:
    """``work`` in ``partitions`` tasks (hash of ``doc_id``), or, when unset, as read unless that leaves a core idle:
    fewer partitions than the cluster has slots, or fewer ``source_files`` (the documents table's files) than
    slots. The second is the common small-corpus case: Spark splits a 19 MB Parquet file in two for two cores,
    but its one row group goes to the split holding the group's middle, so one task scores every row."""
    if partitions:
        return work.repartition(partitions, "doc_id")
    slots = work.sparkSession.sparkContext.defaultParallelism
    if work.rdd.getNumPartitions() < slots or (source_files is not None and source_files < slots):
        return work.repartition(slots, "doc_id")
    return work


def score_documents(
    work: DataFrame, scorers: ScorerSet, gpu_stage: bool = False, gpu_profile=None, partitions: int | None = None,
    source_files: int | None = None,
) -> DataFrame:
    """The planned work with every scorer's columns filled where needed (null elsewhere).

    By default every scorer runs in one ``mapInArrow`` pass over the rows as read. With ``gpu_stage`` the
    CPU scorers run first, the rows are hash-partitioned by ``doc_id`` (a stage boundary), and the GPU scorers
    run in a second ``mapInArrow`` carrying ``gpu_profile``, so only that stage asks for GPUs.
    """
    limit = text_limit([r for _, _, r in scorers.runs()])
    if limit is not None:  # ship only what some scorer reads to Python: a several-MB page costs max_chars
        work = work.withColumn("text", cut_text(F.col("text"), limit))
    work = spread_work(work, partitions, source_files)
    runs = scorers.runs()
    values = _value_fields(scorers)
    by_col = {f.name: f for f in values}
    if not gpu_stage:
        schema = T.StructType(_pass_fields(scorers) + values)
        fn = functools.partial(score_partitions, tuple(r for _, _, r in runs), tuple(schema.fieldNames()))
        return work.mapInArrow(fn, schema)
    cpu = [(s, r) for _, s, r in runs if not s.gpu_capable]
    gpu = [(s, r) for _, s, r in runs if s.gpu_capable]
    cpu_fields = [by_col[c] for s, r in cpu for c in r.columns]
    stage1 = T.StructType(_pass_fields(scorers) + [T.StructField("text", T.StringType())] + cpu_fields)
    fn1 = functools.partial(score_partitions, tuple(r for _, r in cpu), tuple(stage1.fieldNames()))
    first = work.mapInArrow(fn1, stage1)
    shuffled = first.repartition(partitions or first.rdd.getNumPartitions(), "doc_id")
    stage2 = T.StructType([f for f in stage1.fields if f.name != "text"] + [by_col[c] for s, r in gpu for c in r.columns])
    fn2 = functools.partial(score_partitions, tuple(r for _, r in gpu), tuple(stage2.fieldNames()))
    return shuffled.mapInArrow(fn2, stage2, profile=gpu_profile).select(*[f.name for f in T.StructType(_pass_fields(scorers) + values).fields])


def gpu_resource_profile(spark: SparkSession, cfg: QuadmixConfig, scorers: ScorerSet):
    """(ResourceProfile | None, why): the task profile of the GPU scoring stage, when it can apply.

    It applies only with ``annotate.stage_level_scheduling``, a GPU-capable scorer, a non-local master, and
    executors that declare GPUs (``spark.executor.resource.gpu.amount``).
    """
    ac = cfg.annotate
    if not ac.stage_level_scheduling:
        return None, "off (annotate.stage_level_scheduling: false)"
    if not any(s.gpu_capable for s in scorers.by_key().values()):
        return None, "no GPU-capable scorer (onnx_transformer with device auto/cuda)"
    master = spark.sparkContext.master
    if master.startswith("local"):
        return None, f"not applied: {master} has no GPU resources (scorers run on CPU)"
    if not spark.sparkContext.getConf().get("spark.executor.resource.gpu.amount"):
        return None, "not applied: executors declare no GPUs (set spark.executor.resource.gpu.amount)"
    return build_gpu_profile(ac.task_gpus, ac.task_cpus), f"task asks {ac.task_cpus} CPU + {ac.task_gpus} GPU"


def build_gpu_profile(task_gpus: float, task_cpus: int):
    """A task-level ResourceProfile asking each task for ``task_gpus`` GPUs and ``task_cpus`` CPUs."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    reqs = TaskResourceRequests().cpus(task_cpus).resource("gpu", task_gpus)
    return ResourceProfileBuilder().require(reqs).build


# ---------------------------------------------------------------- the table


def annotations_schema(scorers: ScorerSet) -> T.StructType:
    return T.StructType(
        [T.StructField("doc_id", T.StringType()), T.StructField("n_tokens", T.LongType()), *_value_fields(scorers),
         T.StructField(VERSIONS, T.MapType(T.StringType(), T.StringType()))]
    )


def _delta_table(spark: SparkSession, table: str):
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, table) if is_path(table) else DeltaTable.forName(spark, table)


def create_annotations(spark: SparkSession, table: str, scorers: ScorerSet) -> None:
    from delta.tables import DeltaTable

    builder = DeltaTable.createIfNotExists(spark)
    builder = builder.location(table) if is_path(table) else builder.tableName(table)
    builder.addColumns(annotations_schema(scorers)).comment("quadmix annotations: one row per doc_id").execute()


@contextmanager
def _session_confs(spark: SparkSession, confs: dict[str, str]) -> Iterator[None]:
    old = {k: spark.conf.get(k, None) for k in confs}
    for k, v in confs.items():
        spark.conf.set(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)


def _versions_literal(versions: dict[str, str]) -> Column:
    return F.create_map(*[F.lit(x) for kv in sorted(versions.items()) for x in kv])


def merge_annotations(
    spark: SparkSession, table: str, scored: DataFrame, scorers: ScorerSet, updates: bool, metadata: str
) -> None:
    """MERGE scored rows into ``annotations`` on ``doc_id`` in one commit.

    New documents are inserted; with ``updates`` (a new scorer or an explicit rescore) existing rows get only
    the columns of the scorers that scored them, and their version map the current versions. Delta
    materialises the source for the two-pass update merge, so the models run once.
    """
    versions = scorers.versions()
    columns = ["doc_id", "n_tokens", *scorers.value_columns()]
    target_cols = set(read_table(spark, table).columns)
    merge = _delta_table(spark, table).alias("t").merge(scored.alias("s"), "t.doc_id = s.doc_id")
    if updates:
        sets: dict[str, Column] = {"n_tokens": F.col("s.n_tokens")}
        for key, scorer, run in scorers.runs():
            need = F.col(f"s.{need_column(scorer.name)}")
            for c in run.columns:
                old = F.col(f"t.{c}") if c in target_cols else F.lit(None)
                sets[c] = F.when(need, F.col(f"s.{c}")).otherwise(old)
        keys = F.array(*[F.lit(k) for k in versions])
        kept = F.map_filter(F.col(f"t.{VERSIONS}"), lambda k, v: ~F.array_contains(keys, k))
        sets[VERSIONS] = F.map_concat(kept, _versions_literal(versions))
        merge = merge.whenMatchedUpdate(set=sets)
    inserts = {c: F.col(f"s.{c}") for c in columns}
    inserts[VERSIONS] = _versions_literal(versions)
    merge = merge.whenNotMatchedInsert(values=inserts)
    if not set(columns) <= target_cols:
        merge = merge.withSchemaEvolution()
    confs = {
        "spark.databricks.delta.commitInfo.userMetadata": metadata,
        "spark.databricks.delta.merge.materializeSource": "all" if updates else "auto",
    }
    with _session_confs(spark, confs):
        merge.execute()


def append_annotations(table: str, scored: DataFrame, scorers: ScorerSet, txn: tuple[str, int], metadata: str) -> None:
    """Append scored rows to an empty ``annotations`` table in one commit.

    ``txn`` (Delta ``txnAppId``/``txnVersion``, from the documents and annotations versions and the scorer versions)
    makes a repeated or concurrent identical append a no-op, so no document is ever added twice.
    """
    from quadmix_spark.core.storage import write_table

    columns = ["doc_id", "n_tokens", *scorers.value_columns()]
    rows = scored.select(*columns, _versions_literal(scorers.versions()).alias(VERSIONS))
    write_table(rows, table, metadata=json.loads(metadata), txn=txn)


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- histograms


def score_histograms(annotations: DataFrame, criteria: list[str], bins: int) -> pd.DataFrame:
    """Per-domain histograms of each criterion (and ``domain_conf``): a small pandas frame.

    Columns: ``criterion, domain, bin, bin_lo, bin_hi, count, share`` (share of the domain's scored rows);
    bins span each criterion's global min..max.
    """
    cols = [c for c in [*criteria, "domain_conf"] if c in annotations.columns]
    if not cols:
        return pd.DataFrame(columns=["criterion", "domain", "bin", "bin_lo", "bin_hi", "count", "share"])
    pairs = F.array(*[F.struct(F.lit(c).alias("criterion"), F.col(c).cast("double").alias("score")) for c in cols])
    long = annotations.select(F.coalesce("domain", F.lit("(none)")).alias("domain"), F.explode(pairs).alias("x"))
    long = long.select("domain", "x.criterion", "x.score").where(F.col("score").isNotNull() & ~F.isnan("score"))
    bounds = long.groupBy("criterion").agg(F.min("score").alias("lo"), F.max("score").alias("hi"))
    width = (F.col("hi") - F.col("lo")) / bins
    b = F.when(width > 0, F.floor((F.col("score") - F.col("lo")) / width)).otherwise(F.lit(0))
    binned = long.join(F.broadcast(bounds), "criterion").withColumn("bin", F.least(F.lit(bins - 1), b.cast("int")))
    counts = binned.groupBy("criterion", "domain", "bin", "lo", "hi").count().toPandas()
    if counts.empty:
        return pd.DataFrame(columns=["criterion", "domain", "bin", "bin_lo", "bin_hi", "count", "share"])
    w = (counts["hi"] - counts["lo"]) / bins
    counts["bin_lo"] = counts["lo"] + counts["bin"] * w
    counts["bin_hi"] = counts["bin_lo"] + w
    counts["share"] = counts["count"] / counts.groupby(["criterion", "domain"])["count"].transform("sum")
    out = counts[["criterion", "domain", "bin", "bin_lo", "bin_hi", "count", "share"]]
    return out.sort_values(["criterion", "domain", "bin"]).reset_index(drop=True)


def plot_score_histograms(hist: pd.DataFrame, bins: int):
    """One heat map per criterion: rows = domains, columns = score bins, colour = share of the domain."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    criteria = sorted(hist["criterion"].unique()) if len(hist) else []
    domains = sorted(hist["domain"].unique()) if len(hist) else []
    fig = Figure(figsize=(4.2 * max(1, len(criteria)), 0.28 * max(8, len(domains)) + 1.5))
    FigureCanvasAgg(fig)
    for i, crit in enumerate(criteria):
        ax = fig.add_subplot(1, len(criteria), i + 1)
        sub = hist[hist["criterion"] == crit]
        grid = np.zeros((len(domains), bins))
        for r in sub.itertuples():
            grid[domains.index(r.domain), int(r.bin)] = r.share
        lo, hi = float(sub["bin_lo"].min()), float(sub["bin_hi"].max())
        ax.imshow(grid, aspect="auto", cmap="viridis", extent=(lo, hi, len(domains) - 0.5, -0.5), interpolation="nearest")
        ax.set_title(crit, fontsize=9)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if i == 0 else [], fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("score histograms per domain (share of the domain's documents)", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the stage


def rescore_allowed(cfg: QuadmixConfig, scorers: ScorerSet, rescore: list[str] | None) -> set[str]:
    """The scorers allowed to replace older versions' columns (``annotate.rescore`` and ``--rescore``); a name
    annotate does not use is an error."""
    allowed = set(cfg.annotate.rescore) | set(rescore or [])
    names = {s.name for s in scorers.by_key().values()}
    unknown = sorted(n for n in allowed if n != "all" and n not in names)
    if unknown:
        raise ScorerError(f"rescore names scorer(s) not used by annotate: {', '.join(unknown)}")
    return allowed


def run_annotate(
    spark: SparkSession,
    cfg: QuadmixConfig,
    rescore: list[str] | None = None,
    run_id: str | None = None,
    scorers: ScorerSet | None = None,
    histograms: bool = True,
) -> AnnotateReport:
    """The annotate stage: score what is missing for the current scorer versions, MERGE it; then, when the
    table changed and ``histograms``, the per-domain score histograms (``report.histograms``)."""
    scorers = scorers or resolve_scorers(cfg)
    allowed = rescore_allowed(cfg, scorers, rescore)
    docs_table, table = cfg.storage.table(DOCUMENTS), cfg.storage.table(ANNOTATIONS)
    if not table_exists(spark, docs_table):
        raise ScorerError(f"no documents table at {docs_table}: run `quadmix ingest` first")
    documents = read_table(spark, docs_table)
    report = AnnotateReport(versions=scorers.versions(), implementations=scorers.implementations())
    existing = read_table(spark, table) if table_exists(spark, table) else None
    report.table_version_before = table_version(spark, table)
    existing_versions: dict[str, dict[str, int]] = {}
    if existing is not None:
        existing_versions = version_counts(existing)
        report.rescored = check_versions(existing_versions, scorers, allowed)
    flagged = flag_documents(documents, existing, scorers)
    if existing is None:  # every document is new and needs every scorer: a count Delta answers from its log
        n = documents.count()
        report.documents, report.new_documents, report.scored = n, n, {s.name: n for s in scorers.by_key().values()}
    else:
        report.documents, report.new_documents, report.scored = work_counts(flagged, scorers)
    if any(report.scored.values()):
        profile, report.gpu_profile = gpu_resource_profile(spark, cfg, scorers)
        if existing is None:
            create_annotations(spark, table, scorers)
            faults.point("annotate.created")
        work = None if existing is None else uniform_work(documents, scorers, report.documents, report.new_documents,
                                                           report.scored)
        if work is None:
            work = flagged.where(_any_need(scorers))
        scored = score_documents(work, scorers, profile is not None, profile, cfg.annotate.partitions,
                                 len(documents.inputFiles()))
        scored = faults.during(scored, "annotate.scores.write")
        updates = any(n > report.new_documents for n in report.scored.values())
        meta = json.dumps({"stage": "annotate", "run_id": run_id, "config": cfg.fingerprint()})
        t0 = time.perf_counter()
        if not existing_versions:  # an empty table: an idempotent append does what the MERGE would, in one pass
            key = [table_version(spark, docs_table), table_version(spark, table), sorted(scorers.versions().items())]
            txn = f"quadmix-annotate-{_digest(key)}"
            append_annotations(table, scored, scorers, (txn, 0), meta)
        else:
            merge_annotations(spark, table, scored, scorers, updates, meta)
        report.seconds_scoring = time.perf_counter() - t0
    report.table_version_after = table_version(spark, table)
    if report.changed and histograms:  # row and domain counts come with the histograms
        hist = score_histograms(read_table(spark, table), [SCORE_PREFIX + s.name for s in scorers.quality], cfg.annotate.histogram_bins)
        conf = hist[hist["criterion"] == "domain_conf"]
        report.rows, report.domains = int(conf["count"].sum()), int(conf["domain"].nunique())
        report.histograms = hist
        report.prefilter = prefilter_counts(read_table(spark, table), scorers.filters())
    elif existing is not None:
        report.rows = sum(existing_versions.get("domain", {}).values())
    return report
