"""The kernel end to end: σ → q̄ → r̄ → S → copies; realized tokens match expected tokens."""

import numpy as np

from quadmix_spark.kernel import (
    expected_from_rank_knots,
    expected_tokens_per_domain,
    hash_uniform,
    map_scores,
    merged_score,
    percentile_knots,
    realized_copies,
    sample_thetas,
    sampling_value,
    within_domain_rank,
)

DOMAINS = ("Health", "Science", "Sports", "News")
CRITERIA = ("askllm", "fineweb_edu", "dclm")


def test_realized_tokens_match_expected_tokens_within_sampling_error():
    rng = np.random.default_rng(99)
    n = 40_000
    ids = [f"d{i}" for i in range(n)]
    dom = rng.integers(0, len(DOMAINS), n)
    tokens = rng.integers(50, 2000, n).astype(float)
    raw = rng.random((n, len(CRITERIA)))
    sigma = np.column_stack(
        [map_scores(raw[:, j], percentile_knots(raw[:, j], tokens, n_knots=1001)) for j in range(len(CRITERIA))]
    )
    theta = sample_thetas(DOMAINS, CRITERIA, 1, seed=4)[0]
    rbar = within_domain_rank(merged_score(sigma, dom, theta.alpha), dom, tokens)
    s = sampling_value(rbar, theta.lam[dom], theta.omega[dom], theta.eta[dom], theta.eps[dom])
    copies = realized_copies(s, hash_uniform(ids, theta.theta_key, seed=0))

    expected = expected_from_rank_knots(rbar, tokens, theta.lam, theta.omega, theta.eta, theta.eps, domain_idx=dom)
    realized = np.bincount(dom, weights=copies * tokens, minlength=len(DOMAINS))
    frac = s - np.floor(s)
    sd = np.sqrt(np.bincount(dom, weights=frac * (1 - frac) * tokens**2, minlength=len(DOMAINS)))
    assert (np.abs(realized - expected) <= 5 * sd + 1e-9).all()

    # and the per-item sum agrees with the analytic T_m·E_m[S] up to the discreteness of r̄
    domain_tokens = np.bincount(dom, weights=tokens, minlength=len(DOMAINS))
    analytic = expected_tokens_per_domain(theta, domain_tokens)
    np.testing.assert_allclose(expected, analytic, rtol=0.03)
