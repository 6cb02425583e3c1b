"""Helpers shared by the benchmarks: machine facts, timing, result files, the Spark session, scratch space.

Every benchmark measures a *value* and a *baseline* in the same process and the same SparkSession, reports
medians, and writes ``bench/results/<name>.json`` through ``write_result``. Scratch data (generated inputs,
tables written while timing) lives outside the repository, under ``$QUADMIX_BENCH_DIR`` (default
``/tmp/quadmix-bench``); generated inputs are cached there between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_CONF = REPO / "conf" / "default.yaml"
RESULT_KEYS = ("name", "machine", "metric", "value", "baseline", "ratio", "n_docs", "when")

_T0 = time.perf_counter()


# ---------------------------------------------------------------- environment


def setup_env() -> None:
    """The environment ``make bench`` exports, for runs started by hand (never overrides what is set)."""
    os.environ.setdefault("QUADMIX_SHARED", str((REPO.parent / "shared").resolve()))
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def shared_dir() -> Path:
    setup_env()
    return Path(os.environ["QUADMIX_SHARED"])


def log(msg: str) -> None:
    """A progress line with the seconds since the benchmark process started."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- scratch space


def scratch_dir(*parts: str) -> Path:
    """A folder under ``$QUADMIX_BENCH_DIR`` (default ``/tmp/quadmix-bench``), created if missing."""
    base = Path(os.environ.get("QUADMIX_BENCH_DIR") or "/tmp/quadmix-bench").expanduser().resolve()
    if base == REPO or REPO in base.parents:
        raise RuntimeError(f"QUADMIX_BENCH_DIR={base} is inside the repository; point it elsewhere")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(*parts: str) -> Path:
    """An empty scratch folder (whatever was there before is deleted)."""
    path = scratch_dir(*parts)
    shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def remove(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_input(name: str, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """A generated input folder ``<scratch>/inputs/<name>``, built once and reused while intact.

    ``build(tmp_folder)`` writes the files and returns a manifest (JSON-able) that must list them under
    ``"files"`` (names relative to the folder). The folder is built under a temporary name and renamed when
    complete, with the manifest in ``_manifest.json`` (a leading ``_`` keeps it out of Spark/ingest listings).
    """
    root = scratch_dir("inputs")
    final = root / name
    manifest_path = final / "_manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        sizes = manifest.get("sizes", {})
        if all((final / f).is_file() and (final / f).stat().st_size == sizes.get(f) for f in manifest["files"]):
            log(f"reusing cached input {final}")
            return final, manifest
        log(f"cached input {final} is incomplete; regenerating")
    remove(final)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    remove(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    manifest = build(tmp)
    manifest["sizes"] = {f: (tmp / f).stat().st_size for f in manifest["files"]}
    manifest["generated_s"] = round(time.perf_counter() - t0, 2)
    manifest["generated_at"] = utc_now()
    (tmp / "_manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.rename(final)
    log(f"generated input {final} in {manifest['generated_s']} s")
    return final, manifest


# ---------------------------------------------------------------- machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _java_version() -> str | None:
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java:
        return None
    try:
        out = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else None


def git_commit() -> str | None:
    """The repository's HEAD commit (read only), with ``+dirty`` when quadmix_spark/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "quadmix_spark"], cwd=REPO, capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: host, CPUs, memory, Python, PySpark and Java versions."""
    try:
        import pyspark

        pyspark_version = pyspark.__version__
    except ImportError:
        pyspark_version = None
    mem = _total_memory_bytes()
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_total_bytes": mem,
        "memory_total_gib": round(mem / 2**30, 1) if mem else None,
        "python": platform.python_version(),
        "pyspark": pyspark_version,
        "java": _java_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    """Wall seconds of each repeat (in order), what each call returned, and their median."""

    label: str
    times: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)  # untimed warm-up rounds, reported only

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def rate(self, units: float) -> float:
        """``units`` per second at the median time."""
        return units / self.median

    def as_dict(self, units: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"times_s": [round(t, 3) for t in self.times], "median_s": round(self.median, 3)}
        if self.warmup_times:
            out["warmup_times_s"] = [round(t, 3) for t in self.warmup_times]
        if units is not None:
            out["rates"] = [round(units / t, 1) for t in self.times]
            out["median_rate"] = round(units / self.median, 1)
        return out


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def median_of(
    fn: Callable[[int], Any],
    repeats: int,
    *,
    label: str = "",
    setup: Callable[[int], Any] | None = None,
    teardown: Callable[[int, Any], Any] | None = None,
) -> Timing:
    """Time ``fn(i)`` for ``i`` in ``range(repeats)``; ``setup(i)``/``teardown(i, result)`` run untimed."""
    label = label or getattr(fn, "__name__", "fn")
    return interleave(
        {label: (fn, repeats)},
        setup=(lambda _l, i: setup(i)) if setup else None,
        teardown=(lambda _l, i, r: teardown(i, r)) if teardown else None,
    )[label]


def interleave(
    cases: Mapping[str, tuple[Callable[[int], Any], int]],
    *,
    setup: Callable[[str, int], Any] | None = None,
    teardown: Callable[[str, int, Any], Any] | None = None,
    warmup: int = 0,
) -> dict[str, Timing]:
    """Time several cases round-robin (a1 b1 a2 b2 ...), so slow drift of a noisy machine hits each alike.

    ``cases`` maps a label to ``(fn, repeats)``; ``fn(i)`` is timed, the hooks ``setup(label, i)`` and
    ``teardown(label, i, result)`` are not. ``warmup`` rounds of every case run first, round-robin too
    (``i`` = 0 .. warmup-1; the timed repeats continue the numbering): the JVM's JIT compiles the code
    paths of each case there, so the medians are steady-state throughput, as on a long job at scale. Their
    times go to ``Timing.warmup_times`` only. Returns a ``Timing`` per label.
    """
    out = {label: Timing(label) for label in cases}
    rounds = max((n for _, n in cases.values()), default=0)
    for i in range(warmup + rounds):
        warm = i < warmup
        for label, (fn, n) in cases.items():
            if not warm and i - warmup >= n:
                continue
            if setup:
                setup(label, i)
            seconds, result = time_call(lambda: fn(i))
            if warm:
                out[label].warmup_times.append(seconds)
                log(f"{label} warm-up {i + 1}/{warmup}: {seconds:.2f} s (not counted)")
            else:
                out[label].times.append(seconds)
                out[label].results.append(result)
                log(f"{label} repeat {i - warmup + 1}/{n}: {seconds:.2f} s")
            if teardown:
                teardown(label, i, result)
    return out


# ---------------------------------------------------------------- results


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_result(
    name: str,
    metric: str,
    value: float,
    baseline: float,
    n_docs: int,
    extra: dict[str, Any] | None = None,
    *,
    machine: dict[str, Any] | None = None,
    results_dir: Path | None = None,
    ratio: float | None = None,
) -> dict[str, Any]:
    """Write ``bench/results/<name>.json`` (fixed keys first, then ``details`` = ``extra``) and return it.

    ``ratio`` is ``value / baseline`` unless given: a benchmark whose value is itself a same-run ratio (a
    speed-up) and whose baseline is in other units passes ``ratio=value``.
    """
    result: dict[str, Any] = {
        "name": name,
        "machine": machine if machine is not None else machine_info(),
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "ratio": ratio if ratio is not None else (value / baseline if baseline else None),
        "n_docs": n_docs,
        "when": utc_now(),
    }
    assert tuple(result) == RESULT_KEYS
    if extra:
        result["details"] = extra
    write_json((results_dir or RESULTS_DIR) / f"{name}.json", result)
    return result


def write_json(path: Path, obj: Any, indent: int = 2) -> Path:
    """``obj`` as JSON at ``path`` (folder created), through a temporary file, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
    return path


# ---------------------------------------------------------------- Spark


# The embedded default of conf/default.yaml, pinned to what a 2-core benchmark machine has, UI off.
BENCH_SPARK = {"master": "local[2]"}
BENCH_SPARK_CONF = {"spark.ui.enabled": "false"}


def bench_config(root: str | Path, *overrides: str):
    """The project config from ``conf/default.yaml`` with tables under ``root`` and ``--set``-style overrides."""
    setup_env()
    from quadmix_spark.core.config import load_config

    return load_config([DEFAULT_CONF], [f"storage.root={root}", *overrides])


def spark_overrides(conf: Mapping[str, str] | None = None, **spark: Any) -> list[str]:
    """``spark.<key>=value`` overrides: BENCH_SPARK updated by ``spark``, ``spark.conf`` = BENCH_SPARK_CONF + ``conf``."""
    fields = {**BENCH_SPARK, **spark}
    confs = {**BENCH_SPARK_CONF, **(conf or {})}
    out = [f"spark.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in fields.items()]
    out.append(f"spark.conf={json.dumps({k: str(v) for k, v in confs.items()})}")
    return out


def bench_spark(root: str | Path, *overrides: str, conf: Mapping[str, str] | None = None, **spark: Any):
    """(SparkSession, config) of the project's embedded default session, as ``quadmix`` users get it.

    ``spark`` keyword arguments override fields of the ``spark`` config section (``master``,
    ``driver_memory``, ``shuffle_partitions`` ...), ``conf`` adds Spark confs, ``overrides`` are any other
    ``section.key=value`` settings. An already active session is stopped first, so each benchmark gets the
    settings it asks for (JVM options such as the driver memory stay those of the first session).
    """
    from pyspark.sql import SparkSession

    from quadmix_spark.core.session import get_spark

    cfg = bench_config(root, *spark_overrides(conf, **spark), *overrides)
    stop_spark()
    if SparkSession.getActiveSession() is not None:  # pragma: no cover - defensive
        raise RuntimeError("could not stop the active SparkSession")
    session = get_spark(cfg)
    return session, cfg


def stop_spark() -> None:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()


def spark_info(spark) -> dict[str, Any]:
    """The session settings worth recording next to a result."""
    conf = spark.sparkContext.getConf()
    keys = (
        "spark.master",
        "spark.driver.memory",
        "spark.sql.shuffle.partitions",
        "spark.sql.adaptive.enabled",
        "spark.sql.execution.arrow.maxRecordsPerBatch",
        "spark.eventLog.enabled",
    )
    info = {k: conf.get(k) for k in keys if conf.get(k) is not None}
    info["spark_version"] = spark.version
    info["jvm_java_version"] = spark.sparkContext._jvm.System.getProperty("java.version")
    return info


# ---------------------------------------------------------------- command line


def add_option(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument`` unless another benchmark already registered the flag (shared options)."""
    if any(f in parser._option_string_actions for f in flags):  # noqa: SLF001 - argparse has no public lookup
        return
    parser.add_argument(*flags, **kwargs)


def standalone_main(module: str, doc: str, add_arguments, run, argv: list[str] | None = None) -> int:
    """``python -m bench.<module>``: one benchmark's own options, then its ``run``."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
