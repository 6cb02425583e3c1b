"""Reading θ for the sampler: one θ file, or a parameter set (a file of many θ, or an MLflow run)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml

from quadmix_spark.kernel.theta import Theta, load_theta
from quadmix_spark.core.runs import THETA_ARTIFACT, THETA_STAR_ARTIFACT, THETAS_ARTIFACT, child_runs, latest_fit

_RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")


def load_one(path: str, domains: list[str], criteria: list[str]) -> Theta:
    """A θ file (YAML/JSON), an MLflow run (id or ``runs:/<id>``) holding ``theta_star.json`` (a search
    fit) or ``theta.json`` (a proposal), or ``search:<name>``: the newest θ* of that search. Domain and
    criterion names must match the data's."""
    m = _RUN_ID.match(path)
    if Path(path).exists() or not (m or path.startswith("search:")):
        return load_theta(path, domains=domains, criteria=criteria)
    import mlflow

    client = mlflow.MlflowClient()
    run_id = latest_search_fit(client, path.removeprefix("search:")) if path.startswith("search:") else m.group(2)
    names = {a.path for a in client.list_artifacts(run_id)}
    artifact = next((a for a in (THETA_STAR_ARTIFACT, THETA_ARTIFACT) if a in names), None)
    if artifact is None:
        raise FileNotFoundError(f"MLflow run {run_id} has no {THETA_STAR_ARTIFACT} or {THETA_ARTIFACT} artifact")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, artifact, tmp)
        return Theta.from_dict(json.loads(Path(local).read_text()), domains=domains, criteria=criteria)


def check_file(path: str) -> None:
    """Read a θ given as a file (not an MLflow run) before any Spark work: a missing file, bad YAML/JSON,
    unknown keys or invalid values fail at once. The names are matched to the data later, by ``load_one``."""
    if (_RUN_ID.match(path) and not Path(path).exists()) or path.startswith("search:"):
        return
    load_theta(path)


def _from_document(doc, domains, criteria, where: str) -> list[Theta]:
    items = doc.get("thetas") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: expected a list of θ (or {{thetas: [...]}})")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Theta.from_dict(item, domains=domains, criteria=criteria))
        except ValueError as e:  # ThetaMismatchError included: keep its type, say which θ of which file
            raise type(e)(f"{where}, θ number {i}: {e}") from None
    return out


def latest_search_fit(client, search: str) -> str:
    """Run id of the newest search fit (``quadmix search``) of ``search`` in the active experiment."""
    from mlflow.tracking.fluent import _get_experiment_id

    run = latest_fit(client, _get_experiment_id(), search)
    if run is None:
        raise FileNotFoundError(f"--params search:{search}: search {search!r} has no fitted θ* (run `quadmix search --search {search}`)")
    return run.info.run_id


def load_set(source: str, domains: list[str], criteria: list[str]) -> list[Theta]:
    """K θ from a YAML/JSON file (a list, or ``{thetas: [...]}``), a folder of θ files, or an MLflow run.

    An MLflow run is given by id (or ``runs:/<id>``): its ``thetas.json`` artifact, else the
    ``theta.json`` of each of its child runs (a search's parent run), in start-time order.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
        return [load_theta(p, domains=domains, criteria=criteria) for p in files]
    if path.exists():
        doc = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        return _from_document(doc, domains, criteria, str(path))
    m = _RUN_ID.match(source)
    if not m:
        raise FileNotFoundError(f"--params-set {source!r}: no such file or folder, and not an MLflow run id")
    return _from_mlflow(m.group(2), domains, criteria)


def _from_mlflow(run_id: str, domains, criteria) -> list[Theta]:
    import mlflow

    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        if THETAS_ARTIFACT in names:
            local = client.download_artifacts(run_id, THETAS_ARTIFACT, tmp)
            return _from_document(json.loads(Path(local).read_text()), domains, criteria, f"run {run_id}")
        run = client.get_run(run_id)
        children = child_runs(client, run.info.experiment_id, run_id)
        if not children:
            raise ValueError(f"MLflow run {run_id} has no {THETAS_ARTIFACT} artifact and no child runs")
        out = []
        for child in children:
            local = client.download_artifacts(child.info.run_id, THETA_ARTIFACT, tmp)
            out.append(Theta.from_dict(json.loads(Path(local).read_text()), domains=domains, criteria=criteria))
        return out


def theta_params(theta: Theta) -> dict[str, float]:
    """θ as flat MLflow params under stable names (``quadmix.alpha.<domain>.<criterion>``, ...)."""
    from quadmix_spark.kernel.theta import feature_names

    return dict(zip(feature_names(theta.domains, theta.criteria), (float(v) for v in theta.to_vector())))
