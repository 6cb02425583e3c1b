"""Ingest: bad rows land in `rejects` with a reason, counts add up, reruns change nothing."""

from __future__ import annotations

import gzip
import json
import os
import re

import pytest
from pyspark.sql import functions as F

from quadmix_spark.curation.ingest import run_ingest
from quadmix_spark.curation.corpus_files import IngestInputError
from quadmix_spark.core.storage import read_table, table_version
from tests.conftest import DATA, TOKENIZER

pytestmark = pytest.mark.spark


def write_jsonl(path, records, raw_lines=()):
    with open(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for line in raw_lines:
            f.write(line + b"\n")
    return str(path)


def tables(spark, cfg):
    docs = read_table(spark, cfg.storage.table("documents"))
    rejects = read_table(spark, cfg.storage.table("rejects"))
    return docs, rejects


def test_bad_rows_go_to_rejects_with_reasons_and_counts_add_up(spark, cfg_factory, tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "a", "text": "A good page about rivers.", "url": "u1"},
            {"id": "b", "text": "Another good page.", "url": "u2"},
            {"id": "n1", "text": None},
            {"id": "e1", "text": ""},
            {"id": "w1", "text": "  \n\t \u00a0 "},
            {"id": "x1", "text": 123},
            {"id": "m1", "url": "no text field"},
            {"id": "big", "text": "x" * 20_000_000},
            {"id": "d1", "text": "same text"},
            {"id": "d1", "text": "same text"},
            {"id": "c1", "text": "one text"},
            {"id": "c1", "text": "another text"},
            {"text": "a page without an id"},
        ],
        raw_lines=[b"not json at all {", b"[1, 2, 3]", b'{"id": "u8", "text": "bad \xff\xfe bytes"}', b"", b"   "],
    )
    cfg = cfg_factory(f"ingest.input=[{path}]")
    report = run_ingest(spark, cfg)

    assert report.input_rows == 18 and report.blank_lines == 2
    assert report.documents == 3 and report.balanced
    assert report.rejects_by_reason == {
        "null_text": 1, "empty_text": 2, "non_string_text": 1, "missing_text": 1, "too_large": 1,
        "duplicate": 1, "id_conflict": 2, "missing_id": 1, "malformed_json": 1, "not_an_object": 1,
        "invalid_utf8": 1,
    }
    docs, rejects = tables(spark, cfg)
    assert sorted(r.doc_id for r in docs.select("doc_id").collect()) == ["a", "b", "d1"]
    assert {r.doc_id: r.n_chars for r in docs.collect()} == {"a": 25, "b": 18, "d1": 9}
    assert rejects.count() == report.rejects
    assert rejects.where(F.col("source").endswith("bad.jsonl")).count() == report.rejects
    by_reason = {r.reason: r for r in rejects.collect()}
    assert "not json at all" in by_reason["malformed_json"].preview
    assert "bytes" in by_reason["invalid_utf8"].preview
    assert len(by_reason["too_large"].preview) == 1000 and "20000000 characters" in by_reason["too_large"].detail
    assert "BIGINT" in by_reason["non_string_text"].detail
    assert by_reason["duplicate"].detail.startswith("same id and text as a row of") and "bad.jsonl" in by_reason["duplicate"].detail
    conflicts = rejects.where("reason = 'id_conflict'").collect()
    assert {r.detail for r in conflicts} == {"id c1 has different texts in this input"}
    # a reject keeps its id wherever the record had a usable one, so it can be found again in the source
    ids = {r.reason: r.doc_id for r in rejects.collect() if r.reason not in ("duplicate", "id_conflict", "empty_text")}
    assert ids == {
        "null_text": "n1", "non_string_text": "x1", "missing_text": "m1",
        "too_large": "big", "missing_id": None, "malformed_json": None, "not_an_object": None, "invalid_utf8": None,
    }
    assert sorted(r.doc_id for r in rejects.where("reason = 'empty_text'").collect()) == ["e1", "w1"]


