"""The search fit's figures: out-of-fold predictions against actual loss, feature importance, θ* among
the candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quadmix_spark.core.plots import pyplot, save
from quadmix_spark.kernel.theta import unflatten
from quadmix_spark.search.candidates import CandidateResult
from quadmix_spark.search.regression import SearchFit

def plot_pred_vs_actual(fit: SearchFit, path: str | Path, metric: str = "target_loss") -> Path:
    """Out-of-fold predicted against actual loss of every run, with y = x, MAE and ρ in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(fit.y, fit.oof_pred, s=14, alpha=0.8)
    both = np.concatenate([fit.y, fit.oof_pred])
    lo, hi = float(both.min()), float(both.max())
    pad = (hi - lo) * 0.05 or 0.01
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--")
    ax.set_xlabel(f"actual {metric}")
    ax.set_ylabel(f"predicted {metric} (out of fold)")
    ax.set_title(f"{fit.folds}-fold CV: n={fit.n_runs}, MAE={fit.cv_mae:.4g}, Spearman ρ={fit.cv_spearman:.3f}")
    return save(fig, path)


def plot_importance(fit: SearchFit, path: str | Path, top: int = 30) -> Path:
    """The ``top`` features by total gain."""
    plt = pyplot()
    imp = fit.importance("gain").head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(imp) + 1)))
    ax.barh(range(len(imp)), imp.to_numpy())
    ax.set_yticks(range(len(imp)))
    ax.set_yticklabels([n.removeprefix("quadmix.") for n in imp.index], fontsize=7)
    ax.set_xlabel("gain")
    ax.set_title(f"feature importance (top {len(imp)} by gain)")
    return save(fig, path)


def plot_theta_star(cands: CandidateResult, path: str | Path) -> Path:
    """Per domain: the candidates' spread of ω̃, λ̃, η̃ (box) with the top-k (dots) and θ* (red marker),
    and θ*'s α as stacked bars."""
    plt = pyplot()
    ts = cands.theta_star
    m, nc = ts.n_domains, ts.n_criteria
    sample = unflatten(cands.sample_features, m, nc)
    top = unflatten(cands.top_features, m, nc)
    xs = np.arange(m)
    fig, axes = plt.subplots(4, 1, figsize=(max(7, 0.45 * m + 2), 12), sharex=True)
    for ax, label, s_vals, t_vals, star, logy in (
        (axes[0], "ω̃ (top share kept)", sample.omega, top.omega, ts.omega, False),
        (axes[1], "λ̃ (steepness)", sample.lam, top.lam, ts.lam, True),
        (axes[2], "η̃", sample.eta, top.eta, ts.eta, False),
    ):
        if s_vals.shape[0]:
            ax.boxplot([s_vals[:, i] for i in range(m)], positions=xs, widths=0.6, showfliers=False,
                       medianprops={"color": "grey"})
        for j in range(t_vals.shape[0]):
            ax.scatter(xs, t_vals[j], s=6, color="tab:blue", alpha=0.4, label="top-k" if j == 0 else None)
        ax.scatter(xs, star, marker="D", s=28, color="tab:red", zorder=3, label="θ*")
        ax.set_ylabel(label)
        if logy:
            ax.set_yscale("log")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[0].set_title(f"θ* vs {cands.sample_features.shape[0]} candidates (box) and the top {cands.top_k} (dots)")
    bottom = np.zeros(m)
    for j, crit in enumerate(ts.criteria):
        axes[3].bar(xs, ts.alpha[:, j], bottom=bottom, label=crit)
        bottom += ts.alpha[:, j]
    axes[3].set_ylabel("θ* α")
    axes[3].set_ylim(0, 1)
    axes[3].legend(loc="upper right", fontsize=7, ncol=min(nc, 4))
    axes[3].set_xticks(xs)
    axes[3].set_xticklabels(ts.domains, rotation=60, ha="right", fontsize=7)
    return save(fig, path)


def make_plots(fit: SearchFit, cands: CandidateResult, folder: str | Path, metric: str = "target_loss") -> list[Path]:
    """All three plots into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_pred_vs_actual(fit, folder / "pred_vs_actual.png", metric),
        plot_importance(fit, folder / "feature_importance.png"),
        plot_theta_star(cands, folder / "theta_star.png"),
    ]
