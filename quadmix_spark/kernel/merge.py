"""Merged quality score q̄ (Eq. 1, spec §2.3).

For a document x in domain m = d_x with normalized scores σ_{x,1..N}::

    q̄_x = Σ_n α[m, n] · σ[x, n]

α rows are on the simplex (Theta validates that), so q̄ is a convex combination of the σ's and
stays smaller = better; with percentile σ, q̄ ∈ (0, 1].
"""

from __future__ import annotations

import numpy as np

from quadmix_spark.kernel._arrays import as_domain_idx


def merged_score(sigma, domain_idx, alpha) -> np.ndarray:
    """q̄ of every document: ``sigma`` (n_docs, N), ``domain_idx`` (n_docs,) ints in [0, M),
    ``alpha`` (M, N) → (n_docs,) float64.  NaN in σ propagates to q̄."""
    sig = np.asarray(sigma, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    if sig.ndim != 2:
        raise ValueError(f"sigma must be 2-D (n_docs, N), got shape {sig.shape}")
    if a.ndim != 2 or a.shape[1] != sig.shape[1]:
        raise ValueError(f"alpha must be (M, {sig.shape[1]}), got shape {a.shape}")
    d = as_domain_idx(domain_idx, sig.shape[0], a.shape[0])
    w = a[d]
    if sig.shape[1] == 0:
        return np.zeros(sig.shape[0])
    # summed term by term in criterion order, each product rounded (no fused multiply-add, which einsum may
    # use): the same float operations as the sampler's SQL expression, so both give q̄ bit for bit
    q = sig[:, 0] * w[:, 0]
    for n in range(1, sig.shape[1]):
        q = q + sig[:, n] * w[:, n]
    return q
