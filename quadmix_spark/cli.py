"""The ``quadmix`` command: one subcommand per stage, each the same function as ``jobs/<stage>.py``.

Every stage command takes ``--config/-c FILE`` (repeatable, merged in order; default ``conf/default.yaml``)
and ``--set section.key=value`` (repeatable), validates the config before any Spark work, and prints the
resolved config instead of running with ``--dry-run``.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Annotated

import typer
import yaml

from quadmix_spark.core.config import ConfigError, QuadmixConfig, load_config

app = typer.Typer(help="QuaDMix data selection on Spark, Delta Lake and MLflow.", no_args_is_help=True, add_completion=False)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigFiles = Annotated[list[str] | None, typer.Option("--config", "-c", help="YAML config file (repeatable)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the resolved config and what would run, then stop")]


def _load(files: list[str] | None, overrides: list[str] | None) -> QuadmixConfig:
    try:
        return load_config(files, overrides)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@contextmanager
def _user_errors(cfg: QuadmixConfig):
    """Problems with the user's input (files, names, tables, an unreachable tracking server) end the command
    with their message, not a traceback. The tracking server is checked first, before any Spark work.
    Another run holding this stage's lease on the store ends it with exit code 75 (try again later)."""
    from quadmix_spark.curation.corpus_files import IngestInputError
    from quadmix_spark.curation.normalize import KnotsMissingError
    from quadmix_spark.core.runs import SearchNotFound, ThetaStarMissing
    from quadmix_spark.core.run_guard import BUSY_EXIT_CODE, StageBusy
    from quadmix_spark.core.tracking import TrackingUnreachable, check_tracking

    try:
        check_tracking(cfg)
        yield
    except StageBusy as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(BUSY_EXIT_CODE) from None
    except (IngestInputError, KnotsMissingError, FileNotFoundError, ValueError,
            TrackingUnreachable, SearchNotFound, ThetaStarMissing) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


def _show(cfg: QuadmixConfig, fmt: str = "yaml") -> None:
    data = cfg.resolved()
    typer.echo(json.dumps(data, indent=2) if fmt == "json" else yaml.safe_dump(data, sort_keys=False))


def _run_stage(cfg: QuadmixConfig, dry_run: bool, runner: str, *args, would: str | None = None, exit_code=None, **kwargs):
    """What every stage command shares: ``--dry-run`` prints the resolved config (and ``would``) and stops;
    else the runner ``quadmix_spark.jobs.<runner>`` runs under :func:`_user_errors`, its report's summary is
    printed, and ``exit_code(report)`` (when given) ends the command with that code when it is not 0. The jobs
    module is imported only here, so ``--help`` and ``--dry-run`` start no JVM and load no model library."""
    if dry_run:
        _show(cfg)
        if would:
            typer.echo(would)
        return None
    from quadmix_spark import jobs

    with _user_errors(cfg):
        report = getattr(jobs, runner)(cfg, *args, **kwargs)
    typer.echo(report.summary())
    code = exit_code(report) if exit_code else 0
    if code:
        raise typer.Exit(code)
    return report


