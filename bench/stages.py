"""Where the time goes: a per-job / per-stage summary of Spark event logs (no UI needed).

Run a benchmark with ``--event-log DIR`` (uncompressed Spark event logs), then::

    python -m bench.stages DIR            # every log in DIR (or one log file)
    python -m bench.stages DIR --top 15   # only the 15 slowest stages

Jobs are grouped by their description (the benchmarks set e.g. ``ingest r0`` / ``baseline r1``); each stage
shows wall seconds, tasks, executor run and CPU seconds, GC, input, shuffle write/read and spill.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = {
    "run_s": ("internal.metrics.executorRunTime", 1e-3),
    "cpu_s": ("internal.metrics.executorCpuTime", 1e-9),
    "gc_s": ("internal.metrics.jvmGCTime", 1e-3),
    "in_mb": ("internal.metrics.input.bytesRead", 2**-20),
    "shw_mb": ("internal.metrics.shuffle.write.bytesWritten", 2**-20),
    "shr_mb": ("internal.metrics.shuffle.read.localBytesRead", 2**-20),
    "spill_mb": ("internal.metrics.diskBytesSpilled", 2**-20),
}


def _event_files(path: Path) -> list[Path]:
    """The files of one application's log: a plain file, or a rolling ``eventlog_v2_*`` folder."""
    if path.is_dir():
        parts = [f for f in path.iterdir() if f.name.startswith("events_")]
        return sorted(parts, key=lambda f: int(f.name.split("_")[1]) if f.name.split("_")[1].isdigit() else 0)
    return [path]


def read_events(path: Path):
    for part in _event_files(path):
        with part.open() as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def summarize(path: Path) -> list[dict]:
    job_desc: dict[int, str] = {}
    stage_job: dict[int, int] = {}
    jobs: dict[int, dict] = {}
    stages: list[dict] = []
    for ev in read_events(path):
        kind = ev.get("Event")
        if kind == "SparkListenerJobStart":
            jid = ev["Job ID"]
            props = ev.get("Properties") or {}
            job_desc[jid] = props.get("spark.job.description") or "-"
            jobs[jid] = {"start": ev.get("Submission Time"), "end": None}
            for sid in ev.get("Stage IDs", []):
                stage_job.setdefault(sid, jid)
        elif kind == "SparkListenerJobEnd":
            jobs.setdefault(ev["Job ID"], {"start": None})["end"] = ev.get("Completion Time")
        elif kind == "SparkListenerStageCompleted":
            info = ev["Stage Info"]
            acc = {a.get("Name"): a.get("Value") for a in info.get("Accumulables", [])}
            row = {
                "stage": info["Stage ID"],
                "job": stage_job.get(info["Stage ID"]),
                "name": info.get("Stage Name", ""),
                "tasks": info.get("Number of Tasks"),
                "wall_s": ((info.get("Completion Time") or 0) - (info.get("Submission Time") or 0)) / 1000,
            }
            for key, (metric, scale) in METRICS.items():
                value = acc.get(metric)
                row[key] = float(value) * scale if value is not None else 0.0
            row["desc"] = job_desc.get(row["job"], "-")
            stages.append(row)
    for jid, j in jobs.items():
        if j.get("start") and j.get("end"):
            j["wall_s"] = (j["end"] - j["start"]) / 1000
    return stages, jobs, job_desc


def print_summary(path: Path, top: int | None) -> None:
    stages, jobs, job_desc = summarize(path)
    print(f"== {path}")
    by_desc = defaultdict(lambda: {"jobs": 0, "job_wall_s": 0.0, "stages": 0, "run_s": 0.0, "cpu_s": 0.0})
    for jid, j in jobs.items():
        d = by_desc[job_desc.get(jid, "-")]
        d["jobs"] += 1
        d["job_wall_s"] += j.get("wall_s", 0.0)
    for s in stages:
        d = by_desc[s["desc"]]
        d["stages"] += 1
        d["run_s"] += s["run_s"]
        d["cpu_s"] += s["cpu_s"]
    print(f"{'description':<16} {'jobs':>4} {'stages':>6} {'job wall s':>10} {'exec run s':>10} {'exec cpu s':>10}")
    for desc, d in by_desc.items():
        print(f"{desc[:16]:<16} {d['jobs']:>4} {d['stages']:>6} {d['job_wall_s']:>10.1f} {d['run_s']:>10.1f} {d['cpu_s']:>10.1f}")
    rows = sorted(stages, key=lambda s: -s["wall_s"])[:top] if top else stages
    print()
    cols = ("stage", "job", "desc", "tasks", "wall_s", "run_s", "cpu_s", "gc_s", "in_mb", "shw_mb", "shr_mb", "spill_mb")
    print(" ".join(f"{c:>8}" for c in cols) + "  name")
    for s in rows:
        cells = []
        for c in cols:
            v = s[c]
            cells.append(f"{v:>8.1f}" if isinstance(v, float) else f"{str(v)[:8]:>8}")
        print(" ".join(cells) + "  " + s["name"][:60])
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="an event log file, or a folder of them")
    parser.add_argument("--top", type=int, default=None, help="show only the N slowest stages")
    args = parser.parse_args(argv)
    p = Path(args.path)
    if p.is_dir() and not p.name.startswith("eventlog_v2_"):
        files = sorted(f for f in p.iterdir() if not f.name.startswith(".") and (f.is_file() or f.name.startswith("eventlog_v2_")))
    else:
        files = [p]
    if not files:
        print(f"no event logs in {p}", file=sys.stderr)
        return 1
    for f in files:
        print_summary(f, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