def test_missing_text_column_is_a_clear_error_naming_the_file(spark, cfg_factory, tmp_path):
    path = write_jsonl(tmp_path / "notext.jsonl", [{"id": "1", "body": "hello"}])
    with pytest.raises(IngestInputError, match=r"notext\.jsonl.*no field 'text'"):
        run_ingest(spark, cfg_factory(f"ingest.input=[{path}]"))


def test_unusable_inputs_are_clear_errors(spark, cfg_factory, tmp_path):
    with pytest.raises(IngestInputError, match="matches no file"):
        run_ingest(spark, cfg_factory(f"ingest.input=[{tmp_path}/nothing-*.jsonl]"))
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate data" * 10)
    with pytest.raises(IngestInputError, match=r"broken\.jsonl\.gz"):
        run_ingest(spark, cfg_factory(f"ingest.input=[{broken}]"))
    # a gzip cut short among good files: the error names that file and the cause, whether the schema is
    # inferred (read while planning) or configured (read while staging)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        with gzip.open(corpus / f"a{i}.jsonl.gz", "wt") as f:
            f.write(json.dumps({"id": f"a{i}", "text": "fine"}) + "\n")
    whole = gzip.compress(b"".join(json.dumps({"id": str(i), "text": f"page {i} " * 40}).encode() + b"\n" for i in range(3000)))
    (corpus / "z.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    for extra in ((), ("ingest.json_schema='id string, text string'",)):
        with pytest.raises(IngestInputError, match=r"cannot read (JSONL )?input file:/+.*/corpus/z\.jsonl\.gz: java\.io\.EOFException"):
            run_ingest(spark, cfg_factory(f"ingest.input=[{corpus}]", *extra))
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "1", "text": "fine"}])
    for bad in (tmp_path / "nope.json", broken):  # missing, and not a tokenizer: refused before any Spark job
        cfg = cfg_factory(f"ingest.input=[{good}]", f"ingest.tokenizer={bad}")
        with pytest.raises(IngestInputError, match=re.escape(f"ingest.tokenizer '{bad}' cannot be loaded")):
            run_ingest(spark, cfg)
        assert not os.path.exists(cfg.storage.table("documents"))
    with pytest.raises(IngestInputError, match="cannot tell the format"):
        run_ingest(spark, cfg_factory(f"ingest.input=[{tmp_path}/data.csv]"))


def test_rerun_changes_nothing_and_a_new_file_adds_only_new_documents(spark, cfg_factory, tmp_path):
    indir = tmp_path / "in"
    indir.mkdir()
    write_jsonl(indir / "part-0.jsonl", [{"id": str(i), "text": f"document number {i}"} for i in range(5)])
    cfg = cfg_factory(f"ingest.input=[{indir}]")
    first = run_ingest(spark, cfg)
    assert first.documents == 5 and first.rejects == 0
    versions = [table_version(spark, cfg.storage.table(t)) for t in ("documents", "rejects", "ingest_log")]

    again = run_ingest(spark, cfg)
    assert again.batch_id is None and again.files_skipped == 1
    assert [table_version(spark, cfg.storage.table(t)) for t in ("documents", "rejects", "ingest_log")] == versions

    write_jsonl(
        indir / "part-1.jsonl",
        [{"id": "0", "text": "document number 0"}, {"id": "1", "text": "changed text"}, {"id": "9", "text": "new"}],
    )
    second = run_ingest(spark, cfg)
    assert (second.documents, second.rejects_by_reason) == (1, {"duplicate": 1, "id_conflict": 1})
    docs, rejects = tables(spark, cfg)
    assert docs.count() == 6 and docs.select("doc_id").distinct().count() == 6
    assert {r.doc_id: (r.reason, r.detail) for r in rejects.collect()} == {
        "0": ("duplicate", f"already ingested from file:{indir}/part-0.jsonl"),
        "1": ("id_conflict", f"id 1 already ingested from file:{indir}/part-0.jsonl with a different text"),
    }
    log = read_table(spark, cfg.storage.table("ingest_log"))
    assert log.agg(F.sum("input_rows"), F.sum("documents"), F.sum("rejects")).first() == (8, 6, 2)


