"""Deterministic realized copies (spec §2.6, §8): c = ⌊S⌋ + [u < S − ⌊S⌋].

The uniform u of a document is a pure function of (doc_id, θ key, seed), computed bit-for-bit like
Spark SQL's ``xxhash64(doc_id, CAST(theta_key AS BIGINT), CAST(seed AS BIGINT))`` so the
distributed sampler and this kernel realize the same copies on any cluster size, partitioning,
retry or rerun::

    h = 42                                   # Spark's xxhash64 seed
    h = XXH64(utf8(doc_id), seed=h)          # a STRING column: XXH64.hashUnsafeBytes
    h = XXH64_long(theta_key, seed=h)        # a BIGINT column: XXH64.hashLong
    h = XXH64_long(seed, seed=h)
    u = (h as unsigned 64-bit >> 11) · 2^-53 ∈ [0, 1)      # exact in float64

The doc id column must be a STRING in Spark (an integer column would be hashed as an int/long,
giving a different value).  :func:`spark_uniform_expr_sql` returns the Spark SQL expression of u.

Expected copies: E[c] = ⌊S⌋ + P(u < frac S) = S for u uniform; c ∈ {⌊S⌋, ⌊S⌋ + 1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_MASK = (1 << 64) - 1
P1 = 11400714785074694791
P2 = 14029467366897019727
P3 = 1609587929392839161
P4 = 9650029242287828579
P5 = 2870177450012600261
SPARK_HASH_SEED = 42
UNIFORM_SCALE = 2.0**-53  # 1.1102230246251565e-16
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & _MASK
    return (_rotl(acc, 31) * P1) & _MASK


def _merge_round(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * P1 + P4) & _MASK


def _avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * P2) & _MASK
    h ^= h >> 29
    h = (h * P3) & _MASK
    h ^= h >> 32
    return h


def _to_signed(h: int) -> int:
    return h - (1 << 64) if h >= (1 << 63) else h


def xxhash64_bytes(data: bytes, seed: int) -> int:
    """Standard XXH64 of ``data`` with a 64-bit ``seed`` (any int, taken mod 2^64), returned as a
    signed int64 (Spark's ``XXH64.hashUnsafeBytes``)."""
    seed &= _MASK
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + P1 + P2) & _MASK
        v2 = (seed + P2) & _MASK
        v3 = seed
        v4 = (seed - P1) & _MASK
        limit = n - 32
        while p <= limit:
            v1 = _round(v1, int.from_bytes(data[p : p + 8], "little"))
            v2 = _round(v2, int.from_bytes(data[p + 8 : p + 16], "little"))
            v3 = _round(v3, int.from_bytes(data[p + 16 : p + 24], "little"))
            v4 = _round(v4, int.from_bytes(data[p + 24 : p + 32], "little"))
            p += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _MASK
        for v in (v1, v2, v3, v4):
            h = _merge_round(h, v)
    else:
        h = (seed + P5) & _MASK
    h = (h + n) & _MASK
    while p + 8 <= n:
        h ^= _round(0, int.from_bytes(data[p : p + 8], "little"))
        h = (_rotl(h, 27) * P1 + P4) & _MASK
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p : p + 4], "little") * P1) & _MASK
        h = (_rotl(h, 23) * P2 + P3) & _MASK
        p += 4
    while p < n:
        h ^= (data[p] * P5) & _MASK
        h = (_rotl(h, 11) * P1) & _MASK
        p += 1
    return _to_signed(_avalanche(h))


def _u64(x) -> np.ndarray:
    """Array of uint64 holding the two's-complement bits of int64/uint64/python-int input."""
    arr = np.asarray(x)
    if arr.dtype == np.uint64:
        return arr
    if arr.dtype == object or (arr.dtype.kind in "iu" and arr.dtype.itemsize <= 8):
        if arr.dtype == object:
            return np.asarray(np.vectorize(lambda v: int(v) & _MASK, otypes=[np.uint64])(arr), dtype=np.uint64)
        return arr.astype(np.int64).view(np.uint64)
    raise ValueError(f"expected integers, got dtype {arr.dtype}")


