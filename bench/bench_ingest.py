"""Ingest throughput: documents/s of ``run_ingest`` against a plain Spark JSON -> Delta copy of the same rows.

Input: the shared web corpus (``data/web/weborganizer_dev.jsonl.gz``, 8,712 pages) replicated to ``--docs``
documents (default 200,000) and written once as ``--files`` gzip JSONL shards (default 16), cached under
``$QUADMIX_BENCH_DIR/inputs``. Copy ``k`` of a page keeps every field, with ``id`` = ``"<id>-r<k>"`` and
``text`` = the original text + ``"\\n[copy k]"`` (every copy, ``k`` from 0), so ids never repeat and neither do
texts: neither id nor text-hash de-duplication collapses the copies, and every input row must become a
document. Shards hold contiguous runs of rows (copy-major order), like the parts of a sharded crawl.

Measured in one SparkSession (the embedded default of ``conf/default.yaml`` on ``local[2]``, UI off), rounds
interleaved (baseline, ingest, baseline, ingest, ...):

- value: ``quadmix_spark.curation.ingest.run_ingest`` into a fresh ``storage.root`` each repeat, documents/s =
  input rows / wall seconds. The report must be balanced with ``documents == input rows``.
- baseline: ``spark.read.json(files)`` (schema inference included, as ingest infers it too) written as a
  Delta table (mode overwrite) to a fresh path, rows/s.

Result ``ingest_docs_per_s`` (metric ``documents/s``), ratio = median ingest docs/s / median baseline rows/s.
Defaults: 1 ingest + 3 baseline repeats (see ``DEFAULT_INGEST_REPEATS``): 2-4 minutes on 2 cores since the fast token
counter (11-17 minutes before).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    standalone_main,
    add_option,
    bench_config,
    bench_spark,
    cached_input,
    fresh_dir,
    interleave,
    log,
    machine_info,
    remove,
    scratch_dir,
    shared_dir,
    spark_info,
    spark_overrides,
    stop_spark,
    write_result,
)

NAME = "ingest_docs_per_s"
METRIC = "documents/s"
DEFAULT_DOCS = 200_000
DEFAULT_FILES = 16
# Measured on the 2-core benchmark machine at 200k documents: one ingest repeat takes ~8.5 min (84% of it
# token counting) and one baseline repeat ~40 s; with session start-up, 1 ingest + 3 baseline repeats take
# ~11 minutes (17 when other jobs load the machine), while a second ingest repeat would push the benchmark
# well past ~15 minutes.
DEFAULT_INGEST_REPEATS = 1
DEFAULT_BASELINE_REPEATS = 3
GENERATOR_VERSION = 1  # bump when the replication scheme changes (invalidates cached inputs)


def source_path() -> Path:
    return shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz"


# ---------------------------------------------------------------- input generation


def _read_source(path: str) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def replicate(record: dict[str, Any], k: int) -> dict[str, Any]:
    """Copy ``k`` of a source record: fresh id, text + a copy marker, every other field unchanged."""
    out = dict(record)
    out["id"] = f"{record['id']}-r{k}"
    out["text"] = f"{record['text']}\n[copy {k}]"
    return out


_SOURCE: dict[str, list[dict[str, Any]]] = {}


def _source_records(source: str) -> list[dict[str, Any]]:
    """The source records, parsed once per generator process."""
    if source not in _SOURCE:
        _SOURCE[source] = _read_source(source)
    return _SOURCE[source]


def _write_shard(source: str, out_path: str, start: int, stop: int) -> int:
    records = _source_records(source)
    n = len(records)
    with gzip.open(out_path, "wt", encoding="utf-8", compresslevel=6) as f:
        for j in range(start, stop):
            f.write(json.dumps(replicate(records[j % n], j // n), ensure_ascii=False))
            f.write("\n")
    return stop - start


def generate_corpus(source: Path, docs: int, n_files: int) -> tuple[Path, dict[str, Any]]:
    """The replicated corpus folder (cached) and its manifest (``files``, ``rows``, ...)."""
    st = source.stat()
    fp = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{GENERATOR_VERSION}".encode()).hexdigest()[:10]
    name = f"web-{docs}docs-{n_files}files-{fp}"

    def build(folder: Path) -> dict[str, Any]:
        n_src = len(_source_records(str(source)))
        log(f"generating {docs} documents ({math.ceil(docs / n_src)} copies of {n_src}) as {n_files} gzip JSONL files")
        bounds = [(i, docs * i // n_files, docs * (i + 1) // n_files) for i in range(n_files)]
        files = [f"part-{i:05d}.jsonl.gz" for i, _, _ in bounds]
        with ProcessPoolExecutor(max_workers=max(1, min(n_files, os.cpu_count() or 1))) as pool:
            written = list(pool.map(_write_shard, *zip(*[(str(source), str(folder / f), a, b) for f, (_, a, b) in zip(files, bounds)])))
        return {
            "source": str(source),
            "source_rows": n_src,
            "rows": sum(written),
            "rows_per_file": written,
            "files": files,
            "generator_version": GENERATOR_VERSION,
            "scheme": 'copy k of a page: id="<id>-r<k>", text=text+"\\n[copy k]"; contiguous shards',
        }

    folder, manifest = cached_input(name, build)
    if manifest["rows"] != docs:
        raise RuntimeError(f"cached input {folder} has {manifest['rows']} rows, expected {docs}")
    return folder, manifest


# ---------------------------------------------------------------- the benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--docs", type=int, default=None, help=f"documents in the generated corpus (ingest: {DEFAULT_DOCS})")
    add_option(parser, "--repeats", type=int, default=None, help="repeats of both value and baseline (overrides the two below)")
    group = parser.add_argument_group("ingest benchmark")
    add_option(group, "--files", type=int, default=DEFAULT_FILES, help="gzip JSONL shards of the generated corpus")
    add_option(group, "--ingest-repeats", type=int, default=DEFAULT_INGEST_REPEATS, help="timed run_ingest repeats")
    add_option(group, "--baseline-repeats", type=int, default=DEFAULT_BASELINE_REPEATS, help="timed read.json -> Delta repeats")
    add_option(group, "--event-log", default=None, help="write Spark event logs to this folder (diagnosis; off by default)")
    add_option(group, "--keep", action="store_true", help="keep the tables written while timing (default: deleted)")


def _check_report(report, docs: int) -> None:
    problems = []
    if not report.balanced:
        problems.append("report is not balanced")
    if report.input_rows != docs:
        problems.append(f"input rows {report.input_rows} != generated rows {docs}")
    if report.documents != docs:
        problems.append(f"documents {report.documents} != input rows {docs}")
    if problems:
        raise RuntimeError(f"ingest benchmark: {'; '.join(problems)}\n{report.summary()}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from quadmix_spark.curation.ingest import report_dict, run_ingest

    t_start = time.perf_counter()
    docs = args.docs or DEFAULT_DOCS
    ingest_repeats = args.repeats or args.ingest_repeats
    baseline_repeats = args.repeats or args.baseline_repeats
    if docs <= 0 or ingest_repeats <= 0 or baseline_repeats <= 0 or args.files <= 0:
        raise ValueError("--docs, --files and the repeats must be positive")

    source = source_path()
    folder, manifest = generate_corpus(source, docs, args.files)
    files = [str(folder / f) for f in manifest["files"]]
    input_bytes = sum(manifest["sizes"].values())

    conf = {}
    if args.event_log:
        Path(args.event_log).mkdir(parents=True, exist_ok=True)
        conf = {
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": str(Path(args.event_log).resolve()),
            "spark.eventLog.compress": "false",  # plain JSON lines, for bench.stages
        }
    runs = scratch_dir("runs", NAME)
    spark, _ = bench_spark(fresh_dir("runs", NAME, "session"), conf=conf)
    sc = spark.sparkContext
    log(f"Spark {spark.version} on {sc.master}; {docs} documents in {len(files)} files ({input_bytes / 2**20:.0f} MiB gzip)")
    sc.setJobDescription("warm-up")
    spark.range(1000).selectExpr("sum(id)").collect()

    input_override = f"ingest.input={json.dumps(files)}"
    paths: dict[tuple[str, int], Path] = {}
    cfgs: dict[int, Any] = {}

    def setup(label: str, i: int) -> None:
        paths[label, i] = fresh_dir("runs", NAME, f"{label}-{i}")
        if label == "ingest":
            cfgs[i] = bench_config(paths[label, i], *spark_overrides(conf), input_override)
        sc.setJobDescription(f"{label} r{i}")

    def baseline(i: int) -> None:
        spark.read.json(files).write.format("delta").mode("overwrite").save(str(paths["baseline", i] / "copy"))

    def ingest(i: int):
        return run_ingest(spark, cfgs[i])

    def teardown(label: str, i: int, result: Any) -> None:
        sc.setJobDescription(None)
        if label == "ingest":
            _check_report(result, docs)
        else:
            rows = spark.read.format("delta").load(str(paths[label, i] / "copy")).count()
            if rows != docs:
                raise RuntimeError(f"baseline copy has {rows} rows, expected {docs}")
        if not args.keep:
            remove(paths[label, i])

    log(f"timing: {baseline_repeats} baseline + {ingest_repeats} ingest repeats, interleaved")
    try:
        timings = interleave(
            {"baseline": (baseline, baseline_repeats), "ingest": (ingest, ingest_repeats)},
            setup=setup,
            teardown=teardown,
        )
        session = spark_info(spark)
    finally:
        stop_spark()
        if not args.keep:
            remove(runs)

    ingest_rate = timings["ingest"].rate(docs)
    baseline_rate = timings["baseline"].rate(docs)
    details = {
        "value": "median run_ingest documents/s (fresh storage root each repeat)",
        "baseline": "median spark.read.json(files) -> Delta overwrite rows/s (fresh path each repeat)",
        "ingest": timings["ingest"].as_dict(docs),
        "baseline_runs": timings["baseline"].as_dict(docs),
        "ingest_report": report_dict(timings["ingest"].results[-1]),
        "input": {
            "folder": str(folder),
            "files": len(files),
            "bytes_gzip": input_bytes,
            "rows": docs,
            "source": manifest["source"],
            "source_rows": manifest["source_rows"],
            "scheme": manifest["scheme"],
        },
        "repeats": {"ingest": ingest_repeats, "baseline": baseline_repeats, "order": "interleaved, baseline first"},
        "spark": session,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = write_result(NAME, METRIC, ingest_rate, baseline_rate, docs, details, machine=machine_info())
    log(f"ingest {ingest_rate:.0f} docs/s, baseline {baseline_rate:.0f} rows/s, ratio {result['ratio']:.3f}; "
        f"benchmark wall {details['wall_s']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_ingest", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
