import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.rank import within_domain_rank
from tests.kernel._helpers import FAST


def brute_rank(q, d, w):
    out = np.empty(q.size)
    for x in range(q.size):
        same = d == d[x]
        total = w[same].sum()
        out[x] = w[same & (q <= q[x])].sum() / total if total > 0 else 1.0
    return out


@st.composite
def ranked_inputs(draw, allow_zero=True):
    n = draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(0, draw(st.integers(1, 10)), n) / 10.0  # many ties
    d = rng.integers(0, draw(st.integers(1, 4)), n)
    w = rng.integers(0 if allow_zero else 1, 20, n).astype(float)
    return q, d, w


@FAST
@given(ranked_inputs())
def test_matches_brute_force_definition_with_ties(inputs):
    q, d, w = inputs
    np.testing.assert_allclose(within_domain_rank(q, d, w), brute_rank(q, d, w), rtol=0, atol=1e-12)


@FAST
@given(ranked_inputs(allow_zero=False))
def test_rank_in_unit_interval_best_smallest_worst_one(inputs):
    q, d, w = inputs
    r = within_domain_rank(q, d, w)
    assert (r > 0).all() and (r <= 1).all()
    for m in np.unique(d):
        rm, qm = r[d == m], q[d == m]
        assert rm[qm == qm.min()].max() == rm.min()
        assert (rm[qm == qm.max()] == 1.0).all()
        # tie inclusive: the best tie group's rank is its whole token share
        assert rm[qm == qm.min()][0] == w[(d == m) & (q == qm.min())].sum() / w[d == m].sum()


@FAST
@given(ranked_inputs(), st.integers(0, 2**32 - 1))
def test_permutation_invariance(inputs, seed):
    q, d, w = inputs
    perm = np.random.default_rng(seed).permutation(q.size)
    np.testing.assert_array_equal(within_domain_rank(q, d, w)[perm], within_domain_rank(q[perm], d[perm], w[perm]))


def test_zero_weight_domain_gets_worst_rank_and_empty_input():
    q = np.array([0.1, 0.2, 0.3, 0.1])
    d = np.array([0, 0, 1, 1])
    w = np.array([0.0, 0.0, 5.0, 5.0])
    np.testing.assert_array_equal(within_domain_rank(q, d, w), [1.0, 1.0, 1.0, 0.5])
    assert within_domain_rank([], np.array([], dtype=int), []).shape == (0,)


def test_large_input_is_exact_against_sorted_cumsum():
    rng = np.random.default_rng(3)
    n = 200_000
    q = rng.random(n).round(3)
    d = rng.integers(0, 26, n)
    w = rng.integers(1, 5000, n).astype(float)
    r = within_domain_rank(q, d, w)
    m = d == 5
    qm, wm = q[m], w[m]
    order = np.argsort(qm)
    cum = np.cumsum(wm[order])
    last_of_value = np.searchsorted(qm[order], qm, side="right") - 1
    np.testing.assert_array_equal(r[m], cum[last_of_value] / wm.sum())
