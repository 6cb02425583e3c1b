"""Does the selection work? ``python -m bench.quality [--smoke] [--reference]`` (``make quality``).

On the shared web corpus with the demo's trained scorers, in one store (``$QUADMIX_BENCH_DIR/quality/<full|smoke>``):

1. **curation**: ingest, train-scorers, annotate, normalize (the demo's stages; no-ops once done);
2. **seed spread**: the transformer proxy trained on the same θ with several seeds at candidate token budgets;
   the budget of the transformer search is the smallest whose seed-to-seed spread is at most
   ``--max-noise`` (0.25) of the spread between θ (else the largest candidate, and the result says so);
3. **screening search** (``quality-screen``): ``--screen-thetas`` (512) θ trained with the n-gram screening
   proxy at that budget, the LightGBM fit (cross-validated Spearman ``cv_spearman.screen``), θ*;
4. **transformer search** (``quality-lm``): ``--lm-thetas`` (48) θ trained with the transformer proxy, its
   fit (``cv_spearman.lm``) and θ*;
5. **agreement**: the same θ as the transformer search trained with the n-gram proxy (``quality-lm-ngram``):
   Spearman between the two proxies' target losses over those θ (``agreement_spearman``);
6. **paired evaluation** on the held-out part of the target set, with the transformer proxy and
   ``--seeds`` (5) seeds, of each search's θ* against random, every single-criterion top-k and the criteria
   mix: ``paired.<screen|lm>.<random|topk_best|mix> = {mean, se, wins, n}`` where ``mean`` is baseline loss
   minus θ* loss (positive = θ* better) and ``topk_best`` the top-k arm of the lowest mean loss.

With ``--refine-rounds R`` the screening search adds R refinement rounds after its first fit: each proposes the
``--refine-thetas`` (64) candidates the newest fit predicts best (``quadmix propose --refine``), trains them with
the n-gram proxy and fits again; θ* is the last fit's. The rounds are part of the variant (the search gets a name
of its own) and each round's figures are kept in ``screen_refine`` (and in ``refine-<search>.json`` in the
experiment's folder, so a resumed run reports the rounds it did before).

With ``--lm-top N`` a second fidelity follows the screening search's evaluation: the screening fit's N best
candidates in a search of their own (``quality-screen-lm<N>``, ``quadmix propose --refine N --from``), trained with
the transformer proxy; its θ* is the mean of the ``--lm-top-k`` (6) of them the transformer finds best on the
search part (``search.theta_star: trained``), judged like the others (``paired.screen_lm``; ``screen_lm`` has the
N losses and the Spearman of the screening fit's rank with them). It adds a search to the variant, not a variant.
``--lm-race R`` then races the R of them with the lowest loss: each is trained again with ``--lm-race-seeds`` (2)
more seeds (``quadmix propose --replicate``) and θ* averages the ``--lm-top-k`` with the lowest mean loss
(``screen_lm.race``: every raced θ's losses by seed, their means and the pooled seed sd). The replicates join the
same search. θ* is then a θ the race trained with seeds 0 .. S, and its seed-s model is the one that won: the
evaluation must use other seeds (``--eval-seed-base`` > S; refused otherwise), or that luck would count twice.

Steps 3-6 run in the order screening (search, fit, θ* judged by both proxies), then transformer (search, fit,
agreement, θ* judged); ``--stop-after`` ends the run after the seed spread, one of the screening steps or the
transformer search's fit and agreement (``agreement``: its θ* not judged), and
``--skip`` leaves out the judgements of the screening θ* itself (``screen_evaluate_ngram``, ``screen_evaluate``:
80 transformer runs at 10 seeds) when only the second fidelity's θ* is wanted. ``--budget`` fixes the
proxy budget and skips step 2. ``--set KEY=VALUE`` (repeatable) changes a setting for the whole experiment (a
variant, e.g. ``--set search.shared_omega=0.5``): the overrides are recorded in the result, the variant's searches
get names of their own (``quality-screen-v<hash>``; the curation is shared) and its result file is
``selection_quality-v<hash>.json``.

Resumable: every stage reuses what is finished (proposals, trained proxies, evaluated arms), so an interrupted
run is continued by running the command again. Writes ``bench/results/selection_quality.json`` (and, with
``--reference``, ``bench/reference/selection_quality.json``). ``--smoke`` runs the same path on 400 pages
with tiny settings in a few minutes (``tests/bench/test_bench_quality.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, RESULTS_DIR, git_commit, log, machine_info, scratch_dir, setup_env, utc_now, write_json

NAME = "selection_quality"
REFERENCE_DIR = REPO / "bench" / "reference"
CONFS = [REPO / "conf" / "default.yaml", REPO / "conf" / "scorers.yaml", REPO / "conf" / "search-demo.yaml"]
STOP_POINTS = ("spread", "screen_fit", "screen_evaluate_ngram", "screen_evaluate", "screen_lm_evaluate", "agreement")
SKIPPABLE = ("screen_evaluate_ngram", "screen_evaluate")  # judgements of the screening θ* another step supersedes
GOALS = {"cv_spearman.screen": 0.8, "cv_spearman.lm": 0.6, "agreement_spearman": 0.7, "paired_z": 2.0}


# ---------------------------------------------------------------- settings


def plan(args) -> dict[str, Any]:
    """The experiment's sizes (full or smoke)."""
    base = args.eval_seed_base
    if args.lm_race and base <= args.lm_race_seeds:
        # θ* is then one of the raced θ, whose seed-s model is the one the race kept: judged again with seed s, its
        # luck on the search part would carry over to the evaluation part
        raise SystemExit(f"--lm-race trains its θ with seeds 0..{args.lm_race_seeds}, which chose θ*: evaluate with other "
                         f"seeds (--eval-seed-base {args.lm_race_seeds + 1} or more)")
    if args.smoke:
        return {"docs": 400, "screen_thetas": 16, "lm_thetas": 8, "seeds": [base, base + 1], "budgets": [6_000],
                "spread_thetas": 3, "spread_seeds": [0, 1], "min_runs": 6, "cv_folds": 3, "n_candidates": 2000}
    return {"docs": None, "screen_thetas": args.screen_thetas, "lm_thetas": args.lm_thetas,
            "seeds": list(range(base, base + args.seeds)),
            "budgets": args.budgets, "spread_thetas": 6, "spread_seeds": [0, 1, 2], "min_runs": 16, "cv_folds": 5,
            "n_candidates": 100_000}


