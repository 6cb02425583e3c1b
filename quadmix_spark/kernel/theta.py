"""The QuaDMix parameter set θ (spec §2.7, §3.1, §3.4): Algorithm 1, features, top-k, θ files.

θ holds, per domain m, the merging weights α[m, :] (on the simplex) and the sampling parameters in
their **rescaled** form λ̃_m, ω̃_m, η̃_m, ε̃_m — the values that define S.  That is (N + 4)·M numbers.

- :class:`Theta` validates itself and has a content-derived id (:attr:`Theta.theta_id`,
  order-independent: it is keyed by names) and a signed 64-bit :attr:`Theta.theta_key` for hashing.
- :func:`sample_theta_matrix` draws candidates with Algorithm 1 in batch; :func:`sample_thetas`
  wraps the same draws as :class:`Theta` objects.
- :func:`flatten` / :func:`unflatten` map batches to the (n, (N+4)·M) feature matrix whose columns
  are :func:`feature_names`: first ``quadmix.alpha.<domain>.<criterion>`` (domain-major), then
  ``quadmix.lambda.<domain>``, ``quadmix.omega.<domain>``, ``quadmix.eta.<domain>``,
  ``quadmix.epsilon.<domain>``, each block in domain order.
- :func:`average_top_k` is the search's final step: element-wise mean of the k lowest-scored
  candidates in the rescaled space (α stays on the simplex: a convex combination).
- θ files (:func:`save_theta`, :func:`load_theta`; YAML or JSON by extension) are keyed by names,
  never by positions; loading against expected names fails with :class:`ThetaMismatchError` on any
  missing or extra name and otherwise reorders to the expected order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

FORMAT = "quadmix-theta/1"
LAMBDA_MODES = ("log", "linear")
SIMPLEX_TOL = 1e-9
_SIG_DIGITS = 12


class ThetaMismatchError(ValueError):
    """θ's domain or criterion names do not match the expected ones (lists missing and extra)."""


def _check_names(names: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ValueError(f"{what} must be a sequence of names, not a single string")
    out = tuple(names)
    for nm in out:
        if not isinstance(nm, str) or not nm:
            raise ValueError(f"{what} names must be non-empty strings, got {nm!r}")
    dupes = sorted({nm for nm in out if out.count(nm) > 1})
    if dupes:
        raise ValueError(f"duplicate {what} names: {dupes}")
    if not out:
        raise ValueError(f"{what} must not be empty")
    return out


def _mismatch(expected: Sequence[str], found: Sequence[str]) -> tuple[list[str], list[str]]:
    found_set, expected_set = set(found), set(expected)
    return [e for e in expected if e not in found_set], [f for f in found if f not in expected_set]


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, dtype=np.float64, copy=True)
    arr.setflags(write=False)
    return arr


def _canon(v: float) -> str:
    return f"{float(v) + 0.0:.{_SIG_DIGITS}g}"  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True, eq=False)
