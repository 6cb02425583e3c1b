"""Sampling function S(r̄) (Eq. 3, spec §2.5, §5-A1) and its expectation per domain.

For an item of rank r̄ in a domain with parameters (λ, ω, η, ε)::

    g(r̄) = 2 / (1 + exp(-λ (ω - r̄)))                       ∈ [1, 2) for r̄ <= ω
    core = g ** η          (eta_mode="exponent", default)   or   η · g   (eta_mode="multiplier")
    S(r̄) = core + ε        if r̄ <= ω        (inclusive cut-off: S(ω) = 1^η + ε = 1 + ε)
    S(r̄) = ε               if r̄ >  ω

S is non-increasing in r̄ and S >= ε.  With the exponent reading and η ∈ [0, 1],
S ∈ [1 + ε, 2^η + ε] on r̄ <= ω (multiplier reading: [η + ε, 2η + ε]).  A NaN rank is not <= ω and gets S = ε.

Under token weighting r̄ is uniform on (0, 1], so the expected output tokens per input token of a
domain are::

    E[S] = ∫_0^ω (core(r) + ε) dr + ∫_ω^1 ε dr = ∫_0^ω core(r) dr + ε

Note: spec §2.5 writes the last term as ε(1 − ω).  That drops the ε that Eq. 3 also adds on the
retained region r̄ <= ω; the difference is ε·ω <= 1e-4 for Algorithm 1's ranges (the spec's worked
numbers agree with either within 0.001).  This module follows Eq. 3, so E[S] equals the mean of S
over uniform ranks exactly (tested).

Closed form for the exponent reading with η = 1 (and, times η, for the multiplier reading)::

    ∫_0^ω g = (2/λ) ln((1 + e^{λω}) / 2) = ω + (2/λ) ln cosh(λω/2)        (= ω when λ = 0)

evaluated without overflow or cancellation for any λω.  Other η use 12-node Gauss–Legendre
quadrature after the substitution w = e^{-λ(ω - r)}, which makes the integrand analytic on the
whole interval (see ``_power_integral_quad``): error ~1e-12 or better, far below the 1e-6 asked.

Parameters broadcast against each other and against r̄ (index per-domain arrays with the domain
index of each item to get per-item parameters).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from quadmix_spark.kernel._arrays import as_domain_idx
from quadmix_spark.kernel.theta import ThetaMismatchError

ETA_MODES = ("exponent", "multiplier")

_NODES = 12
_GL_X, _GL_W = np.polynomial.legendre.leggauss(_NODES)
_CHUNK = 1 << 15


def _check_mode(eta_mode: str) -> None:
    if eta_mode not in ETA_MODES:
        raise ValueError(f"eta_mode must be one of {ETA_MODES}, got {eta_mode!r}")


def _params(lam, omega, eta, eps) -> tuple[np.ndarray, ...]:
    lam, omega, eta, eps = (np.asarray(v, dtype=np.float64) for v in (lam, omega, eta, eps))
    for name, v in (("lam", lam), ("omega", omega), ("eta", eta), ("eps", eps)):
        if not np.isfinite(v).all():
            raise ValueError(f"{name} must be finite")
    if (lam < 0).any():
        raise ValueError("lam must be >= 0")
    if ((omega < 0) | (omega > 1)).any():
        raise ValueError("omega must be in [0, 1]")
    if (eta < 0).any():
        raise ValueError("eta must be >= 0")
    if (eps < 0).any():
        raise ValueError("eps must be >= 0")
    return lam, omega, eta, eps


def sampling_value(rbar, lam, omega, eta, eps, eta_mode: str = "exponent") -> np.ndarray:
    """S(r̄) of Eq. 3, vectorized and broadcast over all arguments (see module docstring)."""
    _check_mode(eta_mode)
    lam, omega, eta, eps = _params(lam, omega, eta, eps)
    r = np.asarray(rbar, dtype=np.float64)
    keep = r <= omega
    t = np.where(keep, omega - r, 0.0)  # >= 0 where kept, so exp(-λt) ∈ (0, 1]: no overflow
    g = 2.0 / (1.0 + np.exp(-lam * t))
    core = g**eta if eta_mode == "exponent" else eta * g
    return np.where(keep, core + eps, eps + np.zeros_like(core))


def _log_cosh(y: np.ndarray) -> np.ndarray:
    """ln cosh(y) for y >= 0, accurate for tiny y and finite for huge y."""
    small = np.minimum(y, 1.0)
    via_sinh = np.log1p(2.0 * np.sinh(small / 2.0) ** 2)
    via_exp = y + np.log1p(np.exp(-2.0 * np.maximum(y, 1.0))) - np.log(2.0)
    return np.where(y < 1.0, via_sinh, via_exp)


def _sigmoid_integral(lam: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """∫_0^ω 2/(1+e^{-λ(ω-r)}) dr = ω (1 + ln cosh(y) / y), y = λω/2, in closed form.

    ln cosh(y)/y → y/2 as y → 0 (used below y = 1e-6, relative error < 1e-12), so λ = 0 and
    subnormal λ give ω without dividing by λ."""
    y = lam * omega / 2.0
    tiny = y < 1e-6
    safe_y = np.where(tiny, 1.0, y)
    ratio = np.where(tiny, y / 2.0, _log_cosh(safe_y) / safe_y)
    return omega * (1.0 + ratio)


def _power_integral_quad(lam: np.ndarray, omega: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """∫_0^ω (2/(1+e^{-λ(ω-r)}))^η dr for 1-D inputs of equal length, by Gauss–Legendre.

    With s = λ(ω - r) and w = e^{-s}, f = 2^η (1+w)^{-η}, so::

        ∫_0^ω f dr = 2^η (ω - (1/λ) ∫_{e^{-λω}}^1 g(w) dw),   g(w) = (1 - (1+w)^{-η}) / w

    g is analytic on [0, 1] (its only singularity is at w = -1), so 12 nodes give ~1e-15 relative
    accuracy for any λ, ω (no saturation cut-off needed).  For λω < 1e-6 the expansion
    ω + η λ ω² / 4 is used (error ~ η² λ² ω³ / 24).
    """
    out = np.empty(lam.shape[0], dtype=np.float64)
    for lo in range(0, lam.shape[0], _CHUNK):
        la, om, et = lam[lo : lo + _CHUNK], omega[lo : lo + _CHUNK], eta[lo : lo + _CHUNK]
        x = la * om
        small = x < 1e-6
        safe = np.where(small, 1.0, la)
        a = np.exp(-np.where(small, 1.0, x))  # lower limit e^{-λω}
        w = a[:, None] + (1.0 - a)[:, None] * (_GL_X[None, :] + 1.0) / 2.0
        g = -np.expm1(-et[:, None] * np.log1p(w)) / w
        integral_g = -np.expm1(-np.where(small, 1.0, x)) * (g @ _GL_W) / 2.0  # (1 - a)·mean(g)
        big = 2.0**et * (om - integral_g / safe)
        out[lo : lo + _CHUNK] = np.where(small, om + et * x * om / 4.0, big)
    return out


def expected_sampling_value(lam, omega, eta, eps, eta_mode: str = "exponent") -> np.ndarray:
    """E_m[S] = ∫_0^ω core(r) dr + ε for r̄ uniform on (0, 1]; broadcast over domains."""
    _check_mode(eta_mode)
    lam, omega, eta, eps = np.broadcast_arrays(*_params(lam, omega, eta, eps))
    shape = lam.shape
    lam, omega, eta, eps = (v.ravel() for v in (lam, omega, eta, eps))
    closed = _sigmoid_integral(lam, omega)
    if eta_mode == "multiplier":
        integral = eta * closed
    else:
        integral = np.where(eta == 0, omega, closed)
        general = (eta != 0) & (eta != 1)
        if general.any():
            integral = integral.copy()
            integral[general] = _power_integral_quad(lam[general], omega[general], eta[general])
    return (integral + eps).reshape(shape)


def expected_tokens_per_domain(theta, domain_tokens, eta_mode: str = "exponent") -> np.ndarray:
    """Expected output tokens T_m · E_m[S] per domain, in ``theta.domains`` order.

    ``domain_tokens``: a mapping domain name → T_m (must name exactly θ's domains; otherwise
    :class:`~quadmix_spark.kernel.theta.ThetaMismatchError`), or an array aligned with
    ``theta.domains``.
    """
    if isinstance(domain_tokens, Mapping):
        missing = [d for d in theta.domains if d not in domain_tokens]
        extra = sorted(str(d) for d in domain_tokens if d not in set(theta.domains))
        if missing or extra:
            raise ThetaMismatchError(
                f"domain_tokens does not match theta's domains: missing {missing}, extra {extra}"
            )
        tokens = np.array([domain_tokens[d] for d in theta.domains], dtype=np.float64)
    else:
        tokens = np.asarray(domain_tokens, dtype=np.float64)
        if tokens.shape != (len(theta.domains),):
            raise ValueError(f"domain_tokens must have shape ({len(theta.domains)},), got {tokens.shape}")
    if not np.isfinite(tokens).all() or (tokens < 0).any():
        raise ValueError("domain_tokens must be finite and >= 0")
    return tokens * expected_sampling_value(theta.lam, theta.omega, theta.eta, theta.eps, eta_mode)


def expected_from_rank_knots(
    rbar,
    tokens,
    lam,
    omega,
    eta,
    eps,
    eta_mode: str = "exponent",
    domain_idx=None,
    n_domains: int | None = None,
):
    """Expected output tokens Σ_b tokens_b · S(r̄_b) of a token-weighted distribution of ranks.

    ``rbar``/``tokens`` describe the distribution: exact per-item ranks and token counts (then the
    result is the exact expected output tokens), or a histogram (bin representative rank, bin
    tokens).  Because S is non-increasing, a histogram evaluated at its bins' upper rank edges
    gives a lower bound and at the lower edges an upper bound of the exact value.

    Without ``domain_idx`` the parameters are scalars (one domain) and a float is returned.  With
    ``domain_idx`` (ints in [0, M)) the parameters are (M,) arrays and an (M,) array of per-domain
    sums is returned (``n_domains`` defaults to ``len(lam)``).
    """
    r = np.asarray(rbar, dtype=np.float64).ravel()
    w = np.asarray(tokens, dtype=np.float64).ravel()
    if r.shape != w.shape:
        raise ValueError(f"rbar and tokens must have the same length, got {r.shape} and {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("tokens must be finite and >= 0")
    if domain_idx is None:
        return float(np.dot(w, sampling_value(r, lam, omega, eta, eps, eta_mode)))
    lam, omega, eta, eps = (np.asarray(v, dtype=np.float64) for v in (lam, omega, eta, eps))
    m = int(n_domains) if n_domains is not None else int(lam.shape[0])
    d = as_domain_idx(domain_idx, r.shape[0], m)
    s = sampling_value(r, lam[d], omega[d], eta[d], eps[d], eta_mode)
    return np.bincount(d, weights=w * s, minlength=m)