def test_an_id_rejected_as_conflicting_stays_rejected_in_later_inputs(spark, cfg_factory, tmp_path):
    indir = tmp_path / "in"
    indir.mkdir()
    write_jsonl(indir / "a.jsonl", [{"id": "c", "text": "one text"}, {"id": "c", "text": "another text"}])
    cfg = cfg_factory(f"ingest.input=[{indir}]")
    assert run_ingest(spark, cfg).rejects_by_reason == {"id_conflict": 2}
    write_jsonl(indir / "b.jsonl", [{"id": "c", "text": "one text"}, {"id": "d", "text": "fine"}])
    later = run_ingest(spark, cfg)
    assert (later.documents, later.rejects_by_reason) == (1, {"id_conflict": 1})
    docs, rejects = tables(spark, cfg)
    assert [r.doc_id for r in docs.collect()] == ["d"]
    assert rejects.where("ingest_batch = '%s'" % later.batch_id).first().detail == "id c was rejected as id_conflict by an earlier input"


def _touch(path, seconds=60):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_a_touched_file_with_the_same_content_is_logged_as_unchanged_and_writes_nothing(spark, cfg_factory, tmp_path):
    indir = tmp_path / "my corpus #1"  # Spark's _metadata.file_path spells this "my%20corpus%20%231"
    indir.mkdir()
    lines = [{"id": str(i), "text": f"page {i} " + "words " * (i % 7)} for i in range(400)]
    part = write_jsonl(indir / "part-0.jsonl", lines, raw_lines=[b"", b"not json {"])
    other = write_jsonl(indir / "part-1.jsonl", [{"id": "o", "text": "other"}])
    empty = write_jsonl(indir / "part-2.jsonl", [])
    cfg = cfg_factory(f"ingest.input=['{indir}']")
    assert run_ingest(spark, cfg).documents == 401
    log = read_table(spark, cfg.storage.table("ingest_log"))
    assert {r.path.rsplit("/", 1)[1]: r.input_rows for r in log.collect()} == {"part-0.jsonl": 402, "part-1.jsonl": 1, "part-2.jsonl": 0}
    tables_ = ("documents", "rejects")
    versions = [table_version(spark, cfg.storage.table(t)) for t in tables_]

    # the digest read back (a plain file split into many tasks) equals the one logged while staging (one task)
    before = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "2048")
    try:
        _touch(part)
        _touch(empty)
        again = run_ingest(spark, cfg)
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", before)
    assert (again.files_new, again.files_unchanged, again.input_rows) == (2, 2, 0) and "touched but unchanged" in again.summary()
    assert [table_version(spark, cfg.storage.table(t)) for t in tables_] == versions
    log = read_table(spark, cfg.storage.table("ingest_log")).where(F.col("path").endswith("part-0.jsonl")).orderBy("mtime").collect()
    assert len(log) == 2 and log[0].content_digest == log[1].content_digest and log[0].content_digest.startswith("402:")
    assert (log[1].input_rows, log[1].documents, log[1].rejects) == (0, 0, 0)
    assert run_ingest(spark, cfg).batch_id is None

    # one batch: part-0 with the same size but one character changed (ingested as usual: its changed row is a
    # conflict), part-1 touched but unchanged
    changed = open(part, "rb").read().replace(b'"page 7 ', b'"page 8 ', 1)
    open(part, "wb").write(changed)
    _touch(part, 120)
    _touch(other, 120)
    report = run_ingest(spark, cfg)
    assert (report.files_new, report.files_unchanged) == (2, 1)
    assert (report.documents, report.rejects_by_reason) == (0, {"duplicate": 399, "id_conflict": 1, "malformed_json": 1})

    # a reading setting changed: touching the file reads it again
    _touch(other, 180)
    assert run_ingest(spark, cfg_factory(f"ingest.input=['{indir}']", "ingest.max_chars=4")).rejects_by_reason == {"too_large": 1}


