"""Drive ``quadmix`` stages as real driver processes, kill them at fault points, and compare stores.

A stage runs as ``python -m quadmix_spark.cli <stage> ...`` in a process group of its own, with
``QUADMIX_FAULT`` arming one point of :mod:`quadmix_spark.core.faults` and ``QUADMIX_FAULT_DIR`` collecting the
hits. Every process an attempt starts (the JVM, PySpark's worker daemon and its workers) inherits a token in
its environment, so the harness can wait until all of them are gone before the next attempt.

A store's digest lists, for every Delta table under ``<root>/tables``, the proxy pool and the exports: the
number of rows, a checksum of the rows' contents (order-free) and the number of repeated keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.loopback import pid_alive, terminate, wait_gone, wait_until

REPO = Path(__file__).resolve().parents[2]
CONFIG = ["-c", str(REPO / "conf" / "default.yaml"), "-c", str(REPO / "tests" / "faults" / "faults.yaml")]
TOKEN_ENV = "QUADMIX_TEST_ATTEMPT"
ATTEMPT_TIMEOUT_S = 300.0

# The key of each table: no two rows may share it.
KEYS: dict[str, tuple[str, ...]] = {
    "documents": ("doc_id",),
    "annotations": ("doc_id",),
    "ingest_log": ("unit_key",),
    "score_knots": ("criterion",),
    "selection": ("run", "doc_id"),
    "training_output": ("run", "doc_id", "epoch", "copy"),
    "proxy_index": ("theta_id", "doc_id"),
    "proxy_theta_tokens": ("theta_id",),
    "pool_offsets": ("doc_id",),
}


@dataclass
class Attempt:
    """One started ``quadmix`` command."""

    args: list[str]
    proc: subprocess.Popen
    log: Path
    token: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = ATTEMPT_TIMEOUT_S) -> int:
        """The exit status (negative: the signal), once every process of the attempt is gone."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"quadmix {' '.join(self.args[:3])} still running after {timeout:.0f}s:\n"
                                 f"{self.output()[-4000:]}") from None
        left = wait_gone(attempt_pids(self.token), 60)
        if left:  # PySpark's worker daemon outlives a killed JVM for a moment; these are ours
            terminate(left, grace=5)
        return rc

    def stop(self) -> None:
        """End the attempt (by its process group and token), first asking the driver for its Python stack."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGABRT)  # PYTHONFAULTHANDLER: the stack lands in the log
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        terminate(attempt_pids(self.token), grace=5)


def attempt_pids(token: str) -> list[int]:
    """Live processes whose environment carries ``token`` (read from /proc)."""
    needle = f"{TOKEN_ENV}={token}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def start(args: list[str], root: Path, logs: Path, fault: str | None = None, fault_dir: Path | None = None,
          name: str | None = None) -> Attempt:
    """Start ``quadmix <args>`` on the store at ``root`` (returns at once)."""
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_ENV: token, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYTHONFAULTHANDLER": "1"}
    for var in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "MLFLOW_TRACKING_URI", "QUADMIX_FAULT",
                "QUADMIX_FAULT_DIR", "QUADMIX_FAULT_PGID"):
        env.pop(var, None)
    if fault:
        env["QUADMIX_FAULT"] = fault
        if fault_dir is not None:
            fault_dir.mkdir(parents=True, exist_ok=True)
            env["QUADMIX_FAULT_DIR"] = str(fault_dir)
    full = [*args, *CONFIG, "--set", f"storage.root={root}"]
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name or args[0]}-{token[:8]}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quadmix_spark.cli", *full], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True)
    return Attempt(full, proc, log, token)


def run_ok(args: list[str], root: Path, logs: Path) -> str:
    """Run ``quadmix <args>`` to the end; its output, or an error with it when it failed."""
    attempt = start(args, root, logs)
    rc = attempt.wait()
    assert rc == 0, f"quadmix {' '.join(args)} exited {rc}:\n{attempt.output()[-6000:]}"
    return attempt.output()


def hits(fault_dir: Path, point: str) -> list[Path]:
    return sorted(fault_dir.glob(f"{point}.*"))


def wait_for_hit(fault_dir: Path, point: str, attempts: list[Attempt], timeout: float = ATTEMPT_TIMEOUT_S) -> Path:
    """Poll until some process records ``point``; fail early when every attempt has ended."""
    def dead() -> str | None:
        if all(a.proc.poll() is not None for a in attempts):
            return "every attempt ended:\n" + "\n".join(a.output()[-3000:] for a in attempts)
        return None

    return wait_until(f"fault point {point}", lambda: (hits(fault_dir, point) or [None])[0], timeout, interval=0.1, alive=dead)


# ---------------------------------------------------------------- stores


def copy_store(src: Path, dst: Path) -> Path:
    """A copy of a store that is its own: the MLflow experiment's and runs' artifact locations point into it."""
    if src.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    else:
        dst.mkdir(parents=True)
    db = dst / "mlflow.db"
    if db.exists():
        old, new = src.resolve().as_uri(), dst.resolve().as_uri()
        with sqlite3.connect(db) as con:
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return dst


@dataclass(frozen=True)
class TableDigest:
    rows: int
    checksum: str
    repeated_keys: int


def frame_digest(df, key: tuple[str, ...] | None) -> TableDigest:
    """Rows, an order-free checksum of every column, and the rows sharing a key."""
    from pyspark.sql import functions as F

    cols = sorted(df.columns)
    hashes = sorted(r[0] for r in df.select(F.sha2(F.to_json(F.struct(*cols)), 256)).collect())
    repeated = 0
    if key:
        repeated = df.groupBy(*key).count().where(F.col("count") > 1).agg(F.sum(F.col("count") - 1)).first()[0] or 0
    return TableDigest(len(hashes), hashlib.sha256("\n".join(hashes).encode()).hexdigest(), int(repeated))


def export_digest(spark, folder: Path) -> tuple[TableDigest, int, int]:
    """The rows of an export's shards, and the rows and tokens its manifest states."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = spark.read.parquet(*[str(p) for p in sorted(folder.glob("part-*"))])
    return frame_digest(shards, None), manifest["rows"], manifest["tokens"]


