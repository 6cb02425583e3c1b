"""Run the benchmarks: ``python -m bench.run [--only NAME] [--docs N] [options of the benchmarks]``.

Each module in ``BENCHMARKS`` provides ``NAME``, ``add_arguments(parser)`` and ``run(args) -> result dict``
(the dict ``bench.common.write_result`` returned). Options are shared: ``--docs 50000`` applies to every
benchmark that takes a corpus size. The run ends with a table of name / value / baseline / ratio and exits
non-zero when any benchmark raised (the others still run).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.common import log, setup_env, stop_spark

# short name -> module; a new benchmark is one more line here
BENCHMARKS = {
    "ingest": "bench.bench_ingest",
    "sample": "bench.bench_sample",
    "many_theta": "bench.bench_many_theta",
    "rank": "bench.bench_rank",
    "annotate": "bench.bench_annotate",
    "tokenize": "bench.bench_tokenize",
    "tokenize_count": "bench.bench_token_count",
    "search": "bench.bench_search",
    "proxy": "bench.bench_proxy",
    "ngram": "bench.bench_ngram",
    "scale": "bench.bench_scale",
}


def _modules(names: list[str]):
    return {name: importlib.import_module(BENCHMARKS[name]) for name in names}


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    setup_env()
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="Run the quadmix-spark benchmarks.")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable; one of {', '.join(sorted(BENCHMARKS))})",
    )
    modules = _modules(list(BENCHMARKS))
    for mod in modules.values():
        mod.add_arguments(parser)
    args = parser.parse_args(argv)
    selected = args.only or list(BENCHMARKS)

    rows, failed = [], []
    t0 = time.perf_counter()
    for name in selected:
        mod = modules[name]
        log(f"=== {name} ({mod.NAME})")
        t = time.perf_counter()
        try:
            result = mod.run(args)
        except Exception:  # noqa: BLE001 - report, keep going, exit non-zero
            traceback.print_exc()
            failed.append(name)
            rows.append((mod.NAME, None, None, None, "FAILED", time.perf_counter() - t))
        else:
            rows.append((result["name"], result["value"], result["baseline"], result["ratio"], result["metric"], time.perf_counter() - t))
        finally:
            stop_spark()

    print()
    header = ("name", "value", "baseline", "ratio", "metric", "wall s")
    table = [header] + [(n, _fmt(v), _fmt(b), _fmt(r), m, f"{w:.0f}") for n, v, b, r, m, w in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"\n{len(rows) - len(failed)} ok, {len(failed)} failed, {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