def test_exact_duplicates_keep_the_first_file_whatever_the_order(spark, cfg_factory, tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, [{"id": "same", "text": "identical", "origin": name}])
    cfg = cfg_factory(f"ingest.input=[{tmp_path}/*.jsonl]")
    report = run_ingest(spark, cfg)
    assert (report.documents, report.rejects_by_reason) == (1, {"duplicate": 1})
    kept = read_table(spark, cfg.storage.table("documents")).first()
    assert kept.origin == "a.jsonl" and kept.source.endswith("a.jsonl")


def test_gzip_without_ids_hashes_the_text(spark, cfg_factory, tmp_path):
    path = tmp_path / "noids.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for text in ["alpha beta", "gamma", "alpha beta"]:
            f.write(json.dumps({"text": text, "lang": "en"}) + "\n")
    cfg = cfg_factory(f"ingest.input=[{path}]", "ingest.id_column=null")
    report = run_ingest(spark, cfg)
    assert (report.documents, report.rejects_by_reason) == (2, {"duplicate": 1})
    import hashlib

    docs = {r.doc_id: r for r in read_table(spark, cfg.storage.table("documents")).collect()}
    expected = hashlib.sha256(b"alpha beta").hexdigest()
    assert docs[expected[:32]].text_hash == expected and docs[expected[:32]].lang == "en"


def test_parquet_and_delta_inputs(spark, cfg_factory, tmp_path):
    rows = [("p1", "first parquet text", 3), ("p2", None, 4), ("p3", "third", 5)]
    df = spark.createDataFrame(rows, "id string, text string, source int")
    df.coalesce(1).write.parquet(str(tmp_path / "pq"))
    df.write.format("delta").save(str(tmp_path / "dl"))

    cfg = cfg_factory(f"ingest.input=[{tmp_path}/pq]", "ingest.format=parquet")
    report = run_ingest(spark, cfg)
    assert (report.documents, report.rejects_by_reason) == (2, {"null_text": 1})
    docs = read_table(spark, cfg.storage.table("documents"))
    assert "input_source" in docs.columns  # an input column named like one of ours is kept, renamed
    for f in (tmp_path / "pq").glob("*.parquet"):
        _touch(f)
    assert run_ingest(spark, cfg).files_unchanged == 1
    assert read_table(spark, cfg.storage.table("documents")).count() == 2

    cfg = cfg_factory(f"ingest.input=[{tmp_path}/dl]", f"storage.root={tmp_path}/store-delta")
    report = run_ingest(spark, cfg)
    assert (report.format, report.documents) == ("delta", 2)
    assert run_ingest(spark, cfg).batch_id is None
    spark.createDataFrame([("p4", "fourth", 6)], "id string, text string, source int").write.format("delta").mode(
        "append"
    ).save(str(tmp_path / "dl"))
    report = run_ingest(spark, cfg)  # a new table version: its existing rows are duplicates, p4 is new
    assert (report.documents, report.rejects_by_reason) == (1, {"duplicate": 2, "null_text": 1})


def test_non_string_text_column_is_a_schema_error(spark, cfg_factory, tmp_path):
    spark.createDataFrame([("1", 5)], "id string, text int").write.parquet(str(tmp_path / "pq"))
    with pytest.raises(IngestInputError, match="column 'text' is int, expected string"):
        run_ingest(spark, cfg_factory(f"ingest.input=[{tmp_path}/pq]", "ingest.format=parquet"))


