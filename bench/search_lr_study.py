"""Which LightGBM learning rate should the search use? Cost and θ* quality per learning rate, several seeds.

Not part of ``make bench`` (a few minutes); run ``python -m bench.search_lr_study`` to redo the measurement
behind ``quadmix_spark.search.config.DEFAULT_LIGHTGBM``. For each learning rate and each seed of the synthetic runs of
``bench_search`` (3,000 θ × 182 features), the fit (early stopping 3 on 200 held-out runs, one thread) and
100,000 candidates with top-10 averaging; reported per learning rate: median fit and candidate seconds,
mean trees, validation MAE and Spearman ρ, and the mean noise-free loss of θ* (``bench_search.true_loss``,
lower is better): the question a search answers, not only how well the regressor fits.

Writes ``bench/results/search_lr_study.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.common import RESULTS_DIR, git_commit, log, machine_info, utc_now


def study(rates: list[float], seeds: list[int], runs: int = 3000, n_val: int = 200, n_cand: int = 100_000) -> list[dict]:
    from bench.bench_search import _case, synthetic_runs
    from quadmix_spark.kernel.theta import feature_names
    from quadmix_spark.search.config import DEFAULT_LIGHTGBM

    data = {seed: synthetic_runs(runs, seed) for seed in seeds}
    keys = ("fit_s", "candidates_s", "best_iteration", "val_mae", "val_spearman", "theta_star_true_loss")
    rows = []
    for lr in rates:
        per_seed = []
        for seed, (X, y, domains, criteria) in data.items():
            case = _case(X, y, feature_names(domains, criteria), domains, criteria, n_val / runs, n_cand, 4242,
                         {**DEFAULT_LIGHTGBM, "learning_rate": lr})
            per_seed.append({"seed": seed, **{k: case[k] for k in keys}})
        mean = lambda k: statistics.fmean(r[k] for r in per_seed)  # noqa: E731
        row = {"learning_rate": lr,
               "fit_s": round(statistics.median(r["fit_s"] for r in per_seed), 3),
               "candidates_s": round(statistics.median(r["candidates_s"] for r in per_seed), 3),
               "trees": round(mean("best_iteration"), 1), "val_mae": round(mean("val_mae"), 5),
               "val_spearman": round(mean("val_spearman"), 5),
               "theta_star_true_loss": round(mean("theta_star_true_loss"), 5), "per_seed": per_seed}
        log(f"lr {lr}: fit {row['fit_s']:.2f} s, candidates {row['candidates_s']:.2f} s, {row['trees']:.0f} trees, "
            f"MAE {row['val_mae']:.4f}, ρ {row['val_spearman']:.4f}, θ* true loss {row['theta_star_true_loss']:.4f}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search_lr_study", description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0.01,0.02,0.03,0.05,0.1", help="comma-separated learning rates")
    parser.add_argument("--seeds", default="11,12,13,14,15", help="comma-separated seeds of the synthetic runs")
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = study(rates, seeds)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "search_lr_study.json"
    out.write_text(json.dumps({"name": "search_lr_study", "machine": machine_info(), "when": utc_now(),
                               "commit": git_commit(), "seeds": seeds, "rows": rows}, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