class Theta:
    """One θ: ``alpha`` (M, N) rows on the simplex; ``lam``, ``omega``, ``eta``, ``eps`` (M,).

    Ranges checked in ``__post_init__`` (errors name the domain/criterion): all finite,
    α >= 0 with rows summing to 1 within 1e-9, λ̃ >= 0, ω̃ ∈ [0, 1], η̃ >= 0, ε̃ >= 0; names
    non-empty and unique.  Arrays are stored as read-only float64 copies.  Two Thetas are ``==``
    when their names (in order) and all values are identical.
    """

    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    alpha: np.ndarray
    lam: np.ndarray
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray

    def __post_init__(self) -> None:
        domains = _check_names(self.domains, "domain")
        criteria = _check_names(self.criteria, "criterion")
        object.__setattr__(self, "domains", domains)
        object.__setattr__(self, "criteria", criteria)
        m, n = len(domains), len(criteria)
        alpha = _readonly(self.alpha)
        if alpha.shape != (m, n):
            raise ValueError(f"alpha must have shape (M={m}, N={n}), got {alpha.shape}")
        object.__setattr__(self, "alpha", alpha)
        for field_name in ("lam", "omega", "eta", "eps"):
            arr = _readonly(getattr(self, field_name))
            if arr.shape != (m,):
                raise ValueError(f"{field_name} must have shape (M={m},), got {arr.shape}")
            object.__setattr__(self, field_name, arr)
        for i, dom in enumerate(domains):
            row = alpha[i]
            for j, crit in enumerate(criteria):
                if not np.isfinite(row[j]) or row[j] < 0:
                    raise ValueError(f"alpha[{dom!r}][{crit!r}] = {float(row[j])!r} must be finite and >= 0")
            if abs(row.sum() - 1.0) > SIMPLEX_TOL:
                raise ValueError(
                    f"alpha[{dom!r}] sums to {float(row.sum())!r}; each domain's alpha must sum to 1 "
                    f"within {SIMPLEX_TOL}"
                )
            checks = (
                ("lambda", self.lam[i], self.lam[i] >= 0, ">= 0"),
                ("omega", self.omega[i], 0 <= self.omega[i] <= 1, "in [0, 1]"),
                ("eta", self.eta[i], self.eta[i] >= 0, ">= 0"),
                ("epsilon", self.eps[i], self.eps[i] >= 0, ">= 0"),
            )
            for label, value, ok, rule in checks:
                if not (np.isfinite(value) and ok):
                    raise ValueError(f"{label}[{dom!r}] = {float(value)!r} must be finite and {rule}")

    # -- identity ---------------------------------------------------------------------------
    @property
    def n_domains(self) -> int:
        return len(self.domains)

    @property
    def n_criteria(self) -> int:
        return len(self.criteria)

    def _canonical_json(self) -> str:
        body = {
            "v": FORMAT,
            "domains": {
                dom: {
                    "alpha": {c: _canon(self.alpha[i, j]) for j, c in enumerate(self.criteria)},
                    "lambda": _canon(self.lam[i]),
                    "omega": _canon(self.omega[i]),
                    "eta": _canon(self.eta[i]),
                    "epsilon": _canon(self.eps[i]),
                }
                for i, dom in enumerate(self.domains)
            },
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @cached_property
    def theta_id(self) -> str:
        """16 hex chars of sha256 of a canonical, name-keyed JSON of the values rounded to 12
        significant digits: independent of domain/criterion order, stable across file round trips."""
        return hashlib.sha256(self._canonical_json().encode("ascii")).hexdigest()[:16]

    @property
    def theta_key(self) -> int:
        """``theta_id`` read as a 64-bit two's-complement integer (a Spark BIGINT)."""
        v = int(self.theta_id, 16)
        return v - (1 << 64) if v >= (1 << 63) else v

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Theta):
            return NotImplemented
        return (
            self.domains == other.domains
            and self.criteria == other.criteria
            and all(
                np.array_equal(getattr(self, f), getattr(other, f))
                for f in ("alpha", "lam", "omega", "eta", "eps")
            )
        )

    __hash__ = None  # type: ignore[assignment]

    # -- conversions ------------------------------------------------------------------------
    def to_vector(self) -> np.ndarray:
        """The ((N+4)·M,) feature vector in :func:`feature_names` order."""
        return flatten(self.alpha[None], self.lam[None], self.omega[None], self.eta[None], self.eps[None])[0]

    @classmethod
    def from_vector(cls, vec, domains: Sequence[str], criteria: Sequence[str]) -> Theta:
        alpha, lam, omega, eta, eps = unflatten(np.asarray(vec, dtype=np.float64)[None], len(domains), len(criteria))
        return cls(tuple(domains), tuple(criteria), alpha[0], lam[0], omega[0], eta[0], eps[0])

    def reindex(self, domains: Sequence[str] | None = None, criteria: Sequence[str] | None = None) -> Theta:
        """The same θ with arrays in the given name orders (names must match exactly as sets)."""
        return Theta.from_dict(self.to_dict(), domains=domains, criteria=criteria)

    def to_dict(self) -> dict[str, Any]:
        """Name-keyed plain dict (floats exact): ``{"format", "theta_id", "criteria", "domains":
        {<domain>: {"alpha": {<criterion>: w}, "lambda", "omega", "eta", "epsilon"}}}``."""
        return {
            "format": FORMAT,
            "theta_id": self.theta_id,
            "criteria": list(self.criteria),
            "domains": {
                dom: {
                    "alpha": {c: float(self.alpha[i, j]) for j, c in enumerate(self.criteria)},
                    "lambda": float(self.lam[i]),
                    "omega": float(self.omega[i]),
                    "eta": float(self.eta[i]),
                    "epsilon": float(self.eps[i]),
                }
                for i, dom in enumerate(self.domains)
            },
        }

    @classmethod
    def from_dict(
        cls,
        d: Mapping[str, Any],
        domains: Sequence[str] | None = None,
        criteria: Sequence[str] | None = None,
    ) -> Theta:
        """Build a θ from :meth:`to_dict` output, matching names rather than positions.

        With ``domains``/``criteria`` given, the file must name exactly those (else
        :class:`ThetaMismatchError` listing the missing and the extra names) and the arrays follow
        the given order; otherwise the file's order is used.  Every domain's ``alpha`` must name the
        same criteria.  A stored ``theta_id`` that differs from the recomputed one is a
        ``ValueError`` (the file was edited without dropping its id).
        """
        if not isinstance(d, Mapping) or not isinstance(d.get("domains"), Mapping):
            raise ValueError("a theta dict needs a 'domains' mapping of domain name -> parameters")
        _no_unknown_keys(d, TOP_KEYS, "the theta")
        per_domain: Mapping[str, Any] = d["domains"]
        file_domains = [str(k) for k in per_domain]
        if not file_domains:
            raise ValueError("a theta dict needs at least one domain")
        if d.get("criteria") is not None:
            file_criteria = [str(c) for c in d["criteria"]]
        else:
            first = per_domain[file_domains[0]]
            file_criteria = [str(c) for c in (first.get("alpha") or {})]
        for dom in file_domains:
            entry = per_domain[dom]
            if not isinstance(entry, Mapping) or not isinstance(entry.get("alpha"), Mapping):
                raise ValueError(f"domain {dom!r} needs an 'alpha' mapping of criterion -> weight")
            _no_unknown_keys(entry, DOMAIN_KEYS, f"domain {dom!r}")
            missing, extra = _mismatch(file_criteria, [str(c) for c in entry["alpha"]])
            if missing or extra:
                raise ThetaMismatchError(
                    f"domain {dom!r}: alpha criteria do not match {file_criteria}: "
                    f"missing {missing}, extra {extra}"
                )
            for key in ("lambda", "omega", "eta", "epsilon"):
                if key not in entry:
                    raise ValueError(f"domain {dom!r} is missing {key!r}")
        if domains is not None:
            domains = _check_names(domains, "domain")
            missing, extra = _mismatch(domains, file_domains)
            if missing or extra:
                raise ThetaMismatchError(f"theta domains do not match: missing {missing}, extra {extra}")
        else:
            domains = tuple(file_domains)
        if criteria is not None:
            criteria = _check_names(criteria, "criterion")
            missing, extra = _mismatch(criteria, file_criteria)
            if missing or extra:
                raise ThetaMismatchError(f"theta criteria do not match: missing {missing}, extra {extra}")
        else:
            criteria = tuple(file_criteria)

        def num(dom: str, value: Any, label: str) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{label}[{dom!r}] = {value!r} is not a number") from None

        alpha = np.array(
            [[num(dom, per_domain[dom]["alpha"][c], f"alpha[..][{c!r}]") for c in criteria] for dom in domains]
        )
        vals = {
            key: np.array([num(dom, per_domain[dom][key], key) for dom in domains])
            for key in ("lambda", "omega", "eta", "epsilon")
        }
        theta = cls(domains, criteria, alpha, vals["lambda"], vals["omega"], vals["eta"], vals["epsilon"])
        stored = d.get("theta_id")
        if stored is not None and str(stored) != theta.theta_id:
            raise ValueError(
                f"stored theta_id {stored!r} does not match the values (recomputed {theta.theta_id!r}); "
                "drop 'theta_id' from an edited file"
            )
        return theta


