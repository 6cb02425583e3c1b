"""Packaging and layout: the wheel ships every module executors import; jobs/ and the CLI match 1:1."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import typer.main

from quadmix_spark.cli import app
from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
    )
    (whl,) = out.glob("quadmix_spark-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_carries_the_compiled_tokenizer_loop_for_every_python_from_3_11(wheel):
    # the stable ABI: a Databricks runtime on a later CPython installs the same wheel
    assert "-cp311-abi3-" in wheel.filename, wheel.filename
    assert any(n.startswith("quadmix_udfs/_bpe_native") and n.endswith(".abi3.so") for n in wheel.namelist())


def test_wheel_ships_the_library_the_kernel_and_the_udf_adapters(wheel):
    names = set(wheel.namelist())
    expected = {f"quadmix_spark/{p.relative_to(REPO / 'quadmix_spark')}" for p in (REPO / "quadmix_spark").rglob("*.py")}
    expected |= {f"quadmix_udfs/{p.relative_to(REPO / 'udfs')}" for p in (REPO / "udfs").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "quadmix = quadmix_spark.cli:main" in wheel.read(entry_points).decode()


def test_every_job_file_is_a_cli_stage_and_back():
    commands = {c.name for c in typer.main.get_command(app).commands.values()} - {"config"}
    jobs = {p.stem.replace("_", "-") for p in (REPO / "jobs").glob("*.py")}
    assert commands == jobs
    for job in (REPO / "jobs").glob("*.py"):
        assert f'main(["{job.stem.replace("_", "-")}", *sys.argv[1:]])' in job.read_text()


def test_every_stage_has_one_runner_in_jobs_and_no_stage_module_calls_a_runner():
    import re

    from quadmix_spark import jobs

    commands = {c.name for c in typer.main.get_command(app).commands.values()} - {"config"}
    for command in commands:
        assert callable(getattr(jobs, command.replace("-", "_") + "_job", None)), command
    for path in (REPO / "quadmix_spark").rglob("*.py"):
        if path.relative_to(REPO / "quadmix_spark").as_posix() in ("jobs.py", "cli.py"):
            continue
        text = path.read_text()
        assert not re.search(r"^def \w+_job\(", text, re.M), f"{path} defines a stage runner outside jobs.py"
        assert "quadmix_spark.jobs" not in text and "import jobs" not in text, f"{path} imports the runners"


def test_a_stage_run_opens_only_in_the_shared_plumbing():
    # a stage's MLflow run (lease, config, fingerprint, stale-run cleanup) opens in core/tracking.stage_run, which
    # the runners call; stage modules log into it or make child records (client.create_run), never start one
    opened = sorted(p.relative_to(REPO / "quadmix_spark").as_posix() for p in (REPO / "quadmix_spark").rglob("*.py")
                    if "start_run(" in p.read_text())
    assert opened == ["core/tracking.py", "jobs.py"], opened
    assert "nested=True" in next(line for line in (REPO / "quadmix_spark" / "jobs.py").read_text().splitlines()
                                 if "start_run(" in line)  # train-scorers' one run per model, inside the stage's run


def test_kernel_does_not_import_spark():
    for path in Path(REPO / "quadmix_spark" / "kernel").glob("*.py"):
        assert "pyspark" not in path.read_text(), path


def _imports(path: Path) -> set[str]:
    """The quadmix_spark modules a file imports (at any depth of the file: lazy imports count too)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quadmix_spark"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("quadmix_spark")}
    return out


# The one crossing allowed each way (README "Layout"): core's config composes the workflows' config sections; the
# search turns θ into data with the curation's sampler; the reference-LM scorer is the proxy model, trained by the
# proxy's loop on the proxy's data types (settings, vocabulary map).
ALLOWED_CROSSINGS = {
    ("core/config.py", "quadmix_spark.curation.config"), ("core/config.py", "quadmix_spark.search.config"),
    ("search/evaluate.py", "quadmix_spark.curation.sample"), ("search/proxy.py", "quadmix_spark.curation.sample"),
    ("curation/causal_lm_train.py", "quadmix_spark.search.proxy_model"),
    ("curation/causal_lm_train.py", "quadmix_spark.search.proxy_train"),
    ("curation/causal_lm_train.py", "quadmix_spark.search.proxy_data"),
}
FORBIDDEN = {"kernel": ("core", "curation", "search"), "core": ("curation", "search"), "curation": ("search",),
             "search": ("curation",)}


def test_the_packages_import_in_one_direction_core_and_kernel_below_the_two_workflows():
    found = set()
    for package, below in FORBIDDEN.items():
        for path in (REPO / "quadmix_spark" / package).rglob("*.py"):
            rel = path.relative_to(REPO / "quadmix_spark").as_posix()
            for mod in _imports(path):
                parts = mod.split(".")
                if len(parts) > 1 and parts[1] in below:
                    found.add((rel, ".".join(parts[:3])))
    assert found <= ALLOWED_CROSSINGS, sorted(found - ALLOWED_CROSSINGS)
    # the rule is enforced, not vacuous: the allowed crossings exist
    assert ALLOWED_CROSSINGS <= found, sorted(ALLOWED_CROSSINGS - found)