SMOKE_OVERRIDES = [  # cheap scorers and tiny models: the same path, in minutes
    "train_scorers.models.ref_minilm.enabled=false", "train_scorers.models.topic_minilm.enabled=false",
    "train_scorers.models.ref_lm.enabled=false",
    "train_scorers.models.dclm.negatives=300", "train_scorers.models.wiki_tfidf.negatives=300",
    "train_scorers.models.topic_fasttext.epoch=5", "train_scorers.report_docs=100",
    "train_scorers.reference.alpaca.max_docs=300", "train_scorers.reference.enwiki.max_docs=20",
    "annotate.domain_scorer=topic_fasttext", "annotate.quality_scorers=[dclm, wiki_tfidf, gopher]",
    "proxy.pool.shards=2", "proxy.model={vocab_size: 512, n_layer: 1, n_head: 2, d_model: 16, ffn: 32, seq_len: 64}",
    "proxy.train={batch_size: 8, micro_batch_size: 8, warmup_steps: 2, log_every: 10}",
    "proxy.target.max_examples_per_task=4",
]


class Experiment:
    """Configs of the experiment's searches over one store."""

    def __init__(self, root: Path, args, sizes: dict[str, Any], corpus: Path | None):
        self.root, self.args, self.sizes = root, args, sizes
        self.base = [f"storage.root={root / 'store'}", "spark.master=local[2]", "spark.driver_memory=3g",
                     f"search.min_runs={sizes['min_runs']}", f"search.cv_folds={sizes['cv_folds']}",
                     f"search.n_candidates={sizes['n_candidates']}", f"evaluate.seeds={json.dumps(sizes['seeds'])}",
                     "evaluate.baselines=[random, 'topk:*', mix]"]
        if corpus is not None:
            self.base.append(f"ingest.input=[{corpus}]")
        if args.smoke:
            self.base += SMOKE_OVERRIDES
        self.base += list(args.set or [])
        self.suffix = variant_suffix(variant_keys(args))

    def config(self, *overrides: str):
        from quadmix_spark.core.config import load_config

        return load_config([str(c) for c in CONFS], [*self.base, *overrides])

    def name(self, search: str) -> str:
        """A search's name in this variant (``--set`` overrides give the searches their own names, so a variant
        shares the store's curation but never another variant's proposals)."""
        return search + self.suffix

    def search(self, name: str, kind: str, tokens: int, n: int, seed: int = 0, train_seed: int = 0):
        return self.config(f"search.name={self.name(name)}", f"search.n_proposals={n}", f"search.seed={42 + seed}",
                           f"proxy.model.kind={kind}", f"proxy.train.tokens={tokens}", f"proxy.train.seed={train_seed}")


