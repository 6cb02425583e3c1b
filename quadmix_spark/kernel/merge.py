"""Merged quality score q̄ (Eq. 1, spec §2.3).

For a document x in domain m = d_x with normalized scores σ_{x,1..N}::

    q̄_x = Σ_n α[m, n] · σ[x, n]

α rows are on the simplex (Theta validates that), so q̄ is a convex combination of the σ's and
stays smaller = better; with percentile σ, q̄ ∈ (0, 1].

Saturation (``sampling.sigma_saturation`` = c; not in the paper, whose σ is unspecified, spec §5-A3): each
percentile σ enters the sum as g(σ) = (1 + c)·σ / (σ + c) instead, a monotone map of [0, 1] onto itself that
is steep near 0 and flat beyond c. With c small, a document in the top c of any one criterion gets a q̄ well
below one that is merely good on all of them, so the merge behaves like a soft "best of the criteria" (the
``mix`` baseline's rule) rather than their average; c → ∞ gives σ back. Only a product and a division, in a
fixed order: the same bits in numpy and in Spark SQL.
"""

from __future__ import annotations

import numpy as np

from quadmix_spark.kernel._arrays import as_domain_idx


def saturate(sigma, c: float | None) -> np.ndarray:
    """g(σ) = (1 + c)·σ / (σ + c) element-wise (σ itself when ``c`` is None); g(0) = 0, g(1) = 1."""
    sig = np.asarray(sigma, dtype=np.float64)
    if c is None:
        return sig
    check_saturation(c)
    return (sig * (1.0 + c)) / (sig + c)


def check_saturation(c: float | None) -> None:
    if c is not None and not (np.isfinite(c) and c > 0):
        raise ValueError(f"sigma saturation must be a finite number > 0 (or None), got {c!r}")


def merged_score(sigma, domain_idx, alpha, saturation: float | None = None) -> np.ndarray:
    """q̄ of every document: ``sigma`` (n_docs, N), ``domain_idx`` (n_docs,) ints in [0, M),
    ``alpha`` (M, N) → (n_docs,) float64, each σ through :func:`saturate` first when ``saturation`` is given.
    NaN in σ propagates to q̄."""
    sig = saturate(sigma, saturation)
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
