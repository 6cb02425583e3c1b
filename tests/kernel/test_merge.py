import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.merge import merged_score
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
