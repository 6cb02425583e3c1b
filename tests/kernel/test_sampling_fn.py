import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.sampling_fn import (
    _power_integral_quad,
    expected_from_rank_knots,
    expected_sampling_value,
    expected_tokens_per_domain,
    sampling_value,
)
from quadmix_spark.kernel.theta import Theta, ThetaMismatchError
from tests.kernel._helpers import FAST, SLOW, eps_st, eta_mode_st, eta_unit_st, lam_st, omega_st

eta_any_st = st.one_of(eta_unit_st, st.floats(0.0, 5.0))


def grid_with(omega):
    r = np.concatenate([np.linspace(0.0, 1.0, 2001), [omega, np.nextafter(omega, 2.0), np.nextafter(omega, -1.0)]])
    return np.sort(r[(r >= 0) & (r <= 1)])


@FAST
@given(lam_st, omega_st, eta_any_st, eps_st, eta_mode_st)
def test_non_increasing_in_rank_and_floor_eps(lam, omega, eta, eps, mode):
    r = grid_with(omega)
    s = sampling_value(r, lam, omega, eta, eps, mode)
    assert (np.diff(s) <= 0).all()
    assert (s >= eps).all()


@FAST
@given(lam_st, omega_st, eta_any_st, eps_st, eta_mode_st)
def test_inclusive_cut_off_at_omega(lam, omega, eta, eps, mode):
    at, after = sampling_value(np.array([omega, np.nextafter(omega, 2.0)]), lam, omega, eta, eps, mode)
    core_at_omega = 1.0 if mode == "exponent" else eta  # the sigmoid term is exactly 1 at r = omega
    assert at == core_at_omega + eps
    assert after == eps


@FAST
@given(lam_st, omega_st, eta_unit_st, eps_st)
def test_exponent_mode_retained_range(lam, omega, eta, eps):
    r = np.linspace(0.0, omega, 501)
    s = sampling_value(r, lam, omega, eta, eps)
    assert (s >= 1.0 + eps).all() and (s <= 2.0**eta + eps).all()


def test_vectorized_per_item_parameters_and_nan_rank():
    s = sampling_value(np.array([0.01, 0.01, np.nan]), np.array([10.0, 0.0, 5.0]), 0.05, 1.0, 1e-3)
    assert s[0] > s[1] == 1.0 + 1e-3 and s[2] == 1e-3


@pytest.mark.parametrize(
    "omega,lam,eta,expected",
    [
        (0.05, 1.0, 1.0, 0.051),
        (0.05, 10**1.5, 1.0, 0.069),
        (0.05, 1000.0, 1.0, 0.099),
        (0.1, 1.0, 1.0, 0.103),
        (0.1, 1000.0, 1.0, 0.199),
        (0.05, 1.0, 0.5, 0.051),  # λ = 1: the sigmoid is ~1 whatever η
        (0.1, 1.0, 0.0, 0.1 + 5e-4),
    ],
)
def test_spec_2_5_worked_numbers(omega, lam, eta, expected):
    assert expected_sampling_value(lam, omega, eta, 5e-4) == pytest.approx(expected, abs=1e-3)


def test_limits_small_and_large_lambda_omega():
    assert expected_sampling_value(1e-9, 0.1, 1.0, 0.0) == pytest.approx(0.1, rel=1e-9)
    assert expected_sampling_value(1e6, 0.1, 1.0, 0.0) == pytest.approx(0.2, rel=1e-4)
    assert expected_sampling_value(0.0, 0.07, 0.3, 1e-3) == pytest.approx(0.07 + 1e-3, rel=1e-12)


@FAST
@given(lam_st, omega_st)
def test_closed_form_matches_quadrature_for_eta_one(lam, omega):
    closed = expected_sampling_value(lam, omega, 1.0, 0.0)
    quad = _power_integral_quad(np.array([lam]), np.array([omega]), np.array([1.0]))[0]
    assert closed == pytest.approx(quad, abs=1e-9)


