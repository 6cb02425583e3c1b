"""Stage runners, one per ``quadmix`` command and in the order of the two workflows: the up-front checks, a
SparkSession, the stage's MLflow run, one library call (``run_<stage>``), what is logged. Each returns the
stage's report, whose ``summary()`` the CLI prints. The CLI, ``jobs/*.py`` (spark-submit and Databricks) and
the benchmarks all call these; the stage modules hold the work and import no runner.

curation: ingest_job, train_scorers_job, annotate_job, normalize_job, sample_job (sample_many_job)
search:   propose_job, proxy_job, search_job, evaluate_job
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pyspark.sql import functions as F

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.curation.ingest import IngestReport, report_dict, run_ingest
from quadmix_spark.core.runs import (
    PARAM_GPU_STAGE,
    TAG_ANNOTATIONS_VERSION,
    TAG_KNOTS_WRITTEN,
    TAG_MODEL,
    TAG_RUN,
    TAG_SEARCH,
    TAG_STAGE,
    TAG_THETA_ID,
    TAG_TRAIN_WARNINGS,
    THETA_ARTIFACT,
)
from quadmix_spark.core.session import get_spark
from quadmix_spark.core.tracking import stage_run

if TYPE_CHECKING:  # the stage modules load their model libraries; a runner imports its stage when it runs
    from quadmix_spark.curation.annotate import AnnotateReport
    from quadmix_spark.curation.train_scorers import TrainReport


def ingest_job(cfg: QuadmixConfig) -> IngestReport:
    import mlflow

    with stage_run(cfg, "ingest") as run:  # the lease first: a second ingest stops before starting Spark
        spark = get_spark(cfg)
        report = run_ingest(spark, cfg, run_id=run.info.run_id)
        mlflow.log_params({"ingest.format": report.format, "ingest.batch_id": report.batch_id or "none"})
        mlflow.log_metrics({k: v for k, v in report_dict(report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_metrics({f"rejects.{k}": v for k, v in report.rejects_by_reason.items()})
        mlflow.log_dict(report_dict(report), "ingest_report.json")
    return report


def train_scorers_job(cfg: QuadmixConfig) -> TrainReport:
    """Runner for ``quadmix train-scorers`` / ``jobs/train_scorers.py``: Spark, an MLflow run, the stage.

    Each model gets a nested MLflow run (params: version, task, model, settings; metrics: held-out AUC or
    accuracy; artifacts: its folder, i.e. the model files and ``meta.json``); the parent run carries
    ``<name>.<metric>`` for all of them and the report.
    """
    import mlflow

    from quadmix_spark.curation.train_scorers import TrainedModel, run_train_scorers

    spark = get_spark(cfg)

    def log(t: TrainedModel) -> None:
        with mlflow.start_run(run_name=f"train:{t.name}", nested=True, tags={TAG_STAGE: "train-scorers", TAG_MODEL: t.name}):
            params = {"version": t.version, "task": t.task, "model": t.model, "skipped": t.skipped, "n_train": t.n_train,
                      "n_holdout": t.n_holdout}
            params.update({f"param.{k}": v for k, v in cfg.train_scorers.models[t.name].model_dump().items() if v is not None})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in t.metrics.items()})
            mlflow.log_artifacts(t.folder, artifact_path=f"models/{t.name}")  # with report.json / report.png
            if t.warnings:
                mlflow.set_tag(TAG_TRAIN_WARNINGS, " | ".join(t.warnings)[:5000])
        mlflow.log_metrics({f"{t.name}.{k}": float(v) for k, v in t.metrics.items()})
        mlflow.log_param(f"{t.name}.version", t.version)

    with stage_run(cfg, "train-scorers"):
        report = run_train_scorers(spark, cfg, log)
        mlflow.log_text(report.summary(), "train_scorers/summary.txt")
        mlflow.log_dict({t.name: asdict(t) for t in report.models}, "train_scorers/models.json")
    return report


def annotate_job(cfg: QuadmixConfig, rescore: list[str] | None = None) -> AnnotateReport:
    """Runner for ``quadmix annotate`` / ``jobs/annotate.py``: scorers checked, Spark, an MLflow run, the stage.

    Logs the scorer versions (params ``quadmix.scorer.<key>``), the implementation an adapter says it runs
    (``quadmix.scorer_impl.<name>``, e.g. text_stats' compiled kernel), counts and speed (metrics), and the
    per-domain score histograms as a table (``annotate/score_histograms.json``) and a PNG plot.
    """
    import mlflow

    from quadmix_spark.curation.annotate import plot_score_histograms, rescore_allowed, run_annotate
    from quadmix_spark.curation.scorers import resolve_scorers

    scorers = resolve_scorers(cfg)  # every model file checked before Spark starts
    rescore_allowed(cfg, scorers, rescore)
    spark = get_spark(cfg)
    with stage_run(cfg, "annotate") as run:
        report = run_annotate(spark, cfg, rescore, run.info.run_id, scorers)
        mlflow.log_params({f"quadmix.scorer.{k}": v for k, v in report.versions.items()})
        mlflow.log_params({PARAM_GPU_STAGE: report.gpu_profile[:250]})
        mlflow.log_params({f"quadmix.scorer_impl.{k}": v[:250] for k, v in report.implementations.items()})
        mlflow.log_metrics({f"annotate.{k}": float(v) for k, v in report.metrics().items()})
        mlflow.set_tag(TAG_ANNOTATIONS_VERSION, str(report.table_version_after))
        if report.histograms is not None and len(report.histograms):
            mlflow.log_table(report.histograms, "annotate/score_histograms.json")
            fig = plot_score_histograms(report.histograms, cfg.annotate.histogram_bins)
            mlflow.log_figure(fig, "annotate/score_histograms.png")
        mlflow.log_text(report.summary(), "annotate/summary.txt")
    return report


@dataclass(frozen=True)
class NormalizeReport:
    knots: list
    written: bool

    def summary(self) -> str:
        state = "written" if self.written else "already current, unchanged"
        return f"normalize: {len(self.knots)} criteria ({', '.join(k.criterion for k in self.knots)}), knots {state}"


def normalize_job(cfg: QuadmixConfig) -> NormalizeReport:
    """σ knots of the current annotations (idempotent per annotations version)."""
    import mlflow

    from quadmix_spark.curation.normalize import run_normalize
    from quadmix_spark.core.tables import ANNOTATIONS, SCORE_KNOTS

    with stage_run(cfg, "normalize") as run:
        spark = get_spark(cfg)
        knots, written = run_normalize(
            spark, cfg.storage.table(ANNOTATIONS), cfg.storage.table(SCORE_KNOTS), cfg.normalize.method,
            cfg.normalize.n_knots, run_id=run.info.run_id,
        )
        mlflow.log_params({"normalize.method": cfg.normalize.method, "normalize.n_knots": cfg.normalize.n_knots})
        mlflow.log_dict({"knots": [k.to_dict() for k in knots]}, "score_knots.json")
        mlflow.set_tag(TAG_KNOTS_WRITTEN, str(written).lower())
    return NormalizeReport(knots, written)


def sample_dry_run_job(cfg: QuadmixConfig, params: str):
    from quadmix_spark.curation.sample import dry_run_report, load_inputs
    from quadmix_spark.core.theta_sources import check_file, load_one
    from quadmix_spark.core.tracking import configure_mlflow

    check_file(params)
    configure_mlflow(cfg)
    spark = get_spark(cfg)
    inp = load_inputs(spark, cfg)
    return dry_run_report(spark, cfg, load_one(params, inp.domains, inp.criteria))


def sample_job(cfg: QuadmixConfig, params: str | None = None, baseline: str | None = None, random_seed: int | None = None):
    """One θ (or a baseline): selection, training output, export; report, plot and θ logged to MLflow."""
    import tempfile
    from pathlib import Path

    import mlflow

    from quadmix_spark.curation.sample import load_inputs, plot_report, run_sample
    from quadmix_spark.core.storage import table_version
    from quadmix_spark.core.theta_sources import check_file, load_one, theta_params
    from quadmix_spark.core.tracking import configure_mlflow

    if params:
        check_file(params)
    configure_mlflow(cfg)  # --params may name an MLflow run (a search fit's θ*)
    spark = get_spark(cfg)
    theta = inp = None
    if params or random_seed is not None:
        inp = load_inputs(spark, cfg)
        if params:
            theta = load_one(params, inp.domains, inp.criteria)
        else:
            from quadmix_spark.kernel.theta import sample_thetas

            theta = sample_thetas(inp.domains, inp.criteria, 1, random_seed)[0]
    with stage_run(cfg, "sample", run_name=f"sample-{cfg.sampling.run}", scope=f"sample.{cfg.sampling.run}") as run:
        if theta is not None:
            mlflow.log_params(theta_params(theta))
            mlflow.log_dict(theta.to_dict(), THETA_ARTIFACT)
        result = run_sample(spark, cfg, theta=theta, baseline=baseline, run_id=run.info.run_id, inp=inp)
        mlflow.set_tags({TAG_RUN: result.run, TAG_THETA_ID: result.theta_id})
        mlflow.log_params({
            "sampling.run": result.run, "sampling.seed": cfg.sampling.seed, "sampling.budget_tokens": cfg.sampling.budget_tokens,
            "delta.annotations_version": result.annotations_version,
            "delta.documents_version": table_version(spark, cfg.storage.table("documents")),
        })
        r = result.report
        mlflow.log_metrics({
            "input_tokens": float(r.input_tokens.sum()), "expected_tokens": float(r.expected_tokens.sum()),
            "realized_tokens": float(r.realized_tokens.sum()), "unique_tokens": float(r.unique_tokens.sum()),
            "output_tokens": float(result.output_tokens), "epochs": float(len(result.epochs)),
        })
        mlflow.log_table(r, "domain_report.json")
        mlflow.log_dict(result.manifest, "export_manifest.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(plot_report(r, str(Path(tmp) / "domain_report.png"), f"run {result.run}"))
    return result


def sample_many_job(cfg: QuadmixConfig, params_set: str):
    """K θ in one job: the proxy index and each θ's realized tokens."""
    import hashlib

    import mlflow

    from quadmix_spark.curation.sample import load_inputs, run_sample_many
    from quadmix_spark.core.theta_sources import load_set

    spark = get_spark(cfg)
    inp = load_inputs(spark, cfg)
    thetas = load_set(params_set, inp.domains, inp.criteria)
    ids = sorted(t.theta_id for t in thetas)  # the same θ set twice at once: the second stops
    with stage_run(cfg, "sample-many", scope=f"sample-many.{hashlib.sha256(' '.join(ids).encode()).hexdigest()[:16]}") as run:
        result = run_sample_many(spark, cfg, thetas, run_id=run.info.run_id, inp=inp)
        mlflow.log_params({"n_theta": len(thetas), "params_set": params_set})
        mlflow.log_table(result.tokens, "theta_tokens.json")
    return result


def propose_job(cfg: QuadmixConfig, n: int | None = None, refine: int | None = None, source: str | None = None,
                replicate: int | None = None, seeds: int = 2):
    """K θ of search ``search.name`` from Algorithm 1, as MLflow child runs (names from the annotations); with
    ``refine``, that many of the best candidates of the newest fit of the search (or of search ``source``) instead;
    with ``replicate``, that many of its best trained θ again with ``seeds`` more training seeds (neither needs
    Spark)."""
    from quadmix_spark.search import propose as proposals
    from quadmix_spark.search.propose import propose
    from quadmix_spark.search.proxy_pool import pool_predicate
    from quadmix_spark.core.run_guard import lease, search_scope
    from quadmix_spark.curation.sample import load_inputs
    from quadmix_spark.core.tracking import configure_mlflow

    configure_mlflow(cfg)
    with lease(cfg, search_scope(cfg.search.name), "propose"):  # propose and proxy of one search exclude each other
        if refine is not None:
            return proposals.refine(cfg, refine, source)
        if replicate is not None:
            return proposals.replicate(cfg, replicate, seeds)
        spark = get_spark(cfg)
        inp = load_inputs(spark, cfg, pool_predicate(cfg))
        tokens = {r["domain"]: int(r["tokens"]) for r in inp.annotations.groupBy("domain").agg(
            F.sum("n_tokens").alias("tokens")).collect()}
        return propose(cfg, inp.domains, inp.criteria, n or cfg.search.n_proposals, domain_tokens=tokens)


def proxy_job(cfg: QuadmixConfig):
    """Train the unfinished proxies of search ``search.name`` (one Spark task per θ)."""
    import mlflow

    from quadmix_spark.search.proxy import outcomes_frame, run_search_proxies

    from quadmix_spark.core.run_guard import search_scope

    with stage_run(cfg, "proxy", run_name=f"proxy-{cfg.search.name}", scope=search_scope(cfg.search.name)) as run:
        spark = get_spark(cfg)
        mlflow.set_tag(TAG_SEARCH, cfg.search.name)
        report = run_search_proxies(spark, cfg, run_id=run.info.run_id)
        mlflow.log_metrics({"trained": float(len(report.outcomes) - len(report.failed)), "failed": float(len(report.failed)),
                            "skipped": float(report.skipped), "pool_docs": float(report.pool.get("n_docs", 0)),
                            "pool_tokens": float(report.pool.get("n_tokens", 0))})
        if report.outcomes:
            mlflow.log_table(outcomes_frame(report.outcomes), "proxy_outcomes.json")
    return report


def search_job(cfg: QuadmixConfig, names: list[str] | None = None, out_path: str | None = None):
    """Fit LightGBM on the finished proxies of one or more searches and derive θ*: the fit and its checks first
    (a refused fit leaves no run), then one ``search-fit-<names>`` run under the ``search`` lease."""
    from quadmix_spark.search.theta_star import fit_theta_star, log_search
    from quadmix_spark.core.tracking import configure_mlflow

    configure_mlflow(cfg)
    outcome = fit_theta_star(cfg, names or [cfg.search.name])
    with stage_run(cfg, "search", run_name=outcome.run_name, tags=outcome.tags) as run:
        return log_search(outcome, run.info.run_id, out_path)


def evaluate_job(cfg: QuadmixConfig):
    """θ* against the baselines: fresh proxies, several seeds each, at the same token budget. One run per (search,
    θ*, proxy settings), which a later invocation resumes to train only the missing (arm, seed) proxies."""
    from quadmix_spark.search.evaluate import evaluate_target, run_evaluate
    from quadmix_spark.core.tracking import configure_mlflow

    configure_mlflow(cfg)
    target = evaluate_target(cfg)
    with stage_run(cfg, "evaluate", run_name=f"evaluate-{target.search}", scope=f"evaluate.{target.search}",
                   tags=target.tags, resume=target.find_run) as run:
        spark = get_spark(cfg)
        return run_evaluate(spark, cfg, target, run.info.run_id)
