import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quadmix_spark.kernel.copies import (
    doc_hashes,
    hash_uniform,
    hash_uniform_from_doc_hashes,
    realized_copies,
    spark_uniform_expr_sql,
    xxhash64_bytes,
    xxhash64_long,
)
from tests.kernel._helpers import FAST

INT64 = st.integers(-(2**63), 2**63 - 1)
IDS = [f"doc-{i:06d}" for i in range(20_000)]
HASHES = doc_hashes(IDS)


def u64(x):
    return x & (2**64 - 1)


@pytest.mark.parametrize(
    "data,seed,expected",
    [  # published XXH64 reference values
        (b"", 0, 0xEF46DB3751D8E999),
        (b"a", 0, 0xD24EC4F1A98C6E5B),
        (b"abc", 0, 0x44BC2CF5AD770999),
    ],
)
def test_xxhash64_bytes_reference_vectors(data, seed, expected):
    assert u64(xxhash64_bytes(data, seed)) == expected


@FAST
@given(st.lists(INT64, min_size=1, max_size=20), INT64)
def test_hash_long_equals_xxh64_of_eight_little_endian_bytes(values, seed):
    got = xxhash64_long(np.array(values, dtype=np.int64), np.int64(seed))
    want = [xxhash64_bytes(v.to_bytes(8, "little", signed=True), seed) for v in values]
    assert got.dtype == np.int64 and got.tolist() == want


@FAST
@given(st.binary(min_size=0, max_size=100), INT64)
def test_xxhash64_bytes_is_signed_int64_and_input_sensitive(data, seed):
    h = xxhash64_bytes(data, seed)
    assert -(2**63) <= h < 2**63
    assert h == xxhash64_bytes(bytes(data), seed)
    assert h != xxhash64_bytes(data + b"\x00", seed)


@FAST
@given(INT64, INT64)
def test_uniform_is_deterministic_in_range_and_depends_on_key_and_seed(theta_key, seed):
    u = hash_uniform_from_doc_hashes(HASHES[:2000], theta_key, seed)
    assert u.dtype == np.float64 and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(u, hash_uniform(IDS[:2000], theta_key, seed))
    other_key = hash_uniform_from_doc_hashes(HASHES[:2000], theta_key ^ 1, seed)
    other_seed = hash_uniform_from_doc_hashes(HASHES[:2000], theta_key, seed ^ 1)
    assert (u == other_key).mean() < 0.01 and (u == other_seed).mean() < 0.01


def test_uniform_is_uniform():
    u = np.sort(hash_uniform_from_doc_hashes(HASHES, 123456789, 7))
    n = u.size
    ks = max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())
    assert ks < 1.63 / np.sqrt(n)  # KS 1% critical value


@FAST
@given(st.floats(0.0, 4.0), INT64)
def test_realized_copies_mean_matches_S_within_five_sigma(s_value, theta_key):
    u = hash_uniform_from_doc_hashes(HASHES, theta_key, 1)
    c = realized_copies(np.full(u.size, s_value), u)
    base = np.floor(s_value)
    assert set(np.unique(c)) <= {int(base), int(base) + 1}
    p = s_value - base
    sd = np.sqrt(p * (1 - p) / u.size)
    assert abs(c.mean() - s_value) <= 5 * sd + 1e-12


def test_realized_copies_rule_is_strict_and_exact_on_integers():
    s = np.array([2.25, 2.25, 2.25, 3.0, 0.0, 1e-4])
    u = np.array([0.0, 0.2499, 0.25, 0.0, 0.0, 0.5])
    np.testing.assert_array_equal(realized_copies(s, u), [3, 3, 2, 3, 0, 0])
    assert realized_copies(s, u).dtype == np.int64
    with pytest.raises(ValueError):
        realized_copies([-1.0], [0.5])
    with pytest.raises(ValueError):
        realized_copies([1.0], [1.0])


def test_spark_expression_text_and_int64_checks():
    expr = spark_uniform_expr_sql("doc_id", -5, 42)
    assert expr == (
        "shiftrightunsigned(xxhash64(doc_id, CAST(-5 AS BIGINT), CAST(42 AS BIGINT)), 11)"
        " * 1.1102230246251565E-16D"
    )
    assert float("1.1102230246251565E-16") == 2.0**-53
    with pytest.raises(ValueError):
        spark_uniform_expr_sql("doc_id", 2**63, 0)
    with pytest.raises(ValueError):
        hash_uniform(["a"], 0, True)
    with pytest.raises(ValueError):
        doc_hashes([b"bytes-not-str"])
