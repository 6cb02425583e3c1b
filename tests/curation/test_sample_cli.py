"""normalize and sample through the CLI: tables, dry-run figures, MLflow runs with θ, report and plot."""

from __future__ import annotations

import json

import mlflow
import pytest
from pyspark.sql import functions as F
from typer.testing import CliRunner

from quadmix_spark.cli import app
from quadmix_spark.kernel.theta import save_theta
from quadmix_spark.core.storage import read_table
from tests.conftest import DEFAULT_CONF
from tests.sampling_data import a_theta, make_corpus

pytestmark = pytest.mark.spark


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_normalize_then_sample_logs_everything(spark, tmp_path):
    root = tmp_path / "store"
    base = ["-c", str(DEFAULT_CONF), "--set", f"storage.root={root}", "--set", "sampling.coarse_bins=64"]
    from tests.conftest import make_config

    cfg = make_config(root)
    data = make_corpus(spark, cfg, n=600)
    first, again = invoke("normalize", *base), invoke("normalize", *base)
    assert "knots written" in first and "already current" in again
    criteria = [line.split(")")[0] for out in (first, again) for line in out.splitlines() if line.startswith("normalize:")]
    assert len(criteria) == 2 and criteria[0] == criteria[1]  # the same criteria, in the annotations' column order

    theta = a_theta(sorted(set(data["domains"])), seed=21)
    save_theta(theta, tmp_path / "theta.yaml")
    dry = invoke("sample", *base, "--params", str(tmp_path / "theta.yaml"), "--dry-run")
    assert "expected_tokens" in dry and "total: expected" in dry and "fitted to" not in dry
    dry = invoke("sample", *base, "--params", str(tmp_path / "theta.yaml"), "--dry-run", "--set", "sampling.budget_tokens=5000")
    assert "fitted to sampling.budget_tokens = 5,000" in dry
    assert not (root / "tables" / "selection").exists()  # a dry run writes nothing

    out = invoke("sample", *base, "--set", "sampling.run=cli", "--params", str(tmp_path / "theta.yaml"))
    assert "sample run 'cli'" in out
    sel = read_table(spark, cfg.storage.table("selection")).where(F.col("run") == "cli")
    assert sel.count() == 600 and sel.select("theta_id").distinct().first()[0] == theta.theta_id
    manifest = json.loads((root / "export" / "cli" / "manifest.json").read_text())
    assert manifest["tokens"] == read_table(spark, cfg.storage.table("training_output")).where(
        F.col("run") == "cli").agg(F.sum("n_tokens")).first()[0]

    mlflow.set_tracking_uri(cfg.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["quadmix"], filter_string="tags.`quadmix.stage` = 'sample'")
    assert len(runs) == 1
    run = mlflow.get_run(runs.run_id[0])
    assert float(run.data.params[f"quadmix.omega.{theta.domains[0]}"]) == pytest.approx(theta.omega[0])
    assert run.data.params["delta.annotations_version"] == "0"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"theta.json", "domain_report.png", "domain_report.json", "export_manifest.json", "config.yaml"} <= arts

    thetas = [a_theta(theta.domains, seed=s).to_dict() for s in (1, 2)]
    (tmp_path / "set.json").write_text(json.dumps({"thetas": thetas}))
    assert "proxy index for 2 θ" in invoke("sample", *base, "--params-set", str(tmp_path / "set.json"))
    ids = {r.theta_id for r in read_table(spark, cfg.storage.table("proxy_index")).select("theta_id").distinct().collect()}
    assert ids == {t["theta_id"] for t in thetas}


def test_a_theta_with_other_domain_names_is_an_error(spark, tmp_path):
    from tests.conftest import make_config

    root = tmp_path / "store"
    cfg = make_config(root)
    make_corpus(spark, cfg, n=200)
    invoke("normalize", "-c", str(DEFAULT_CONF), "--set", f"storage.root={root}")
    save_theta(a_theta(["dom0", "dom1", "elsewhere", "dom3", "dom4"]), tmp_path / "bad.yaml")
    result = CliRunner().invoke(app, ["sample", "-c", str(DEFAULT_CONF), "--set", f"storage.root={root}", "--params", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "extra" in result.output and "elsewhere" in result.output


def test_a_bad_theta_file_is_refused_before_spark_naming_the_file_and_the_key(tmp_path):
    import yaml

    theta = a_theta(["news", "science"], seed=3).to_dict()
    theta["domains"]["news"]["epsilom"] = 0.1
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(theta))
    store = tmp_path / "store"  # no tables: the refusal comes before any data (or Spark) is needed
    base = ["-c", str(DEFAULT_CONF), "--set", f"storage.root={store}"]
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["sample", *base, "--params", str(path), *extra])
        assert result.exit_code == 1, result.output
        assert f"theta file '{path}': domain 'news': unknown key(s) ['epsilom']" in result.output
    theta["domains"]["news"].pop("epsilom")
    theta["domains"]["news"]["alpha"] = {c: 0.9 for c in theta["criteria"]}
    path.write_text(yaml.safe_dump(theta))
    result = CliRunner().invoke(app, ["sample", *base, "--params", str(path)])
    assert result.exit_code == 1 and "alpha['news'] sums to " in result.output and "np.float64" not in result.output
    result = CliRunner().invoke(app, ["sample", *base, "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and f"theta file '{tmp_path / 'nope.yaml'}' does not exist" in result.output
    assert not (store / "tables").exists()


def test_a_bad_theta_in_a_set_is_named_by_file_and_position(tmp_path):
    from quadmix_spark.kernel.theta import ThetaMismatchError
    from quadmix_spark.core.theta_sources import load_set

    domains = ["news", "science"]
    good, bad = a_theta(domains, seed=1).to_dict(), a_theta(domains, seed=2).to_dict()
    bad["domains"]["news"]["epsilom"] = 0.1
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"thetas": [good, bad]}))
    criteria = list(good["criteria"])
    with pytest.raises(ValueError, match=r"set\.json, θ number 1: domain 'news': unknown key\(s\) \['epsilom'\]"):
        load_set(str(path), domains, criteria)
    path.write_text(json.dumps([good]))
    with pytest.raises(ThetaMismatchError, match=r"set\.json, θ number 0: theta domains do not match: missing \['sports'\]"):
        load_set(str(path), [*domains, "sports"], criteria)
    assert [t.theta_id for t in load_set(str(path), domains, criteria)] == [good["theta_id"]]
