"""Stage runners: a SparkSession, an MLflow run, one library call. Shared by the CLI and ``jobs/*.py``."""

from __future__ import annotations

from pyspark.sql import functions as F

from quadmix_spark.config import QuadmixConfig
from quadmix_spark.ingest import IngestReport, report_dict, run_ingest
from quadmix_spark.runs import TAG_KNOTS_WRITTEN, TAG_RUN, TAG_SEARCH, TAG_THETA_ID, THETA_ARTIFACT
from quadmix_spark.session import get_spark
from quadmix_spark.tracking import stage_run


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


def normalize_job(cfg: QuadmixConfig):
    """σ knots of the current annotations (idempotent per annotations version)."""
    import mlflow

    from quadmix_spark.normalize import run_normalize
    from quadmix_spark.tables import ANNOTATIONS, SCORE_KNOTS

    with stage_run(cfg, "normalize") as run:
        spark = get_spark(cfg)
        knots, written = run_normalize(
            spark, cfg.storage.table(ANNOTATIONS), cfg.storage.table(SCORE_KNOTS), cfg.normalize.method,
            cfg.normalize.n_knots, run_id=run.info.run_id,
        )
        mlflow.log_params({"normalize.method": cfg.normalize.method, "normalize.n_knots": cfg.normalize.n_knots})
        mlflow.log_dict({"knots": [k.to_dict() for k in knots]}, "score_knots.json")
        mlflow.set_tag(TAG_KNOTS_WRITTEN, str(written).lower())
    return knots, written


def sample_dry_run_job(cfg: QuadmixConfig, params: str):
    from quadmix_spark.sample import dry_run_report, load_inputs
    from quadmix_spark.thetas import check_file, load_one
    from quadmix_spark.tracking import configure_mlflow

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

    from quadmix_spark.sample import load_inputs, plot_report, run_sample
    from quadmix_spark.storage import table_version
    from quadmix_spark.thetas import check_file, load_one, theta_params
    from quadmix_spark.tracking import configure_mlflow

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

    from quadmix_spark.sample import load_inputs, run_sample_many
    from quadmix_spark.thetas import load_set

    spark = get_spark(cfg)
    inp = load_inputs(spark, cfg)
    thetas = load_set(params_set, inp.domains, inp.criteria)
    ids = sorted(t.theta_id for t in thetas)  # the same θ set twice at once: the second stops
    with stage_run(cfg, "sample-many", scope=f"sample-many.{hashlib.sha256(' '.join(ids).encode()).hexdigest()[:16]}") as run:
        result = run_sample_many(spark, cfg, thetas, run_id=run.info.run_id, inp=inp)
        mlflow.log_params({"n_theta": len(thetas), "params_set": params_set})
        mlflow.log_table(result.tokens, "theta_tokens.json")
    return result


def propose_job(cfg: QuadmixConfig, n: int | None = None):
    """K θ of search ``search.name`` from Algorithm 1, as MLflow child runs (names from the annotations)."""
    from quadmix_spark.propose import propose
    from quadmix_spark.proxy_pool import pool_predicate
    from quadmix_spark.run_guard import lease, search_scope
    from quadmix_spark.sample import load_inputs
    from quadmix_spark.tracking import configure_mlflow

    configure_mlflow(cfg)
    with lease(cfg, search_scope(cfg.search.name), "propose"):  # propose and proxy of one search exclude each other
        spark = get_spark(cfg)
        inp = load_inputs(spark, cfg, pool_predicate(cfg))
        tokens = {r["domain"]: int(r["tokens"]) for r in inp.annotations.groupBy("domain").agg(
            F.sum("n_tokens").alias("tokens")).collect()}
        return propose(cfg, inp.domains, inp.criteria, n or cfg.search.n_proposals, domain_tokens=tokens)


def proxy_job(cfg: QuadmixConfig):
    """Train the unfinished proxies of search ``search.name`` (one Spark task per θ)."""
    import mlflow

    from quadmix_spark.proxy import outcomes_frame, run_search_proxies

    from quadmix_spark.run_guard import search_scope

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


def search_job(cfg: QuadmixConfig, names: list[str] | None = None):
    """Fit LightGBM on the finished proxies of one or more searches and derive θ*."""
    from quadmix_spark.search import run_search
    from quadmix_spark.tracking import configure_mlflow

    configure_mlflow(cfg)
    return run_search(cfg, names or [cfg.search.name])


def evaluate_job(cfg: QuadmixConfig):
    """θ* against the baselines: fresh proxies, several seeds each, at the same token budget."""
    from quadmix_spark.evaluate import run_evaluate
    from quadmix_spark.tracking import configure_mlflow

    configure_mlflow(cfg)
    spark = get_spark(cfg)
    return run_evaluate(spark, cfg)