def pool_folders(root: Path) -> list[Path]:
    return sorted(p for p in (root / "proxy" / "pools").glob("*") if p.is_dir())


def store_digest(spark, root: Path) -> dict[str, object]:
    """What a store holds: every Delta table, the export of every sample run, the proxy pool."""
    from quadmix_spark.core.storage import read_table, table_exists

    out: dict[str, object] = {}
    tables = root / "tables"
    for path in sorted(tables.iterdir()) if tables.exists() else []:
        if table_exists(spark, str(path)):
            out[path.name] = frame_digest(read_table(spark, str(path)), KEYS.get(path.name))
    for folder in sorted((root / "export").glob("*")):
        out[f"export/{folder.name}"] = export_digest(spark, folder)
    pools = pool_folders(root)
    assert len(pools) <= 1, f"more than one proxy pool in {root}: {pools}"
    for pool in pools:  # its folder name depends on the store's path: compared by content
        out["pool_offsets"] = frame_digest(read_table(spark, str(pool / "offsets")), KEYS["pool_offsets"])
        for sub in ("shards", "counts", "docs"):
            for f in sorted((pool / sub).glob("*")):
                if not f.name.startswith("."):
                    out[f"pool/{sub}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
        out["pool/pool.json"] = (pool / "pool.json").exists()
    return out


_reference_digests: dict[Path, dict[str, object]] = {}


def assert_same_store(spark, store: Path, reference: Path) -> dict[str, object]:
    """The store equals the reference (a store no test writes to), table by table, and no table repeats a key."""
    got = store_digest(spark, store)
    if reference not in _reference_digests:
        _reference_digests[reference] = store_digest(spark, reference)
    want = _reference_digests[reference]
    repeated = {k: v.repeated_keys for k, v in got.items() if isinstance(v, TableDigest) and v.repeated_keys}
    assert not repeated, f"repeated keys in {store}: {repeated}"
    differ = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
    assert not differ, f"{store} differs from the uninterrupted run's {reference}:\n" + "\n".join(
        f"  {k}: got {g}, want {w}" for k, (g, w) in differ.items())
    return got


# ---------------------------------------------------------------- MLflow


def client_of(root: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path, filter_string: str = "") -> list:
    client = client_of(root)
    exp = client.get_experiment_by_name("quadmix")
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=5000)


def assert_runs_settled(root: Path, killed_pid: int | None) -> None:
    """No run is left RUNNING; the stage run the killed driver had opened (if any) ended FAILED, saying why."""
    from quadmix_spark.core.runs import TAG_FAILURE, TAG_PID

    running = [(r.info.run_name, r.info.run_id) for r in all_runs(root, "attributes.status = 'RUNNING'")]
    assert not running, f"runs left RUNNING in {root}: {running}"
    if killed_pid is None:
        return
    mine = all_runs(root, f"tags.`{TAG_PID}` = '{killed_pid}'")
    assert mine, f"the killed driver (pid {killed_pid}) opened no stage run"
    for r in mine:
        assert r.info.status == "FAILED" and "interrupted" in r.data.tags.get(TAG_FAILURE, ""), (r.info, r.data.tags)


def search_state(root: Path, search: str) -> dict:
    """A search's runs by proposal index: θ id, status, params, and every value of ``target_loss`` logged."""
    from quadmix_spark.core.runs import child_runs, find_search

    client = client_of(root)
    exp_id = client.get_experiment_by_name("quadmix").experiment_id
    parent = find_search(client, exp_id, search)
    assert parent is not None, f"no search {search!r} in {root}"
    out = {"parent": (parent.info.status, parent.data.params, parent.data.tags.get("quadmix.n_proposals"))}
    indices = []
    for child in child_runs(client, exp_id, parent.info.run_id):
        i = int(child.data.tags["quadmix.proposal_index"])
        indices.append(i)
        losses = [m.value for m in client.get_metric_history(child.info.run_id, "target_loss")]
        out[i] = (child.data.tags["quadmix.theta_id"], child.info.status, child.data.params, losses)
    assert len(indices) == len(set(indices)), f"search {search!r} has a proposal index twice: {sorted(indices)}"
    return out