def _rotl_np(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def xxhash64_long(values, seeds) -> np.ndarray:
    """Vectorized Spark ``XXH64.hashLong(v, seed)`` (= XXH64 of v's 8 little-endian bytes).

    ``values``, ``seeds``: int64 or uint64 arrays (or python ints; broadcast together); result is
    a signed int64 array.  uint64 arithmetic wraps modulo 2^64 as XXH64 requires.
    """
    v, s = np.broadcast_arrays(_u64(values), _u64(seeds))
    p1, p2, p3, p4, p5 = (np.uint64(c) for c in (P1, P2, P3, P4, P5))
    with np.errstate(over="ignore"):
        h = s + p5 + np.uint64(8)
        h = h ^ (_rotl_np(v * p2, 31) * p1)
        h = _rotl_np(h, 27) * p1 + p4
        h = h ^ (h >> np.uint64(33))
        h = h * p2
        h = h ^ (h >> np.uint64(29))
        h = h * p3
        h = h ^ (h >> np.uint64(32))
    return h.view(np.int64)


def _check_int64(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value}")
    return value


def doc_hashes(doc_ids: Sequence[str]) -> np.ndarray:
    """Spark ``xxhash64(doc_id)`` of each id (XXH64 of its UTF-8 bytes, seed 42), int64 array.

    θ-independent: compute once and reuse with :func:`hash_uniform_from_doc_hashes`."""
    out = np.empty(len(doc_ids), dtype=np.int64)
    for i, doc in enumerate(doc_ids):
        if not isinstance(doc, str):
            raise ValueError(f"doc ids must be strings, got {type(doc).__name__} at position {i}")
        out[i] = xxhash64_bytes(doc.encode("utf-8"), SPARK_HASH_SEED)
    return out


def hash_uniform_from_doc_hashes(doc_hash, theta_key: int, seed: int) -> np.ndarray:
    """u from precomputed :func:`doc_hashes` (vectorized; see :func:`hash_uniform`)."""
    theta_key = _check_int64(theta_key, "theta_key")
    seed = _check_int64(seed, "seed")
    h = xxhash64_long(np.int64(theta_key), np.asarray(doc_hash, dtype=np.int64))
    h = xxhash64_long(np.int64(seed), h)
    return (h.view(np.uint64) >> np.uint64(11)).astype(np.float64) * UNIFORM_SCALE


def hash_uniform(doc_ids: Sequence[str], theta_key: int, seed: int) -> np.ndarray:
    """u ∈ [0, 1) per doc id, equal bit for bit to Spark's
    ``shiftrightunsigned(xxhash64(doc_id, CAST(theta_key AS BIGINT), CAST(seed AS BIGINT)), 11) * 2^-53``
    (``theta_key`` and ``seed`` must fit in int64)."""
    return hash_uniform_from_doc_hashes(doc_hashes(doc_ids), theta_key, seed)


def spark_uniform_expr_sql(doc_col: str, theta_key: int, seed: int) -> str:
    """Spark SQL expression string computing :func:`hash_uniform` for the STRING column
    expression ``doc_col`` (inserted verbatim, e.g. ``"doc_id"`` or a back-quoted name)."""
    theta_key = _check_int64(theta_key, "theta_key")
    seed = _check_int64(seed, "seed")
    return (
        f"shiftrightunsigned(xxhash64({doc_col}, CAST({theta_key} AS BIGINT), CAST({seed} AS BIGINT)), 11)"
        f" * {repr(UNIFORM_SCALE).upper()}D"
    )


def realized_copies(S, u) -> np.ndarray:
    """c = ⌊S⌋ + [u < S − ⌊S⌋] as int64 (S finite and >= 0, u ∈ [0, 1); shapes broadcast)."""
    s = np.asarray(S, dtype=np.float64)
    uu = np.asarray(u, dtype=np.float64)
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError("S must be finite and >= 0")
    if not np.isfinite(uu).all() or (uu < 0).any() or (uu >= 1).any():
        raise ValueError("u must be in [0, 1)")
    base = np.floor(s)
    return (base + (uu < s - base)).astype(np.int64)
