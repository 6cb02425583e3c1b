"""Propose θ for a search (spec §3.1): one MLflow parent run per search, one child run per θ.

MLflow contract (what ``quadmix proxy`` writes and ``quadmix search`` reads; users' own trainers may
fill it in instead, see README "Bring your own trainer"):

- parent run: tags ``quadmix.search=<name>``, ``quadmix.role=search``; params ``search.seed``,
  ``search.lambda_mode``, ``search.criteria`` (and the domains, all criteria and the sampler's version: the
  settings the θ were drawn with, which ``quadmix search`` checks); artifacts ``thetas.json`` (every proposed
  θ, so that ``quadmix sample --params-set <parent run id>`` reads the set) and ``domain_tokens.json`` (the
  pool's tokens per domain).
- child run per θ: tags ``mlflow.parentRunId``, ``quadmix.search``, ``quadmix.role=proxy``,
  ``quadmix.theta_id``, ``quadmix.proposal_index``, ``quadmix.domains`` / ``quadmix.criteria`` (JSON
  lists) and ``quadmix.proxy.status`` (pending | running | finished | failed); θ as flat params
  (``quadmix.alpha.<domain>.<criterion>``, ``quadmix.lambda.<domain>``, ``quadmix.omega.<domain>``,
  ``quadmix.eta.<domain>``, ``quadmix.epsilon.<domain>``) and ``theta.json``; once trained, metric
  ``target_loss`` (and ``target_loss.<task>``) and run status FINISHED.

θ number i of a search is drawn with Algorithm 1 from ``default_rng([seed, i])``, so proposing more
θ later extends a search without changing the ones it has; proposing again is a no-op.

**Refinement** (:func:`refine`, ``quadmix propose --refine N``): after a fit, N more θ: the candidates the
search's newest fit predicts best, leaving out θ the search already has. Their children carry
``quadmix.refine.fit`` (the fit's run id), ``quadmix.refine.fit_inputs`` (its ``quadmix.fit.inputs`` digest: a
refit of the same runs with the same settings is the same fit, so proposing after it is a no-op),
``quadmix.refine.round`` and ``quadmix.refine.rank`` instead of a proposal index; ``thetas.json`` lists them after Algorithm 1's θ (and their ids under ``refined``).
``quadmix propose --refine N --from <search>`` puts the best candidates of another search's fit into a search of
their own (param ``search.seeded_from``), to be trained with another proxy (a second, costlier fidelity).

**Replicates** (:func:`replicate`, ``quadmix propose --replicate N --seeds S``): the N θ of a search whose first
training measured best, trained again with S more seeds (a race among the best, where one run's seed noise is as
large as the differences between them). Their children carry the θ's params, ``quadmix.theta_id``,
``quadmix.seed`` (the training seed ``quadmix proxy`` uses for that run instead of ``proxy.train.seed``),
``quadmix.replicate.of`` (the θ's first run) and ``quadmix.replicate.rank``; a fit with
``search.theta_star: trained`` ranks the θ by the mean of their runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from quadmix_spark.core.config import QuadmixConfig
from quadmix_spark.kernel.theta import Theta, feature_names, sample_theta_matrix
from quadmix_spark.core.runs import (DOMAIN_TOKENS_ARTIFACT, PENDING, ROLE_PROXY, ROLE_SEARCH, TAG_CRITERIA, TAG_DOMAINS, TAG_FIT_INPUTS,
                                TAG_N_PROPOSALS, TAG_PARENT, TAG_PROPOSAL_INDEX, TAG_PROXY_STATUS, TAG_REFINE_FIT,
                                TAG_REFINE_FIT_INPUTS, TAG_REFINE_RANK, TAG_REFINE_ROUND, TAG_REPLICATE_OF, TAG_REPLICATE_RANK,
                                TAG_ROLE, TAG_SEARCH, TAG_SEED, TAG_STAGE, TAG_THETA_ID,
                                THETA_ARTIFACT, THETAS_ARTIFACT, child_runs, experiment_id, find_search, latest_fit,
                                require_search)
from quadmix_spark.core.theta_sources import theta_params

SAMPLER_VERSION = "algorithm1/1"  # recorded on a search: a change to the θ sampler's ranges must bump it


def sampler_version(sc) -> str:
    """What a search records as its sampler: :data:`SAMPLER_VERSION`, plus the shared-ω̃ share and spread when
    used (``search.shared_omega``); the fit draws its candidates only with the sampler its proposals had."""
    if not sc.shared_omega:
        return SAMPLER_VERSION
    return f"{SAMPLER_VERSION}+shared-omega/{sc.shared_omega:g}/{sc.omega_spread:g}"


def draw_theta(domains: list[str], criteria: list[str], seed: int, index: int, lambda_mode: str,
               active: list[str] | None = None, shared_omega: float = 0.0, omega_spread: float = 0.25) -> Theta:
    mask = None if active is None else [c in active for c in criteria]
    b = sample_theta_matrix(1, len(domains), len(criteria), np.random.default_rng([seed, index]), lambda_mode, mask,
                            shared_omega, omega_spread)
    return Theta(tuple(domains), tuple(criteria), b.alpha[0], b.lam[0], b.omega[0], b.eta[0], b.eps[0])


@dataclass
class ProposeResult:
    search: str
    parent_run_id: str
    thetas: list[Theta]
    created: int
    refined_from: str | None = None  # refine: the fit whose best candidates these θ are
    seeds: tuple[int, ...] = ()  # replicate: the training seeds these θ get again

    def summary(self) -> str:
        if self.seeds:
            return (f"search {self.search!r} (MLflow run {self.parent_run_id}): the {len(self.thetas)} best θ again with "
                    f"seeds {list(self.seeds)}, {self.created} new run(s); next: quadmix proxy --search {self.search}, "
                    "quadmix search (search.theta_star: trained ranks θ by their mean)")
        what = f"{len(self.thetas)} θ" if self.refined_from is None else \
            f"{len(self.thetas)} refined θ (the best candidates of fit {self.refined_from})"
        return (f"search {self.search!r} (MLflow run {self.parent_run_id}): {what}, {self.created} new; "
                f"next: quadmix proxy --search {self.search}" + ("" if self.refined_from is None else ", quadmix search"))


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, repr(v) if isinstance(v, float) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _create_child(client, exp_id: str, run_name: str, tags: dict[str, str], theta: Theta) -> None:
    """One θ's run: pending, its θ as params and ``theta.json``, status SCHEDULED (what ``proxy`` picks up)."""
    from quadmix_spark.core import faults

    child = client.create_run(exp_id, run_name=run_name, tags={**tags, TAG_THETA_ID: theta.theta_id, TAG_PROXY_STATUS: PENDING})
    faults.point("propose.child.created")
    _log_params(client, child.info.run_id, theta_params(theta))
    client.log_dict(child.info.run_id, theta.to_dict(), THETA_ARTIFACT)
    client.update_run(child.info.run_id, status="SCHEDULED")