@SLOW
@given(lam_st, omega_st, eta_any_st, eps_st, eta_mode_st)
def test_expectation_matches_mean_over_fine_rank_grid(lam, omega, eta, eps, mode):
    k = 200_000
    mids = (np.arange(k) + 0.5) / k  # r̄ uniform on (0, 1] under token weighting
    mean = sampling_value(mids, lam, omega, eta, eps, mode).mean()
    bound = 1e-6 + (2.0 ** max(eta, 1.0) + eta) * 2 / k  # quadrature + one grid cell at the jump
    assert expected_sampling_value(lam, omega, eta, eps, mode) == pytest.approx(mean, abs=bound)


def test_expected_value_is_vectorized_over_domains():
    lam, omega, eta, eps = np.array([1.0, 31.6, 1000.0]), np.array([0.05, 0.05, 0.1]), np.array([1.0, 0.3, 0.7]), np.full(3, 5e-4)
    vec = expected_sampling_value(lam, omega, eta, eps)
    single = [expected_sampling_value(lam[i], omega[i], eta[i], eps[i]) for i in range(3)]
    np.testing.assert_allclose(vec, single, rtol=1e-14)


def _theta():
    return Theta(("a", "b"), ("x", "y"), np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([10.0, 100.0]),
                 np.array([0.05, 0.1]), np.array([1.0, 0.5]), np.array([1e-4, 0.0]))


def test_expected_tokens_per_domain_by_name_and_by_position():
    theta = _theta()
    per_token = expected_sampling_value(theta.lam, theta.omega, theta.eta, theta.eps)
    np.testing.assert_allclose(expected_tokens_per_domain(theta, {"b": 2e6, "a": 1e6}), [1e6, 2e6] * per_token)
    np.testing.assert_allclose(expected_tokens_per_domain(theta, [1e6, 2e6]), [1e6, 2e6] * per_token)
    with pytest.raises(ThetaMismatchError, match="missing \\['b'\\], extra \\['c'\\]"):
        expected_tokens_per_domain(theta, {"a": 1.0, "c": 2.0})


def test_expected_from_rank_knots_brackets_and_converges():
    theta = _theta()
    k = 100_000
    edges = np.linspace(0.0, 1.0, k + 1)
    tok = np.full(k, 3.0)
    params = (theta.lam[1], theta.omega[1], theta.eta[1], theta.eps[1])
    lower = expected_from_rank_knots(edges[1:], tok, *params)
    upper = expected_from_rank_knots(edges[:-1], tok, *params)
    exact = 3.0 * k * expected_sampling_value(*params)
    assert lower <= exact <= upper
    assert upper - lower <= 3.0 * (2.0 + 1.0)  # one cell's jump, times the cell's tokens
    d = np.repeat([0, 1], k)
    per_dom = expected_from_rank_knots(np.tile(edges[1:], 2), np.tile(tok, 2), theta.lam, theta.omega, theta.eta,
                                       theta.eps, domain_idx=d)
    assert per_dom[1] == pytest.approx(lower, rel=1e-12)


def test_invalid_parameters_raise():
    with pytest.raises(ValueError):
        sampling_value(0.1, -1.0, 0.1, 1.0, 0.0)
    with pytest.raises(ValueError):
        sampling_value(0.1, 1.0, 1.5, 1.0, 0.0)
    with pytest.raises(ValueError):
        expected_sampling_value(1.0, 0.1, 1.0, 0.0, eta_mode="power")


@FAST
@given(st.floats(1e-2, 1000.0), st.floats(0.01, 1.0))
def test_quadrature_matches_closed_form_for_eta_two(lam, omega):
    # ∫ (2σ(s))² ds = 4 (ln(1 + e^s) - σ(s)) + C
    s = lam * omega
    exact = 4.0 * ((np.logaddexp(0.0, s) - np.log(2.0)) - (1.0 / (1.0 + np.exp(-s)) - 0.5)) / lam
    assert expected_sampling_value(lam, omega, 2.0, 0.0) == pytest.approx(exact, rel=1e-9, abs=1e-12)
