"""Small input checks shared by the kernel modules (private)."""

from __future__ import annotations

import numpy as np


def as_1d_float(values, name: str, *, allow_nan: bool = False) -> np.ndarray:
    """Return ``values`` as a 1-D float64 array; reject NaN/inf unless ``allow_nan``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if allow_nan:
        if np.isinf(arr).any():
            raise ValueError(f"{name} contains infinite values")
    elif not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def as_weights(weights, n: int, name: str = "weights") -> np.ndarray:
    """Return non-negative finite float64 weights of length ``n``."""
    w = as_1d_float(weights, name)
    if w.shape[0] != n:
        raise ValueError(f"{name} has length {w.shape[0]}, expected {n}")
    if (w < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return w


def as_domain_idx(domain_idx, n: int, n_domains: int | None = None) -> np.ndarray:
    """Return a 1-D int64 array of domain indices of length ``n`` (all >= 0, < n_domains)."""
    d = np.asarray(domain_idx)
    if d.ndim != 1 or d.shape[0] != n:
        raise ValueError(f"domain_idx must be 1-D of length {n}, got shape {d.shape}")
    if d.size and not np.issubdtype(d.dtype, np.integer):
        raise ValueError(f"domain_idx must be integers, got dtype {d.dtype}")
    d = d.astype(np.int64, copy=False)
    if d.size and d.min() < 0:
        raise ValueError("domain_idx must be >= 0")
    if n_domains is not None and d.size and d.max() >= n_domains:
        raise ValueError(f"domain_idx has value {int(d.max())} but there are only {n_domains} domains")
    return d