TOP_KEYS = ("format", "theta_id", "criteria", "domains")
DOMAIN_KEYS = ("alpha", "lambda", "omega", "eta", "epsilon")


def _no_unknown_keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [str(k) for k in d if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {', '.join(allowed)})")


def save_theta(theta: Theta, path: str | Path) -> Path:
    """Write ``theta.to_dict()`` to ``.yaml``/``.yml``/``.json`` (chosen by extension)."""
    path = Path(path)
    suffix = path.suffix.lower()
    d = theta.to_dict()
    if suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
    elif suffix == ".json":
        text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
    else:
        raise ValueError(f"theta file must end in .yaml, .yml or .json, got {path.name!r}")
    path.write_text(text, encoding="utf-8")
    return path


def load_theta(
    path: str | Path, domains: Sequence[str] | None = None, criteria: Sequence[str] | None = None
) -> Theta:
    """Read a θ file written by :func:`save_theta` (or by hand); see :meth:`Theta.from_dict`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"theta file must end in .yaml, .yml or .json, got {path.name!r}")
    if not path.is_file():
        raise FileNotFoundError(f"theta file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        d = yaml.safe_load(text) if suffix in (".yaml", ".yml") else json.loads(text)
        return Theta.from_dict(d, domains=domains, criteria=criteria)
    except ThetaMismatchError as e:
        raise ThetaMismatchError(f"theta file {str(path)!r}: {e}") from None
    except (ValueError, yaml.YAMLError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"theta file {str(path)!r}: {e}") from None


# -- Algorithm 1 ------------------------------------------------------------------------------
class ThetaBatch(NamedTuple):
    """n candidate θ as arrays: alpha (n, M, N); lam, omega, eta, eps (n, M) (rescaled values)."""

    alpha: np.ndarray
    lam: np.ndarray
    omega: np.ndarray
    eta: np.ndarray
    eps: np.ndarray


def sample_theta_matrix(
    n: int,
    n_domains: int,
    n_criteria: int,
    rng: np.random.Generator | int,
    lambda_mode: str = "log",
    active_criteria: Sequence[bool] | None = None,
    shared_omega: float = 0.0,
    omega_spread: float = 0.25,
) -> ThetaBatch:
    """Draw ``n`` θ with Algorithm 1 (spec §3.1), vectorized over candidates.

    Per candidate: a ~ U(0,1)^N, ã = a / Σa; per domain b ~ U(0,1)^N, α = ã·b / Σ(ã·b);
    λ̃ = 10^{3u} on [1, 1000] (``"log"``) or 1000·u on [0, 1000] (``"linear"``); ω̃ = 0.1u;
    η̃ = u; ε̃ = u / 1000.  Draw order from ``rng`` (a Generator, or a seed for
    ``np.random.default_rng``): a (n, N), b (n, M, N), then u for λ, ω, η, ε, each (n, M), so a
    seed fixes the batch.  ``active_criteria`` (N bools) zeroes a criterion's global weight (the
    paper's ablations) so α renormalizes over the others.  A row whose weights are all 0 (a
    probability-2^-53 event) gets equal weights over the active criteria.

    ``shared_omega`` (not in the paper; 0 = Algorithm 1 exactly, the same draws as without it): that share of
    the rows instead takes one ω̃ for every domain, 0.1·u, times exp(``omega_spread``·z_m) per domain (z
    standard normal), capped at 0.1. Algorithm 1's independent ω̃ put the domains' shares of the kept tokens
    far from the pool's own (where random selection and the single-criterion baselines sit); these rows keep
    them near it. Drawn after everything else, so the other parameters of a row do not change.
    """
    if not 0.0 <= shared_omega <= 1.0 or omega_spread < 0:
        raise ValueError(f"need 0 <= shared_omega <= 1 and omega_spread >= 0, got {shared_omega}, {omega_spread}")
    if lambda_mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {lambda_mode!r}")
    if n < 0 or n_domains < 1 or n_criteria < 1:
        raise ValueError("need n >= 0, n_domains >= 1, n_criteria >= 1")
    rng = np.random.default_rng(rng)
    active = np.ones(n_criteria, dtype=bool) if active_criteria is None else np.asarray(active_criteria, dtype=bool)
    if active.shape != (n_criteria,) or not active.any():
        raise ValueError("active_criteria must be N booleans with at least one True")
    fallback = active / active.sum()

    a = rng.random((n, n_criteria))
    a *= active
    a_sum = a.sum(axis=1, keepdims=True)
    a = np.where(a_sum > 0, a / np.where(a_sum > 0, a_sum, 1.0), fallback)

    alpha = rng.random((n, n_domains, n_criteria))
    alpha *= a[:, None, :]
    row = alpha[:, :, 0].copy()
    for j in range(1, n_criteria):  # faster than .sum(axis=2) for small N
        row += alpha[:, :, j]
    bad = row <= 0
    row[bad] = 1.0
    alpha /= row[:, :, None]
    if bad.any():
        alpha[bad] = fallback

    lam = rng.random((n, n_domains))
    if lambda_mode == "log":
        lam *= 3.0
        np.power(10.0, lam, out=lam)
    else:
        lam *= 1000.0
    omega = rng.random((n, n_domains))
    omega *= 0.1
    eta = rng.random((n, n_domains))
    eps = rng.random((n, n_domains))
    eps /= 1000.0
    if shared_omega > 0:
        pick = rng.random(n) < shared_omega
        base = 0.1 * rng.random(n)
        shared = np.minimum(base[:, None] * np.exp(omega_spread * rng.standard_normal((n, n_domains))), 0.1)
        omega = np.where(pick[:, None], shared, omega)
    return ThetaBatch(alpha, lam, omega, eta, eps)


def sample_thetas(
    domains: Sequence[str],
    criteria: Sequence[str],
    n: int,
    seed: int,
    lambda_mode: str = "log",
    active_criteria: Sequence[bool] | None = None,
    shared_omega: float = 0.0,
    omega_spread: float = 0.25,
) -> list[Theta]:
    """``n`` θ from Algorithm 1 as :class:`Theta` objects; row i equals row i of
    ``sample_theta_matrix(n, M, N, seed, lambda_mode)``."""
    domains, criteria = _check_names(domains, "domain"), _check_names(criteria, "criterion")
    b = sample_theta_matrix(n, len(domains), len(criteria), seed, lambda_mode, active_criteria, shared_omega, omega_spread)
    return [Theta(domains, criteria, b.alpha[i], b.lam[i], b.omega[i], b.eta[i], b.eps[i]) for i in range(n)]


# -- features ---------------------------------------------------------------------------------
def feature_names(domains: Sequence[str], criteria: Sequence[str]) -> list[str]:
    """Column names of :func:`flatten`'s matrix ((N+4)·M names, unique)."""
    domains, criteria = _check_names(domains, "domain"), _check_names(criteria, "criterion")
    names = [f"quadmix.alpha.{d}.{c}" for d in domains for c in criteria]
    for key in ("lambda", "omega", "eta", "epsilon"):
        names.extend(f"quadmix.{key}.{d}" for d in domains)
    if len(set(names)) != len(names):
        raise ValueError("domain/criterion names produce duplicate feature names (avoid '.' clashes)")
    return names


