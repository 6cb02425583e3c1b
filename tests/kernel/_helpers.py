"""Shared hypothesis settings and strategies for the kernel tests (deterministic: derandomize)."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

lam_st = st.one_of(st.just(0.0), st.floats(0.0, 1000.0), st.floats(1e-6, 1.0))
omega_st = st.one_of(st.just(0.0), st.just(0.1), st.floats(0.0, 1.0))
eta_unit_st = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
eps_st = st.one_of(st.just(0.0), st.floats(0.0, 1e-3))
eta_mode_st = st.sampled_from(["exponent", "multiplier"])


@st.composite
def weighted_scores(draw, min_size=1, max_size=60, n_levels=None, allow_zero=True):
    """(scores, weights) with ties likely and a positive total weight."""
    n = draw(st.integers(min_size, max_size))
    levels = draw(st.integers(1, 8)) if n_levels is None else n_levels
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(float) / levels + rng.choice([0.0, 0.5], n) * rng.random(n)
    weights = rng.integers(0 if allow_zero else 1, 50, n).astype(float)
    weights[rng.integers(n)] += 1.0  # positive total
    return scores, weights
