"""The evaluate stage's tables: per-arm summary and the paired comparison against θ* (no Spark)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from quadmix_spark.search.evaluate import EvaluateResult, paired_differences, plot_evaluation, summarize


def outcomes(losses: dict[str, list[float]], failed: set[tuple[str, int]] = frozenset()) -> pd.DataFrame:
    rows = []
    for arm, values in losses.items():
        for seed, v in enumerate(values):
            status = "failed" if (arm, seed) in failed else "finished"
            rows.append({"label": arm, "seed": seed, "status": status, "target_loss": v if status == "finished" else np.nan,
                         "search_part.target_loss": v - 0.1})
    return pd.DataFrame(rows)


def test_paired_differences_compare_seed_by_seed():
    # random is worse than θ* by 0.1 on every seed, although the seeds' spread (1.0) is ten times larger
    star = [5.0, 6.0, 7.0, 5.5, 6.5]
    frame = outcomes({"theta_star": star, "random": [s + 0.1 for s in star],
                      "mix": [s + d for s, d in zip(star, [0.2, -0.1, 0.05, -0.05, 0.0])]})
    paired = paired_differences(frame).set_index("arm")
    assert list(paired.index) == ["random", "mix"]
    r = paired.loc["random"]
    assert r["mean"] == pytest.approx(0.1) and r["se"] == pytest.approx(0.0, abs=1e-12) and r["wins"] == 5 and r["n"] == 5
    m = paired.loc["mix"]
    d = np.array([0.2, -0.1, 0.05, -0.05, 0.0])
    assert m["mean"] == pytest.approx(d.mean()) and m["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(5))
    assert m["z"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(5))) and m["wins"] == 2
    table = summarize(frame).set_index("arm")
    assert table.loc["random", "std"] == pytest.approx(np.std([s + 0.1 for s in star], ddof=1))  # unpaired spread is large
    assert table.loc["theta_star", "search_part_mean"] == pytest.approx(np.mean(star) - 0.1)


def test_only_seeds_both_arms_finished_are_paired():
    frame = outcomes({"theta_star": [1.0, 2.0, 3.0], "random": [1.5, 2.5, 9.0]}, failed={("theta_star", 2)})
    (row,) = paired_differences(frame).to_dict("records")
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.5) and row["wins"] == 2
    one = paired_differences(outcomes({"theta_star": [1.0], "random": [2.0]})).iloc[0]
    assert one["n"] == 1 and np.isnan(one["se"])
    assert paired_differences(outcomes({"random": [1.0]})).empty  # no θ* to compare with


def test_summary_prints_the_paired_table_and_the_plot_is_written(tmp_path):
    frame = outcomes({"theta_star": [5.0, 5.2, 5.1], "random": [5.3, 5.4, 5.2], "topk:edu": [5.1, 5.3, 5.0]})
    table, paired = summarize(frame), paired_differences(frame)
    text = EvaluateResult("demo", "run1", table, frame, paired).summary()
    assert "held-out evaluation part" in text and "paired against θ*" in text
    assert "random" in text and "θ* better on 3 of 3 seeds" in text and "search part" in text
    png = plot_evaluation(table, paired, tmp_path / "plots" / "evaluate.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
