"""The fast byte-level BPE path changes no table: ``documents``, the proxy pool's shards and the evaluation
sets are the same with ``ingest.fast_tokenizer`` on and off (real Spark, Delta, the shared GPT-NeoX file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

from quadmix_spark.curation.ingest import run_ingest
from quadmix_spark.search.proxy_pool import build_pool
from quadmix_spark.search.proxy_data import build_eval_set
from quadmix_spark.core.storage import read_table
from tests.conftest import DATA, TOKENIZER
from tests.udfs.test_bpe_fast import COMPILED, generated

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """The robustness crawl and a file of generated hard strings (ids given)."""
    folder = tmp_path_factory.mktemp("token-tables")
    path = folder / "hard.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(generated(1_500, seed=42)):
            if text.strip():
                f.write(json.dumps({"id": f"g{i}", "text": text}) + "\n")
    return [str(DATA / "robustness" / "cc_raw_multilingual.jsonl.gz"), str(path)]


def _store(spark, cfg_factory, inputs, fast: bool, name: str):
    cfg = cfg_factory(f"storage.root={Path(cfg_factory().storage.root).parent / name}", f"ingest.input={json.dumps(inputs)}",
                      f"ingest.fast_tokenizer={str(fast).lower()}", "proxy.pool.shards=3")
    report = run_ingest(spark, cfg)
    return cfg, report


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.bin"))}


def test_documents_pool_and_eval_sets_are_the_same_with_and_without_the_fast_path(spark, cfg_factory, inputs, tmp_path):
    fast_cfg, fast_report = _store(spark, cfg_factory, inputs, True, "fast")
    slow_cfg, slow_report = _store(spark, cfg_factory, inputs, False, "slow")
    # the tables below come from the compiled loop where it is built
    assert fast_report.token_counter.startswith("fast byte-level BPE, " + ("compiled" if COMPILED else "Python (not compiled"))
    assert slow_report.token_counter == "tokenizers (fast path turned off)"
    assert "tokens counted by fast byte-level BPE" in fast_report.summary()

    cols = ["doc_id", "text", "n_tokens", "n_chars", "text_hash", "source"]
    fast_docs, slow_docs = (read_table(spark, c.storage.table("documents")) for c in (fast_cfg, slow_cfg))
    fast_rows = fast_docs.select(*cols).orderBy("doc_id").collect()
    assert len(fast_rows) > 1_500 and fast_rows == slow_docs.select(*cols).orderBy("doc_id").collect()
    assert fast_docs.agg(F.sum("n_tokens")).first()[0] > 1_000_000

    pools = []
    for cfg in (fast_cfg, slow_cfg):
        domains = read_table(spark, cfg.storage.table("documents")).select("doc_id", F.lit("all").alias("domain"))
        pools.append(build_pool(spark, cfg, domains))
    shards = [_digest(Path(p.folder) / "shards") for p in pools]
    assert len(shards[0]) == 3 and shards[0] == shards[1]
    offsets = [read_table(spark, f"{p.folder}/offsets").orderBy("doc_id").collect() for p in pools]
    assert offsets[0] == offsets[1]

    target = DATA / "target" / "target_val_texts.jsonl.gz"
    sets = [build_eval_set("bmk", str(target), str(TOKENIZER), str(tmp_path / f"eval-{fast}.npz"), 400, 0, 256,
                           fast_tokenizer=fast) for fast in (True, False)]
    a, b = (np.load(tmp_path / f"eval-{fast}.npz") for fast in (True, False))
    assert sets[0].tokens.shape[0] > 10_000
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
