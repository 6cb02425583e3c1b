"""Many θ in one job: K = 64 θ in one ``run_sample_many`` job against 64 single-θ jobs, speed-up (x).

Input (``bench.sample_data``, cached): an ``annotations`` Delta table of ``--docs`` documents (default 200,000,
the proxy-pool size: a subset of the corpus anyway; the same generator as ``sample_docs_per_s``: 24 domains,
one with ~50% of the documents, criteria q_edu / q_dclm / q_ref). ``run_normalize`` computes the knots once
(untimed, reported in ``details.normalize_s``); two storage roots link (symbolic links) to the same annotations
and knots, one for the 64-θ job and one for the single-θ jobs, so neither rewrites the other's
``proxy_index`` slices.

θ: ``sample_thetas(domains, criteria, --thetas, --theta-seed)`` (Algorithm 1 as drawn, ω ∈ [0, 0.1]).

Measured in one SparkSession (the embedded default of ``conf/default.yaml`` on ``local[2]``, UI off), in
``--theta-rounds`` interleaved rounds, each: one K-θ job, then single-θ jobs.

- many: ``run_sample_many(spark, cfg, thetas)`` (the proxy index + per-θ token counts for all K θ).
- single: ``run_sample_many(spark, cfg, [θ])``, the same code path with K = 1, for a fixed subset: the first
  ``--single-thetas`` θ (default 8 of the 64; every round times the same subset). **The time of K single jobs
  is extrapolated** as (mean single-θ job time) × K; ``--single-thetas 64`` times them all.
- Each single job's per-θ realized tokens must equal the K-θ job's for the same θ (determinism check).

Result ``many_theta_speedup`` (metric ``x``): value = K × median(per-round mean single-θ job s) / median(K-θ job
s), baseline = the median single-θ job time in seconds, ratio = the speed-up again (value / baseline would mix x
and seconds). Goal >= 20x. ``details.many.per_theta_s`` is the K-θ job's time per θ.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

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

NAME = "many_theta_speedup"
METRIC = "x"
DEFAULT_DOCS = 200_000
DEFAULT_PARTS = 8
DEFAULT_THETAS = 64
DEFAULT_SINGLE = 8
DEFAULT_ROUNDS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--docs", type=int, default=None, help=f"documents in the generated corpus (many-θ: {DEFAULT_DOCS})")
    add_option(parser, "--repeats", type=int, default=None, help="repeats of both value and baseline (overrides the per-benchmark ones)")
    add_option(parser, "--event-log", default=None, help="write Spark event logs to this folder (diagnosis; off by default)")
    add_option(parser, "--keep", action="store_true", help="keep the tables written while timing (default: deleted)")
    add_option(parser, "--theta-seed", type=int, default=7, help="seed of the θ draws (sample_thetas)")
    group = parser.add_argument_group("many-θ benchmark")
    add_option(group, "--thetas", type=int, default=DEFAULT_THETAS, help="K, the θ of the many-θ job")
    add_option(group, "--single-thetas", type=int, default=DEFAULT_SINGLE,
               help="single-θ jobs timed per round (the first N of the K θ; the K-job total is extrapolated)")
    add_option(group, "--theta-rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds (K-θ job + single jobs)")
    add_option(group, "--many-parts", type=int, default=DEFAULT_PARTS, help="files of the generated annotations table")


def _event_log_conf(folder: str | None) -> dict[str, str]:
    from bench.bench_sample import event_log_conf

    return event_log_conf(folder)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from quadmix_spark.kernel.theta import sample_thetas
    from quadmix_spark.curation.normalize import run_normalize
    from quadmix_spark.core.tables import SCORE_KNOTS
    from quadmix_spark.curation.sample import run_sample_many

    t_start = time.perf_counter()
    docs = args.docs or DEFAULT_DOCS
    K, n_single = args.thetas, min(args.single_thetas, args.thetas)
    rounds = args.repeats or args.theta_rounds
    if docs <= 0 or K <= 0 or n_single <= 0 or rounds <= 0 or args.many_parts <= 0:
        raise ValueError("--docs, --thetas, --single-thetas, --theta-rounds and --many-parts must be positive")

    conf = _event_log_conf(args.event_log)
    base = fresh_dir("runs", NAME)
    norm_root, many_root, single_root = (base / "norm", base / "many", base / "single")
    spark, _ = bench_spark(norm_root, conf=conf)
    sc = spark.sparkContext
    folder, manifest = generate_tables(spark, docs, args.many_parts, with_documents=False)
    link_inputs(norm_root, folder, ("annotations",))
    log(f"Spark {spark.version} on {sc.master}; {docs} annotated documents, {manifest['tokens']:,} tokens, "
        f"{len(manifest['domains'])} domains ({BIG_DOMAIN}: {manifest['big_domain_share']:.1%}); K = {K}, "
        f"{n_single} single-θ jobs per round, {rounds} rounds")
    sc.setJobDescription("warm-up")
    spark.range(1000).selectExpr("sum(id)").collect()
    spark.range(1000).mapInPandas(lambda it: it, "id long").collect()  # start the Python workers

    norm_cfg = bench_config(norm_root, *spark_overrides(conf))
    sc.setJobDescription("normalize")
    t0 = time.perf_counter()
    run_normalize(spark, norm_cfg.storage.table("annotations"), norm_cfg.storage.table(SCORE_KNOTS),
                  norm_cfg.normalize.method, norm_cfg.normalize.n_knots)
    normalize_s = time.perf_counter() - t0
    log(f"normalize (untimed for the result): {normalize_s:.1f} s")
    for root in (many_root, single_root):
        link_inputs(root, norm_root, ("annotations", SCORE_KNOTS))
    cfg_many = bench_config(many_root, *spark_overrides(conf))
    cfg_single = bench_config(single_root, *spark_overrides(conf))

    thetas = sample_thetas(manifest["domains"], list(CRITERIA), K, args.theta_seed)
    singles: list[list[float]] = []

    def many(i: int):
        return run_sample_many(spark, cfg_many, thetas)

    def single(i: int):
        times, results = [], []
        for j in range(n_single):
            sc.setJobDescription(f"single r{i} t{j}")
            t = time.perf_counter()
            results.append(run_sample_many(spark, cfg_single, [thetas[j]]))
            times.append(time.perf_counter() - t)
        singles.append(times)
        log(f"single-θ jobs, round {i + 1}: " + ", ".join(f"{t:.1f}" for t in times) + " s")
        return results

    def setup(label: str, i: int) -> None:
        sc.setJobDescription(f"{label} r{i}")

    def teardown(label: str, i: int, result: Any) -> None:
        sc.setJobDescription(None)
        if label == "many":
            tok = result.tokens
            if len(tok) != K or (tok.realized_tokens <= 0).any():
                raise RuntimeError(f"many-θ job: {int((tok.realized_tokens <= 0).sum())} of {K} θ selected nothing")

    log(f"timing: {rounds} rounds of (one {K}-θ job, {n_single} single-θ jobs), interleaved")
    try:
        timings = interleave({"many": (many, rounds), "single": (single, rounds)}, setup=setup, teardown=teardown)
        session = spark_info(spark)
    finally:
        stop_spark()
        if not args.keep:
            remove(base)

    # determinism: a single job's realized tokens for θ j equal the K-job's for θ j
    many_tokens = timings["many"].results[-1].tokens.set_index("theta_id")
    mismatches = []
    for r in (x for round_ in timings["single"].results for x in round_):
        row = r.tokens.iloc[0]
        want = many_tokens.loc[row.theta_id]
        if (int(row.realized_tokens), int(row.selected_docs)) != (int(want.realized_tokens), int(want.selected_docs)):
            mismatches.append(row.theta_id)
    if mismatches:
        raise RuntimeError(f"single-θ and {K}-θ jobs disagree on the realized tokens of θ {sorted(set(mismatches))}")

    many_median = timings["many"].median
    round_means = [statistics.mean(t) for t in singles]
    single_median = statistics.median(round_means)
    speedup = K * single_median / many_median
    all_single = [round(t, 3) for ts in singles for t in ts]
    tokens = timings["many"].results[-1].tokens
    details = {
        "value": f"speed-up: {K} x median(per-round mean single-θ job s) / median({K}-θ job s); "
                 f"the {K} single jobs are EXTRAPOLATED from the first {n_single} θ ({n_single} jobs timed per round)",
        "baseline": "median (over rounds) of the mean single-θ job time, seconds: run_sample_many(spark, cfg, [θ])",
        "ratio": "= value (the speed-up); value / baseline would mix x and seconds",
        "many": timings["many"].as_dict() | {"per_theta_s": [round(t / K, 3) for t in timings["many"].times],
                                              "median_per_theta_s": round(many_median / K, 3)},
        "single": {"times_s_by_round": [[round(t, 3) for t in ts] for ts in singles], "round_means_s": [round(m, 3) for m in round_means],
                   "median_s": round(single_median, 3), "min_s": min(all_single), "max_s": max(all_single),
                   "timed_thetas": n_single, "estimated_total_s": round(K * single_median, 1),
                   "total_is": f"extrapolated: {K} x mean single-θ time" if n_single < K else "measured: all K single jobs"},
        "speedup_by_round": [round(K * m / t, 2) for m, t in zip(round_means, timings["many"].times)],
        "normalize_s": round(normalize_s, 2),
        "thetas": {"k": K, "seed": args.theta_seed, "single_ids": [t.theta_id for t in thetas[:n_single]],
                   "realized_tokens_median": float(tokens.realized_tokens.median()),
                   "realized_share_median": float(tokens.realized_tokens.median()) / manifest["tokens"],
                   "selected_docs_median": float(tokens.selected_docs.median())},
        "input": {k: manifest[k] for k in ("source", "source_rows", "rows", "partitions", "tokens", "big_domain_share", "scheme")}
        | {"folder": str(folder), "domains": len(manifest["domains"]), "big_domain": BIG_DOMAIN, "table": "annotations only"},
        "repeats": {"rounds": rounds, "order": f"interleaved: {K}-θ job, then {n_single} single-θ jobs, per round"},
        "spark": session,
        "commit": git_commit(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = write_result(NAME, METRIC, speedup, single_median, docs, details, machine=machine_info(), ratio=speedup)
    log(f"{K}-θ job {many_median:.1f} s ({many_median / K:.2f} s per θ), single-θ job {single_median:.1f} s: "
        f"speed-up {speedup:.1f}x; benchmark wall {details['wall_s']} s")
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_many_theta", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
