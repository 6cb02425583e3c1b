"""The MLflow contract between stages, in one place: tag, role, status and artifact names, and the queries
that find a search's runs.

What the stages leave in MLflow and read back:

- every stage run: ``quadmix.stage``, ``quadmix.config_fingerprint`` and the lease tags of
  :mod:`quadmix_spark.core.run_guard` (``quadmix.host``, ``quadmix.pid``, ``quadmix.pid_start``, ``quadmix.lease``;
  ``quadmix.failure`` when it was ended for a dead driver);
- a search (``quadmix propose``): a parent run (role ``search``) with ``thetas.json`` and
  ``domain_tokens.json``, and a child run per θ (role ``proxy``) with ``theta.json``, the θ id, its proposal
  index, the domain and criterion names (JSON lists) and the proxy status (pending | running | finished |
  failed), the proxy's settings fingerprint and, when it failed, the error;
- a fit (``quadmix search``, role ``search-fit``) with ``theta_star.json``;
- an evaluation (``quadmix evaluate``, role ``evaluate``) and one run per arm and seed (role
  ``evaluate-proxy``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# ---------------------------------------------------------------------------------------------- tags
TAG_PARENT = "mlflow.parentRunId"
TAG_STAGE = "quadmix.stage"
TAG_CONFIG_FINGERPRINT = "quadmix.config_fingerprint"
TAG_ROLE = "quadmix.role"
TAG_SEARCH = "quadmix.search"
TAG_THETA_ID = "quadmix.theta_id"
TAG_PROPOSAL_INDEX = "quadmix.proposal_index"
TAG_N_PROPOSALS = "quadmix.n_proposals"
TAG_REFINE_FIT = "quadmix.refine.fit"        # a refined θ: the fit whose best candidate it was (no proposal index)
TAG_REFINE_ROUND = "quadmix.refine.round"    # 1 for the first fit refined from, 2 for the next, ...
TAG_REFINE_RANK = "quadmix.refine.rank"      # its place among that fit's refined θ (0 = predicted best)
TAG_REFINE_FIT_INPUTS = "quadmix.refine.fit_inputs"  # that fit's TAG_FIT_INPUTS: a refit of the same inputs is the same fit
TAG_REPLICATE_OF = "quadmix.replicate.of"    # a θ trained again with another seed: the run of its first training
TAG_REPLICATE_RANK = "quadmix.replicate.rank"  # that θ's place by its first run's metric (0 = best)
TAG_FIT_INPUTS = "quadmix.fit.inputs"        # on a fit: a digest of everything it was fitted from (fit_inputs_key)
TAG_DOMAINS = "quadmix.domains"     # a JSON list
TAG_CRITERIA = "quadmix.criteria"   # a JSON list
TAG_PROXY_STATUS = "quadmix.proxy.status"
TAG_PROXY_ERROR = "quadmix.proxy.error"
TAG_PROXY_FINGERPRINT = "quadmix.proxy.fingerprint"
TAG_PROXY_DEVICE = "quadmix.proxy.device"
TAG_SEARCH_RUN_ID = "quadmix.search_run_id"      # on a fit: its search's parent run
TAG_SEARCH_WARNINGS = "quadmix.search.warnings"
TAG_THETA_STAR = "quadmix.theta_star"            # on an evaluation: the θ* it evaluates
TAG_SEARCH_FIT_RUN = "quadmix.search_fit_run"    # on an evaluation: the fit θ* came from
TAG_BASELINES_VERSION = "quadmix.baselines_version"
TAG_BASELINE_FRACTION = "quadmix.baseline_fraction"
TAG_ARM = "quadmix.arm"
TAG_SEED = "quadmix.seed"
TAG_RUN = "quadmix.run"                          # on a sample run: sampling.run
TAG_KNOTS_WRITTEN = "quadmix.knots_written"
TAG_ANNOTATIONS_VERSION = "quadmix.annotations_version"
TAG_MODEL = "quadmix.model"                      # on a scorer's training run
TAG_TRAIN_WARNINGS = "quadmix.train.warnings"
TAG_HOST, TAG_PID, TAG_PID_START, TAG_LEASE = "quadmix.host", "quadmix.pid", "quadmix.pid_start", "quadmix.lease"
TAG_FAILURE = "quadmix.failure"

PARAM_GPU_STAGE = "quadmix.annotate.gpu_stage"

# --------------------------------------------------------------------------------------------- roles
ROLE_SEARCH = "search"
ROLE_PROXY = "proxy"
ROLE_FIT = "search-fit"
ROLE_EVALUATE = "evaluate"
ROLE_EVALUATE_PROXY = "evaluate-proxy"

# ------------------------------------------------------------------------------ proxy run statuses
PENDING, RUNNING, FINISHED, FAILED = "pending", "running", "finished", "failed"

# ----------------------------------------------------------------------------------------- artifacts
THETA_ARTIFACT = "theta.json"                 # one θ: a proxy run
THETAS_ARTIFACT = "thetas.json"               # every θ of a search: its parent run
THETA_STAR_ARTIFACT = "theta_star.json"       # a fit's θ*, and the evaluation's copy
DOMAIN_TOKENS_ARTIFACT = "domain_tokens.json"  # tokens per domain: a search's parent run

PAGE_SIZE = 1000  # search_runs returns at most this many runs a call


class SearchNotFound(LookupError):
    """No search of that name in the experiment."""


class ThetaStarMissing(LookupError):
    """A search has no fitted θ* yet."""


def quote(value: str) -> str:
    """``value`` as a quoted string of an MLflow filter (a name with a quote in it is refused)."""
    if "'" in value:
        raise ValueError(f"name {value!r} must not contain a quote")
    return f"'{value}'"


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise SearchNotFound(f"MLflow experiment {name!r} does not exist: run `quadmix propose` first")
    return exp.experiment_id


def search_all(client, exp_id: str, filter_string: str, order: str = "attributes.start_time ASC") -> list:
    """Every active run matching the filter, page by page (any number of runs)."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=PAGE_SIZE, order_by=[order], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def role_filter(role: str, search: str | None = None) -> str:
    """The filter for runs of ``role`` (of search ``search`` when given)."""
    where = f"tags.`{TAG_ROLE}` = {quote(role)}"
    return where if search is None else f"{where} and tags.`{TAG_SEARCH}` = {quote(search)}"


