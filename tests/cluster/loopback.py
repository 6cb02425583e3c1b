"""A real Spark standalone cluster and a real MLflow tracking server on 127.0.0.1, for the cluster tests.

Everything here is started from the installed packages (pyspark's ``sbin/spark-daemon.sh``, the
environment's ``mlflow server``), on free loopback ports picked at run time, with every file it writes
(pid files, logs, worker and local dirs, the SQLite store, artifacts) under one scratch folder.
Readiness is polled with bounded timeouts (the master's and workers' JSON, MLflow's ``/health``), never
slept on. ``stop()`` ends every process it started, by pid, including the executors and Python
workers that a worker forked, and is safe to call after a failed start or a killed worker.

Standard library only, so it can also be used from a plain ``python`` to bring a cluster up by hand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


class ClusterError(RuntimeError):
    pass


# ---------------------------------------------------------------- small helpers


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's choice, so parallel runs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all sockets held open together, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2,
               alive: Callable[[], str | None] | None = None) -> T:
    """Poll ``probe`` until it returns a truthy value (returned), or raise after ``timeout`` seconds.

    ``alive`` (optional) is checked on each round and returns an error message once the thing being
    waited for can no longer become ready (its process died), so a failed start fails fast.
    """
    deadline = time.monotonic() + timeout
    last_error: str | None = None
    while True:
        try:
            value = probe()
        except Exception as e:  # a probe may fail while a server starts (connection refused, bad JSON)
            value, last_error = None, f"{type(e).__name__}: {e}"
        if value:
            return value
        if alive is not None and (dead := alive()):
            raise ClusterError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)  # polling interval of a bounded wait, not a synchronization point


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status when it is our own child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (bounded) for ``pids`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        for p in pids:
            _reap(p)
        left = [p for p in pids if pid_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def terminate(pids: list[int], grace: float = 20.0) -> None:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, then SIGKILL whatever is left (each by its pid)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in wait_gone(pids, grace):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = wait_gone(pids, 10)
    if left:
        raise ClusterError(f"processes still running after SIGKILL: {left}")


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no log at {path})"


# ---------------------------------------------------------------- the Spark standalone cluster


@dataclass
class Daemon:
    cls: str
    instance: int
    port: int
    webui_port: int
    pid: int = 0
    killed: bool = False
    # processes the daemon had started (executors, Python workers), recorded before it was killed
    orphans: list[int] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.cls.rsplit(".", 1)[1].lower()


class LoopbackCluster:
    """A standalone master and ``workers`` workers on 127.0.0.1, started with pyspark's spark-daemon.sh."""

    def __init__(self, scratch: Path, python: str = sys.executable, workers: int = 2, worker_cores: int = 1,
                 worker_memory: str = "2g", daemon_memory: str = "512m", start_timeout: float = 120.0):
        self.scratch = Path(scratch)
        self.python = python
        self.n_workers = workers
        self.worker_cores = worker_cores
        self.worker_memory = worker_memory
        self.daemon_memory = daemon_memory
        self.start_timeout = start_timeout
        self.home = spark_home()
        ports = free_ports(2 + 2 * workers)
        self.master = Daemon(MASTER_CLASS, 1, ports[0], ports[1])
        self.workers = [Daemon(WORKER_CLASS, i + 1, ports[2 + 2 * i], ports[3 + 2 * i]) for i in range(workers)]
        self.ident = f"quadmix-{os.getpid()}"
        self.env = self._env()

    # -- addresses
    @property
    def url(self) -> str:
        return f"spark://{LOOPBACK}:{self.master.port}"

    @property
    def master_ui(self) -> str:
        return f"http://{LOOPBACK}:{self.master.webui_port}"

    def worker_ui(self, i: int) -> str:
        return f"http://{LOOPBACK}:{self.workers[i].webui_port}"

    def master_state(self) -> dict:
        return http_json(f"{self.master_ui}/json")

    def worker_state(self, i: int) -> dict:
        return http_json(f"{self.worker_ui(i)}/json")

    def alive_workers(self) -> list[dict]:
        return [w for w in self.master_state().get("workers", []) if w.get("state") == "ALIVE"]

    # -- environment of the daemons (and so of the executors they fork)
    def _env(self) -> dict[str, str]:
        dirs = {name: self.scratch / name for name in ("conf", "pids", "logs", "work", "local")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update({
            "SPARK_HOME": str(self.home),
            "SPARK_CONF_DIR": str(dirs["conf"]),  # empty: no stray spark-defaults/spark-env from elsewhere
            "SPARK_PID_DIR": str(dirs["pids"]),
            "SPARK_LOG_DIR": str(dirs["logs"]),
            "SPARK_WORKER_DIR": str(dirs["work"]),
            "SPARK_LOCAL_DIRS": str(dirs["local"]),
            "SPARK_LOCAL_IP": LOOPBACK,
            "SPARK_IDENT_STRING": self.ident,
            "SPARK_DAEMON_MEMORY": self.daemon_memory,
            "PYSPARK_PYTHON": self.python,
            "HOSTNAME": "loopback",  # part of the daemons' log file names
            # the master's REST submission server would take the fixed port 6066: not used here
            "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false",
        })
        env.pop("PYSPARK_GATEWAY_PORT", None)
        env.pop("SPARK_MASTER_HOST", None)
        return env

    def _pid_file(self, d: Daemon) -> Path:
        return Path(self.env["SPARK_PID_DIR"]) / f"spark-{self.ident}-{d.cls}-{d.instance}.pid"

    def log_file(self, d: Daemon) -> Path:
        return Path(self.env["SPARK_LOG_DIR"]) / f"spark-{self.ident}-{d.cls}-{d.instance}-loopback.out"

    def _daemon(self, action: str, d: Daemon, *args: str) -> None:
        script = self.home / "sbin" / "spark-daemon.sh"
        out = subprocess.run(["bash", str(script), action, d.cls, str(d.instance), *args], env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise ClusterError(f"spark-daemon.sh {action} {d.short} failed:\n{out.stdout}{out.stderr}")
        if action == "start":
            pid_file = self._pid_file(d)
            if not pid_file.exists():
                raise ClusterError(f"spark-daemon.sh wrote no pid file {pid_file}:\n{out.stdout}{out.stderr}")
            d.pid = int(pid_file.read_text().strip())

    def _dead(self, d: Daemon) -> Callable[[], str | None]:
        return lambda: None if pid_alive(d.pid) else f"{d.short} (pid {d.pid}) exited; log:\n{_tail(self.log_file(d))}"

    # -- life cycle
    def start(self) -> LoopbackCluster:
        try:
            m = self.master
            self._daemon("start", m, "--host", LOOPBACK, "--port", str(m.port), "--webui-port", str(m.webui_port))
            wait_until("the master's web UI", lambda: self.master_state().get("status") == "ALIVE",
                       self.start_timeout, alive=self._dead(m))
            for w in self.workers:
                self._start_worker(w)
            for w in self.workers:
                wait_until(f"worker {w.instance} to register", lambda w=w: self._registered(w), self.start_timeout,
                           alive=self._dead(w))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_worker(self, w: Daemon) -> None:
        self._daemon("start", w, "--host", LOOPBACK, "--port", str(w.port), "--webui-port", str(w.webui_port),
                     "--cores", str(self.worker_cores), "--memory", self.worker_memory, self.url)

    def _registered(self, w: Daemon) -> bool:
        return any(x.get("port") == w.port for x in self.alive_workers())

    def kill_worker(self, i: int) -> Daemon:
        """SIGKILL worker ``i`` (a crash, not a shutdown); its executors lose their worker and exit."""
        w = self.workers[i]
        w.orphans = descendants(w.pid)
        os.kill(w.pid, signal.SIGKILL)
        w.killed = True
        if wait_gone([w.pid], 30):
            raise ClusterError(f"worker {w.instance} (pid {w.pid}) survived SIGKILL")
        return w

    def restart_worker(self, i: int) -> None:
        """Start worker ``i`` again after ``kill_worker`` (fresh ports) and wait until it registers."""
        w = self.workers[i]
        terminate([p for p in w.orphans if pid_alive(p)], grace=15)  # what the crash left, if anything
        w.port, w.webui_port = free_ports(2)
        w.killed, w.orphans = False, []
        self._start_worker(w)
        wait_until(f"worker {w.instance} to register again", lambda: self._registered(w), self.start_timeout,
                   alive=self._dead(w))

    def stop(self) -> None:
        """Stop workers then master (spark-daemon.sh stop, then by pid), and every process they left."""
        problems = []
        for d in [*reversed(self.workers), self.master]:
            if not d.pid:
                continue
            left_behind = list(d.orphans)
            if pid_alive(d.pid):
                left_behind += descendants(d.pid)
                try:
                    self._daemon("stop", d)
                except Exception as e:  # fall back to our own signals below
                    problems.append(str(e))
                try:
                    terminate([d.pid])
                except ClusterError as e:
                    problems.append(str(e))
            # executors and Python workers: they exit with their worker; make sure, by pid
            try:
                terminate([p for p in left_behind if pid_alive(p)], grace=15)
            except ClusterError as e:
                problems.append(str(e))
        if problems:
            raise ClusterError("; ".join(problems))

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- MLflow tracking server


class MlflowServer:
    """``mlflow server`` (or ``mlflow ui``) on 127.0.0.1 with a SQLite store, one worker.

    With ``serve_artifacts`` (the default) artifacts are proxied by the server into ``<scratch>/artifacts``,
    so clients (a driver on any node) upload over HTTP and need no shared folder.
    """

    def __init__(self, scratch: Path, python: str = sys.executable, backend_store: Path | None = None,
                 start_timeout: float = 120.0, subcommand: str = "server", serve_artifacts: bool = True):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.db = backend_store or self.scratch / "mlflow.db"
        self.artifacts = self.scratch / "artifacts" if serve_artifacts else None
        self.subcommand = subcommand
        self.port = free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.log = self.scratch / "mlflow-server.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        mlflow = Path(self.python).parent / "mlflow"
        cmd = [str(mlflow), self.subcommand, "--host", LOOPBACK, "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.db}"]
        if self.artifacts is not None:
            cmd += ["--artifacts-destination", str(self.artifacts)]
        return cmd

    def start(self) -> MlflowServer:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.scratch, env=env, start_new_session=True)
        try:
            wait_until("the MLflow server's /health", lambda: http_text(f"{self.url}/health").strip() == "OK",
                       self.start_timeout, alive=self._dead)
        except BaseException:
            self.stop()
            raise
        return self

    def _dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"mlflow server exited with {self.proc.returncode}; log:\n{_tail(self.log)}"
        return None

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]  # the server and its uvicorn worker(s)
        terminate([p for p in pids if pid_alive(p)])
        self.proc.wait(timeout=10)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
