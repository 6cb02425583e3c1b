"""Typed config: files + overrides, errors that name key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from quadmix_spark.cli import app
from quadmix_spark.core.config import ConfigError, load_config, parse_override
from tests.conftest import DEFAULT_CONF


def test_overrides_are_typed_and_applied_after_files(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("ingest:\n  max_chars: 10\n  text_column: body\n")
    cfg = load_config(
        [DEFAULT_CONF, extra],
        ["ingest.max_chars=25", "ingest.id_column=null", "ingest.input=[a.jsonl, b.jsonl]", "spark.conf={x.y: '1'}"],
    )
    assert cfg.ingest.max_chars == 25 and cfg.ingest.text_column == "body"
    assert cfg.ingest.id_column is None and cfg.ingest.input == ["a.jsonl", "b.jsonl"]
    assert cfg.spark.conf == {"x.y": "1"}


def test_environment_references_are_expanded(monkeypatch):
    monkeypatch.setenv("QUADMIX_SHARED", "/data/shared")
    monkeypatch.setenv("QUADMIX_ROOT", "/scratch/q")
    cfg = load_config([DEFAULT_CONF])
    assert cfg.ingest.tokenizer == "/data/shared/data/models/tokenizers/gpt_neox_20b.json"
    assert cfg.storage.table("documents") == "/scratch/q/tables/documents"
    assert cfg.tracking_uri == "sqlite:////scratch/q/mlflow.db"


def test_invalid_values_name_the_key_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as e:
        load_config([DEFAULT_CONF], ["ingest.max_chars=-5", "ingest.format=csv"])
    msg = str(e.value)
    assert "ingest.max_chars = -5: Input should be greater than 0" in msg
    assert "ingest.format = 'csv'" in msg and "'jsonl'" in msg and "'parquet'" in msg


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"ingest.txt_column: unknown key in ingest \(allowed: .*text_column"):
        load_config([DEFAULT_CONF], ["ingest.txt_column=body"])
    # inside a named entry (scorers: {name: {...}}), the entry's own keys
    with pytest.raises(ConfigError, match=r"scorers.dclm.modle: unknown key in scorers.dclm \(allowed: .*, model, "):
        load_config([DEFAULT_CONF], ["scorers={dclm: {type: fasttext, modle: /x.bin}}"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        parse_override("just-a-word")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["/nonexistent/conf.yaml"])


def test_storage_tables_are_paths_or_catalog_names():
    cfg = load_config([DEFAULT_CONF], ["storage.root=s3://bucket/q", "tracking.uri=http://127.0.0.1:5000"])
    assert cfg.storage.table("documents") == "s3://bucket/q/tables/documents"
    cfg = load_config([DEFAULT_CONF], ["storage.catalog=main", "storage.schema=quadmix"])
    assert cfg.storage.table("annotations") == "main.quadmix.annotations"
    with pytest.raises(ConfigError, match="set both storage.catalog and storage.schema"):
        load_config([DEFAULT_CONF], ["storage.catalog=main"])
    with pytest.raises(ConfigError, match="tracking.uri must be set"):
        _ = load_config([DEFAULT_CONF], ["storage.root=s3://bucket/q"]).tracking_uri


def test_cli_config_show_and_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["config", "show", "-c", str(DEFAULT_CONF), "--set", "ingest.max_chars=77"])
    assert result.exit_code == 0 and "max_chars: 77" in result.output
    result = runner.invoke(app, ["config", "show", "-c", str(DEFAULT_CONF), "--format", "json"])
    assert result.exit_code == 0 and '"text_column": "text"' in result.output
    result = runner.invoke(app, ["ingest", "-c", str(DEFAULT_CONF), "--set", "ingest.max_chars=zero"])
    assert result.exit_code == 2 and "ingest.max_chars = 'zero'" in result.output


def test_cli_dry_run_prints_the_resolved_config_without_running(tmp_path):
    result = CliRunner().invoke(
        app, ["ingest", "-c", str(DEFAULT_CONF), "--input", "x.jsonl", "--set", f"storage.root={tmp_path}", "--dry-run"]
    )
    assert result.exit_code == 0
    assert "- x.jsonl" in result.output and f"would ingest ['x.jsonl'] into {tmp_path}/tables/documents" in result.output
    assert not (tmp_path / "tables").exists()


def test_strings_may_reference_other_keys_of_the_config(tmp_path):
    scorers = Path(DEFAULT_CONF).parent / "scorers.yaml"
    moved = load_config([DEFAULT_CONF, scorers], [f"storage.root={tmp_path}/store"])
    assert moved.scorers["dclm"].model == f"{tmp_path}/store/models/dclm/current/model.bin"
    with pytest.raises(ConfigError, match=r"ingest.tokenizer: \$\{storage.nope\} names no key"):
        load_config([DEFAULT_CONF], ["ingest.tokenizer=${storage.nope}/t.json"])
    kept = load_config([DEFAULT_CONF], ["spark.conf={spark.hadoop.fs.s3a.buffer.dir: '${hadoop.tmp.dir}/s3a', x.y: '${storage.root}'}",
                                        "ingest.tokenizer=${hadoop.tmp.dir}/t.json"])
    assert kept.spark.conf == {"spark.hadoop.fs.s3a.buffer.dir": "${hadoop.tmp.dir}/s3a", "x.y": "${storage.root}"}
    assert kept.ingest.tokenizer.endswith("${hadoop.tmp.dir}/t.json")  # not a section of ours: as written
    with pytest.raises(ConfigError, match="nest too deeply"):
        load_config([DEFAULT_CONF], ["storage.root=${ingest.tokenizer}", "ingest.tokenizer=${storage.root}"])
