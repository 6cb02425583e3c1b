"""MLflow helpers: one run per stage invocation, the resolved config logged with it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quadmix_spark.config import QuadmixConfig


def configure_mlflow(cfg: QuadmixConfig) -> str:
    """Point MLflow at the configured store (creating the local folder for a SQLite file) and experiment."""
    import mlflow

    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
        # keep artifacts beside the local store, not in ./mlruns of whatever folder the job ran from
        mlflow.create_experiment(name, artifact_location=Path(cfg.storage.path("mlartifacts")).resolve().as_uri())
    mlflow.set_experiment(name)
    return uri


@contextmanager
def stage_run(cfg: QuadmixConfig, stage: str, run_name: str | None = None) -> Iterator[object]:
    """An MLflow run tagged with the stage, carrying the resolved config as ``config.yaml``."""
    import mlflow

    configure_mlflow(cfg)
    with mlflow.start_run(run_name=run_name or stage, tags={"quadmix.stage": stage}) as run:
        mlflow.log_dict(cfg.resolved(), "config.yaml")
        mlflow.set_tag("quadmix.config_fingerprint", cfg.fingerprint())
        yield run