def propose(cfg: QuadmixConfig, domains: list[str], criteria: list[str], n: int,
            domain_tokens: dict[str, int] | None = None) -> ProposeResult:
    """Make sure search ``cfg.search.name`` has θ number 0..n-1 (creating what is missing). ``domain_tokens``
    (the pool's tokens per domain) is recorded on the parent run: the search derives each θ's domain mix
    from it (:class:`~quadmix_spark.search.regression.Featurizer`)."""
    import mlflow

    from quadmix_spark.core import faults
    from quadmix_spark.core.run_guard import settle_children
    from quadmix_spark.core.tracking import configure_mlflow

    sc = cfg.search
    if sc.criteria is not None:
        unknown = sorted(set(sc.criteria) - set(criteria))
        if unknown:
            raise ValueError(f"search.criteria names {unknown}, not criteria of the annotations {criteria}")
    configure_mlflow(cfg)
    client = mlflow.MlflowClient()
    exp_id = experiment_id(client, cfg.tracking.experiment)
    parent = _open_parent(client, exp_id, cfg, {**draw_settings(sc), "search.domains": json.dumps(domains),
                                                "search.all_criteria": json.dumps(criteria)})
    parent_id = parent.info.run_id
    children = settle_children(client, child_runs(client, exp_id, parent_id), sc.metric, repair=True)
    existing = {int(r.data.tags[TAG_PROPOSAL_INDEX]) for r in children if TAG_PROPOSAL_INDEX in r.data.tags}
    thetas, created = [], 0
    tags_common = {TAG_PARENT: parent_id, TAG_SEARCH: sc.name, TAG_ROLE: ROLE_PROXY,
                   TAG_DOMAINS: json.dumps(domains), TAG_CRITERIA: json.dumps(criteria)}
    for i in range(n):
        theta = draw_theta(domains, criteria, sc.seed, i, sc.lambda_mode, sc.criteria, sc.shared_omega, sc.omega_spread)
        thetas.append(theta)
        if i in existing:
            continue
        _create_child(client, exp_id, f"theta-{i:04d}", {**tags_common, TAG_PROPOSAL_INDEX: str(i)}, theta)
        created += 1
    n_all = max([n, *(i + 1 for i in existing)])
    all_thetas = thetas + [draw_theta(domains, criteria, sc.seed, i, sc.lambda_mode, sc.criteria, sc.shared_omega, sc.omega_spread)
                           for i in range(n, n_all)]
    _log_thetas(client, parent_id, all_thetas, refined_thetas(children))
    if domain_tokens is not None:
        client.log_dict(parent_id, {d: int(v) for d, v in sorted(domain_tokens.items())}, DOMAIN_TOKENS_ARTIFACT)
    client.set_tag(parent_id, TAG_N_PROPOSALS, str(n_all))
    faults.point("propose.end")
    if parent.info.status == "RUNNING":
        client.set_terminated(parent_id, "FINISHED")
    return ProposeResult(sc.name, parent_id, all_thetas, created)