def variant_keys(args) -> list[str]:
    """What makes a variant: the ``--set`` overrides, and refinement rounds when asked for."""
    keys = list(args.set or [])
    if getattr(args, "refine_rounds", 0):
        keys.append(f"refine={args.refine_rounds}x{args.refine_thetas}")
    return keys


def variant_suffix(overrides: list[str]) -> str:
    """``""`` for the experiment as designed; else ``-v<hash of the overrides>``."""
    import hashlib

    if not overrides:
        return ""
    return "-v" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]


# ---------------------------------------------------------------- steps


def curate(exp: Experiment) -> dict[str, Any]:
    """ingest → train-scorers → annotate → normalize (each a no-op when already done)."""
    from quadmix_spark.jobs import annotate_job, ingest_job, normalize_job, train_scorers_job

    cfg = exp.config()
    ingest = ingest_job(cfg)
    scorers = train_scorers_job(cfg)
    annotate_job(cfg)
    normalize_job(cfg)
    from quadmix_spark.core.session import get_spark
    from quadmix_spark.core.storage import read_table

    documents = read_table(get_spark(cfg), cfg.storage.table("documents")).count()
    return {"documents": documents, "ingested_now": ingest.documents,
            "scorers": {t.name: {**t.metrics, "warnings": t.warnings} for t in scorers.models}}


def train_search(cfg) -> dict[str, float]:
    """propose and train every θ of a search (again once if some failed); {θ id: target loss}."""
    from quadmix_spark.jobs import propose_job

    propose_job(cfg)
    return train_proposed(cfg)


def train_proposed(cfg) -> dict[str, float]:
    """Train every θ a search has (again once if some failed); {θ id: target loss}."""
    from quadmix_spark.jobs import proxy_job

    for _ in range(2):
        report = proxy_job(cfg)
        log(report.summary())
        if not report.failed:
            break
    return finished_losses(cfg)


def finished_losses(cfg, replicates: bool = False) -> dict[str, Any]:
    """{θ id: target loss} of a search's finished θ, from each θ's first run; with ``replicates``, {θ id: [loss of
    each finished run, by training seed]} of the θ trained with several seeds (``quadmix propose --replicate``)."""
    import mlflow

    from quadmix_spark.core.runs import TAG_REPLICATE_OF, TAG_THETA_ID, child_runs, experiment_id, require_search
    from quadmix_spark.search.proxy import train_seed

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    parent = require_search(client, exp_id, cfg.search.name)
    metric = cfg.search.metric
    done = [r for r in child_runs(client, exp_id, parent.info.run_id) if r.info.status == "FINISHED" and metric in r.data.metrics]
    if not replicates:
        return {r.data.tags[TAG_THETA_ID]: float(r.data.metrics[metric]) for r in done if TAG_REPLICATE_OF not in r.data.tags}
    raced = {r.data.tags[TAG_THETA_ID] for r in done if TAG_REPLICATE_OF in r.data.tags}
    runs: dict[str, list[tuple[int, float]]] = {}
    for r in done:
        t = r.data.tags
        if t[TAG_THETA_ID] in raced:
            runs.setdefault(t[TAG_THETA_ID], []).append((train_seed(r, cfg), float(r.data.metrics[metric])))
    return {k: [loss for _, loss in sorted(v)] for k, v in runs.items()}


