"""The Databricks bundle (deploy/databricks) and the spark-submit files (deploy/spark-submit), checked offline.

The bundle's targets are resolved here (variables, target overrides) and every job is validated with the
typed models of `databricks-bundles` (``Job.from_dict`` rejects unknown fields and bad enum values), then
against the wheel: the entry point exists, each task's subcommand is a `quadmix` command, its options parse,
and its config files and ``--set`` overrides load. No workspace is contacted.
"""

from __future__ import annotations

import glob
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

BUNDLE = REPO / "deploy" / "databricks"
SPARK_SUBMIT = REPO / "deploy" / "spark-submit"

# Stages that run on the GPU job cluster / with the GPU settings of submit.sh.
GPU_STAGES = {"annotate", "proxy", "evaluate"}
CURATION = ["ingest", "annotate", "normalize", "sample"]
SEARCH = ["propose", "proxy", "search", "evaluate"]

# Values of the bundle's built-in references, as the Databricks CLI would fill them for a user.
WORKSPACE_FILE_PATH = "/Workspace/Users/someone@example.com/.bundle/quadmix-spark/{target}/files"


# ---------------------------------------------------------------- resolving the bundle


def _deep_merge(base: Any, update: Any) -> Any:
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for k, v in update.items():
            out[k] = _deep_merge(base.get(k), v) if k in base else v
        return out
    return update


_REF = re.compile(r"\$\{([A-Za-z0-9_.\-\[\]]+)\}")


