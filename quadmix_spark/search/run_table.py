"""Reading a search's runs: the finished proxy runs of one or more searches as a feature table, and the
checks that they can be fitted together (spec §3.3).

Input: the MLflow contract
--------------------------
The runs are read from the experiment ``cfg.tracking.experiment`` of the store ``cfg.tracking_uri``.
Other stages (``quadmix propose``, ``quadmix proxy``) write them, and a user's own trainer may too:

- a **search** is a parent run tagged ``quadmix.search=<name>`` and ``quadmix.role=search``;
- each **θ** is a child run tagged ``quadmix.search=<name>``, ``quadmix.role=proxy``,
  ``quadmix.theta_id=<id>``, ``quadmix.domains=<JSON list>``, ``quadmix.criteria=<JSON list>`` and
  ``mlflow.parentRunId=<parent run id>``, carrying θ as params under the names of
  :func:`quadmix_spark.kernel.theta.feature_names` (``quadmix.alpha.<domain>.<criterion>``,
  ``quadmix.lambda.<domain>``, ``quadmix.omega.<domain>``, ``quadmix.eta.<domain>``,
  ``quadmix.epsilon.<domain>``; values are strings of floats, the rescaled λ̃, ω̃, η̃, ε̃);
- a proxy that finished has run status ``FINISHED`` and the metric named ``cfg.search.metric``
  (default ``target_loss``; the last logged value is used).

Only finished proxy runs with a finite metric enter the fit; running, failed and killed runs, and
runs without the metric, are counted and skipped. Features are built **by name** from the params (never
by position), in the canonical order of ``feature_names(domains, criteria)``. The fit refuses, with
:class:`SearchInputError`, runs that disagree on the domain or criterion names (for example two searches
over different domain sets), runs lacking a feature param or the name tags, and params that are not
numbers; an unknown search name is an error listing the searches the experiment holds.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from quadmix_spark.core.runs import (DOMAIN_TOKENS_ARTIFACT, ROLE_PROXY, ROLE_SEARCH, TAG_CRITERIA, TAG_DOMAINS,
                                     TAG_PROXY_FINGERPRINT, TAG_ROLE, TAG_SEARCH, TAG_THETA_ID, names_tag, quote,
                                     search_all)
from quadmix_spark.kernel.theta import feature_names

_LIST_LIMIT = 10  # names/run ids shown in an error message before "... and n more"


class SearchInputError(ValueError):
    """The runs cannot be fitted as they are: unknown search, disagreeing names, missing params, too few runs."""


def _short(items: Sequence[Any], limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------- collect runs
@dataclass
class RunTable:
    """The finished proxy runs of one or more searches, as a feature matrix.

    ``X`` has the columns ``feature_names(domains, criteria)`` in that order; row i belongs to
    ``run_ids[i]`` (θ ``theta_ids[i]`` of search ``search_of_run[i]``) with target ``y[i]``. Rows are
    sorted by (search, θ id, run id), so the table does not depend on the store's listing order.
    ``skipped`` counts, per search, runs left out and why (``status:<STATUS>``, ``no_metric``).
    """

    X: pd.DataFrame
    y: np.ndarray
    run_ids: list[str]
    theta_ids: list[str]
    search_of_run: list[str]
    domains: tuple[str, ...]
    criteria: tuple[str, ...]
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict[str, int]:
        """Finished proxy runs per search."""
        out: dict[str, int] = {}
        for s in self.search_of_run:
            out[s] = out.get(s, 0) + 1
        return out


def search_names_in(client, experiment_id: str) -> list[str]:
    """The search names that appear in the experiment (on search parents and proxy runs), sorted."""
    names: set[str] = set()
    for role in (ROLE_SEARCH, ROLE_PROXY):
        for run in search_all(client, experiment_id, f"tags.`{TAG_ROLE}` = '{role}'"):
            name = run.data.tags.get(TAG_SEARCH)
            if name:
                names.add(name)
    return sorted(names)


def collect_runs(client, experiment_id: str, search_names: Sequence[str], metric: str) -> RunTable:
    """The finished proxy runs (status FINISHED, role ``proxy``, metric present and finite) of the named
    searches, features built by name from the params (see the module docstring for the contract).

    Raises :class:`SearchInputError` for an unknown search name (listing those the experiment holds),
    runs without the ``quadmix.domains``/``quadmix.criteria`` tags, runs that disagree on those names
    (naming the searches and the differing names), missing feature params (naming them) and params that
    are not numbers.
    """
    if isinstance(search_names, str):
        search_names = [search_names]
    names = list(dict.fromkeys(search_names))
    if not names:
        raise SearchInputError("no search names given")

    finished: dict[str, list] = {}
    skipped: dict[str, dict[str, int]] = {}
    unknown = []
    for name in names:
        runs = search_all(
            client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_PROXY}'"
        )
        if not runs and not search_all(
            client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"
        ):
            unknown.append(name)
            continue
        keep, skip = [], {}
        for run in runs:
            if run.info.status != "FINISHED":
                reason = f"status:{run.info.status}"
            elif metric not in run.data.metrics or not math.isfinite(run.data.metrics[metric]):
                reason = "no_metric"
            else:
                keep.append(run)
                continue
            skip[reason] = skip.get(reason, 0) + 1
        finished[name], skipped[name] = keep, skip
    if unknown:
        found = search_names_in(client, experiment_id)
        raise SearchInputError(
            f"unknown search name(s) {unknown} in experiment {experiment_id}: no runs tagged "
            f"{TAG_SEARCH}=<name>; searches found there: {found or 'none'}"
        )

    # -- domain and criterion names: every run must carry them, and all must agree (as sets)
    untagged = [r.info.run_id for rs in finished.values() for r in rs
                if names_tag(r, TAG_DOMAINS) is None or names_tag(r, TAG_CRITERIA) is None]
    if untagged:
        raise SearchInputError(
            f"{len(untagged)} finished proxy run(s) lack a JSON list in the tags {TAG_DOMAINS} / {TAG_CRITERIA}: "
            f"{_short(untagged)}"
        )
    variants: dict[tuple[frozenset, frozenset], dict[str, Any]] = {}
    for name, rs in finished.items():
        for r in rs:
            doms, crits = names_tag(r, TAG_DOMAINS), names_tag(r, TAG_CRITERIA)
            key = (frozenset(doms), frozenset(crits))
            v = variants.setdefault(key, {"domains": doms, "criteria": crits, "searches": {}, "runs": 0})
            v["searches"][name] = v["searches"].get(name, 0) + 1
            v["runs"] += 1
    if len(variants) > 1:
        vs = list(variants.values())
        ref = vs[0]
        lines = []
        for v in vs:
            where = ", ".join(f"{s!r} ({n} runs)" for s, n in v["searches"].items())
            line = f"  searches {where}: {len(v['domains'])} domains, criteria {list(v['criteria'])}"
            if v is not ref:
                diffs = []
                for label, key in (("domains", "domains"), ("criteria", "criteria")):
                    extra = sorted(set(v[key]) - set(ref[key]))
                    missing = sorted(set(ref[key]) - set(v[key]))
                    if extra:
                        diffs.append(f"extra {label} {_short(extra)}")
                    if missing:
                        diffs.append(f"missing {label} {_short(missing)}")
                line += f"; against the first: {'; '.join(diffs)}"
            lines.append(line)
        raise SearchInputError(
            "the runs disagree on domain/criterion names, so their θ are not the same features; "
            "fit each set of searches separately:\n" + "\n".join(lines)
        )
    # losses from proxies trained differently (model, tokens, target set) are not one regression target
    prints: dict[str, list[str]] = {}
    for name, rs in finished.items():
        for r in rs:
            fp = r.data.tags.get(TAG_PROXY_FINGERPRINT)
            if fp:
                prints.setdefault(fp, []).append(name)
    if len(prints) > 1:
        detail = "; ".join(f"{fp}: {len(v)} runs of {sorted(set(v))}" for fp, v in prints.items())
        raise SearchInputError(
            f"the runs were trained with different proxy settings (tag {TAG_PROXY_FINGERPRINT}: {detail}); "
            "their losses are not comparable: fit runs of one proxy setting at a time"
        )

    # canonical order: the first run's (no finished run at all: an empty table, check_enough reports it)
    first = next((r for rs in finished.values() for r in rs), None)
    domains = names_tag(first, TAG_DOMAINS) if first is not None else ()
    criteria = names_tag(first, TAG_CRITERIA) if first is not None else ()

    # -- features by name
    cols = feature_names(domains, criteria) if domains else []
    rows, ys, run_ids, theta_ids, of_search = [], [], [], [], []
    lacking: dict[str, list[str]] = {}
    bad_values: list[str] = []
    for name, rs in finished.items():
        for r in rs:
            params = r.data.params
            missing = [c for c in cols if c not in params]
            if missing:
                lacking[r.info.run_id] = missing
                continue
            try:
                rows.append([float(params[c]) for c in cols])
            except ValueError:
                bad = [c for c in cols if not _is_float(params[c])]
                bad_values.append(f"{r.info.run_id}: {_short([f'{c}={params[c]!r}' for c in bad], 3)}")
                continue
            ys.append(float(r.data.metrics[metric]))
            run_ids.append(r.info.run_id)
            theta_ids.append(r.data.tags.get(TAG_THETA_ID, ""))
            of_search.append(name)
    if lacking:
        all_missing = sorted({c for m in lacking.values() for c in m}, key=cols.index)
        raise SearchInputError(
            f"{len(lacking)} finished proxy run(s) lack feature params {_short(all_missing)} "
            f"(runs {_short(list(lacking))}); every θ param {cols[0]!r}... must be logged"
        )
    if bad_values:
        raise SearchInputError(f"feature params that are not numbers: {_short(bad_values, 5)}")

    order = sorted(range(len(ys)), key=lambda i: (names.index(of_search[i]), theta_ids[i], run_ids[i]))
    X = pd.DataFrame(np.array([rows[i] for i in order], dtype=np.float64).reshape(len(order), len(cols)), columns=cols)
    return RunTable(
        X=X,
        y=np.array([ys[i] for i in order], dtype=np.float64),
        run_ids=[run_ids[i] for i in order],
        theta_ids=[theta_ids[i] for i in order],
        search_of_run=[of_search[i] for i in order],
        domains=tuple(domains),
        criteria=tuple(criteria),
        skipped=skipped,
    )


def _is_float(s: Any) -> bool:
    try:
        float(s)
    except (TypeError, ValueError):
        return False
    return True


def check_enough(n: int | Mapping[str, int], min_runs: int, names: Sequence[str] | str) -> None:
    """Raise :class:`SearchInputError` when fewer than ``min_runs`` finished proxy runs are available.

    ``n`` is the total, or a mapping search name -> count (the message then names each search's count).
    """
    label = names if isinstance(names, str) else ", ".join(names)
    total = sum(n.values()) if isinstance(n, Mapping) else int(n)
    if total >= min_runs:
        return
    per = ""
    if isinstance(n, Mapping) and len(n) > 1:
        per = " (" + ", ".join(f"{k}: {v}" for k, v in n.items()) + ")"
    raise SearchInputError(
        f"search {label} has only {total} finished proxy runs{per}, need {min_runs} "
        "(run `quadmix proxy` or lower search.min_runs)"
    )


# ------------------------------------------------------------------------------- candidate settings
# What `quadmix propose` records on a search's parent run (the settings its θ were drawn with), against the
# config setting the fit's candidates are drawn with. A fit over θ drawn one way and candidates drawn another
# would search outside the region its regressor was fitted on (an ablation's θ*, for instance, gaining weight
# on the ablated criterion).
DRAW_SETTINGS = {"search.lambda_mode": "search.lambda_mode", "search.criteria": "search.criteria",
                 "search.sampler": "the candidate sampler"}


def check_draw_settings(client, experiment_id: str, names: Sequence[str], cfg, table: RunTable) -> None:
    """Refuse a fit whose candidates would be drawn with other settings than any included search's θ were
    (``search.lambda_mode``, ``search.criteria``, the sampler's version), or over other domains or criteria.
    A search whose parent run records none (a user's own trainer) is not checked."""
    from quadmix_spark.search.propose import sampler_version

    now = {"search.lambda_mode": cfg.search.lambda_mode, "search.criteria": json.dumps(cfg.search.criteria),
           "search.sampler": sampler_version(cfg.search), "search.domains": json.dumps(list(table.domains)),
           "search.all_criteria": json.dumps(list(table.criteria))}
    for name in names:
        parents = search_all(client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'")
        for parent in parents:
            recorded = parent.data.params
            for key, value in now.items():
                have = recorded.get(key)
                if have is None or same_setting(key, have, value):
                    continue
                raise SearchInputError(
                    f"search {name!r} drew its θ with {key}={have}, but this fit would draw its candidates with {value}: "
                    f"the regressor would be searched outside the region it was fitted on; fit with "
                    + ("the search.shared_omega / search.omega_spread it was proposed with" if key == "search.sampler"
                       else f"--set {key}={have}")
                    + (" (or fit the searches separately)" if len(names) > 1 else "")
                )


def same_setting(key: str, recorded: str, now: str) -> bool:
    """Whether a draw setting a search's parent recorded equals ``now`` (name lists compared as sets)."""
    if key in ("search.criteria", "search.domains", "search.all_criteria"):
        a, b = json.loads(recorded), json.loads(now)
        return (a is None and b is None) or (a is not None and b is not None and sorted(a) == sorted(b))
    return recorded == now



def search_domain_tokens(client, experiment_id: str, names: Sequence[str], domains: Sequence[str]) -> tuple[float, ...] | None:
    """The pool's tokens per domain recorded on the searches' parent runs (in ``domains`` order), or None when
    a search has none (proposed before it was recorded, or by a user's own tooling). Searches over different
    pools are refused: their domain mixes would not be comparable."""

    found = {}
    for name in names:
        for parent in search_all(client, experiment_id, f"tags.`{TAG_SEARCH}` = {quote(name)} AND tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"):
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    tokens = json.loads(Path(client.download_artifacts(parent.info.run_id, DOMAIN_TOKENS_ARTIFACT, tmp)).read_text())
            except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                return None
            found[name] = tuple(float(tokens.get(d, 0.0)) for d in domains)
    if not found:
        return None
    values = set(found.values())
    if len(values) > 1:
        raise SearchInputError(f"searches {sorted(found)} were proposed over pools with other tokens per domain: fit them apart")
    return values.pop()