def draw_settings(sc) -> dict[str, str]:
    """What a search's parent records of the settings its θ are drawn with (besides its domains and criteria)."""
    return {"search.seed": str(sc.seed), "search.lambda_mode": sc.lambda_mode, "search.criteria": json.dumps(sc.criteria),
            "search.sampler": sampler_version(sc)}


def _open_parent(client, exp_id: str, cfg: QuadmixConfig, recorded: dict[str, str], extra: dict[str, str] | None = None):
    """Search ``cfg.search.name``'s parent run: created with ``recorded`` (and ``extra``) as params and the config,
    completed if a crash left it half made, refused if it exists with other ``recorded`` settings."""
    from quadmix_spark.core import faults
    from quadmix_spark.core.run_guard import resume_search_parent

    sc = cfg.search
    parent = resume_search_parent(client, find_search(client, exp_id, sc.name), recorded, cfg.resolved())
    if parent is None:
        parent = client.create_run(exp_id, run_name=f"search-{sc.name}",
                                   tags={TAG_SEARCH: sc.name, TAG_ROLE: ROLE_SEARCH, TAG_STAGE: "propose"})
        faults.point("propose.parent.created")
        _log_params(client, parent.info.run_id, {**recorded, **(extra or {})})
        client.log_dict(parent.info.run_id, cfg.resolved(), "config.yaml")
        return parent
    have = parent.data.params
    differ = {k: (have.get(k), v) for k, v in recorded.items() if k in have and have[k] != v}
    if differ:
        raise ValueError(f"search {sc.name!r} exists with other settings {differ} (recorded, now): "
                         "use another search.name or the recorded settings")
    return parent