def _resolve(value: Any, refs: dict[str, Any], used: set[str]) -> Any:
    """Replace ``${name}`` references; a string that is a single reference takes the value's type."""
    if isinstance(value, dict):
        return {k: _resolve(v, refs, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, refs, used) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(name: str) -> Any:
        if name not in refs:
            raise AssertionError(f"unknown reference ${{{name}}}")
        used.add(name)
        return refs[name]

    if (m := _REF.fullmatch(value)) is not None:
        return _resolve(lookup(m.group(1)), refs, used)
    return _REF.sub(lambda m: str(_resolve(lookup(m.group(1)), refs, used)), value)


def load_bundle(target: str | None = None) -> dict:
    """databricks.yml with its includes; with ``target``, that target's overrides applied and references resolved."""
    root = yaml.safe_load((BUNDLE / "databricks.yml").read_text())
    resources: dict = {}
    for pattern in root.get("include", []):
        files = sorted(glob.glob(str(BUNDLE / pattern)))
        assert files, f"include {pattern!r} matches no file"
        for f in files:
            data = yaml.safe_load(Path(f).read_text())
            assert set(data) <= {"resources"}, f"{f}: only `resources` belongs in a resource file"
            resources = _deep_merge(resources, data["resources"])
    bundle = {**root, "resources": resources}
    if target is None:
        return bundle
    tgt = root["targets"][target] or {}
    bundle = _deep_merge(bundle, {k: v for k, v in tgt.items() if k not in ("variables", "default")})
    variables = {name: spec.get("default") for name, spec in root["variables"].items()}
    for name, value in (tgt.get("variables") or {}).items():
        assert name in variables, f"target {target} sets undeclared variable {name}"
        variables[name] = value
    missing = [n for n, v in variables.items() if v is None]
    assert not missing, f"variables without a value in {target}: {missing}"
    refs = {f"var.{k}": v for k, v in variables.items()}
    refs |= {"bundle.name": root["bundle"]["name"], "bundle.target": target,
             "workspace.file_path": WORKSPACE_FILE_PATH.format(target=target)}
    used: set[str] = set()
    bundle = _resolve(bundle, refs, used)
    bundle["_unused_variables"] = sorted(k for k in refs if k.startswith("var.") and k not in used)
    return bundle


def jobs(target: str | None = None) -> dict[str, dict]:
    return load_bundle(target)["resources"]["jobs"]


def tasks(job: dict) -> dict[str, dict]:
    return {t["task_key"]: t for t in job["tasks"]}


def task_stage(task: dict) -> str:
    return task["python_wheel_task"]["parameters"][0]


# ---------------------------------------------------------------- the wheel's side


def cli_commands() -> dict:
    import typer.main

    from quadmix_spark.cli import app

    return dict(typer.main.get_command(app).commands)


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------- tests

TARGETS = ["dev", "prod"]


def test_bundle_layout():
    bundle = load_bundle()
    assert bundle["bundle"]["name"] == "quadmix-spark"
    assert set(bundle["targets"]) == set(TARGETS)
    assert set(jobs()) == {"quadmix_curation", "quadmix_search"}
    assert (BUNDLE / "resources" / "curation.job.yml").exists() and (BUNDLE / "resources" / "search.job.yml").exists()
    artifact = bundle["artifacts"]["quadmix_wheel"]
    assert artifact["type"] == "whl" and (BUNDLE / artifact["path"]).resolve() == REPO


@pytest.mark.parametrize("target", [None, *TARGETS])
def test_jobs_validate_with_the_typed_models(target):
    """Every job parses into `databricks.bundles.jobs.Job` (unresolved: references are typed variables)."""
    from databricks.bundles.jobs import Job

    for name, job in jobs(target).items():
        model = Job.from_dict(job)
        assert model.name and model.tasks, name
        assert Job.from_dict(model.as_dict()) == model  # the whole document survived the round trip


@pytest.mark.parametrize("target", TARGETS)
def test_every_variable_is_used(target):
    assert load_bundle(target)["_unused_variables"] == []


@pytest.mark.parametrize("target", TARGETS)
def test_task_graph_and_clusters(target):
    for name, job in jobs(target).items():
        clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
        by_key = tasks(job)
        for key, task in by_key.items():
            assert task["job_cluster_key"] in clusters, f"{name}.{key}: unknown job cluster"
            for dep in task.get("depends_on", []):
                assert dep["task_key"] in by_key, f"{name}.{key} depends on unknown task {dep['task_key']}"
            gpu = "gpu" in clusters[task["job_cluster_key"]]["spark_version"]
            assert gpu == (task_stage(task) in GPU_STAGES), f"{name}.{key}: GPU stage on the wrong cluster"
    assert _chain(jobs(target)["quadmix_curation"]) == CURATION
    assert _chain(jobs(target)["quadmix_search"]) == SEARCH


def _chain(job: dict) -> list[str]:
    """The stages in dependency order; the graph must be one chain."""
    by_key = tasks(job)
    deps = {k: [d["task_key"] for d in t.get("depends_on", [])] for k, t in by_key.items()}
    order, done = [], set()
    while len(order) < len(by_key):
        ready = [k for k in by_key if k not in done and all(d in done for d in deps[k])]
        assert len(ready) == 1, f"not a single chain (ready: {ready})"
        order.append(ready[0])
        done.add(ready[0])
    return [task_stage(by_key[k]) for k in order]


def test_schedules_paused_in_dev_and_running_in_prod():
    dev, prod = load_bundle("dev"), load_bundle("prod")
    assert dev["targets"]["dev"]["mode"] == "development" and prod["targets"]["prod"]["mode"] == "production"
    for job in dev["resources"]["jobs"].values():
        for trigger in ("schedule", "trigger", "continuous"):
            if trigger in job:
                assert job[trigger]["pause_status"] == "PAUSED"
    assert prod["resources"]["jobs"]["quadmix_curation"]["schedule"]["pause_status"] == "UNPAUSED"


@pytest.mark.parametrize("target", TARGETS)
def test_tasks_call_the_wheel_entry_point(target):
    """package_name/entry_point name this project's console script, and the library is the built wheel."""
    scripts = project()["scripts"]
    for name, job in jobs(target).items():
        for key, task in tasks(job).items():
            wheel_task = task["python_wheel_task"]
            assert _normalized(wheel_task["package_name"]) == _normalized(project()["name"]), f"{name}.{key}"
            assert scripts.get(wheel_task["entry_point"]) == "quadmix_spark.cli:main", f"{name}.{key}"
            libs = [lib["whl"] for lib in task.get("libraries", []) if "whl" in lib]
            assert libs, f"{name}.{key}: no wheel library"
            for lib in libs:  # relative to the resource file: the artifact's dist/ folder
                assert (BUNDLE / "resources" / lib).resolve().parent == REPO / "dist", f"{name}.{key}: {lib}"


def _job_parameter_defaults(job: dict) -> dict[str, str]:
    return {p["name"]: str(p["default"]) for p in job.get("parameters", [])}


def _local_args(args: list[str], job: dict, target: str) -> list[str]:
    """Task parameters as they would reach the CLI, with workspace paths mapped back to this checkout."""
    defaults = _job_parameter_defaults(job)
    out = []
    for a in args:
        a = re.sub(r"\{\{job\.parameters\.([A-Za-z0-9_]+)\}\}", lambda m: defaults[m.group(1)], a)
        out.append(a.replace(WORKSPACE_FILE_PATH.format(target=target), str(BUNDLE)))
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_task_commands_exist_and_their_options_and_configs_load(target):
    commands = cli_commands()
    for name, job in jobs(target).items():
        defaults = _job_parameter_defaults(job)
        for key, task in tasks(job).items():
            params = task["python_wheel_task"]["parameters"]
            for ref in re.findall(r"\{\{job\.parameters\.([A-Za-z0-9_]+)\}\}", " ".join(params)):
                assert ref in defaults, f"{name}.{key}: unknown job parameter {ref}"
            stage = params[0]
            assert stage in commands, f"{name}.{key}: `quadmix {stage}` does not exist"
            args = _local_args(params[1:], job, target)
            ctx = commands[stage].make_context(stage, list(args))  # unknown options raise here
            _load_task_config(ctx.params)


def _load_task_config(params: dict) -> None:
    """The task's config files and --set overrides load and validate (the stage would start)."""
    from quadmix_spark.core.config import load_config

    overrides = list(params.get("set_") or [])
    if params.get("input_"):
        overrides.append(f"ingest.input={params['input_']}")
    files = params.get("config") or []
    for f in files:
        assert Path(f).exists(), f"config file {f} is not in the bundle"
    load_config(files, overrides)


def test_databricks_config_file_loads():
    from quadmix_spark.core.config import load_config

    cfg = load_config([BUNDLE / "conf" / "databricks.yaml"], ["storage.catalog=main", "storage.schema=quadmix"])
    assert cfg.tracking_uri == "databricks" and cfg.storage.table("documents") == "main.quadmix.documents"


# ---------------------------------------------------------------- spark-submit files


def _submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([str(SPARK_SUBMIT / "submit.sh"), *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **(env or {})})


def _local_python() -> str:
    """The interpreter submit.sh uses on this machine ($QUADMIX_PYTHON, else .venv/bin/python)."""
    import os

    return os.environ.get("QUADMIX_PYTHON") or str(REPO / ".venv" / "bin" / "python")


def _confs(out: str) -> dict[str, str]:
    import shlex

    words = shlex.split(out)
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--conf")


def test_submit_gpu_stages_match_the_bundle():
    text = (SPARK_SUBMIT / "submit.sh").read_text()
    default = re.search(r'QUADMIX_GPU_STAGES:-([a-z ]+)\}', text).group(1)
    assert set(default.split()) == GPU_STAGES


K8S_ENV = {"K8S_API_SERVER": "https://kubernetes.example:443", "QUADMIX_SPARK_IMAGE": "registry.example/spark:4.2.0",
           "QUADMIX_UPLOAD_PATH": "s3a://bucket/uploads"}


@pytest.mark.parametrize("target,env", [("standalone", {}), ("yarn", {}), ("k8s", K8S_ENV), ("local", {})])
def test_submit_command_per_target(target, env):
    out = _submit("ingest", "--target", target, "--print", "--", "-c", "conf/default.yaml", "--set", "a.b=1", env=env)
    assert out.returncode == 0, out.stderr
    confs = _confs(out.stdout)
    cluster_mode = confs.get("spark.submit.deployMode") == "cluster"
    assert confs["spark.pyspark.python"] == "./environment/bin/python"
    assert confs["spark.pyspark.driver.python"] == ("./environment/bin/python" if cluster_mode else _local_python())
    assert "#environment" in out.stdout and "--jars" in out.stdout
    assert out.stdout.rstrip().endswith(("jobs/ingest.py -c default.yaml --set a.b=1" if cluster_mode
                                         else "jobs/ingest.py -c conf/default.yaml --set a.b=1"))
    assert "spark.executor.resource.gpu.amount" not in confs  # ingest is a CPU stage


def test_submit_gpu_settings_and_overrides(tmp_path):
    out = _submit("ingest", "--target", "yarn", "--gpu", "--local-python", "--master", "yarn",
                  "--conf", "spark.task.resource.gpu.amount=1", "--print")
    assert out.returncode == 0, out.stderr
    confs = _confs(out.stdout)
    assert confs["spark.executor.resource.gpu.amount"] == "1" and confs["spark.task.resource.gpu.amount"] == "1"
    assert confs["spark.executor.resource.gpu.discoveryScript"] == "./getGpusResources.sh"
    assert "getGpusResources.sh" in out.stdout.split("--files", 1)[1].split()[0]
    assert confs["spark.pyspark.python"] == _local_python()
    k8s = _confs(_submit("ingest", "--target", "k8s", "--gpu", "--print", env=K8S_ENV).stdout)
    assert k8s["spark.executor.resource.gpu.vendor"] == "nvidia.com"


def test_submit_errors_are_clear():
    out = _submit("no-such-stage", "--print")
    assert out.returncode == 2 and "no stage 'no-such-stage'" in out.stderr and "ingest" in out.stderr
    out = _submit("ingest", "--target", "k8s", "--print", env={"K8S_API_SERVER": ""})
    assert out.returncode == 2 and "K8S_API_SERVER is not set" in out.stderr
    out = _submit("ingest", "--target", "mesos", "--print")
    assert out.returncode == 2 and "unknown target 'mesos'" in out.stderr


def test_gpu_discovery_script_output():
    import json

    script = SPARK_SUBMIT / "getGpusResources.sh"
    out = subprocess.run([str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "QUADMIX_GPU_ADDRESSES": "0,1"})
    assert out.returncode == 0 and json.loads(out.stdout) == {"name": "gpu", "addresses": ["0", "1"]}
    out = subprocess.run([str(script)], capture_output=True, text=True, env={"PATH": "/nonexistent:/usr/bin:/bin"})
    if out.returncode == 0:  # a machine with GPUs: whatever nvidia-smi lists
        assert json.loads(out.stdout)["name"] == "gpu" and json.loads(out.stdout)["addresses"]
    else:
        assert "nvidia-smi" in out.stderr
