"""Stage runners: a SparkSession, an MLflow run, one library call. Shared by the CLI and ``jobs/*.py``."""

from __future__ import annotations

from quadmix_spark.config import QuadmixConfig
from quadmix_spark.ingest import IngestReport, report_dict, run_ingest
from quadmix_spark.session import get_spark
from quadmix_spark.tracking import stage_run


def ingest_job(cfg: QuadmixConfig) -> IngestReport:
    import mlflow

    spark = get_spark(cfg)
    with stage_run(cfg, "ingest") as run:
        report = run_ingest(spark, cfg, run_id=run.info.run_id)
        mlflow.log_params({"ingest.format": report.format, "ingest.batch_id": report.batch_id or "none"})
        mlflow.log_metrics({k: v for k, v in report_dict(report).items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_metrics({f"rejects.{k}": v for k, v in report.rejects_by_reason.items()})
        mlflow.log_dict(report_dict(report), "ingest_report.json")
    return report