def seed_spread(exp: Experiment, budget: int) -> dict[str, Any]:
    """The same θ with several seeds: pooled seed-to-seed std against the std between θ of their mean losses."""
    sizes = exp.sizes
    per_seed = [train_search(exp.search(f"quality-spread-{budget}-s{s}", "transformer", budget, sizes["spread_thetas"], seed=99,
                                        train_seed=s)) for s in sizes["spread_seeds"]]
    ids = sorted(set.intersection(*(set(p) for p in per_seed)))
    losses = np.array([[p[i] for p in per_seed] for i in ids])  # θ × seed
    seed_sd = float(np.sqrt(np.mean(np.var(losses, axis=1, ddof=1))))
    theta_sd = float(np.std(losses.mean(axis=1), ddof=1))
    return {"tokens": budget, "thetas": len(ids), "seeds": len(per_seed), "seed_sd": seed_sd, "theta_sd": theta_sd,
            "noise_ratio": seed_sd / theta_sd if theta_sd > 0 else float("inf")}


def choose_budget(spreads: list[dict[str, Any]], max_noise: float) -> tuple[int, str]:
    """The smallest budget whose noise ratio is at most ``max_noise``; else the largest (and why)."""
    for s in sorted(spreads, key=lambda s: s["tokens"]):
        if s["noise_ratio"] <= max_noise:
            return s["tokens"], f"smallest budget with seed sd <= {max_noise} x θ sd (ratio {s['noise_ratio']:.2f})"
    last = max(spreads, key=lambda s: s["tokens"])
    return last["tokens"], f"no candidate reached seed sd <= {max_noise} x θ sd: the largest ({last['noise_ratio']:.2f})"


def fit(cfg) -> dict[str, Any]:
    """The search stage's fit and θ*, and for comparison the cross-validated Spearman of every feature set."""
    import mlflow
    import pandas as pd

    from quadmix_spark.jobs import search_job
    from quadmix_spark.search.regression import FEATURE_SETS, featurizer_for, fit_search
    from quadmix_spark.search.run_table import search_domain_tokens

    outcome = search_job(cfg)
    log(outcome.summary())
    sc, table = cfg.search, outcome.runs
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    tokens = search_domain_tokens(client, outcome.experiment_id, [sc.name], table.domains)
    by_features = {}
    for kind in FEATURE_SETS:
        f = featurizer_for(kind, table.domains, table.criteria, tokens)
        if f.kind == kind:
            cv = fit_search(pd.DataFrame(f(table.X.to_numpy()), columns=f.names), table.y, sc.lightgbm, sc.cv_folds,
                            sc.val_fraction, sc.early_stopping_rounds, sc.seed, groups=table.theta_ids)
            by_features[kind] = cv.cv_spearman
    out = {"run_id": outcome.run_id, "features": outcome.features, "cv_spearman": outcome.metrics["cv_spearman"],
           "cv_mae": outcome.metrics["cv_mae"], "cv_spearman_by_features": by_features, "n_runs": len(outcome.runs),
           "n_trees": outcome.fit.n_trees, "theta_star": outcome.theta_star.theta_id}
    if tokens is not None:
        star = outcome.theta_star.reindex(table.domains, table.criteria).to_vector()[None, :]
        out["coverage"] = mix_coverage(table.X.to_numpy(), np.asarray(table.y), star, table.domains, table.criteria, tokens)
    return out


def refine_screen(exp: "Experiment", cfg, rounds: int, n: int, first_fit: dict[str, Any]) -> dict[str, Any]:
    """``rounds`` refinement rounds of the search of ``cfg`` after its first fit ``first_fit``: propose the newest
    fit's ``n`` best candidates, train them, fit again. Per round: the refined θ's losses against the search's best
    loss before the round, and the new fit. What is done is kept in ``refine-<search>.json`` and read back by a
    resumed run (whose first fit already sees the refined θ, so the figures of the rounds before it are kept here):
    ``{"initial": first fit, "rounds": [...]}``."""
    from quadmix_spark.jobs import propose_job

    state_path = exp.root / f"refine-{cfg.search.name}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"initial": first_fit, "rounds": []}
    done = state["rounds"]
    for r in range(len(done), rounds):
        before = finished_losses(cfg)
        proposed = propose_job(cfg, refine=n)
        log(proposed.summary())
        losses = train_search(cfg)
        new = [losses[t.theta_id] for t in proposed.thetas if t.theta_id in losses]
        new_fit = fit(cfg)
        done.append({"round": r + 1, "refined_from": proposed.refined_from, "thetas": len(proposed.thetas),
                     "trained": len(new), "loss_min": float(np.min(new)) if new else None,
                     "loss_mean": float(np.mean(new)) if new else None,
                     "search_loss_min_before": float(min(before.values())), "fit": new_fit})
        write_json(state_path, state, indent=1)
    return {"initial": state["initial"], "rounds": done[:rounds]}