def test_robustness_crawl_counts_add_up_and_tokens_are_real(spark, cfg_factory):
    path = DATA / "robustness" / "cc_raw_multilingual.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        n_lines = sum(1 for _ in f)
    cfg = cfg_factory(f"ingest.input=[{path}]")
    report = run_ingest(spark, cfg)
    assert report.balanced and report.input_rows == n_lines
    docs, rejects = tables(spark, cfg)
    assert docs.count() == report.documents and rejects.count() == report.rejects
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    for row in docs.orderBy("doc_id").limit(20).collect():
        assert row.n_tokens == len(tok.encode(row.text, add_special_tokens=False).ids)
        assert row.n_chars == len(row.text)
    # n_chars comes from the Python string the tokens are counted on: Spark's own count agrees on every document
    assert docs.where(F.col("n_chars") != F.char_length("text")).count() == 0


@pytest.mark.parametrize("broadcast_rows", [200_000, 0])
def test_duplicate_detection_moves_no_text(spark, cfg_factory, tmp_path, broadcast_rows):
    """The id rules run on narrow rows: with the rejections joined back by broadcast, ingest shuffles a small
    fraction of the text it reads (the window over whole rows shuffled all of it); by a shuffle join (past
    ``ingest.broadcast_rejects_rows``) the same tables come out. Identical lines in one file keep exactly one."""
    from bench.bench_scale import stage_shuffle_bytes

    pages = [{"id": f"p{i}", "text": f"page {i} " + "lorem ipsum dolor sit amet " * 400} for i in range(120)]
    dup_file = [pages[0], pages[0], pages[1], {"id": "p2", "text": "another text"}]  # same line twice; a conflict
    write_jsonl(tmp_path / "a.jsonl", pages)
    write_jsonl(tmp_path / "b.jsonl", dup_file)
    cfg = cfg_factory(f"ingest.input=[{tmp_path}/*.jsonl]", f"ingest.broadcast_rejects_rows={broadcast_rows}")
    before = max((s for s, _ in stage_shuffle_bytes(spark)), default=-1)
    report = run_ingest(spark, cfg)
    shuffled = sum(b for s, b in stage_shuffle_bytes(spark) if s > before)
    text_bytes = sum(len(r["text"]) for r in pages + dup_file)
    if broadcast_rows:
        assert shuffled < 0.1 * text_bytes, (shuffled, text_bytes)
    docs, rejects = tables(spark, cfg)
    assert report.documents == 119 and report.input_rows == 124
    assert sorted(r.reason for r in rejects.collect()) == ["duplicate", "duplicate", "duplicate", "id_conflict", "id_conflict"]
    kept = {r.doc_id: r.source for r in docs.collect()}
    assert "p2" not in kept and kept["p0"].endswith("a.jsonl") and kept["p1"].endswith("a.jsonl")


def test_the_cpu_bound_scan_splits_small_inputs_across_the_cores_and_changes_no_table(spark, cfg_factory, tmp_path):
    """Small files are packed into one task by Spark's default; ingest's scan asks for several per core (a
    launcher's own setting wins, and the setting is restored), and the tables are the same either way."""
    from quadmix_spark.curation.ingest import MIN_PARTITION_NUM, cpu_bound_scan

    files = [write_jsonl(tmp_path / f"in{i}.jsonl", [{"id": f"f{i}-{j}", "text": f"file {i} row {j} text"} for j in range(40)])
             for i in range(6)]
    assert spark.read.text(files).rdd.getNumPartitions() <= spark.sparkContext.defaultParallelism
    with cpu_bound_scan(spark):
        assert spark.read.text(files).rdd.getNumPartitions() == 6  # a file each: no file is cut here
    assert spark.conf.get(MIN_PARTITION_NUM, None) is None
    spark.conf.set(MIN_PARTITION_NUM, "1")
    try:
        own = spark.read.text(files).rdd.getNumPartitions()
        with cpu_bound_scan(spark):
            assert spark.read.text(files).rdd.getNumPartitions() == own < 6
        assert spark.conf.get(MIN_PARTITION_NUM) == "1"
        cfg_one = cfg_factory(f"ingest.input=[{tmp_path}/*.jsonl]", "storage.root=" + str(tmp_path / "one"))
        run_ingest(spark, cfg_one)
    finally:
        spark.conf.unset(MIN_PARTITION_NUM)
    cfg_many = cfg_factory(f"ingest.input=[{tmp_path}/*.jsonl]", "storage.root=" + str(tmp_path / "many"))
    run_ingest(spark, cfg_many)
    cols = ["doc_id", "text", "n_tokens", "text_hash", "source"]
    one, many = (read_table(spark, c.storage.table("documents")).select(*cols).orderBy("doc_id").collect() for c in (cfg_one, cfg_many))
    assert len(one) == 240 and one == many


