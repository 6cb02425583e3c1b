"""Token-weighted within-domain rank r̄ (Eq. 2, spec §2.4), exact, for in-memory arrays.

For x in domain m::

    r̄_x = W({y : d_y = m, q̄_y <= q̄_x}) / W({y : d_y = m})        W = sum of weights (tokens)

Ties are inclusive: every member of a tie group gets the cumulative weight at the END of its group.
Smaller q̄ is better, so the best item of a domain has the smallest r̄ and the worst tie group has
exactly 1.0.

Weights are taken as given (no ``max(tokens, 1)`` here; that is the caller's policy):

- zero-weight items are ranked like any other; r̄_x = 0 happens only if x and every item of its
  domain that is at least as good as x all have weight 0 (so in general r̄ ∈ [0, 1], and
  r̄ ∈ (0, 1] whenever all weights are > 0);
- a domain whose total weight is 0 gets r̄ = 1.0 for all its items (treated as the worst rank, so
  S = ε there); nothing is divided by zero.

Implementation: one ``lexsort`` by (domain, q̄), a global cumulative sum, per-domain offsets, and
tie-group ends — no Python loop over documents.  With integer token counts below 2**53 in total the
cumulative sums are exact.
"""

from __future__ import annotations

import numpy as np

from quadmix_spark.kernel._arrays import as_1d_float, as_domain_idx, as_weights


def within_domain_rank(qbar, domain_idx, weights) -> np.ndarray:
    """r̄ of every item: ``qbar`` (n,) finite floats, ``domain_idx`` (n,) ints >= 0,
    ``weights`` (n,) non-negative → (n,) float64 in [0, 1] (see module docstring)."""
    q = as_1d_float(qbar, "qbar")
    n = q.shape[0]
    d = as_domain_idx(domain_idx, n)
    w = as_weights(weights, n)
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    order = np.lexsort((q, d))  # primary key: domain, secondary: q̄ ascending (best first)
    ds, qs, ws = d[order], q[order], w[order]
    cum = np.cumsum(ws)

    new_domain = ds[1:] != ds[:-1]
    dom_start = np.flatnonzero(np.r_[True, new_domain])
    dom_end = np.flatnonzero(np.r_[new_domain, True])
    dom_of_pos = np.cumsum(np.r_[True, new_domain]) - 1
    before = np.r_[0.0, cum][dom_start]  # cumulative weight before each domain's first item
    within = cum - before[dom_of_pos]

    group_end_flag = np.r_[new_domain | (qs[1:] != qs[:-1]), True]
    group_end = np.flatnonzero(group_end_flag)
    group_of_pos = np.cumsum(np.r_[True, group_end_flag[:-1]]) - 1
    tied = within[group_end][group_of_pos]

    total = within[dom_end][dom_of_pos]
    positive = total > 0
    r = np.ones(n, dtype=np.float64)
    np.divide(tied, total, out=r, where=positive)
    out[order] = r
    return out
