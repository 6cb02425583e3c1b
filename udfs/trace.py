"""Where a scoring stage's time goes: model-call spans written by the Python workers (opt-in).

Set ``QUADMIX_TRACE_DIR`` in the executors' environment (``spark.executorEnv.QUADMIX_TRACE_DIR``, or
``SparkContext.environment`` before the job is planned; in local mode the driver's environment) and every
Python worker appends one JSON line per span to ``<dir>/trace-<host>-<pid>.jsonl``:
``{"kind", "pid", "t0", "t1", "docs", "tokens"}`` with wall-clock seconds (``time.time()``), so spans from
the workers of one machine line up with each other and with the driver's clock.

Kinds written by the ``onnx_transformer`` encoder: ``tokenize`` (one per scored batch of texts) and ``model``
(one per ``session.run``, ``tokens`` = padded tokens fed). :func:`summarize` turns the spans of one run into
the figures that say whether the accelerator was fed: how long until the first model call, how much of the
run at least one worker was inside a model call, the idle gaps, and the tail after the last call (write and
commit). Unset, tracing costs one environment lookup per batch and writes nothing.

Changing the variable changes the environment Spark keys its Python worker pools on: set it before the
first job of a session, or the traced job starts fresh workers (and loads its models again).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "QUADMIX_TRACE_DIR"

_files: dict[str, object] = {}


def trace_dir() -> str | None:
    """The folder spans go to in this process, or None when tracing is off."""
    return os.environ.get(ENV) or None


def _sink(folder: str):
    f = _files.get(folder)
    if f is None:
        os.makedirs(folder, exist_ok=True)
        name = f"trace-{socket.gethostname()}-{os.getpid()}.jsonl"
        f = _files[folder] = open(os.path.join(folder, name), "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the worker
    return f


def record(kind: str, t0: float, t1: float, **fields) -> None:
    """Append one span (no-op when tracing is off)."""
    folder = trace_dir()
    if folder is None:
        return
    _sink(folder).write(json.dumps({"kind": kind, "pid": os.getpid(), "t0": t0, "t1": t1, **fields}) + "\n")


@contextmanager
def span(kind: str, **fields) -> Iterator[None]:
    """Time the block as one span of ``kind`` with ``fields`` (no-op when tracing is off)."""
    if trace_dir() is None:
        yield
        return
    t0 = time.time()
    try:
        yield
    finally:
        record(kind, t0, time.time(), **fields)


def read_spans(folder: str | Path) -> list[dict]:
    """Every span written under ``folder`` (all workers), in start order."""
    out = []
    for path in sorted(Path(folder).glob("trace-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return sorted(out, key=lambda s: s["t0"])


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``[t0, t1]`` intervals (time covered by at least one)."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize(spans: Iterable[dict], start: float, end: float) -> dict[str, float | int | None]:
    """Figures of the spans inside one run ``[start, end]`` (wall-clock seconds, as the spans are):

    - ``model_busy_s``: time at least one worker was inside a model call (the accelerator's share of the run,
      as far as the workers can see it), ``busy_fraction`` = that / the run;
    - ``model_sum_s``: the calls' summed time (above ``model_busy_s`` when workers overlapped);
    - ``before_first_model_s``: run start to the first call (job start, read, first tokenization), of which
      ``before_first_batch_s`` until a worker started tokenizing its first batch;
    - ``idle_between_s``: gaps with no call between the first call's start and the last call's end;
    - ``after_last_model_s``: last call's end to the run's end (the last writes, the commit, the report);
    - ``tokenize_sum_s``, ``docs``, ``tokens``, ``model_calls``, ``workers``.
    """
    inside = [s for s in spans if s["t0"] >= start and s["t1"] <= end]
    calls = [s for s in inside if s["kind"] == "model"]
    model = [(s["t0"], s["t1"]) for s in calls]
    window = end - start
    out: dict[str, float | int | None] = {
        "run_s": round(window, 3),
        "model_calls": len(model),
        "workers": len({s["pid"] for s in calls}),
        "docs": sum(int(s.get("docs", 0)) for s in calls),
        "tokens": sum(int(s.get("tokens", 0)) for s in calls),
        "tokenize_sum_s": round(sum(s["t1"] - s["t0"] for s in inside if s["kind"] == "tokenize"), 3),
        "before_first_batch_s": round(min(s["t0"] for s in inside) - start, 3) if inside else None,
    }
    if not model:
        return {**out, "model_busy_s": 0.0, "model_sum_s": 0.0, "busy_fraction": 0.0,
                "before_first_model_s": None, "idle_between_s": None, "after_last_model_s": None}
    busy = union_seconds(model)
    first, last = min(a for a, _ in model), max(b for _, b in model)
    return {
        **out,
        "model_busy_s": round(busy, 3),
        "model_sum_s": round(sum(b - a for a, b in model), 3),
        "busy_fraction": round(busy / window, 4) if window > 0 else None,
        "before_first_model_s": round(first - start, 3),
        "idle_between_s": round((last - first) - busy, 3),
        "after_last_model_s": round(end - last, 3),
    }
