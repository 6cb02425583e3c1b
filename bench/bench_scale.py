"""How cost grows: per-row cost against the number of rows, and per-θ cost against the number of θ.

Input (``bench.sample_data``, cached per size): the generated ``annotations`` table (24 domains, one holding ~50%
of the documents, criteria q_edu / q_dclm / q_ref; narrow rows, no text) at each ``--scale-rows`` size, files in
proportion (``--scale-rows-per-file``), and ``documents`` + ``annotations`` at the sizes up to
``--scale-docs-rows`` for the sampler's join with the text.

Points, each timed in one SparkSession (the embedded default of ``conf/default.yaml`` on ``local[2]``, UI off),
after one untimed warm-up of every stage on the smallest size:

- rows sweep, at every size: ``normalize`` (``run_normalize``: the percentile knots of every criterion),
  ``rank1`` (one θ, every ω = 0.1 as in ``bench_sample``: ``rank_and_sample(keep_all=True)`` written as a Delta ``selection`` table, the
  annotations-only part of ``quadmix sample``), ``many`` (``run_sample_many`` with ``--scale-row-thetas`` θ:
  ``proxy_index`` + ``proxy_theta_tokens``), and at sizes <= ``--scale-docs-rows`` ``sample_docs`` (the whole
  ``run_sample``: selection, training order, the text export joined from ``documents``);
- θ sweep, at ``--scale-theta-rows`` rows: ``many`` with K = each of ``--scale-thetas`` θ (Algorithm 1 draws),
  in chunks of ``sampling.theta_chunk`` (``--scale-theta-chunk`` overrides it, e.g. to measure one chunk).

For each point: wall seconds, seconds per million rows (per θ and million rows for ``many``), the peak RSS of
the driver's JVM, of the driver's Python process and of the largest Python worker (``/proc/<pid>/status``
VmHWM, reset through ``clear_refs`` at the start of the point and polled every 0.2 s), bytes shuffled (the
stages' shuffle writes, from Spark's status store), and the largest pickled Python function shipped to the tasks
(the UDF closures with what they capture: where arrays that grow with θ would travel).

Results: ``bench/results/scale.json`` (every point), ``scale.png`` beside it (seconds per million rows against
rows; per θ against K), and two summaries in the usual format:
``scale_rows_growth`` (value = the largest, over normalize / rank1 / many, of cost per row at the largest size
÷ at the smallest; goal <= 1.15) and ``scale_theta_growth`` (value = time per θ at the largest K ÷ at the
smallest K; goal <= 1.0). Both have baseline 1.0 (linear) and ratio = value.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


from bench.common import (
    RESULTS_DIR,
    add_option,
    bench_config,
    bench_spark,
    fresh_dir,
    git_commit,
    scratch_dir,
    log,
    machine_info,
    remove,
    spark_info,
    spark_overrides,
    standalone_main,
    stop_spark,
    write_json,
    write_result,
)
from bench.bench_sample import paper_theta
from bench.sample_data import CRITERIA, generate_tables, link_inputs

NAME = "scale_rows_growth"
THETA_NAME = "scale_theta_growth"
METRIC = "x"
DEFAULT_ROWS = "1000000,4000000"
DEFAULT_THETAS = "64,256"
DEFAULT_ROW_THETAS = 16
DEFAULT_ROWS_PER_FILE = 125_000
DEFAULT_DOCS_ROWS = 0
POLL_S = 0.2
# the status store keeps every stage of a long θ sweep (bytes shuffled are summed over them)
SCALE_CONF = {"spark.ui.retainedStages": "1000000", "spark.ui.retainedJobs": "1000000"}


def _ints(text: str) -> list[int]:
    values = [int(x) for x in str(text).replace("_", "").split(",") if x.strip()]
    if not values or min(values) <= 0:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale benchmark")
    add_option(group, "--scale-rows", default=DEFAULT_ROWS, help=f"rows of the rows sweep (default {DEFAULT_ROWS}; the "
               "issue's points: 1000000,4000000,16000000)")
    add_option(group, "--scale-thetas", default=DEFAULT_THETAS, help=f"K of the θ sweep (default {DEFAULT_THETAS}; "
               "the issue's points: 64,512,3000)")
    add_option(group, "--scale-theta-rows", type=int, default=1_000_000, help="rows of the θ sweep")
    add_option(group, "--scale-row-thetas", type=int, default=DEFAULT_ROW_THETAS, help="θ of `many` in the rows sweep")
    add_option(group, "--scale-theta-chunk", type=int, default=None, help="sampling.theta_chunk of the θ sweep "
               "(default: the config's)")
    add_option(group, "--scale-docs-rows", type=int, default=DEFAULT_DOCS_ROWS, help="measure the whole run_sample "
               "(with the documents join) at the sizes up to this (0 = never; 1M documents are ~3.2 GB of text)")
    add_option(group, "--scale-rows-per-file", type=int, default=DEFAULT_ROWS_PER_FILE, help="rows per generated file")
    add_option(group, "--scale-repeats", type=int, default=1, help="timed repeats of each point (median)")
    add_option(group, "--theta-seed", type=int, default=7, help="seed of the θ draws (sample_thetas)")
    add_option(group, "--results-dir", default=None, help=f"where the results go (default {RESULTS_DIR})")


# ---------------------------------------------------------------- resources


def _status(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` kB field in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _clear_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass


class PeakWatch:
    """Peak RSS of the driver JVM, this Python process and the largest Python worker during a ``with`` block."""

    def __init__(self, jvm_pid: int):
        self.jvm = jvm_pid
        self.peaks = {"driver_jvm": 0, "driver_python": 0, "worker_python": 0}
        self._stop = threading.Event()

    def _workers(self) -> list[int]:
        return [p for p in _descendants(self.jvm) if p != os.getpid()]

    def _poll(self) -> None:
        self.peaks["driver_jvm"] = max(self.peaks["driver_jvm"], _status(self.jvm, "VmHWM"))
        self.peaks["driver_python"] = max(self.peaks["driver_python"], _status(os.getpid(), "VmHWM"))
        for p in self._workers():
            self.peaks["worker_python"] = max(self.peaks["worker_python"], _status(p, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def __enter__(self) -> PeakWatch:
        for p in (self.jvm, os.getpid(), *self._workers()):
            _clear_peak(p)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._poll()
        self._stop.set()
        self._thread.join()


class ShippedFunctions:
    """The largest pickled Python function (a UDF with its closure) sent to the tasks while active."""

    def __init__(self):
        self.largest = 0

    @contextmanager
    def watch(self):
        import pyspark.core.rdd as rdd

        real = rdd._prepare_for_python_RDD

        def measured(sc, command):
            from pyspark.serializers import CloudPickleSerializer

            self.largest = max(self.largest, len(CloudPickleSerializer().dumps(command)))
            return real(sc, command)

        rdd._prepare_for_python_RDD = measured
        try:
            yield self
        finally:
            rdd._prepare_for_python_RDD = real


def stage_shuffle_bytes(spark) -> list[tuple[int, int]]:
    """(stage id, shuffle bytes written) of every stage the status store holds."""
    sc = spark.sparkContext
    seq = sc._jsc.sc().statusStore().stageList(None, False, False, sc._gateway.new_array(sc._jvm.double, 0), None)
    return [(int(s.stageId()), int(s.shuffleWriteBytes())) for s in (seq.apply(i) for i in range(seq.length()))]


def measure(spark, label: str, fn) -> dict[str, Any]:
    """Run ``fn()`` once: wall seconds, peak RSS, bytes shuffled, largest shipped function."""
    before = max((s for s, _ in stage_shuffle_bytes(spark)), default=-1)
    shipped = ShippedFunctions()
    spark.sparkContext.setJobDescription(label)
    with PeakWatch(spark.sparkContext._gateway.proc.pid) as peaks, shipped.watch():
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    spark.sparkContext.setJobDescription(None)
    shuffled = sum(b for s, b in stage_shuffle_bytes(spark) if s > before)
    out = {"wall_s": round(wall, 3), "shuffle_bytes": shuffled, "largest_function_bytes": shipped.largest,
           **{f"peak_rss_{k}_bytes": v for k, v in peaks.peaks.items()}}
    log(f"{label}: {wall:.1f} s, shuffled {shuffled / 1e6:.1f} MB, peak worker RSS {peaks.peaks['worker_python'] / 1e6:.0f} MB, "
        f"driver JVM {peaks.peaks['driver_jvm'] / 1e6:.0f} MB, largest function {shipped.largest / 1e3:.0f} kB")
    return out


def _median_point(spark, label: str, fn, repeats: int) -> dict[str, Any]:
    runs = [measure(spark, f"{label} r{i}" if repeats > 1 else label, fn) for i in range(repeats)]
    order = sorted(range(len(runs)), key=lambda i: runs[i]["wall_s"])
    point = dict(runs[order[len(order) // 2]])
    point["walls_s"] = [r["wall_s"] for r in runs]
    return point


# ---------------------------------------------------------------- the stages


def _thetas(domains: list[str], k: int, seed: int):
    from quadmix_spark.kernel.theta import sample_thetas

    return sample_thetas(domains, list(CRITERIA), k, seed)


class Store:
    """A benchmark storage root linked to the cached tables of one size, its knots computed."""

    def __init__(self, spark, rows: int, rows_per_file: int, with_documents: bool, conf: dict):
        self.rows = rows
        files = max(2, -(-rows // rows_per_file))
        self.folder, self.manifest = generate_tables(spark, rows, files, with_documents=with_documents)
        self.root = fresh_dir("runs", "scale", f"{rows}{'-docs' if with_documents else ''}")
        link_inputs(self.root, self.folder, ("annotations", "documents") if with_documents else ("annotations",))
        self.overrides = spark_overrides(conf)
        self.cfg = bench_config(self.root, *self.overrides)

    def config(self, *extra: str):
        return bench_config(self.root, *self.overrides, *extra)

    def normalize(self, spark) -> None:
        from quadmix_spark.curation.normalize import run_normalize
        from quadmix_spark.core.tables import SCORE_KNOTS

        c = self.cfg
        run_normalize(spark, c.storage.table("annotations"), c.storage.table(SCORE_KNOTS), c.normalize.method, c.normalize.n_knots)

    def rank1(self, spark, theta) -> None:
        from quadmix_spark.curation.ranking import ThetaStack, narrow_batches, rank_and_sample
        from quadmix_spark.curation.sample import load_inputs, settings

        inp = load_inputs(spark, self.cfg)
        stack = ThetaStack.of([theta], inp.domains, inp.criteria)
        with narrow_batches(spark), rank_and_sample(inp.annotations, stack, inp.knots, settings(self.cfg), keep_all=True) as ranked:
            ranked.write.format("delta").mode("overwrite").save(str(self.root / "rank1-selection"))

    def many(self, spark, thetas, *extra: str):
        from quadmix_spark.curation.sample import run_sample_many

        result = run_sample_many(spark, self.config(*extra), thetas)
        if len(result.tokens) != len(thetas) or (result.tokens.selected_docs <= 0).any():
            raise RuntimeError("a θ of the many-θ job selected nothing")
        return result

    def sample_docs(self, spark, theta, i: int) -> None:
        from quadmix_spark.curation.sample import run_sample

        result = run_sample(spark, self.config(f"sampling.run=scale-{i}", "sampling.budget_tokens=null"), theta=theta)
        if int(result.report.input_docs.sum()) != self.rows:
            raise RuntimeError(f"run_sample read {int(result.report.input_docs.sum())} documents, expected {self.rows}")

    def close(self, keep: bool) -> None:
        if not keep:
            remove(self.root)


# ---------------------------------------------------------------- run


def _per_row(point: dict, rows: int, k: int = 1) -> float:
    return point["wall_s"] / k / (rows / 1e6)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    rows_list, thetas_list = _ints(args.scale_rows), _ints(args.scale_thetas)
    theta_rows, row_k, repeats = args.scale_theta_rows, args.scale_row_thetas, args.scale_repeats
    if theta_rows <= 0 or row_k <= 0 or repeats <= 0 or args.scale_rows_per_file <= 0:
        raise ValueError("--scale-theta-rows, --scale-row-thetas, --scale-repeats and --scale-rows-per-file must be positive")
    chunk_set = [f"sampling.theta_chunk={args.scale_theta_chunk}"] if args.scale_theta_chunk else []
    conf = SCALE_CONF
    results = Path(args.results_dir) if getattr(args, "results_dir", None) else RESULTS_DIR
    spark, _ = bench_spark(fresh_dir("runs", "scale", "session"), conf=conf)
    log(f"Spark {spark.version} on {spark.sparkContext.master}; rows {rows_list}, θ {thetas_list} at {theta_rows:,} rows")
    points: dict[str, Any] = {"rows": [], "thetas": []}
    keep = getattr(args, "keep", False)
    try:
        # warm-up: every stage once on the smallest size (the JIT compiles the paths; not reported)
        warm = Store(spark, min(rows_list), args.scale_rows_per_file, False, conf)
        theta = paper_theta(warm.manifest["domains"], args.theta_seed)
        row_thetas = _thetas(warm.manifest["domains"], row_k, args.theta_seed)
        measure(spark, "warm-up normalize", lambda: warm.normalize(spark))
        measure(spark, "warm-up rank1", lambda: warm.rank1(spark, theta))
        measure(spark, "warm-up many", lambda: warm.many(spark, row_thetas[:4]))
        warm.close(keep)

        for rows in rows_list:
            store = Store(spark, rows, args.scale_rows_per_file, False, conf)
            point: dict[str, Any] = {"rows": rows, "files": len(list((store.folder / "tables" / "annotations").glob("*.parquet")))}
            point["normalize"] = _median_point(spark, f"normalize {rows:,}", lambda: store.normalize(spark), repeats)
            point["rank1"] = _median_point(spark, f"rank1 {rows:,}", lambda: store.rank1(spark, theta), repeats)
            point["many"] = _median_point(spark, f"many K={row_k} {rows:,}", lambda: store.many(spark, row_thetas), repeats)
            point["many"]["k"] = row_k
            for stage in ("normalize", "rank1", "many"):
                k = row_k if stage == "many" else 1
                point[stage]["s_per_m_rows"] = round(_per_row(point[stage], rows, k), 4)
            store.close(keep)
            if rows <= args.scale_docs_rows:
                docs = Store(spark, rows, args.scale_rows_per_file, True, conf)
                docs.normalize(spark)
                counter = iter(range(10**6))
                point["sample_docs"] = _median_point(spark, f"sample with documents {rows:,}",
                                                     lambda: docs.sample_docs(spark, theta, next(counter)), repeats)
                point["sample_docs"]["s_per_m_rows"] = round(_per_row(point["sample_docs"], rows), 4)
                docs.close(keep)
            points["rows"].append(point)
            write_json(results / "scale.json", {"points": points, "partial": True})

        store = Store(spark, theta_rows, args.scale_rows_per_file, False, conf)
        store.normalize(spark)
        for k in thetas_list:
            thetas = _thetas(store.manifest["domains"], k, args.theta_seed)
            point = _median_point(spark, f"many K={k} {theta_rows:,}", lambda: store.many(spark, thetas, *chunk_set), repeats)
            point.update({"k": k, "rows": theta_rows, "s_per_theta": round(point["wall_s"] / k, 4),
                          "s_per_theta_m_rows": round(_per_row(point, theta_rows, k), 4)})
            points["thetas"].append(point)
            write_json(results / "scale.json", {"points": points, "partial": True})
        store.close(keep)
        session = spark_info(spark)
        theta_chunk = args.scale_theta_chunk or store.cfg.sampling.theta_chunk
    finally:
        stop_spark()
        if not keep:
            remove(scratch_dir("runs", "scale"))

    growth = {}
    first, last = points["rows"][0], points["rows"][-1]
    for stage in ("normalize", "rank1", "many"):
        growth[stage] = round(last[stage]["s_per_m_rows"] / first[stage]["s_per_m_rows"], 3)
    theta_growth = round(points["thetas"][-1]["s_per_theta"] / points["thetas"][0]["s_per_theta"], 3)
    summary = {
        "rows_growth": {"from_rows": first["rows"], "to_rows": last["rows"], **growth},
        "theta_growth": {"from_k": points["thetas"][0]["k"], "to_k": points["thetas"][-1]["k"], "per_theta": theta_growth},
        "theta_chunk": theta_chunk,
        "worker_rss_by_k": {p["k"]: p["peak_rss_worker_python_bytes"] for p in points["thetas"]},
    }
    plot = _plot(points, results / "scale.png")
    common = {"commit": git_commit(), "spark": session, "wall_s": round(time.perf_counter() - t_start, 1)}
    write_json(results / "scale.json", {"points": points, "summary": summary, "plot": plot, "machine": machine_info(), **common})
    rows_value = max(growth.values())
    write_result(THETA_NAME, METRIC, theta_growth, 1.0, theta_rows, results_dir=results, extra={
        "value": f"time per θ at K = {points['thetas'][-1]['k']} ÷ at K = {points['thetas'][0]['k']} ({theta_rows:,} rows, "
                 f"run_sample_many in chunks of {theta_chunk}); goal <= 1.0",
        "points": points["thetas"], **common}, ratio=theta_growth)
    result = write_result(NAME, METRIC, rows_value, 1.0, last["rows"], results_dir=results, extra={
        "value": f"largest over normalize / rank1 / many (K = {row_k}) of cost per row at {last['rows']:,} rows ÷ at "
                 f"{first['rows']:,}; goal <= 1.15",
        "growth": growth, "points": points["rows"], **common}, ratio=rows_value)
    log(f"cost per row {first['rows']:,} -> {last['rows']:,}: {growth}; time per θ K {points['thetas'][0]['k']} -> "
        f"{points['thetas'][-1]['k']}: {theta_growth}x; wall {common['wall_s']} s")
    return result


def _plot(points: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib comes with the dev extra
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [p["rows"] for p in points["rows"]]
    for stage, label in (("normalize", "normalize"), ("rank1", "one θ (rank + selection)"), ("many", "many θ, per θ")):
        a.plot(rows, [p[stage]["s_per_m_rows"] for p in points["rows"]], "o-", label=label)
    docs = [(p["rows"], p["sample_docs"]["s_per_m_rows"]) for p in points["rows"] if "sample_docs" in p]
    if docs:
        a.plot(*zip(*docs), "s--", label="sample with documents")
    a.set_xscale("log")
    a.set_xlabel("rows")
    a.set_ylabel("seconds per million rows")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    ks = [p["k"] for p in points["thetas"]]
    b.plot(ks, [p["s_per_theta"] for p in points["thetas"]], "o-")
    b.set_xscale("log")
    b.set_xlabel("θ (K)")
    b.set_ylabel(f"seconds per θ ({points['thetas'][0]['rows']:,} rows)" if points["thetas"] else "seconds per θ")
    b.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_scale", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