def refined_thetas(children: list) -> list[Theta]:
    """The refined θ among a search's child runs (:func:`refine`), in round and rank order, read back from
    their params (logged as ``repr`` of each float, so the values and ids are exact)."""
    out = []
    for r in children:  # child_runs' order: Algorithm 1's θ, then the refined ones by round and rank
        t = r.data.tags
        if TAG_REFINE_FIT not in t:
            continue
        domains, criteria = json.loads(t[TAG_DOMAINS]), json.loads(t[TAG_CRITERIA])
        vec = [float(r.data.params[k]) for k in feature_names(domains, criteria)]
        out.append(Theta.from_vector(vec, domains, criteria))
    return out


def _log_thetas(client, parent_id: str, algorithm1: list[Theta], refined: list[Theta]) -> None:
    client.log_dict(parent_id, {"thetas": [t.to_dict() for t in [*algorithm1, *refined]],
                                "refined": [t.theta_id for t in refined]}, THETAS_ARTIFACT)


def refine(cfg: QuadmixConfig, n: int, source: str | None = None) -> ProposeResult:
    """Add to search ``cfg.search.name`` the ``n`` candidates its newest fit predicts best that it does not
    already have (:func:`~quadmix_spark.search.theta_star.ranked_candidates`): one refinement round, to be
    trained by ``quadmix proxy`` and fitted again by ``quadmix search``. Each round adds training runs where
    the fit places θ*, so the next fit is corrected exactly where it matters; the candidates are the fit's own
    Algorithm-1 draws, so the next fit searches the same distribution. Once the newest fit (or a fit of the same
    inputs, :func:`~quadmix_spark.search.theta_star.fit_inputs_key`) has ``n`` refined θ, a no-op; a crash in
    between is completed by running it again.

    With ``source`` (``--from``, another search's name) the candidates are the newest fit of ``source``, and
    search ``cfg.search.name`` is created for them when missing, recording the source's domains, criteria and
    pool, and the draw settings, which must be the source's (``search.seeded_from`` names it): a second search
    over the best of the first, typically trained with a costlier proxy than the one that screened them, and
    fitted with ``search.theta_star: trained``."""
    import mlflow

    from quadmix_spark.core.run_guard import settle_children
    from quadmix_spark.core.tracking import configure_mlflow
    from quadmix_spark.search.run_table import SearchInputError
    from quadmix_spark.search.theta_star import ranked_candidates

    if n < 1:
        raise ValueError(f"--refine needs a number of θ >= 1, got {n}")
    sc = cfg.search
    source = source or sc.name
    configure_mlflow(cfg)
    client = mlflow.MlflowClient()
    exp_id = experiment_id(client, cfg.tracking.experiment)
    fit = latest_fit(client, exp_id, source)
    if fit is None:
        require_search(client, exp_id, source)
        raise SearchInputError(f"search {source!r} has no fit to refine: run `quadmix proxy --search {source}` and "
                               f"`quadmix search --search {source}` first")
    parent = require_search(client, exp_id, sc.name) if source == sc.name else _seeded_parent(client, exp_id, cfg, source, fit)
    parent_id, fit_id = parent.info.run_id, fit.info.run_id
    children = settle_children(client, child_runs(client, exp_id, parent_id), sc.metric, repair=True)
    # a fit is known by its inputs' digest (a rerun of `quadmix search` with nothing new is the same fit under
    # another run id); fits and refined θ from before the digest was recorded, by the fit's run id
    fit_key = fit.data.tags.get(TAG_FIT_INPUTS) or fit_id

    def made_from(r) -> str | None:
        return r.data.tags.get(TAG_REFINE_FIT_INPUTS) or r.data.tags.get(TAG_REFINE_FIT)

    mine = [r for r in children if made_from(r) == fit_key]
    rounds = {made_from(r): int(r.data.tags.get(TAG_REFINE_ROUND, 0)) for r in children if TAG_REFINE_FIT in r.data.tags}
    round_no = rounds.get(fit_key, max(rounds.values(), default=0) + 1)
    have = {r.data.tags.get(TAG_THETA_ID) for r in children}
    created = 0
    if len(mine) < n:
        domains, criteria = json.loads(fit.data.tags[TAG_DOMAINS]), json.loads(fit.data.tags[TAG_CRITERIA])
        # enough candidates that n remain even if every θ the search has is among them
        k = min(int(fit.data.params["n_candidates"]), n + len(have))
        fresh = [t for t in ranked_candidates(client, exp_id, fit, k) if t.theta_id not in have][: n - len(mine)]
        tags_common = {TAG_PARENT: parent_id, TAG_SEARCH: sc.name, TAG_ROLE: ROLE_PROXY, TAG_DOMAINS: json.dumps(domains),
                       TAG_CRITERIA: json.dumps(criteria), TAG_REFINE_FIT: fit_id, TAG_REFINE_ROUND: str(round_no)}
        if TAG_FIT_INPUTS in fit.data.tags:
            tags_common[TAG_REFINE_FIT_INPUTS] = fit_key
        for j, theta in enumerate(fresh, start=len(mine)):
            _create_child(client, exp_id, f"refine-r{round_no}-{j:04d}", {**tags_common, TAG_REFINE_RANK: str(j)}, theta)
            created += 1
        children = child_runs(client, exp_id, parent_id)
    refined = refined_thetas(children)
    _log_thetas(client, parent_id, _algorithm1_thetas(client, parent_id), refined)
    if parent.info.status == "RUNNING":  # a seeded search's parent, made just now (or by a run that died)
        client.set_terminated(parent_id, "FINISHED")
    ids = {r.data.tags[TAG_THETA_ID] for r in children if made_from(r) == fit_key}
    return ProposeResult(sc.name, parent_id, [t for t in refined if t.theta_id in ids], created, refined_from=fit_id)


