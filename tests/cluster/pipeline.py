"""The stages the cluster tests run, and how to run them: spark-submit on the cluster, or in-process locally.

Every stage in ``PIPELINE`` runs through ``deploy/spark-submit/submit.sh`` against the standalone master with
tracking to the MLflow server, and in-process on the local session with the same arguments; its tables must be
equal, and its MLflow run must be on the server with the listed metrics equal to the local run's. A stage with
``cluster=False`` (training the scorers: fastText training is multi-threaded, hence not bit-reproducible) runs
once, locally, and both pipelines read what it wrote (``$QUADMIX_TEST_MODELS``).

All stages read ``conf/default.yaml`` plus ``tests/cluster/pipeline.yaml`` (small real scorers, a tiny search).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = ["-c", str(REPO / "conf" / "default.yaml"), "-c", str(REPO / "tests" / "cluster" / "pipeline.yaml")]
SUBMIT = REPO / "deploy" / "spark-submit" / "submit.sh"
EXPERIMENT = "quadmix-cluster-test"


@dataclass(frozen=True)
class Context:
    """What stage arguments may depend on."""

    corpus: Path  # the JSONL input of the pipeline
    root: Path    # storage.root of this run


@dataclass(frozen=True)
class StageRun:
    stage: str                                               # jobs/<stage>.py and `quadmix <stage>`
    args: Callable[[Context], list[str]] = lambda ctx: []    # quadmix options (besides storage and tracking)
    tables: tuple[str, ...] = ()                             # tables it writes: cluster == local
    metrics: tuple[str, ...] = ()                            # MLflow metrics: cluster run == local run
    submit: tuple[str, ...] = ()                             # extra submit.sh options (e.g. --no-gpu)
    cluster: bool = True                                     # False: run once, locally, before the cluster runs
    spark_app: bool = True                                   # False: a driver-only stage (no Spark application)


PIPELINE: list[StageRun] = [
    StageRun(
        "ingest",
        args=lambda ctx: ["--input", str(ctx.corpus)],
        tables=("documents", "rejects", "ingest_log"),
        metrics=("input_rows", "documents", "rejects", "blank_lines", "files_new"),
    ),
    StageRun("train-scorers", cluster=False),
    StageRun("annotate", tables=("annotations",), submit=("--no-gpu",)),  # the CPU path on the loopback cluster
    StageRun("normalize", tables=("score_knots",)),
    StageRun("sample", args=lambda ctx: ["--random-theta", "7", "--set", "sampling.run=cluster-test"],
             tables=("selection", "training_output"),
             metrics=("input_tokens", "expected_tokens", "realized_tokens", "output_tokens", "epochs")),
    StageRun("propose"),
    StageRun("proxy", tables=("proxy_index", "proxy_theta_tokens"), submit=("--no-gpu",),
             metrics=("trained", "failed", "pool_docs", "pool_tokens")),
    StageRun("search", spark_app=False),  # LightGBM on the driver: reads MLflow runs, no Spark job
]

# Columns that legitimately differ between two runs of the same input (none so far; e.g. timestamps).
VOLATILE_COLUMNS: dict[str, tuple[str, ...]] = {}


def common_overrides(root: Path, tracking_uri: str) -> list[str]:
    return ["--set", f"storage.root={root}", "--set", f"tracking.uri={tracking_uri}",
            "--set", f"tracking.experiment={EXPERIMENT}"]


@dataclass
class Submission:
    """A running or finished ``submit.sh`` (spark-submit) process, with its output in ``log``."""

    stage: str
    proc: subprocess.Popen
    log: Path
    extra: dict = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# Loopback-sized resources: 1-core executors of 1 GiB, a 1 GiB driver.
SMALL = ("--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1",
         "--conf", "spark.driver.memory=1g", "--conf", "spark.sql.shuffle.partitions=4")


def submit_stage(run: StageRun, ctx: Context, master: str, tracking_uri: str, logs: Path,
                 confs: dict[str, str] | None = None, python_env: str = "local") -> Submission:
    """Start ``submit.sh <stage>`` against ``master`` (returns at once; ``finish`` waits).

    ``python_env="local"``: executors run this interpreter (the cluster is on this machine);
    ``"packed"``: submit.sh builds (once) and ships the packed environment with ``--archives``.
    """
    cmd = [str(SUBMIT), run.stage, "--master", master, "--python-env", python_env, *SMALL, *run.submit]
    for k, v in (confs or {}).items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += ["--", *CONFIG, *run.args(ctx), *common_overrides(ctx.root, tracking_uri)]
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{run.stage}.log"
    env = {**os.environ, "QUADMIX_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    for var in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)
    return Submission(run.stage, proc, log, {"cmd": cmd})


def finish(sub: Submission, timeout: float) -> None:
    """Wait for a submission (bounded); on failure or time-out raise with the end of its log."""
    try:
        rc = sub.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_submission(sub)
        raise AssertionError(f"{sub.stage}: spark-submit still running after {timeout:.0f}s\n{sub.output()[-4000:]}") from None
    assert rc == 0, f"{sub.stage}: spark-submit exited {rc}\n{' '.join(sub.extra['cmd'])}\n{sub.output()[-6000:]}"


def stop_submission(sub: Submission) -> None:
    """End a submission that is still running: spark-submit's JVM and the Python driver under it, by pid."""
    from tests.cluster.loopback import descendants, terminate

    if sub.proc.poll() is None:
        terminate([sub.proc.pid, *descendants(sub.proc.pid)])
    sub.proc.wait(timeout=10)


def run_in_process(run: StageRun, ctx: Context, tracking_uri: str) -> None:
    """The same stage through the ``quadmix`` CLI in this process (the active local session is used)."""
    from quadmix_spark.cli import main

    argv = [run.stage, *CONFIG, *run.args(ctx), *common_overrides(ctx.root, tracking_uri)]
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"quadmix {' '.join(argv)} exited {e.code}"