def flatten(alpha, lam, omega, eta, eps) -> np.ndarray:
    """Batch (alpha (n,M,N), lam/omega/eta/eps (n,M)) → (n, (N+4)·M) in :func:`feature_names` order."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim != 3:
        raise ValueError(f"alpha must be (n, M, N), got shape {alpha.shape}")
    n, m, _ = alpha.shape
    rest = [np.asarray(v, dtype=np.float64) for v in (lam, omega, eta, eps)]
    for v in rest:
        if v.shape != (n, m):
            raise ValueError(f"lam/omega/eta/eps must be (n={n}, M={m}), got {v.shape}")
    return np.concatenate([alpha.reshape(n, -1), *rest], axis=1)


def unflatten(features, n_domains: int, n_criteria: int) -> ThetaBatch:
    """Inverse of :func:`flatten` for an (n, (N+4)·M) matrix."""
    x = np.asarray(features, dtype=np.float64)
    m, k = n_domains, n_criteria
    if x.ndim != 2 or x.shape[1] != (k + 4) * m:
        raise ValueError(f"features must be (n, {(k + 4) * m}), got shape {x.shape}")
    n = x.shape[0]
    alpha = x[:, : m * k].reshape(n, m, k)
    off = m * k
    lam, omega, eta, eps = (x[:, off + i * m : off + (i + 1) * m] for i in range(4))
    return ThetaBatch(alpha, lam, omega, eta, eps)


# -- search -----------------------------------------------------------------------------------
def top_k_indices(scores, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest scores, best first (stable: ties keep input order; NaN last)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not 1 <= k <= s.shape[0]:
        raise ValueError(f"k must be in [1, {s.shape[0]}], got {k}")
    return np.argsort(s, kind="stable")[:k]


def average_top_k(
    alpha,
    lam,
    omega,
    eta,
    eps,
    scores,
    k: int = 10,
    *,
    domains: Sequence[str],
    criteria: Sequence[str],
) -> Theta:
    """θ* = element-wise mean of the ``k`` candidates with the LOWEST ``scores`` (predicted loss),
    in the rescaled space.  α rows are a convex combination (renormalized only to remove rounding
    drift), so they stay on the simplex; with k = 1, θ* is that candidate exactly."""
    alpha = np.asarray(alpha, dtype=np.float64)
    idx = top_k_indices(scores, k)
    if np.asarray(scores).ravel().shape[0] != alpha.shape[0]:
        raise ValueError("scores must have one value per candidate")
    a = alpha[idx].mean(axis=0)
    if len(idx) > 1:  # one candidate is itself, bit for bit (its θ id too)
        a /= a.sum(axis=1, keepdims=True)
    means = [np.asarray(v, dtype=np.float64)[idx].mean(axis=0) for v in (lam, omega, eta, eps)]
    return Theta(tuple(domains), tuple(criteria), a, *means)
