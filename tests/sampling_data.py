"""Generated documents + annotations for sampler tests: skewed domains, ties, three criteria."""

from __future__ import annotations

import numpy as np

from quadmix_spark.kernel.theta import Theta, sample_thetas
from quadmix_spark.core.storage import write_table

CRITERIA = ["edu", "dclm", "ref"]


def make_corpus(spark, cfg, n=2000, seed=3, big_share=0.9, n_domains=5, partitions=3):
    """Write `documents` and `annotations` tables; return the numpy arrays behind them."""
    rng = np.random.default_rng(seed)
    domains = np.array([f"dom{i}" for i in range(n_domains)])
    d = np.where(rng.random(n) < big_share, 0, rng.integers(1, n_domains, n))
    tokens = rng.integers(20, 400, n)
    scores = {
        "edu": np.round(rng.normal(2.0, 1.0, n), 1),  # coarse: many ties
        "dclm": rng.beta(0.5, 0.5, n),
        "ref": rng.random(n),
    }
    ids = [f"doc-{i:05d}" for i in range(n)]
    docs = [(ids[i], f"text of document {i} " * 3, int(tokens[i])) for i in range(n)]
    ann = [(ids[i], str(domains[d[i]]), 0.9, int(tokens[i]), *(float(scores[c][i]) for c in CRITERIA)) for i in range(n)]
    write_table(
        spark.createDataFrame(docs, "doc_id string, text string, n_tokens long").repartition(partitions),
        cfg.storage.table("documents"), mode="overwrite",
    )
    write_table(
        spark.createDataFrame(ann, "doc_id string, domain string, domain_conf double, n_tokens long, "
                              + ", ".join(f"q_{c} double" for c in CRITERIA)).repartition(partitions),
        cfg.storage.table("annotations"), mode="overwrite",
    )
    return {"ids": ids, "domain_idx": d, "domains": [str(x) for x in domains], "tokens": tokens, "scores": scores}


def a_theta(domains, seed=1, **fixed) -> Theta:
    t = sample_thetas(domains, CRITERIA, 1, seed)[0]
    if not fixed:
        return t
    vals = {k: np.full(len(domains), v, dtype=float) for k, v in fixed.items()}
    return Theta(t.domains, t.criteria, t.alpha, vals.get("lam", t.lam), vals.get("omega", t.omega),
                 vals.get("eta", t.eta), vals.get("eps", t.eps))
