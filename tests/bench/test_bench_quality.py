"""``python -m bench.quality --smoke``: the selection-quality experiment's whole path on 400 pages (real Spark,
Delta, MLflow, trained scorers, n-gram and transformer proxies), and the result file's contract."""

from __future__ import annotations

import json

import numpy as np
import pytest

# about 3 minutes on 2 cores: in `make slow`; the stages it chains are each tested in `make test`
pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_the_smoke_run_goes_end_to_end_and_writes_every_figure(tmp_path, spark):
    from bench.quality import main

    root, results = tmp_path / "quality", tmp_path / "results"
    assert main(["--smoke", "--root", str(root), "--results-dir", str(results), "--lm-top", "6", "--lm-top-k", "2"]) == 0
    r = json.loads((results / "selection_quality.json").read_text())
    assert r["smoke"] and r["commit"] and r["machine"]["cpu_model"]
    assert set(r["cv_spearman"]) == {"screen", "lm"}
    assert r["agreement_thetas"] == r["sizes"]["lm_thetas"] and -1 <= r["agreement_spearman"] <= 1
    assert len(r["proxy_losses"]["screen"]) == r["sizes"]["screen_thetas"]
    # the second fidelity: the screening fit's 6 best candidates trained with the transformer, θ* the mean of 2
    lm_top = r["screen_lm"]
    assert lm_top["trained"] == len(lm_top["losses"]) == 6 and lm_top["fit"]["n_runs"] == 6
    assert lm_top["loss_min"] == min(lm_top["losses"].values()) and -1 <= lm_top["spearman_screen_rank_lm_loss"] <= 1
    assert lm_top["fit"]["theta_star"] not in lm_top["losses"]
    for search in ("screen", "lm", "screen_lm"):
        for arm in ("random", "topk_best", "mix"):
            p = r["paired"][search][arm]
            assert set(p) == {"mean", "se", "wins", "n"} and p["n"] == len(r["sizes"]["seeds"]) and np.isfinite(p["mean"])
        assert r["paired"][search]["topk_best_arm"].startswith("topk:")
    assert r["budget"]["spread"] and r["budget"]["tokens"] in r["sizes"]["budgets"]
    assert set(r["verdicts"]) >= {"cv_spearman.screen", "cv_spearman.lm", "agreement_spearman", "paired.lm.mix",
                                "paired.screen_lm.mix"}
    assert "dclm" in r["curation"]["scorers"] and "auc_within_length" in r["curation"]["scorers"]["dclm"]

    # resumed: every run is reused, and the second fidelity keeps its 6 θ (propose --refine would add 6 more)
    assert main(["--smoke", "--root", str(root), "--results-dir", str(results), "--lm-top", "6", "--lm-top-k", "2",
                 "--stop-after", "screen_lm_evaluate"]) == 0
    again = json.loads((results / "selection_quality.json").read_text())
    assert again["screen_lm"]["losses"] == lm_top["losses"] and again["screen_lm"]["fit"]["n_runs"] == 6
    assert again["paired"]["screen_lm"] == r["paired"]["screen_lm"]

    # a race among the second fidelity's best: 3 θ trained again with one more seed; θ* the best mean of 2 seeds
    racing = ["--smoke", "--root", str(root), "--results-dir", str(results), "--lm-top", "6", "--lm-top-k", "1",
            "--lm-race", "3", "--lm-race-seeds", "1", "--stop-after", "screen_lm_evaluate"]
    with pytest.raises(SystemExit, match="--eval-seed-base 2"):  # the race's seeds chose θ*: not for judging it
        main(racing)
    assert main([*racing, "--eval-seed-base", "2"]) == 0
    raced = json.loads((results / "selection_quality.json").read_text())["screen_lm"]
    assert raced["losses"] == lm_top["losses"] and raced["fit"]["n_runs"] == 9
    race = raced["race"]
    first3 = sorted(lm_top["losses"], key=lm_top["losses"].get)[:3]
    assert sorted(race["runs"]) == sorted(first3) and all(len(v) == 2 for v in race["runs"].values())
    assert all(race["runs"][t][0] == lm_top["losses"][t] for t in first3)  # seed 0's run is the first one
    assert race["best"] == min(race["means"], key=race["means"].get) == raced["fit"]["theta_star"]
    judged = json.loads((results / "selection_quality.json").read_text())
    assert judged["sizes"]["seeds"] == [2, 3] and judged["paired"]["screen_lm"]["random"]["n"] == 2


