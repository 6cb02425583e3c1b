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
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # job logs, not a terminal
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


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer."""


def check_tracking(cfg: QuadmixConfig, timeout_s: float = 10.0) -> str:
    """Fail fast, before any Spark work, when an HTTP tracking server cannot be reached.

    The CLI calls this before every stage (``cli._user_errors``): a typo in the URI must not surface as
    minutes of MLflow retries, or as a failed task after the pool has been tokenized."""
    uri = cfg.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return uri
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    req = urllib.request.Request(url, data=b'{"max_results": 1}', headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read(1)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # reachable, credentials are MLflow's business
            return uri
        raise TrackingUnreachable(f"MLflow tracking URI {uri} answered HTTP {e.code} at {url}: check tracking.uri") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnreachable(f"MLflow tracking URI {uri} is unreachable ({reason}): check tracking.uri "
                                  "or start the server (`mlflow server --host 127.0.0.1 --port 5000`)") from None
    return uri
