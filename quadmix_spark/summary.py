"""What a pipeline run left behind, in a few lines: tables, the search, θ*, the export, the comparison.

``python -m quadmix_spark.summary -c conf/default.yaml ...`` (the last step of ``make demo``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quadmix_spark.core.config import QuadmixConfig, StorageConfig, load_config
from quadmix_spark.core.runs import ROLE_EVALUATE, ROLE_FIT, ROLE_PROXY, ROLE_SEARCH, role_filter, search_all


def _tables(cfg: QuadmixConfig) -> list[str]:
    from quadmix_spark.core.session import get_spark
    from quadmix_spark.core.storage import read_table, table_exists

    spark = get_spark(cfg)
    lines = []
    for name in ("documents", "rejects", "annotations", "selection", "training_output", "proxy_index"):
        table = cfg.storage.table(name)
        if not table_exists(spark, table):
            continue
        df = read_table(spark, table)
        extra = ""
        if name == "annotations":
            extra = f", {df.select('domain').distinct().count()} domains"
        if name in ("selection", "training_output"):
            runs = sorted(r[0] for r in df.select("run").distinct().collect())
            extra = f", runs {runs}"
        if name == "proxy_index":
            extra = f", {df.select('theta_id').distinct().count()} θ"
        lines.append(f"  {name:<16} {df.count():>9,} rows{extra}   ({table})")
    return lines


def _search(cfg: QuadmixConfig) -> list[str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return ["  (no MLflow experiment yet)"]
    name, lines = cfg.search.name, []
    q = lambda role: search_all(client, exp.experiment_id, role_filter(role, name), order="attributes.start_time DESC")
    parents, children, fits, evals = q(ROLE_SEARCH), q(ROLE_PROXY), q(ROLE_FIT), q(ROLE_EVALUATE)
    if not parents:
        return [f"  search {name!r}: not proposed yet"]
    done = sum(r.info.status == "FINISHED" and cfg.search.metric in r.data.metrics for r in children)
    lines.append(f"  search {name!r}: parent run {parents[0].info.run_id}, {len(children)} θ proposed, {done} proxies finished")
    if fits:
        m = fits[0].data.metrics
        lines.append(f"  θ* from run {fits[0].info.run_id}: LightGBM cross-validated MAE {m.get('cv_mae', float('nan')):.4f}, "
                     f"Spearman {m.get('cv_spearman', float('nan')):.3f}; sample with --params search:{name}")
    if evals:
        metric = cfg.search.metric
        lines.append(f"  evaluate run {evals[0].info.run_id} ({metric} on the held-out part, mean ± std over seeds; "
                     "paired: baseline − θ*, positive = θ* better):")
        m = evals[0].data.metrics
        arms = {k[len(metric) + 1 : -len(".mean")] for k in m if k.startswith(f"{metric}.") and k.endswith(".mean")}
        for arm in sorted(arms, key=lambda a: m[f"{metric}.{a}.mean"]):
            paired = (f"   paired {m[f'paired.{arm}.mean']:+.4f} ± {m.get(f'paired.{arm}.se', float('nan')):.4f} SE, "
                      f"θ* better on {int(m.get(f'paired.{arm}.wins', 0))}/{int(m.get(f'paired.{arm}.n', 0))}"
                      if f"paired.{arm}.mean" in m else "")
            lines.append(f"    {arm:<22} {m[f'{metric}.{arm}.mean']:.4f} ± {m.get(f'{metric}.{arm}.std', 0):.4f}{paired}")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m quadmix_spark.summary")
    ap.add_argument("-c", "--config", action="append")
    ap.add_argument("--set", action="append", dest="overrides")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print("quadmix: what this store holds")
    print("\n".join(_tables(cfg)))
    print("\n".join(_search(cfg)))
    export = Path(cfg.storage.path("export"))
    for manifest in sorted(export.glob("*/manifest.json")) if export.exists() else []:
        m = json.loads(manifest.read_text())
        print(f"  export {manifest.parent.name}: {m['rows']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards ({manifest})")
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:"):
        how = f"mlflow ui --backend-store-uri {uri}" if Path(cfg.storage.root).resolve() != Path(StorageConfig.model_fields["root"].default).resolve() else "make ui"
        print(f"MLflow UI: {how}   (http://127.0.0.1:5000; open experiment {cfg.tracking.experiment!r}, search runs nest their proxies)")
    else:
        print(f"MLflow runs: {uri}, experiment {cfg.tracking.experiment!r}")


if __name__ == "__main__":
    main()
