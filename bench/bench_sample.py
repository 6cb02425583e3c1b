"""Sampler throughput: input documents/s of ``run_sample`` for one θ against a plain Delta copy of ``documents``.

Input (``bench.sample_data``, cached): ``documents`` + ``annotations`` Delta tables of ``--docs`` documents
(default 1,000,000: the shared web corpus replicated with fresh ids, ~3.2 GB of text; n_tokens estimated as
n_chars // 4), 24 domains with one holding ~50% of the documents, three criteria q_edu / q_dclm / q_ref. A
benchmark storage root links (symbolic links) to the cached tables; ``run_normalize`` computes the score knots
there once (untimed, its time is reported in ``details.normalize_s``).

θ: ``sample_thetas(domains, criteria, 1, --theta-seed)[0]`` with every domain's ω set to 0.1, as in the paper,
so ~10-20% of the tokens survive (S ∈ [1, 2^η] + ε on r̄ <= ω); ``sampling.budget_tokens = null`` (one
realization, no budget fitting).

Measured in one SparkSession (the embedded default of ``conf/default.yaml`` on ``local[2]``, UI off), rounds
interleaved (copy, sample, copy, sample, ...):

- value: ``quadmix_spark.curation.sample.run_sample(spark, cfg, theta=θ)`` with a fresh ``sampling.run`` name each
  repeat (``bench-r<i>``) in one storage root: every pass included (ranking, the ``selection`` slice, the
  training output = copies joined with text, the Parquet export + manifest, the per-domain report).
  Documents/s = input documents / wall seconds.
- baseline: ``spark.read.format("delta").load(documents)`` written as Delta (mode overwrite) to a fresh path,
  rows/s.

Result ``sample_docs_per_s`` (metric ``documents/s``), ratio = median sampler docs/s / median copy rows/s
(goal >= 0.8: the whole sampler costs at most 1.25 plain copies). Defaults: one untimed warm-up round (a copy
and a sample: the JVM compiles both code paths there, as it has long done so in a job over billions of
documents; their times are reported as ``warmup_times_s``), then 3 + 3 timed repeats.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    standalone_main,
    add_option,
    bench_config,
    git_commit,
    bench_spark,
    fresh_dir,
    interleave,
    log,
    machine_info,
    remove,
    spark_info,
    spark_overrides,
    stop_spark,
    write_result,
)
from bench.sample_data import BIG_DOMAIN, CRITERIA, generate_tables, link_inputs

NAME = "sample_docs_per_s"
METRIC = "documents/s"
DEFAULT_DOCS = 1_000_000
DEFAULT_PARTS = 16
DEFAULT_SAMPLE_REPEATS = 3
DEFAULT_COPY_REPEATS = 3
DEFAULT_WARMUP = 1
OMEGA = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--docs", type=int, default=None, help=f"documents in the generated corpus (sample: {DEFAULT_DOCS})")
    add_option(parser, "--repeats", type=int, default=None, help="repeats of both value and baseline (overrides the per-benchmark ones)")
    add_option(parser, "--event-log", default=None, help="write Spark event logs to this folder (diagnosis; off by default)")
    add_option(parser, "--keep", action="store_true", help="keep the tables written while timing (default: deleted)")
    group = parser.add_argument_group("sample benchmark")
    add_option(group, "--sample-parts", type=int, default=DEFAULT_PARTS, help="files of the generated documents/annotations tables")
    add_option(group, "--sample-repeats", type=int, default=DEFAULT_SAMPLE_REPEATS, help="timed run_sample repeats")
    add_option(group, "--copy-repeats", type=int, default=DEFAULT_COPY_REPEATS, help="timed Delta read -> Delta write repeats")
    add_option(group, "--sample-warmup", type=int, default=DEFAULT_WARMUP,
               help="untimed warm-up rounds (one copy + one sample each) before the timed repeats")
    add_option(group, "--theta-seed", type=int, default=7, help="seed of the θ draws (sample_thetas)")


def event_log_conf(folder: str | None) -> dict[str, str]:
    if not folder:
        return {}
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": str(Path(folder).resolve()),
        "spark.eventLog.compress": "false",  # plain JSON lines, for bench.stages
    }


def paper_theta(domains: list[str], seed: int):
    """One Algorithm-1 θ with every ω = 0.1."""
    from quadmix_spark.kernel.theta import Theta, sample_thetas

    t = sample_thetas(domains, list(CRITERIA), 1, seed)[0]
    return Theta(t.domains, t.criteria, t.alpha, t.lam, np.full(len(domains), OMEGA), t.eta, t.eps)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from quadmix_spark.curation.normalize import run_normalize
    from quadmix_spark.core.tables import SCORE_KNOTS
    from quadmix_spark.curation.sample import run_sample

    t_start = time.perf_counter()
    docs = args.docs or DEFAULT_DOCS
    sample_repeats = args.repeats or args.sample_repeats
    copy_repeats = args.repeats or args.copy_repeats
    warmup = args.sample_warmup
    if docs <= 0 or sample_repeats <= 0 or copy_repeats <= 0 or args.sample_parts <= 0 or warmup < 0:
        raise ValueError("--docs, --sample-parts and the repeats must be positive (--sample-warmup >= 0)")

    conf = event_log_conf(args.event_log)
    root = fresh_dir("runs", NAME, "root")
    spark, _ = bench_spark(root, conf=conf)
    sc = spark.sparkContext
    folder, manifest = generate_tables(spark, docs, args.sample_parts, with_documents=True)
    link_inputs(root, folder)
    log(f"Spark {spark.version} on {sc.master}; {docs} documents, {manifest['tokens']:,} tokens, "
        f"{len(manifest['domains'])} domains ({BIG_DOMAIN}: {manifest['big_domain_share']:.1%} of the documents)")
    sc.setJobDescription("warm-up")
    spark.range(1000).selectExpr("sum(id)").collect()

    cfg0 = bench_config(root, *spark_overrides(conf))
    sc.setJobDescription("normalize")
    t0 = time.perf_counter()
    run_normalize(spark, cfg0.storage.table("annotations"), cfg0.storage.table(SCORE_KNOTS), cfg0.normalize.method, cfg0.normalize.n_knots)
    normalize_s = time.perf_counter() - t0
    log(f"normalize (untimed for the result): {normalize_s:.1f} s")

    theta = paper_theta(manifest["domains"], args.theta_seed)
    documents = cfg0.storage.table("documents")
    copies: dict[int, Path] = {}
    cfgs: dict[int, Any] = {}

    def setup(label: str, i: int) -> None:
        if label == "copy":
            copies[i] = fresh_dir("runs", NAME, f"copy-{i}")
        else:
            cfgs[i] = bench_config(root, *spark_overrides(conf), f"sampling.run=bench-r{i}", "sampling.budget_tokens=null")
        sc.setJobDescription(f"{label} r{i}")

    def copy(i: int) -> None:
        spark.read.format("delta").load(documents).write.format("delta").mode("overwrite").save(str(copies[i] / "documents"))

    def sample(i: int):
        return run_sample(spark, cfgs[i], theta=theta)

    def teardown(label: str, i: int, result: Any) -> None:
        sc.setJobDescription(None)
        if label == "copy":
            rows = spark.read.format("delta").load(str(copies[i] / "documents")).count()
            if rows != docs:
                raise RuntimeError(f"copy has {rows} rows, expected {docs}")
            remove(copies[i])
        else:
            r = result.report
            if int(r.input_docs.sum()) != docs or int(r.input_tokens.sum()) != manifest["tokens"]:
                raise RuntimeError(f"sample report covers {int(r.input_docs.sum())} documents, expected {docs}")
            share = result.output_tokens / manifest["tokens"]
            if not 0.05 <= share <= 0.25 or result.output_tokens != int(r.realized_tokens.sum()):
                raise RuntimeError(f"sample output {result.output_tokens:,} tokens ({share:.1%}) is not ~10-20% of the input")

    log(f"timing: {warmup} warm-up round(s), then {copy_repeats} copy + {sample_repeats} sample repeats, interleaved")
    try:
        timings = interleave({"copy": (copy, copy_repeats), "sample": (sample, sample_repeats)}, setup=setup, teardown=teardown,
                             warmup=warmup)
        session = spark_info(spark)
    finally:
        stop_spark()
        if not args.keep:
            remove(root.parent)

    last = timings["sample"].results[-1]
    rep = last.report
    sample_rate = timings["sample"].rate(docs)
    copy_rate = timings["copy"].rate(docs)
    details = {
        "value": "median run_sample input documents/s (one θ, ω=0.1 everywhere, no budget; fresh sampling.run per "
                 "repeat in one storage root; selection + training output + export + report)",
        "baseline": "median Delta read of `documents` -> Delta overwrite to a fresh path, rows/s",
        "sample": timings["sample"].as_dict(docs),
        "copy": timings["copy"].as_dict(docs),
        "normalize_s": round(normalize_s, 2),
        "theta": {"seed": args.theta_seed, "theta_id": last.theta_id, "omega": OMEGA,
                  "eta_range": [float(theta.eta.min()), float(theta.eta.max())],
                  "lam_range": [float(theta.lam.min()), float(theta.lam.max())]},
        "output": {
            "input_tokens": int(rep.input_tokens.sum()),
            "expected_tokens": float(rep.expected_tokens.sum()),
            "realized_tokens": int(rep.realized_tokens.sum()),
            "unique_tokens": int(rep.unique_tokens.sum()),
            "selected_docs": int(rep.selected_docs.sum()),
            "token_share": int(rep.realized_tokens.sum()) / max(int(rep.input_tokens.sum()), 1),
            "export_shards": len(last.manifest.get("shards", [])),
            "export_rows": last.manifest.get("rows"),
        },
        "input": {k: manifest[k] for k in ("source", "source_rows", "rows", "partitions", "tokens", "big_domain_share", "scheme")}
        | {"folder": str(folder), "domains": len(manifest["domains"]), "big_domain": BIG_DOMAIN,
           "n_tokens": "estimated as n_chars // 4 (the sampler is measured, not the tokenizer)"},
        "repeats": {"sample": sample_repeats, "copy": copy_repeats, "warmup_rounds": warmup,
                    "order": "interleaved, copy first, after the untimed warm-up rounds"},
        "spark": session,
        "commit": git_commit(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = write_result(NAME, METRIC, sample_rate, copy_rate, docs, details, machine=machine_info())
    log(f"sample {sample_rate:.0f} docs/s, copy {copy_rate:.0f} rows/s, ratio {result['ratio']:.3f}; "
        f"benchmark wall {details['wall_s']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_sample", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
