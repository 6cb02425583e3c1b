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
    for path in (REPO / "quadmix_spark").glob("*.py"):
        if path.name in ("jobs.py", "cli.py"):
            continue
        text = path.read_text()
        assert not re.search(r"^def \w+_job\(", text, re.M), f"{path.name} defines a stage runner outside jobs.py"
        assert "quadmix_spark.jobs" not in text and "import jobs" not in text, f"{path.name} imports the runners"


def test_kernel_does_not_import_spark():
    for path in Path(REPO / "quadmix_spark" / "kernel").glob("*.py"):
        assert "pyspark" not in path.read_text(), path