def test_a_variant_reuses_the_curation_and_keeps_its_searches_apart(tmp_path, spark):
    """``--set`` runs a variant in the same store: its own search names and result file, the overrides recorded,
    and ``--stop-after`` ends after the screening fit."""
    from bench.quality import main, variant_suffix

    root, results = tmp_path / "quality", tmp_path / "results"
    common = ["--smoke", "--root", str(root), "--results-dir", str(results), "--budget", "6000",
              "--stop-after", "screen_fit"]
    assert main(common) == 0
    base = json.loads((results / "selection_quality.json").read_text())
    overrides = ["search.shared_omega=0.5"]
    assert main([*common, "--set", overrides[0]]) == 0
    suffix = variant_suffix(overrides)
    assert suffix.startswith("-v") and variant_suffix(["search.shared_omega=0.25"]) != suffix and variant_suffix([]) == ""
    r = json.loads((results / f"selection_quality{suffix}.json").read_text())
    assert r["overrides"] == overrides and r["partial"] and r["last_step"] == "screen_fit"
    assert r["budget"]["tokens"] == 6000 and not r["budget"]["spread"]
    assert r["curation"]["ingested_now"] == 0  # the store's curation, reused
    assert set(r["cv_spearman"]) == {"screen"} and "lm" not in r["paired"]
    assert r["screen_fit"]["theta_star"] != base["screen_fit"]["theta_star"]  # its own proposals, its own θ*

    # refinement rounds: a variant of their own; each round's θ are the newest fit's best candidates, trained and
    # fitted again; a rerun reads the rounds back instead of proposing more
    refine = ["--refine-rounds", "2", "--refine-thetas", "3"]
    assert main([*common, *refine]) == 0
    keys = ["refine=2x3"]
    r = json.loads((results / f"selection_quality{variant_suffix(keys)}.json").read_text())
    assert r["overrides"] == keys and r["last_step"] == "screen_fit"
    rounds = r["screen_refine"]
    assert [x["round"] for x in rounds] == [1, 2] and all(x["thetas"] == x["trained"] == 3 for x in rounds)
    assert rounds[0]["fit"]["n_runs"] == r["screen_fit_initial"]["n_runs"] + 3 == rounds[1]["fit"]["n_runs"] - 3
    assert r["screen_fit"] == rounds[1]["fit"] and rounds[0]["refined_from"] != rounds[1]["refined_from"]
    assert main([*common, *refine]) == 0
    again = json.loads((results / f"selection_quality{variant_suffix(keys)}.json").read_text())
    assert again["screen_refine"] == rounds and again["screen_fit_initial"] == r["screen_fit_initial"]
    # --skip leaves out the judgements of the screening θ* (nothing trained for them), and the result says so
    skip = ["--skip", "screen_evaluate_ngram", "--skip", "screen_evaluate"]
    assert main([*common[:-1], "screen_evaluate", *refine, *skip]) == 0
    r = json.loads((results / f"selection_quality{variant_suffix(keys)}.json").read_text())
    assert r["skipped"] == ["screen_evaluate", "screen_evaluate_ngram"] and r["last_step"] == "screen_evaluate"
    assert "screen_on_ngram" not in r and not r["paired"] and "screen_evaluate" not in r["timings_s"]
    # --stop-after agreement: the transformer search's fit and its agreement with the n-gram proxy, θ* not judged
    assert main([*common[:-1], "agreement", *refine, *skip]) == 0
    r = json.loads((results / f"selection_quality{variant_suffix(keys)}.json").read_text())
    assert r["last_step"] == "agreement" and r["partial"] and set(r["cv_spearman"]) == {"screen", "lm"}
    assert r["agreement_thetas"] == r["sizes"]["lm_thetas"] == len(r["proxy_losses"]["lm"]) and "lm_evaluate" not in r["timings_s"]
    assert not r["paired"] and "verdicts" not in r

    # the seed spread alone (--stop-after spread), as a variant: its own spread runs, its budget, nothing searched
    lr = ["proxy.train.min_lr=0.0001"]
    assert main(["--smoke", "--root", str(root), "--results-dir", str(results), "--stop-after", "spread", "--set", lr[0]]) == 0
    r = json.loads((results / f"selection_quality{variant_suffix(lr)}.json").read_text())
    assert r["overrides"] == lr and r["partial"] and r["last_step"] == "spread"
    (spread,) = r["budget"]["spread"]
    assert spread["seeds"] == 2 and spread["thetas"] == 3 and spread["seed_sd"] > 0 and r["budget"]["tokens"] == 6000
    assert not r["cv_spearman"] and "screen_fit" not in r and "spread_6000" in r["timings_s"]