def screen_lm(exp: "Experiment", budget: int, n: int, k: int, race: int = 0, race_seeds: int = 0) -> tuple[Any, dict[str, Any]]:
    """The second fidelity: the screening fit's ``n`` best candidates in a search of their own (``quadmix propose
    --refine n --from <screening search>``), trained with the transformer proxy; θ* the mean of the ``k`` of them
    the transformer finds best on the search part (``search.theta_star: trained``). With ``race``, the ``race``
    best of them are trained again with ``race_seeds`` more seeds (``quadmix propose --replicate``) and θ* is the
    mean of the ``k`` of those with the lowest mean loss over their seeds. Returns the search's config and its
    figures, with the Spearman between the screening fit's rank of each θ and the transformer's (first) loss."""
    import mlflow

    from quadmix_spark.core.runs import (TAG_REFINE_RANK, TAG_THETA_ID, child_runs, experiment_id, find_search,
                                         require_search)
    from quadmix_spark.jobs import propose_job

    cfg = exp.config(f"search.name={exp.name(f'quality-screen-lm{n}')}", "proxy.model.kind=transformer",
                     f"proxy.train.tokens={budget}", "proxy.train.seed=0", "search.theta_star=trained", f"search.top_k={k}",
                     f"search.min_runs={min(n, exp.sizes['min_runs'])}")
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    # a resumed run keeps the θ it has even when the screening search has been fitted on more runs since (the
    # search's name holds n, so another --lm-top is another search)
    if find_search(client, exp_id, cfg.search.name) is None:
        log(propose_job(cfg, refine=n, source=exp.name("quality-screen")).summary())
    else:
        log(f"search {cfg.search.name!r} exists: its θ are kept (resumed run)")
    losses = train_proposed(cfg)
    rank = {r.data.tags[TAG_THETA_ID]: float(r.data.tags[TAG_REFINE_RANK])
            for r in child_runs(client, exp_id, require_search(client, exp_id, cfg.search.name).info.run_id)
            if TAG_REFINE_RANK in r.data.tags}
    rho, _ = spearman(rank, losses)
    values = np.array(list(losses.values()))
    out = {"search": cfg.search.name, "thetas": n, "top_k": k, "trained": len(losses), "loss_min": float(values.min()),
           "loss_mean": float(values.mean()), "loss_max": float(values.max()), "spearman_screen_rank_lm_loss": rho}
    if race:
        log(propose_job(cfg, replicate=race, seeds=race_seeds).summary())
        train_proposed(cfg)
        runs = finished_losses(cfg, replicates=True)
        means = {t: float(np.mean(v)) for t, v in runs.items()}
        # the pooled seed-to-seed sd of the raced θ: what one run's loss is worth at this fidelity
        seed_sd = float(np.sqrt(np.mean([np.var(v, ddof=1) for v in runs.values() if len(v) > 1]))) if runs else None
        out["race"] = {"thetas": race, "seeds": race_seeds, "runs": runs, "means": means, "seed_sd": seed_sd,
                       "best": min(means, key=means.get) if means else None}
    out["fit"], out["losses"] = fit(cfg), losses
    return cfg, out


