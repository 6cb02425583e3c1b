import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.merge import merged_score, saturate
from quadmix_spark.kernel.theta import sample_theta_matrix
from tests.kernel._helpers import FAST


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 5), st.integers(1, 4))
def test_merged_score_is_eq1_and_a_convex_combination(seed, n_docs, n_domains, n_criteria):
    rng = np.random.default_rng(seed)
    sigma = rng.random((n_docs, n_criteria))
    dom = rng.integers(0, n_domains, n_docs)
    alpha = sample_theta_matrix(1, n_domains, n_criteria, rng).alpha[0]
    q = merged_score(sigma, dom, alpha)
    expected = [sum(alpha[dom[x], n] * sigma[x, n] for n in range(n_criteria)) for x in range(n_docs)]
    np.testing.assert_allclose(q, expected, rtol=1e-12, atol=1e-15)
    assert (q >= sigma.min(axis=1) - 1e-12).all() and (q <= sigma.max(axis=1) + 1e-12).all()


def test_merged_score_rejects_bad_shapes_and_domains():
    sigma = np.ones((3, 2))
    alpha = np.full((2, 2), 0.5)
    with pytest.raises(ValueError):
        merged_score(sigma, [0, 1, 2], alpha)  # domain 2 does not exist
    with pytest.raises(ValueError):
        merged_score(sigma, [0, 1, 1], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError):
        merged_score(sigma, [0, 1], alpha)


def test_saturation_keeps_0_and_1_is_monotone_and_favours_the_best_of_the_criteria():
    p = np.linspace(0.0, 1.0, 10_001)
    for c in (0.001, 0.01, 0.3, 10.0):
        g = saturate(p, c)
        assert g[0] == 0.0 and g[-1] == 1.0 and (np.diff(g) > 0).all() and (g >= p).all()
    assert np.array_equal(saturate(p, None), p)
    # equal weights: a page at the top 1% of one criterion and middling on the other now ranks ahead of a page
    # at 30% on both (without saturation it ranks behind)
    sigma, dom, alpha = np.array([[0.01, 0.7], [0.3, 0.3]]), [0, 0], np.full((1, 2), 0.5)
    plain, sat = merged_score(sigma, dom, alpha), merged_score(sigma, dom, alpha, saturation=0.01)
    assert plain[0] > plain[1] and sat[0] < sat[1]
    np.testing.assert_array_equal(sat, merged_score(saturate(sigma, 0.01), dom, alpha))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="saturation"):
            saturate(p, bad)