def search_parents(client, exp_id: str, name: str) -> list:
    """The parent runs of search ``name``, oldest first (normally one)."""
    return search_all(client, exp_id, role_filter(ROLE_SEARCH, name))


def find_search(client, exp_id: str, name: str):
    """The parent run of search ``name`` (the oldest if several), or None."""
    runs = client.search_runs([exp_id], filter_string=role_filter(ROLE_SEARCH, name),
                              order_by=["attributes.start_time ASC"], max_results=10)
    return runs[0] if runs else None


def require_search(client, exp_id: str, name: str):
    """:func:`find_search`, or :class:`SearchNotFound` naming the searches there are."""
    run = find_search(client, exp_id, name)
    if run is None:
        known = sorted({r.data.tags.get(TAG_SEARCH) for r in search_all(client, exp_id, role_filter(ROLE_SEARCH))} - {None})
        raise SearchNotFound(f"no search named {name!r} (searches in this experiment: {known or 'none'}): "
                             f"run `quadmix propose --search {name}`")
    return run


def child_runs(client, exp_id: str, parent_id: str) -> list:
    """Every child run of a parent run, in proposal order, refined θ after Algorithm 1's by round and rank
    (paged: any number of θ)."""
    runs = search_all(client, exp_id, f"tags.`{TAG_PARENT}` = {quote(parent_id)}")

    def order(r):
        t = r.data.tags
        return (TAG_REFINE_FIT in t, int(t.get(TAG_PROPOSAL_INDEX, 0)), int(t.get(TAG_REFINE_ROUND, 0)),
                int(t.get(TAG_REFINE_RANK, 0)), r.info.run_id)

    return sorted(runs, key=order)


def latest_fit(client, exp_id: str, search: str):
    """The newest fit (``quadmix search``) of ``search``, or None."""
    runs = client.search_runs([exp_id], filter_string=role_filter(ROLE_FIT, search),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def latest_theta_star(client, exp_id: str, search: str) -> tuple[str, dict]:
    """(run id, θ* dict) of the newest fit of ``search``; :class:`ThetaStarMissing` when it has none."""
    run = latest_fit(client, exp_id, search)
    if run is None:
        raise ThetaStarMissing(f"search {search!r} has no fitted θ*: run `quadmix search --search {search}` first")
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, THETA_STAR_ARTIFACT, tmp)
        return run.info.run_id, json.loads(Path(local).read_text())


def names_tag(run, tag: str) -> tuple[str, ...] | None:
    """A JSON-list tag (:data:`TAG_DOMAINS`, :data:`TAG_CRITERIA`) of a run; None when absent or not a list."""
    raw = run.data.tags.get(tag)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(value)
