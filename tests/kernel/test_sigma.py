import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.sigma import (
    Knots,
    flipped_percentile,
    map_scores,
    percentile_knots,
    zscore_knots,
    zscore_map,
    zscore_params,
)
from tests.kernel._helpers import FAST, weighted_scores


def brute_sigma(scores, weights):
    total = weights.sum()
    return np.array([weights[scores >= s].sum() / total for s in scores])


@FAST
@given(weighted_scores())
def test_flipped_percentile_matches_brute_force(data):
    scores, weights = data
    np.testing.assert_allclose(flipped_percentile(scores, weights), brute_sigma(scores, weights), rtol=0, atol=1e-12)


@FAST
@given(weighted_scores(allow_zero=False))
def test_smaller_sigma_is_better_and_in_unit_interval(data):
    scores, weights = data
    sig = flipped_percentile(scores, weights)
    order = np.argsort(scores, kind="stable")
    assert (np.diff(sig[order]) <= 0).all()  # higher raw score -> smaller sigma
    strictly_better = scores[:, None] > scores[None, :]
    assert (sig[:, None] < sig[None, :])[strictly_better].all()
    assert (sig > 0).all() and (sig <= 1).all()
    assert sig[scores == scores.min()].max() == 1.0


@FAST
@given(weighted_scores(max_size=400, n_levels=400), st.integers(2, 40))
def test_knots_mapping_within_documented_bound(data, n_knots):
    scores, weights = data
    knots = percentile_knots(scores, weights, n_knots=n_knots, criterion="c")
    assert 1 <= knots.xs.size <= n_knots
    max_share = np.bincount(np.unique(scores, return_inverse=True)[1], weights=weights).max() / weights.sum()
    assert knots.error_bound <= 1 / (n_knots - 1) + max_share + 1e-15
    err = np.abs(map_scores(scores, knots) - flipped_percentile(scores, weights))
    assert err.max() <= knots.error_bound + 1e-12
    exact_at_knots = np.isin(scores, knots.xs)
    np.testing.assert_allclose(err[exact_at_knots], 0.0, atol=1e-15)


def test_knots_error_on_a_large_sample_is_about_one_over_n_knots():
    rng = np.random.default_rng(7)
    scores = rng.beta(0.5, 3.0, 200_000)
    weights = rng.integers(1, 2000, scores.size).astype(float)
    knots = percentile_knots(scores, weights, n_knots=1001)
    err = np.abs(map_scores(scores, knots) - flipped_percentile(scores, weights))
    assert knots.xs.size <= 1001
    assert err.max() <= 1 / 1000 + weights.max() / weights.sum()


def test_knots_exact_when_few_distinct_values_and_clamped_outside():
    scores = np.array([0.2, 0.5, 0.5, 0.9])
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    knots = percentile_knots(scores, weights, n_knots=5)
    assert knots.error_bound == 0.0
    np.testing.assert_array_equal(map_scores(scores, knots), flipped_percentile(scores, weights))
    out = map_scores(np.array([-1.0, 5.0, np.nan]), knots)
    assert out[0] == 1.0 and out[1] == pytest.approx(0.4) and np.isnan(out[2])


def test_knots_dict_round_trip():
    rng = np.random.default_rng(1)
    knots = percentile_knots(rng.random(500), rng.random(500), n_knots=17, criterion="dclm")
    back = Knots.from_dict(knots.to_dict())
    assert back.criterion == "dclm" and back.method == "percentile"
    np.testing.assert_array_equal(back.xs, knots.xs)
    np.testing.assert_array_equal(back.ys, knots.ys)
    z = Knots.from_dict(zscore_knots([1.0, 2.0, 4.0], [1.0, 1.0, 2.0], "fw").to_dict())
    assert z.method == "zscore" and z.mean == pytest.approx(2.75)


@pytest.mark.parametrize(
    "bad",
    [
        {"criterion": "c", "method": "percentile", "xs": [1.0, 0.5], "ys": [1.0, 0.5]},
        {"criterion": "c", "method": "percentile", "xs": [0.0, 1.0], "ys": [0.5, 1.0]},
        {"criterion": "c", "method": "rank", "xs": [0.0], "ys": [1.0]},
    ],
)
def test_knots_reject_invalid_tables(bad):
    with pytest.raises(ValueError):
        Knots.from_dict(bad)


@FAST
@given(weighted_scores(min_size=2, allow_zero=False))
def test_zscore_is_flipped_and_standardized(data):
    scores, weights = data
    mean, std = zscore_params(scores, weights)
    z = zscore_map(scores, mean, std)
    if std == 0:
        assert (z == 0).all()
        return
    order = np.argsort(scores, kind="stable")
    assert (np.diff(z[order]) <= 1e-12).all()  # higher raw score -> smaller z
    assert np.dot(weights, z) / weights.sum() == pytest.approx(0.0, abs=1e-9)
    assert np.dot(weights, z**2) / weights.sum() == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_array_equal(map_scores(scores, zscore_knots(scores, weights)), z)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        flipped_percentile([1.0, np.nan], [1.0, 1.0])
    with pytest.raises(ValueError):
        flipped_percentile([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError):
        flipped_percentile([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError):
        percentile_knots([1.0, 2.0], [1.0, 1.0], n_knots=1)


def test_a_missing_score_gets_the_worst_sigma_of_the_knots_alone():
    scores, weights = np.array([0.2, 0.9, 0.5, 0.7]), np.array([1.0, 2.0, 1.0, 3.0])
    z = zscore_knots(scores, weights, "c")
    assert z.missing_sigma() == zscore_map(np.array([0.2]), z.mean, z.std)[0] > 0  # the lowest score's σ: the worst
    assert z.missing_sigma() == Knots.from_dict(z.to_dict()).missing_sigma()
    assert percentile_knots(scores, weights, criterion="c").missing_sigma() == 1.0
    assert zscore_knots(np.array([3.0, 3.0]), np.array([1.0, 1.0])).missing_sigma() == 0.0  # constant criterion
    with pytest.raises(ValueError, match="run `quadmix normalize` again"):  # knots stored before `missing` existed
        Knots("c", "zscore", mean=0.5, std=0.1).missing_sigma()
