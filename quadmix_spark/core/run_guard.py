"""What keeps a store consistent when a stage's driver dies, or when two runs of a stage overlap.

Leases. A stage holds a lease on its scope of a store for as long as it runs: ``<storage.root>/locks/
<scope>.lock``, locked with ``flock``. The kernel drops the lock when its process ends, however it ends
(SIGKILL included), so a lease is never stale and needs no expiry. The file holds who has it (stage, MLflow
run id, host, pid, start time); a second run of the same scope stops at once with :class:`StageBusy`,
which names that run. Scopes: one per store for ``ingest``, ``annotate``, ``normalize`` and
``train-scorers``; one per ``sampling.run`` for ``sample``; one per θ set for ``sample --params-set``; one per
search for ``propose`` and ``proxy`` together (:func:`search_scope`). A root that is a cloud URI has no lease
(``flock`` needs a local or mounted file system): Delta's conflict checks are then the only guard.

Runs a dead driver left RUNNING. Every stage run carries the tags ``quadmix.host``, ``quadmix.pid``,
``quadmix.pid_start`` and ``quadmix.lease`` (the lease file). When a stage takes its lease it ends as FAILED
(tag ``quadmix.failure`` says why) every RUNNING run of the same lease (its driver cannot still run, or it
would hold the lease) and every RUNNING stage run of this host whose process is gone.
A search's proposal runs (children of ``search-<name>``) are settled by :func:`settle_children`.

MLflow's SQLite store: :func:`file_lock` serializes creating the database and the experiment, which
MLflow does not guard against a second process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.core.runs import (FAILED, FINISHED, PENDING, TAG_CRITERIA, TAG_DOMAINS, TAG_FAILURE, TAG_HOST, TAG_LEASE,
                                TAG_PID, TAG_PID_START, TAG_PROXY_ERROR, TAG_PROXY_FINGERPRINT, TAG_PROXY_STATUS,
                                TAG_REFINE_FIT, TAG_REFINE_ROUND, TAG_SEARCH, THETA_ARTIFACT)
BUSY_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
HOLDER_WAIT_S = 10.0  # a new holder writes its record right after locking


class StageBusy(RuntimeError):
    """Another run holds the lease of this stage's scope on this store."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc), to tell it from a later process that
    reuses its pid; None where there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that started at ``start`` (when both are known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


def search_scope(name: str) -> str:
    """The lease scope shared by ``propose`` and ``proxy`` of one search (both change its MLflow runs)."""
    return f"search.{name}"


def _file_name(scope: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", scope)[:80]
    return f"{safe}-{hashlib.sha256(scope.encode()).hexdigest()[:8]}.lock"


def lock_dir(cfg: QuadmixConfig) -> Path | None:
    root = cfg.storage.path("locks")
    if "://" in root and not root.startswith("file:"):
        return None
    return Path(root.removeprefix("file:"))


@dataclass
class Lease:
    """A held lease (see the module doc); ``tags`` go on the stage's MLflow run."""

    scope: str
    stage: str
    path: Path | None
    fd: int | None
    started: str

    @property
    def key(self) -> str:
        """The lease's name across stores (several may share one tracking server): its file, or the scope."""
        return str(self.path) if self.path is not None else self.scope

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_PID_START: process_start(os.getpid()) or "",
                TAG_LEASE: self.key}

    def record(self, run_id: str | None = None) -> None:
        """Write who holds the lease (with the MLflow run id once there is one)."""
        if self.fd is None:
            return
        me = {"stage": self.stage, "scope": self.scope, "run_id": run_id, "host": socket.gethostname(),
              "pid": os.getpid(), "started": self.started}
        data = json.dumps(me).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # the file stays: removing it would let a waiter lock an orphaned inode
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _holder(fd: int) -> dict:
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        raw = os.pread(fd, 1 << 16, 0)
        try:
            return json.loads(raw)
        except ValueError:
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)  # polling the holder's first write, bounded


def _busy_message(stage: str, scope: str, path: Path, holder: dict) -> str:
    if not holder:
        who = "a run that has not said who it is"
    else:
        stage_of = holder.get("stage")
        run = f"MLflow run {holder['run_id']}" if holder.get("run_id") else f"a `quadmix {stage_of}` without an MLflow run yet"
        who = f"{run} (stage {stage_of}, pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})"
    return (f"{stage} stopped: lease {scope!r} of this store is held by {who}; nothing was done. Wait for that run to end "
            f"(or stop it), then run again. Lease file: {path}")


@contextmanager
def lease(cfg: QuadmixConfig, scope: str, stage: str) -> Iterator[Lease]:
    """Hold the lease of ``scope`` for the block, or raise :class:`StageBusy` at once."""
    folder = lock_dir(cfg)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if folder is None:
        yield Lease(scope, stage, None, None, started)
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / _file_name(scope)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StageBusy(_busy_message(stage, scope, path, holder)) from None
    held = Lease(scope, stage, path, fd, started)
    try:
        held.record()
        yield held
    finally:
        held.release()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A blocking exclusive ``flock`` on ``path`` for the block (held briefly: MLflow store set-up)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- runs a dead driver left RUNNING