@config_app.command("show")
def config_show(
    config: ConfigFiles = None,
    set_: Overrides = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Print the resolved configuration (defaults + files + overrides, environment expanded)."""
    _show(_load(config, set_), fmt)


@app.command()
def ingest(
    config: ConfigFiles = None,
    set_: Overrides = None,
    input_: Annotated[list[str] | None, typer.Option("--input", "-i", help="path or glob; replaces ingest.input")] = None,
    dry_run: DryRun = False,
) -> None:
    """Read a JSONL/Parquet/Delta corpus into the `documents` table (bad rows into `rejects`)."""
    overrides = list(set_ or [])
    if input_:
        overrides.append(f"ingest.input={json.dumps(input_)}")
    cfg = _load(config, overrides)
    _run_stage(cfg, dry_run, "ingest_job", would=f"# would ingest {cfg.ingest.input} into {cfg.storage.table('documents')}",
               exit_code=lambda report: 0 if report.balanced else 3)


@app.command("train-scorers")
def train_scorers(config: ConfigFiles = None, set_: Overrides = None, dry_run: DryRun = False) -> None:
    """Train the configured quality and domain scorers (fastText, TF-IDF/ONNX, MiniLM + head) with held-out metrics."""
    _run_stage(_load(config, set_), dry_run, "train_scorers_job")


@app.command()
def annotate(
    config: ConfigFiles = None,
    set_: Overrides = None,
    rescore: Annotated[list[str] | None, typer.Option("--rescore", help="scorer to recompute for its new version (repeatable)")] = None,
    dry_run: DryRun = False,
) -> None:
    """Score new documents with every configured scorer into the `annotations` table (Delta MERGE)."""
    _run_stage(_load(config, set_), dry_run, "annotate_job", rescore=rescore)


@app.command()
def normalize(config: ConfigFiles = None, set_: Overrides = None, dry_run: DryRun = False) -> None:
    """Compute the σ knots (per-criterion token-weighted percentiles) of the current annotations."""
    _run_stage(_load(config, set_), dry_run, "normalize_job")


@app.command()
def sample(
    config: ConfigFiles = None,
    set_: Overrides = None,
    params: Annotated[str | None, typer.Option("--params", help="θ: a YAML/JSON file, an MLflow run id, or search:<name> (its newest θ*)")] = None,
    params_set: Annotated[str | None, typer.Option("--params-set", help="many θ: a file, a folder or an MLflow run id")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="random | mix | topk:<criterion>")] = None,
    random_theta: Annotated[int | None, typer.Option("--random-theta", help="a θ drawn by Algorithm 1 with this seed")] = None,
    dry_run: DryRun = False,
) -> None:
    """Sample with one θ (selection + training output + export), a baseline, or many θ (proxy index)."""
    if sum(x is not None for x in (params, params_set, baseline, random_theta)) != 1:
        typer.echo("error: give exactly one of --params, --params-set, --baseline, --random-theta", err=True)
        raise typer.Exit(2)
    cfg = _load(config, set_)
    from quadmix_spark import jobs

    if dry_run:
        if not params:
            _show(cfg)
            return
        with _user_errors(cfg):
            report = jobs.sample_dry_run_job(cfg, params)
        typer.echo(report.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
        t = report.sum(numeric_only=True)
        typer.echo(f"total: expected {t.expected_tokens:,.0f} tokens, unique {t.expected_unique_tokens:,.0f}, "
                   f"repetition {t.expected_tokens / max(t.expected_unique_tokens, 1):.2f} (estimates from the rank histogram)")
        budget = cfg.sampling.budget_tokens
        if budget:
            typer.echo(f"the training output is then fitted to sampling.budget_tokens = {budget:,} "
                       f"({budget / max(t.expected_tokens, 1):.2f} x the expected selection)")
        return
    if params_set:
        _run_stage(cfg, False, "sample_many_job", params_set)
    else:
        _run_stage(cfg, False, "sample_job", params=params, baseline=baseline, random_seed=random_theta)


SearchName = Annotated[str | None, typer.Option("--search", help="search name (sets search.name)")]


def _with_search(set_: list[str] | None, search: str | None) -> list[str]:
    return [*(set_ or []), *([f"search.name={search}"] if search else [])]


@app.command()
def propose(
    config: ConfigFiles = None,
    set_: Overrides = None,
    n: Annotated[int | None, typer.Option("-n", help="number of θ (default search.n_proposals)")] = None,
    search: SearchName = None,
    refine: Annotated[int | None, typer.Option(
        "--refine", help="instead: add this many θ, the best candidates of the search's newest fit (a refinement round)")] = None,
    from_: Annotated[str | None, typer.Option(
        "--from", help="with --refine: the best candidates of this other search's newest fit, into --search (made if "
                       "missing): e.g. a screening search's favourites, to train with the transformer proxy")] = None,
    replicate: Annotated[int | None, typer.Option(
        "--replicate", help="instead: train the N θ whose first run measured best again with --seeds more seeds (a race "
                            "among the best; fit with search.theta_star=trained, which ranks θ by their mean)")] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="with --replicate: how many more training seeds")] = 2,
    dry_run: DryRun = False,
) -> None:
    """Draw K θ with Algorithm 1 into a search: an MLflow parent run and one child run per θ. With --refine N, add
    the N candidates the newest fit predicts best (then `quadmix proxy` and `quadmix search` again); with --from S
    as well, those of search S's newest fit (fit the new search with search.theta_star=trained). With --replicate N,
    the N best trained θ again with --seeds other training seeds."""
    if sum(x is not None for x in (n, refine, replicate)) > 1:
        raise typer.BadParameter("-n, --refine and --replicate are three ways to add runs: give one")
    if from_ is not None and refine is None:
        raise typer.BadParameter("--from names the search whose fit --refine N takes its θ from: give --refine N too")
    _run_stage(_load(config, _with_search(set_, search)), dry_run, "propose_job", n, refine=refine, source=from_,
               replicate=replicate, seeds=seeds)


@app.command()
def proxy(config: ConfigFiles = None, set_: Overrides = None, search: SearchName = None, dry_run: DryRun = False) -> None:
    """Train the search's unfinished proxy models (one Spark task per θ), logging target loss to each θ's run."""
    _run_stage(_load(config, _with_search(set_, search)), dry_run, "proxy_job",
               exit_code=lambda report: 1 if report.failed else 0)


@app.command()
def search(
    config: ConfigFiles = None,
    set_: Overrides = None,
    search: Annotated[list[str] | None, typer.Option("--search", help="search name (repeatable: one fit over several)")] = None,
    dry_run: DryRun = False,
) -> None:
    """Fit LightGBM from θ to target loss over finished proxies, and average the best candidates into θ*."""
    _run_stage(_load(config, _with_search(set_, search[0] if search else None)), dry_run, "search_job", search)


@app.command()
def evaluate(config: ConfigFiles = None, set_: Overrides = None, search: SearchName = None, dry_run: DryRun = False) -> None:
    """Train fresh proxies on θ* and on the baselines (several seeds) and report target loss mean ± std."""
    _run_stage(_load(config, _with_search(set_, search)), dry_run, "evaluate_job")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (also used by ``jobs/*.py`` under spark-submit)."""
    from quadmix_spark.core.faults import arm

    arm()
    app(args=argv if argv is not None else sys.argv[1:], prog_name="quadmix")


if __name__ == "__main__":
    main()
