"""Spark's own xxhash64 and the kernel's uniform expression agree with the kernel bit for bit."""

import numpy as np
import pytest

from quadmix_spark.kernel.copies import (
    doc_hashes,
    hash_uniform,
    spark_uniform_expr_sql,
    xxhash64_long,
)

pytestmark = pytest.mark.spark

KEYS_AND_SEEDS = [
    (0, 0),
    (-1, 1),
    (-(2**63), 2**63 - 1),
    (2**62 + 7, -987654321),
    (0x7A3C19F0E5D2B864 - 2**63, 20250101),
]


def _ids():
    rng = np.random.default_rng(20240607)
    special = ["", "a", "é", "中文", "😀", "naïve café", "x" * 31, "y" * 32, "z" * 33, "w" * 101,
               "ü" * 70, "😀" * 40, "doc\t\nid", "ß" * 3, "abcdefgh" * 4 + "abc", "\x00"]
    alphabet = list("abcXYZ019-_/") + ["é", "中", "文", "😀", "ж", "ß"]
    ids = list(special)
    while len(ids) < 200:
        n = int(rng.integers(0, 150))
        ids.append("".join(rng.choice(alphabet, n)))
    return ids  # every XXH64 tail path (32-byte stripes, 8/4/1-byte remainders): test_tail_paths_are_covered


def test_tail_paths_are_covered():
    lengths = {len(s.encode("utf-8")) for s in _ids()}
    assert 0 in lengths and max(lengths) > 100
    assert {n % 32 // 8 for n in lengths if n >= 32} >= {0, 1, 2, 3}
    assert {n % 8 for n in lengths} == set(range(8))


def test_spark_xxhash64_and_uniform_expression_match_kernel(spark):
    ids = _ids()
    df = spark.createDataFrame([(s,) for s in ids], "doc_id string")
    exprs = ["doc_id", "xxhash64(doc_id) AS h_doc"]
    for i, (key, seed) in enumerate(KEYS_AND_SEEDS):
        exprs.append(f"xxhash64(doc_id, CAST({key} AS BIGINT), CAST({seed} AS BIGINT)) AS h{i}")
        exprs.append(f"{spark_uniform_expr_sql('doc_id', key, seed)} AS u{i}")
    rows = df.selectExpr(*exprs).collect()
    assert [r.doc_id for r in rows] == ids
    h_doc = doc_hashes(ids)
    assert [r.h_doc for r in rows] == h_doc.tolist()
    for i, (key, seed) in enumerate(KEYS_AND_SEEDS):
        chained = xxhash64_long(np.int64(seed), xxhash64_long(np.int64(key), h_doc))
        assert [r[f"h{i}"] for r in rows] == chained.tolist()
        u = hash_uniform(ids, key, seed)
        assert np.array_equal(np.array([r[f"u{i}"] for r in rows]), u)  # bit-exact doubles


def test_spark_hash_of_bigint_matches_hash_long(spark):
    values = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345]
    cols = ", ".join(f"xxhash64(CAST({v} AS BIGINT)) AS c{i}" for i, v in enumerate(values))
    row = spark.sql(f"SELECT {cols}").collect()[0]
    expected = xxhash64_long(np.array(values, dtype=np.int64), np.int64(42))
    assert [row[f"c{i}"] for i in range(len(values))] == expected.tolist()