def replicate(cfg: QuadmixConfig, n: int, seeds: int) -> ProposeResult:
    """Make sure the ``n`` θ of search ``cfg.search.name`` whose first run measured the lowest metric are trained
    again with ``seeds`` more training seeds, ``proxy.train.seed + 1 .. + seeds`` (one child run per θ and seed,
    creating what is missing): a race among the best θ at a fidelity whose seed-to-seed noise is as large as
    the differences between them. Ranked by the first runs only (ties by θ id), so proposing again, after the
    replicates have trained, names the same θ; every first run must have finished (a θ still training could
    belong among the best)."""
    import mlflow

    from quadmix_spark.core.run_guard import settle_children
    from quadmix_spark.core.tracking import configure_mlflow
    from quadmix_spark.search.proxy import is_finished, theta_of_run
    from quadmix_spark.search.run_table import SearchInputError

    if n < 1 or seeds < 1:
        raise ValueError(f"--replicate needs a number of θ >= 1 and --seeds >= 1, got {n} and {seeds}")
    sc = cfg.search
    configure_mlflow(cfg)
    client = mlflow.MlflowClient()
    exp_id = experiment_id(client, cfg.tracking.experiment)
    parent_id = require_search(client, exp_id, sc.name).info.run_id
    children = settle_children(client, child_runs(client, exp_id, parent_id), sc.metric, repair=True)
    firsts = [r for r in children if TAG_REPLICATE_OF not in r.data.tags]
    unfinished = [r.info.run_id for r in firsts if not is_finished(r, sc.metric)]
    if unfinished:
        raise SearchInputError(f"search {sc.name!r} has {len(unfinished)} θ not trained yet (runs {unfinished[:3]}...): "
                               f"run `quadmix proxy --search {sc.name}` first; the race is among trained θ")
    best = sorted(firsts, key=lambda r: (r.data.metrics[sc.metric], r.data.tags[TAG_THETA_ID]))[:n]
    have = {(r.data.tags[TAG_REPLICATE_OF], int(r.data.tags[TAG_SEED])) for r in children if TAG_REPLICATE_OF in r.data.tags}
    wanted = [cfg.proxy.train.seed + j for j in range(1, seeds + 1)]
    created = 0
    for rank, first in enumerate(best):
        theta = theta_of_run(first)
        for seed in wanted:
            if (first.info.run_id, seed) in have:
                continue
            t = first.data.tags
            _create_child(client, exp_id, f"replicate-{rank:04d}-s{seed}",
                          {TAG_PARENT: parent_id, TAG_SEARCH: sc.name, TAG_ROLE: ROLE_PROXY, TAG_DOMAINS: t[TAG_DOMAINS],
                           TAG_CRITERIA: t[TAG_CRITERIA], TAG_REPLICATE_OF: first.info.run_id,
                           TAG_REPLICATE_RANK: str(rank), TAG_SEED: str(seed)}, theta)
            created += 1
    return ProposeResult(sc.name, parent_id, [theta_of_run(r) for r in best], created, seeds=tuple(wanted))