def _running(client, exp_id: str, tag: str, value: str) -> list:
    quoted = value.replace("'", "\\'")
    return client.search_runs([exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{tag}` = '{quoted}'",
                              max_results=1000)


def end_stale_runs(client, exp_id: str, held: Lease) -> list[str]:
    """End as FAILED the RUNNING runs whose driver is gone (see the module doc); returns their ids."""
    host = socket.gethostname()
    found = {r.info.run_id: r for r in _running(client, exp_id, TAG_LEASE, held.key)} if held.fd is not None else {}
    found.update({r.info.run_id: r for r in _running(client, exp_id, TAG_HOST, host)})
    ended = []
    for run_id, run in found.items():
        tags = run.data.tags
        pid, where = tags.get(TAG_PID), tags.get(TAG_HOST)
        if tags.get(TAG_LEASE) == held.key and held.fd is not None:
            why = f"its lease {held.scope!r} was free"
        elif where == host and pid and pid.isdigit() and not process_alive(int(pid), tags.get(TAG_PID_START) or None):
            why = "that process no longer runs"
        else:
            continue
        client.set_tag(run_id, TAG_FAILURE, f"interrupted: its driver (pid {pid} on {where}) stopped without ending the run "
                                            f"({why}); found by stage {held.stage}, pid {os.getpid()}")
        client.set_terminated(run_id, "FAILED")
        ended.append(run_id)
    return ended


def settle_children(client, children: list, metric: str, repair: bool) -> list:
    """The proposal runs of a search, with those left RUNNING by a dead driver settled; call it under the
    search's lease (nothing else then writes to them).

    - the proxy logged ``metric`` but did not end the run: its training is complete, the run is FINISHED;
    - a proxy started on it and died: FAILED, with ``quadmix.proxy.error`` (the next ``quadmix proxy``
      trains it again from the start);
    - never touched by a proxy and complete (every θ param and ``theta.json``): back to SCHEDULED;
    - never touched by a proxy and incomplete (``quadmix propose`` died while making it): deleted when
      ``repair`` (``propose`` makes it again), else a ``ValueError`` asking for ``quadmix propose`` (with
      ``--refine`` for a refinement round's run).
    """
    from quadmix_spark.kernel.theta import feature_names

    out = []
    for run in children:
        run_id, tags = run.info.run_id, run.data.tags
        if run.info.status != "RUNNING":
            out.append(run)
            continue
        if metric in run.data.metrics:
            client.set_tag(run_id, TAG_PROXY_STATUS, FINISHED)
            client.set_terminated(run_id, "FINISHED")
        elif TAG_PROXY_FINGERPRINT in tags or tags.get(TAG_PROXY_STATUS, PENDING) != PENDING:
            client.set_tag(run_id, TAG_PROXY_ERROR, "interrupted: the proxy's driver stopped while training it")
            client.set_tag(run_id, TAG_PROXY_STATUS, FAILED)
            client.set_terminated(run_id, "FAILED")
        else:
            names = feature_names(json.loads(tags[TAG_DOMAINS]), json.loads(tags[TAG_CRITERIA]))
            complete = set(names) <= set(run.data.params) and THETA_ARTIFACT in {a.path for a in client.list_artifacts(run_id)}
            if complete:
                client.update_run(run_id, status="SCHEDULED")
            elif repair:
                client.delete_run(run_id)
                continue
            else:
                raise ValueError(f"proposal run {run_id} ({run.info.run_name}) of search {tags.get(TAG_SEARCH)!r} was left "
                                 f"incomplete by an interrupted {_remedy(tags)}")
        out.append(client.get_run(run_id))
    return out


def _remedy(tags: dict[str, str]) -> str:
    """What made an incomplete proposal run, and the command that makes it again."""
    if TAG_REFINE_FIT in tags:  # a refinement round: plain `propose` would only delete it
        return (f"`quadmix propose --refine` (round {tags.get(TAG_REFINE_ROUND, '?')}, from fit run "
                f"{tags[TAG_REFINE_FIT]}): run `quadmix propose --refine N` for this search again (with its --from, if "
                "it was seeded from another search's fit)")
    return "`quadmix propose`: run `quadmix propose` for this search again"


def resume_search_parent(client, parent, recorded: dict[str, str], config: dict):
    """The parent run of a search whose ``quadmix propose`` died before logging all of ``recorded`` (its
    settings) or its ``config.yaml``: completed when what it has agrees; otherwise returned as it is, for
    propose's own check to refuse."""
    if parent is None or parent.info.status != "RUNNING":
        return parent
    have = parent.data.params
    if any(have.get(k, v) != v for k, v in recorded.items()):
        return parent
    from mlflow.entities import Param

    missing = [Param(k, v) for k, v in recorded.items() if k not in have]
    if missing:
        client.log_batch(parent.info.run_id, params=missing)
    if "config.yaml" not in {a.path for a in client.list_artifacts(parent.info.run_id)}:
        client.log_dict(parent.info.run_id, config, "config.yaml")
    return client.get_run(parent.info.run_id)
