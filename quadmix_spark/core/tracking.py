"""MLflow helpers: one run per stage invocation, the resolved config logged with it, under the stage's lease."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.core.runs import TAG_CONFIG_FINGERPRINT, TAG_FAILURE, TAG_STAGE


def configure_mlflow(cfg: QuadmixConfig) -> str:
    """Point MLflow at the configured store (creating the local folder for a SQLite file) and experiment."""
    import mlflow

    uri = cfg.tracking_uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # job logs, not a terminal
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if not uri.startswith("sqlite:///"):
        mlflow.set_experiment(name)
        return uri
    from quadmix_spark.core.run_guard import file_lock

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates the database's tables and the experiment without a guard against a second process
    with file_lock(db.with_name(db.name + ".setup.lock")):
        if mlflow.get_experiment_by_name(name) is None:
            # keep artifacts beside the local store, not in ./mlruns of whatever folder the job ran from
            mlflow.create_experiment(name, artifact_location=Path(cfg.storage.path("mlartifacts")).resolve().as_uri())
        mlflow.set_experiment(name)
    return uri


@contextmanager
def stage_run(cfg: QuadmixConfig, stage: str, run_name: str | None = None, scope: str | None = None,
              tags: Mapping[str, str] | None = None,
              resume: Callable[[object, str], str | None] | None = None) -> Iterator[object]:
    """An MLflow run tagged with the stage and ``tags``, carrying the resolved config as ``config.yaml``, under
    the lease of ``scope`` (default: the stage) on this store.

    ``resume(client, experiment_id)``, called under the lease, may name an existing run to continue instead of
    starting one (``evaluate`` keeps one run per θ*, which each invocation resumes); it ends FINISHED, or FAILED
    when the block raises, like a new run.

    Raises :class:`~quadmix_spark.core.run_guard.StageBusy` at once, before the run starts, when another run holds
    the lease; runs that dead drivers left RUNNING are ended as FAILED first (see :mod:`quadmix_spark.core.run_guard`).
    Fault points ``<stage>.start`` and ``<stage>.end`` (:mod:`quadmix_spark.core.faults`) lie just inside the run."""
    import mlflow

    from quadmix_spark.core import faults
    from quadmix_spark.core.run_guard import end_stale_runs, lease

    configure_mlflow(cfg)
    with lease(cfg, scope or stage, stage) as held:
        client = mlflow.MlflowClient()
        exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        end_stale_runs(client, exp_id, held)
        all_tags = {**(tags or {}), TAG_STAGE: stage, **held.tags}
        existing = resume(client, exp_id) if resume is not None else None
        started = (mlflow.start_run(run_id=existing) if existing is not None
                   else mlflow.start_run(run_name=run_name or stage, tags=all_tags))
        with started as run:
            if existing is not None:
                mlflow.set_tags(all_tags)  # this invocation's driver and lease, for end_stale_runs
                if TAG_FAILURE in client.get_run(existing).data.tags:  # an earlier interruption, now being resumed
                    client.delete_tag(existing, TAG_FAILURE)
            held.record(run.info.run_id)
            mlflow.log_dict(cfg.resolved(), "config.yaml")
            mlflow.set_tag(TAG_CONFIG_FINGERPRINT, cfg.fingerprint())
            faults.point(f"{stage}.start")
            yield run
            faults.point(f"{stage}.end")


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