def _seeded_parent(client, exp_id: str, cfg: QuadmixConfig, source: str, fit):
    """The parent of search ``cfg.search.name`` seeded from ``source``'s fit ``fit``: made (or checked) with the
    source's domains, criteria and pool tokens and this config's draw settings, which must equal the source's (the
    seeded search's own fit draws its candidates with them)."""
    import tempfile
    from pathlib import Path

    from quadmix_spark.search.run_table import SearchInputError, same_setting

    src = require_search(client, exp_id, source)
    now, had = draw_settings(cfg.search), src.data.params
    differ = {k: (had[k], v) for k, v in now.items() if k != "search.seed" and k in had and not same_setting(k, had[k], v)}
    if differ:
        raise SearchInputError(f"search {source!r} drew its θ with {differ} (recorded, now): seed "
                               f"{cfg.search.name!r} from it with the same settings (--set key=recorded value)")
    recorded = {**now, "search.domains": fit.data.tags[TAG_DOMAINS], "search.all_criteria": fit.data.tags[TAG_CRITERIA]}
    parent = _open_parent(client, exp_id, cfg, recorded, extra={"search.seeded_from": source})
    seeded_from = parent.data.params.get("search.seeded_from")
    if seeded_from is not None and seeded_from != source:
        raise SearchInputError(f"search {cfg.search.name!r} was seeded from search {seeded_from!r}, not {source!r}: "
                               "give it another name")
    if DOMAIN_TOKENS_ARTIFACT not in {a.path for a in client.list_artifacts(parent.info.run_id)} and \
            DOMAIN_TOKENS_ARTIFACT in {a.path for a in client.list_artifacts(src.info.run_id)}:
        with tempfile.TemporaryDirectory() as tmp:
            tokens = json.loads(Path(client.download_artifacts(src.info.run_id, DOMAIN_TOKENS_ARTIFACT, tmp)).read_text())
        client.log_dict(parent.info.run_id, tokens, DOMAIN_TOKENS_ARTIFACT)
    return client.get_run(parent.info.run_id)


def _algorithm1_thetas(client, parent_id: str) -> list[Theta]:
    """The Algorithm-1 θ a search's ``thetas.json`` lists (those not named under ``refined``)."""
    import tempfile
    from pathlib import Path

    if THETAS_ARTIFACT not in {a.path for a in client.list_artifacts(parent_id)}:
        return []  # a search seeded from another's fit (``refine(..., source)``) has no Algorithm-1 θ
    with tempfile.TemporaryDirectory() as tmp:
        doc = json.loads(Path(client.download_artifacts(parent_id, THETAS_ARTIFACT, tmp)).read_text())
    refined = set(doc.get("refined", []))
    thetas = [Theta.from_dict(d) for d in doc["thetas"]]
    return [t for t in thetas if t.theta_id not in refined]