def mix_coverage(x: np.ndarray, losses: np.ndarray, star: np.ndarray, domains, criteria, tokens) -> dict[str, Any]:
    """How far the searched θ's domain mixes lie from the pool's own (where random and the mix baseline sit):
    the total variation distance of each θ's kept-token shares (ω_m·T_m normalized) from T_m/ΣT, its
    Spearman ρ with the loss, and the loss of the θ nearest the pool's mix. A search whose proposals never
    come near the pool's mix cannot find a θ* there, however many θ it trains."""
    from scipy.stats import spearmanr

    from quadmix_spark.search.regression import Featurizer

    f = Featurizer("mix", tuple(domains), tuple(criteria), tuple(tokens))
    pool = np.asarray(tokens, dtype=np.float64) / float(np.sum(tokens))
    m = len(domains)

    def tv(v: np.ndarray) -> np.ndarray:
        return 0.5 * np.abs(f(v)[:, :m] - pool[None, :]).sum(axis=1)

    d = tv(x)
    near = np.argsort(d, kind="stable")[: max(1, len(d) // 10)]
    return {"tv_min": float(d.min()), "tv_median": float(np.median(d)), "tv_max": float(d.max()),
            "tv_theta_star": float(tv(star)[0]), "spearman_tv_loss": float(spearmanr(d, losses).statistic),
            "loss_min": float(losses.min()), "loss_median": float(np.median(losses)),
            "loss_nearest_tenth_mean": float(losses[near].mean()), "nearest_tenth_tv_max": float(d[near].max())}


def evaluate(cfg) -> dict[str, Any]:
    """The paired comparison of the search's θ* with every baseline (``proxy`` settings of ``cfg``)."""
    from quadmix_spark.jobs import evaluate_job

    for _ in range(2):
        result = evaluate_job(cfg)
        if (result.outcomes["status"] == "finished").all():
            break
    log(result.summary())
    table, paired = result.table, result.paired.set_index("arm")
    topk = table[table["arm"].str.startswith("topk:")]
    best = str(topk.loc[topk["mean"].idxmin(), "arm"]) if len(topk) else None
    out: dict[str, Any] = {"arms": {r["arm"]: {"mean": r["mean"], "std": r["std"], "n": int(r["n"]),
                                               "search_part_mean": float(r.get("search_part_mean", np.nan))}
                                    for _, r in table.iterrows()},
                           "topk_best_arm": best}
    for key, arm in (("random", "random"), ("topk_best", best), ("mix", "mix")):
        if arm in paired.index:
            r = paired.loc[arm]
            out[key] = {"mean": float(r["mean"]), "se": float(r["se"]), "wins": int(r["wins"]), "n": int(r["n"])}
    out["all_paired"] = {arm: {"mean": float(r["mean"]), "se": float(r["se"]), "wins": int(r["wins"]), "n": int(r["n"])}
                         for arm, r in paired.iterrows()}
    return out


def spearman(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    from scipy.stats import spearmanr

    ids = sorted(set(a) & set(b))
    if len(ids) < 3:
        return float("nan"), len(ids)
    return float(spearmanr([a[i] for i in ids], [b[i] for i in ids]).statistic), len(ids)


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the experiment: met or not, by how much."""
    out = {}
    for key in ("screen", "lm"):
        goal = GOALS[f"cv_spearman.{key}"]
        value = result["cv_spearman"].get(key)
        out[f"cv_spearman.{key}"] = {"goal": goal, "value": value, "met": value is not None and value >= goal}
    goal, value = GOALS["agreement_spearman"], result.get("agreement_spearman")
    out["agreement_spearman"] = {"goal": goal, "value": value, "met": value is not None and value >= goal}
    for key in ("screen", "lm", *(("screen_lm",) if "screen_lm" in result["paired"] else ())):
        for arm in ("random", "topk_best", "mix"):
            r = result["paired"].get(key, {}).get(arm)
            z = r["mean"] / r["se"] if r and r["se"] and np.isfinite(r["se"]) and r["se"] > 0 else None
            out[f"paired.{key}.{arm}"] = {"goal": f">= {GOALS['paired_z']} SE", "z": z,
                                          "met": z is not None and z >= GOALS["paired_z"]}
    return out


# ---------------------------------------------------------------- the run


def smoke_corpus(root: Path, n: int) -> Path:
    """The first ``n`` shared pages, as the smoke run's corpus."""
    import gzip

    from bench.common import shared_dir

    path = root / "corpus.jsonl"
    if not path.exists():
        with gzip.open(shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz", "rt") as f:
            lines = [line for _, line in zip(range(n), f)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(path)
    return path


def run(args) -> dict[str, Any]:
    setup_env()
    sizes = plan(args)
    root = Path(args.root) if args.root else scratch_dir("quality", "smoke" if args.smoke else "full")
    root.mkdir(parents=True, exist_ok=True)
    corpus = smoke_corpus(root, sizes["docs"]) if sizes["docs"] else None
    exp = Experiment(root, args, sizes, corpus)
    result: dict[str, Any] = {"name": NAME, "commit": git_commit(), "machine": machine_info(), "smoke": bool(args.smoke),
                              "when": utc_now(), "sizes": sizes, "overrides": variant_keys(args),
                              "timings_s": {}, "cv_spearman": {}, "paired": {}}
    timings = result["timings_s"]

    results_dir = Path(args.results_dir) if args.results_dir else RESULTS_DIR

    def step(name: str, fn, *a):
        t = time.perf_counter()
        log(f"--- {name}")
        out = fn(*a)
        timings[name] = round(time.perf_counter() - t, 1)
        # what is finished so far, marked partial, so an interrupted run still leaves its figures
        write({**result, "partial": True, "last_step": name}, False, results_dir)
        return out

    def stop(name: str) -> bool:
        if args.stop_after != name:
            return False
        write({**result, "partial": True, "last_step": name}, False, results_dir)
        log(f"stopped after {name} (--stop-after); run again without it to finish")
        return True

    result["curation"] = step("curation", curate, exp)
    if args.budget:
        budget, why = args.budget, "fixed by --budget (no seed spread measured in this run)"
        result["budget"] = {"tokens": budget, "why": why, "spread": []}
    else:
        spreads = [step(f"spread_{b}", seed_spread, exp, b) for b in sizes["budgets"]]
        budget, why = choose_budget(spreads, args.max_noise)
        result["budget"] = {"tokens": budget, "why": why, "spread": spreads}
    log(f"transformer proxy budget: {budget:,} tokens ({why})")
    if stop("spread"):
        return result

    screen = exp.search("quality-screen", "ngram", budget, sizes["screen_thetas"], seed=0)
    lm = exp.search("quality-lm", "transformer", budget, sizes["lm_thetas"], seed=1)
    lm_as_ngram = exp.search("quality-lm-ngram", "ngram", budget, sizes["lm_thetas"], seed=1)
    # θ* of each search judged by the transformer proxy on held-out target text
    judge = ["proxy.model.kind=transformer", f"proxy.train.tokens={budget}"]
    screen_losses = step("screen_proxies", train_search, screen)
    result["screen_fit"] = step("screen_fit", fit, screen)
    if args.refine_rounds:
        refined = step("screen_refine", refine_screen, exp, screen, args.refine_rounds, args.refine_thetas, result["screen_fit"])
        result["screen_fit_initial"], result["screen_refine"] = refined["initial"], refined["rounds"]
        result["screen_fit"] = refined["rounds"][-1]["fit"]
    result["cv_spearman"]["screen"] = result["screen_fit"]["cv_spearman"]
    if stop("screen_fit"):
        return result
    skip = set(args.skip or [])
    if skip:
        result["skipped"] = sorted(skip)
    if "screen_evaluate_ngram" not in skip:
        result["screen_on_ngram"] = step("screen_evaluate_ngram", evaluate, exp.config(
            f"search.name={exp.name('quality-screen')}", "proxy.model.kind=ngram", f"proxy.train.tokens={budget}"))
    if stop("screen_evaluate_ngram"):
        return result
    if "screen_evaluate" not in skip:
        result["paired"]["screen"] = step("screen_evaluate", evaluate,
                                          exp.config(f"search.name={exp.name('quality-screen')}", *judge))
    if stop("screen_evaluate"):
        return result
    if args.lm_top:
        lm_top_cfg, result["screen_lm"] = step("screen_lm", screen_lm, exp, budget, args.lm_top, args.lm_top_k,
                                               args.lm_race, args.lm_race_seeds)
        result["paired"]["screen_lm"] = step("screen_lm_evaluate", evaluate, lm_top_cfg)
        if stop("screen_lm_evaluate"):
            return result

    lm_losses = step("lm_proxies", train_search, lm)
    result["lm_fit"] = step("lm_fit", fit, lm)
    result["cv_spearman"]["lm"] = result["lm_fit"]["cv_spearman"]
    agree_losses = step("agreement_proxies", train_search, lm_as_ngram)
    rho, n = spearman(lm_losses, agree_losses)
    result["agreement_spearman"], result["agreement_thetas"] = rho, n
    result["proxy_losses"] = {"screen": screen_losses, "lm": lm_losses, "lm_as_ngram": agree_losses}
    if stop("agreement"):
        return result
    result["paired"]["lm"] = step("lm_evaluate", evaluate, exp.config(f"search.name={exp.name('quality-lm')}", *judge))
    result["verdicts"] = verdicts(result)
    result["wall_s"] = round(sum(timings.values()), 1)
    write(result, args.reference, results_dir)
    return result


def write(result: dict[str, Any], reference: bool, results_dir: Path = RESULTS_DIR) -> Path:
    name = NAME + variant_suffix(result.get("overrides") or [])
    path = write_json(results_dir / f"{name}.json", result, indent=1)
    if reference and not result["smoke"]:
        REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, REFERENCE_DIR / f"{name}.json")
        log(f"wrote {REFERENCE_DIR / f'{name}.json'}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="the same path on 400 pages with tiny settings (minutes)")
    parser.add_argument("--root", help="the experiment's folder (default $QUADMIX_BENCH_DIR/quality/<full|smoke>)")
    parser.add_argument("--screen-thetas", type=int, default=512)
    parser.add_argument("--lm-thetas", type=int, default=48)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm in the paired evaluation")
    parser.add_argument("--budgets", type=int, nargs="+", default=[500_000, 2_000_000],
                        help="candidate proxy token budgets (the seed spread picks one)")
    parser.add_argument("--budget", type=int, help="the proxies' token budget, fixed (skips the seed spread)")
    parser.add_argument("--max-noise", type=float, default=0.25, help="largest seed sd / θ sd accepted for a budget")
    parser.add_argument("--reference", action="store_true", help="also write bench/reference/selection_quality.json")
    parser.add_argument("--results-dir", help="where the result file goes (default bench/results)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a config override for every stage of the experiment (repeatable), e.g. "
                             "search.shared_omega=0.5; recorded in the result, and the searches get names of their own")
    parser.add_argument("--refine-rounds", type=int, default=0,
                        help="refinement rounds of the screening search after its first fit (a variant of its own)")
    parser.add_argument("--refine-thetas", type=int, default=64, help="θ proposed per refinement round")
    parser.add_argument("--lm-top", type=int, default=0, metavar="N",
                        help="train the screening fit's N best candidates with the transformer proxy (a search of their "
                             "own) and judge the mean of the best --lm-top-k of them as a θ* too (paired.screen_lm)")
    parser.add_argument("--lm-top-k", type=int, default=6, help="how many of the --lm-top θ that θ* averages")
    parser.add_argument("--lm-race", type=int, default=0, metavar="N",
                        help="train the N best of the --lm-top θ again with --lm-race-seeds more seeds; θ* then averages "
                             "the --lm-top-k of them with the lowest mean loss")
    parser.add_argument("--lm-race-seeds", type=int, default=2, help="more seeds per θ in the --lm-race")
    parser.add_argument("--eval-seed-base", type=int, default=0, metavar="B",
                        help="the paired evaluation's seeds are B .. B+--seeds-1 (with --lm-race, B must exceed the "
                             "race's seeds: the race chose θ* with them)")
    parser.add_argument("--skip", action="append", choices=SKIPPABLE, metavar="STEP",
                        help=f"leave out a judgement of the screening search's own θ* (one of {', '.join(SKIPPABLE)}; "
                             "repeatable), e.g. when only the second fidelity (--lm-top) is wanted; the result lists it")
    parser.add_argument("--stop-after", choices=STOP_POINTS,
                        help="end after this step (a partial result file); the next run without it continues")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
