"""What a trained quality scorer measures: quality, or length and source (pure functions, no Spark).

``train-scorers`` holds out reference text against web documents; a high held-out AUC there may only mean
the two sources differ in length or layout. The report puts beside it:

- ``auc_within_length``: the held-out AUC computed inside each length bin (half-octaves of characters,
  :func:`quadmix_spark.curation.quality_examples.length_bins`) and averaged with the bins' sizes as weights (bins
  holding one class only are left out): what is left when length cannot help;
- on a sample of corpus documents, scored whole as ``annotate`` scores them: ``spearman_length``, the rank
  correlation of the score with the document's length (log characters), and the share of the top 10% of
  scores each domain takes against its share of the sample (``top10_max_domain_share`` and the domain);
- warnings (:func:`report_warnings`) when a score is mostly length (``|spearman_length| >= 0.5``, or the
  within-length AUC more than 0.1 below the AUC) or mostly one domain (one domain holds at least half of the
  top 10% and at least 3 times its share of the sample).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from quadmix_spark.curation.quality_examples import BIN_MIN_CHARS, length_bins

TOP_SHARE = 0.10
LENGTH_RHO = 0.5
LENGTH_AUC_GAP = 0.1
DOMAIN_SHARE, DOMAIN_LIFT = 0.5, 3.0


def auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (ties count half); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def auc_by_length(positive: np.ndarray, scores: np.ndarray, lengths: np.ndarray) -> tuple[float, pd.DataFrame]:
    """(size-weighted mean AUC over the length bins holding both classes, one row per bin: ``bin``,
    ``min_chars``, ``n``, ``positives``, ``auc``)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    bins = length_bins(lengths)
    rows = []
    for b in np.unique(bins):
        m = bins == b
        rows.append({"bin": int(b), "min_chars": int(BIN_MIN_CHARS * 2 ** (b / 2)), "n": int(m.sum()),
                     "positives": int(positive[m].sum()), "auc": auc(positive[m], scores[m])})
    table = pd.DataFrame(rows, columns=["bin", "min_chars", "n", "positives", "auc"])
    both = table[table["auc"].notna()]
    mean = float(np.average(both["auc"], weights=both["n"])) if len(both) else float("nan")
    return mean, table


def corpus_report(scores: np.ndarray, lengths: np.ndarray, domains: np.ndarray | None, top: float = TOP_SHARE) -> tuple[dict, pd.DataFrame]:
    """Metrics of a score over corpus documents (see the module docstring) and the per-domain table
    (``domain``, ``share``: of the sample, ``top_share``: of its top ``top`` by score)."""
    from scipy.stats import spearmanr

    scores = np.asarray(scores, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    out: dict = {"report_docs": int(len(scores))}
    if len(scores) >= 3 and np.ptp(scores) > 0 and np.ptp(lengths) > 0:
        out["spearman_length"] = float(spearmanr(scores, np.log1p(lengths)).statistic)
    else:
        out["spearman_length"] = float("nan")
    table = pd.DataFrame(columns=["domain", "share", "top_share"])
    if domains is not None and len(scores):
        n_top = max(1, int(round(top * len(scores))))
        best = np.argsort(-scores, kind="stable")[:n_top]
        d = pd.Series(np.asarray(domains, dtype=object)).fillna("(none)").astype(str)
        table = pd.DataFrame({"share": d.value_counts(normalize=True), "top_share": d.iloc[best].value_counts(normalize=True)})
        table = table.fillna(0.0).rename_axis("domain").reset_index().sort_values("top_share", ascending=False, kind="stable")
        first = table.iloc[0]
        out.update({"top10_max_domain": str(first["domain"]), "top10_max_domain_share": float(first["top_share"]),
                    "top10_max_domain_base_share": float(first["share"])})
    return out, table.reset_index(drop=True)


def report_warnings(metrics: dict) -> list[str]:
    """Why a quality score may judge length or source rather than quality (empty when nothing stands out)."""
    out = []
    rho = metrics.get("spearman_length", float("nan"))
    if np.isfinite(rho) and abs(rho) >= LENGTH_RHO:
        out.append(f"mostly length: Spearman ρ {rho:+.2f} between the score and document length")
    a, within = metrics.get("auc", float("nan")), metrics.get("auc_within_length", float("nan"))
    if np.isfinite(a) and np.isfinite(within) and a - within > LENGTH_AUC_GAP:
        out.append(f"mostly length: held-out AUC {a:.3f} falls to {within:.3f} within length bins")
    share, base = metrics.get("top10_max_domain_share"), metrics.get("top10_max_domain_base_share")
    if share is not None and share >= DOMAIN_SHARE and share >= DOMAIN_LIFT * max(base, 1e-12):
        out.append(f"mostly one domain: {metrics['top10_max_domain']!r} holds {share:.0%} of the top 10% of scores "
                   f"({base:.0%} of the documents)")
    return out


def plot_report(name: str, bins: pd.DataFrame, scores: np.ndarray, lengths: np.ndarray, domains: pd.DataFrame,
                path: str | Path) -> Path:
    """Three panels: held-out AUC per length bin; score against length on the corpus sample; domain shares of
    the sample and of its top 10%."""
    from quadmix_spark.core.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ok = bins[bins["auc"].notna()]
    axes[0].bar([str(x) for x in ok["min_chars"]], ok["auc"])
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1)
    axes[0].set_xlabel("length bin (characters from)")
    axes[0].set_ylabel("held-out AUC")
    axes[0].tick_params(axis="x", rotation=60, labelsize=7)
    axes[1].scatter(np.maximum(lengths, 1), scores, s=4, alpha=0.4)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("document length (characters)")
    axes[1].set_ylabel("score")
    top = domains.head(12)
    y = np.arange(len(top))
    axes[2].barh(y - 0.2, top["share"], height=0.4, label="documents")
    axes[2].barh(y + 0.2, top["top_share"], height=0.4, label="top 10% by score")
    axes[2].set_yticks(y, top["domain"], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].legend(fontsize=7)
    fig.suptitle(f"quality scorer {name}")
    return save(fig, path, dpi=100)