@pytest.mark.parametrize("unicode", [False, True])
def test_whitespace_only_is_the_regex_it_replaces(spark, unicode):
    """The blank-line and empty-text checks ask the whole-value regex only where the first character is white
    space; the answers are the regex's on values that start with every kind of character, and on invalid UTF-8."""
    from quadmix_spark.curation.corpus_files import whitespace_only

    values = ["", " ", "   ", "\t\n", "\n", "x", " x", "x ", "X\n", " \n ", "\u00a0", " \u00a0", "\u3000 ", "\u2028",
              "\u0085", "\u2029", " \u2028", "\u2028x", "\u200b", "\U0001F600", " \U0001F600", "\r\n", "\x0b\x0c", "é ", None]
    flag = "(?U)" if unicode else ""
    rows = spark.createDataFrame([(v,) for v in values], "s string").withColumn("b", F.col("s").cast("binary"))
    bad = spark.createDataFrame([(bytes(b),) for b in ([0xC2], [0xE2, 0x20, 0x20], [0x20, 0xFF], [0xFF, 0x20])], "b binary")
    rows = rows.unionByName(bad.withColumn("s", F.col("b").cast("string")))
    got = rows.select("s", whitespace_only(F.col("s"), unicode).alias("fast"), F.col("s").rlike(f"^{flag}\\s*$").alias("regex"))
    checked = got.collect()
    assert len(checked) == len(values) + 4
    assert [(r.s, r.fast) for r in checked] == [(r.s, r.regex) for r in checked]
    assert {r.fast for r in checked} == {True, False, None}  # both answers and null are reached


def test_character_counts_agree_with_spark_on_any_text(spark, cfg_factory, tmp_path):
    # astral characters, combining marks, NUL, and invalid bytes replaced on reading: the count taken in Python
    # beside the tokens is Spark's char_length of the stored text
    path = write_jsonl(
        tmp_path / "chars.jsonl",
        [{"id": "emoji", "text": "🙂 x 👩‍👩‍👧"}, {"id": "marks", "text": "cafe\u0301 \u0915\u093c"}, {"id": "nul", "text": "a\x00b"}],
        raw_lines=[b'{"id": "lone", "text": "x\\ud800y"}', b'{"id": "bytes", "text": "bad \xff\xfe bytes"}'],
    )
    cfg = cfg_factory(f"ingest.input=[{path}]", "ingest.invalid_utf8=replace")
    report = run_ingest(spark, cfg)
    # Spark's JSON parser refuses the lone surrogate escape: a reject, the other four are documents
    assert report.documents == 4 and report.rejects_by_reason == {"malformed_json": 1} and report.balanced
    docs, _ = tables(spark, cfg)
    rows = docs.select("doc_id", "n_chars", F.char_length("text").alias("spark"), "text").collect()
    assert all(r.n_chars == r.spark == len(r.text) for r in rows), [(r.doc_id, r.n_chars, r.spark) for r in rows]
    assert {r.doc_id: r.n_chars for r in rows}["emoji"] == 9  # 🙂, two spaces, x, and 👩 ZWJ 👩 ZWJ 👧
