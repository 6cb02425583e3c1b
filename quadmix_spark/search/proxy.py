"""Proxy runs (spec §3.2): train one tiny LM per θ on the pool through its index, as Spark tasks.

Flow of ``quadmix proxy``: the search's unfinished child runs → the pool (tokenized once) → the proxy
index of those θ (one many-θ sampler job) → one plan file per θ (doc hash, S, shard, offset, length:
numbers only, no text) → one Spark task per θ that trains, evaluates on the target set and logs to the
θ's own MLflow run from the executor. Tasks request ``proxy.cpus_per_task`` CPUs and
``proxy.gpus_per_task`` GPUs (fractions pack several proxies on one GPU) through stage-level scheduling
where the cluster supports it; ``proxy.mode: local`` trains in the driver process instead.

Resumable: a θ whose run is FINISHED with the metric is skipped; a failed or interrupted one is
trained again from the start on the next run (its run is reopened, the metric is logged once, at the
end, so nothing is counted twice). A failure is recorded on its run (status FAILED, tag
``quadmix.proxy.error``) and does not stop the other θ.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from quadmix_spark.core import faults
from quadmix_spark.core.config import QuadmixConfig, local_path
from quadmix_spark.search.proxy_pool import Pool
from quadmix_spark.core.runs import (FAILED, FINISHED, PENDING, RUNNING, TAG_CRITERIA, TAG_DOMAINS, TAG_PROXY_DEVICE,
                                TAG_PROXY_ERROR, TAG_PROXY_FINGERPRINT, TAG_PROXY_STATUS, TAG_SEED, TAG_THETA_ID, child_runs,
                                experiment_id, require_search)
from quadmix_spark.core.storage import read_table
from quadmix_spark.core.tables import PROXY_INDEX

if TYPE_CHECKING:
    from quadmix_spark.kernel.theta import Theta


def proxy_fingerprint(cfg: QuadmixConfig) -> str:
    """What makes two proxies' target losses comparable: pool, model, training, target set, sampling."""
    import hashlib

    pc = cfg.proxy
    ident = {"pool": pc.pool.model_dump(), "model": pc.model.model_dump(), "train": pc.train.model_dump(),
             "target": pc.target.model_dump(), "seed": cfg.sampling.seed, "eta_mode": cfg.sampling.eta_mode,
             "metric": cfg.search.metric}
    if cfg.sampling.sigma_saturation is not None:  # absent when unset: earlier proxies keep their fingerprint
        ident["sigma_saturation"] = cfg.sampling.sigma_saturation
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ProxyTask:
    """One proxy to train: the θ (or baseline) id and key, the MLflow run it reports to, its seed."""

    theta_id: str
    theta_key: int
    run_id: str
    seed: int
    label: str = ""


@dataclass(frozen=True)
class TaskEnv:
    """Everything an executor needs, as plain data (nothing model-related is pickled)."""

    tracking_uri: str
    pool_dir: str
    plans_dir: str
    eval_path: str
    shape: dict
    train: dict
    sample_seed: int
    device: str
    cpus: int
    metric: str
    task_weights: dict | None = None
    fail_theta_ids: tuple = ()
    fail_at_step: int = 1
    fingerprint: str = ""
    extra_evals: tuple = ()  # (name, path) of other target sets, logged as `<name>.<metric>`


@dataclass
class ProxyOutcome:
    theta_id: str
    run_id: str
    status: str
    target_loss: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    error: str = ""
    label: str = ""
    seed: int = 0
    task_losses: dict = field(default_factory=dict)
    extra_losses: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the executor side


def _device(pref: str) -> str:
    """The torch device of this task: its assigned GPU (Spark resources), any visible GPU, or the CPU."""
    import torch

    if pref == "cpu":
        return "cpu"
    from quadmix_udfs.onnx_transformer import task_gpu

    has_cuda = torch.cuda.is_available()
    if pref == "cuda" and not has_cuda:
        raise RuntimeError("proxy.device is cuda but torch sees no GPU on this executor")
    if not has_cuda:
        return "cpu"
    gpu = task_gpu()
    # the address is a physical index; where the container shows only its own GPUs, index 0 is that GPU
    return f"cuda:{gpu}" if gpu is not None and gpu < torch.cuda.device_count() else "cuda:0"


DEFAULTS_DIR = "_defaults"  # beside the plan partitions; "_" keeps Spark and pyarrow from reading it as data


def _doc_keys(cols: dict[str, np.ndarray]) -> np.ndarray:
    """One comparable key per document: (shard, offset, length) (an empty document shares its offset with the next)."""
    stacked = np.ascontiguousarray(np.stack([cols["shard"], cols["offset"], cols["length"]], axis=1).astype(np.int64))
    return stacked.view(np.dtype((np.void, 24))).ravel()


@functools.lru_cache(maxsize=2)
def _pool_documents_at(pool_dir: str, _stamp: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    from quadmix_spark.search.proxy_pool import load_doc_index

    docs = load_doc_index(pool_dir)
    domains, domain_code = np.unique(docs["domain"].astype(str), return_inverse=True)
    keys = _doc_keys(docs)
    for v in (*docs.values(), keys, domains, domain_code):
        v.setflags(write=False)  # shared by every θ this process trains
    return docs, keys, domains, domain_code


def _pool_documents(pool_dir: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """The pool's document index, its keys, its domain names and each document's domain code, read once per
    process (and again when the pool is rebuilt)."""
    from quadmix_spark.search.proxy_pool import DOCS_DONE

    return _pool_documents_at(pool_dir, Path(pool_dir, DOCS_DONE).stat().st_mtime_ns)


def read_plan(plans_dir: str, theta_id: str, pool_dir: str | None = None) -> dict[str, np.ndarray]:
    """Every pool document the θ can draw, with its S, in a canonical order (the trainer's shuffles then do
    not depend on file order): columns ``doc_hash, S, shard, offset, length``.

    The plan file lists the documents the index kept (S >= 1, and the ε-tail documents its epoch-0 draw
    picked); every other pool document gets its domain's default S (ε for a θ, the fraction for the random
    baseline, 0 for the top-k baselines: ``_defaults/<θ id>.json``). The trainer then redraws the fractional
    copy of every document each epoch, the tail included, as the sample stage does (spec §2.6). Without a
    defaults file or ``pool_dir`` the plan's rows are all there is."""
    import pyarrow.parquet as pq

    path = Path(plans_dir) / f"theta_id={theta_id}"
    defaults_path = Path(plans_dir) / DEFAULTS_DIR / f"{theta_id}.json"
    defaults = json.loads(defaults_path.read_text()) if defaults_path.exists() else {}
    names = ["doc_hash", "S", "shard", "offset", "length"]
    if path.exists():
        table = pq.read_table(path, columns=names)
        cols = {c: table.column(c).to_numpy().astype(np.float64 if c == "S" else np.int64) for c in names}
    elif defaults_path.exists():  # the index kept nothing (tiny domains); the tail may still be drawn
        cols = {c: np.zeros(0, dtype=np.float64 if c == "S" else np.int64) for c in names}
    else:
        raise FileNotFoundError(f"no plan for θ {theta_id} under {plans_dir}")
    if pool_dir is not None and any(v > 0 for v in defaults.values()):
        docs, doc_keys, domains, domain_code = _pool_documents(pool_dir)
        listed = np.isin(doc_keys, _doc_keys(cols))
        default_s = np.array([float(defaults.get(d, 0.0)) for d in domains], dtype=np.float64)[domain_code]
        rest = ~listed & (default_s > 0)
        cols = {c: np.concatenate([cols[c], default_s[rest] if c == "S" else docs[c][rest]]) for c in cols}
    order = np.lexsort((cols["offset"], cols["shard"], cols["doc_hash"]))
    return {c: v[order] for c, v in cols.items()}


@functools.lru_cache(maxsize=4)
def _tracking_client(uri: str):
    """One MLflow client per tracking URI and worker process: a Python worker trains many proxies, and each new
    client opens its own store (for SQLite, an engine and a schema check)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def train_one(task: ProxyTask, env: TaskEnv) -> ProxyOutcome:
    """Train and evaluate one proxy, reporting to its MLflow run; never raises (failures are recorded).

    Four tracking calls per proxy (the run reopened, its start tags, the metrics with the FINISHED tag, the
    run ended): screening thousands of n-gram proxies that train in a fraction of a second each is otherwise
    mostly tracking round trips."""
    from mlflow.entities import Metric, RunTag

    client = _tracking_client(env.tracking_uri)
    out = ProxyOutcome(task.theta_id, task.run_id, FAILED, label=task.label, seed=task.seed)
    try:
        client.update_run(task.run_id, status="RUNNING")
        ngram = env.shape.get("kind") == "ngram"
        if ngram:
            device = "cpu"  # counts and lookups in numpy: no torch to load
        else:
            import torch

            torch.set_num_threads(max(1, env.cpus))
            device = _device(env.device)
        start_tags = {TAG_PROXY_STATUS: RUNNING, TAG_SEED: str(task.seed),  # the seed it is trained with (what evaluate checks)
                      TAG_PROXY_DEVICE: device, **({TAG_PROXY_FINGERPRINT: env.fingerprint} if env.fingerprint else {})}
        client.log_batch(task.run_id, tags=[RunTag(k, v) for k, v in start_tags.items()])
        from quadmix_spark.search.proxy_model import ModelShape
        from quadmix_spark.search.proxy_data import EvalSet, TrainSettings
        from quadmix_spark.search.token_store import TokenStore

        settings = TrainSettings(**{**env.train, "seed": task.seed})

        def log_metrics(values: dict, step: int) -> None:
            now = int(time.time() * 1000)
            client.log_batch(task.run_id, metrics=[Metric(f"train.{k}", float(v), now, step) for k, v in values.items()])

        def on_step(step: int) -> None:
            if task.theta_id in env.fail_theta_ids and step >= env.fail_at_step:
                raise RuntimeError(f"injected failure at step {step} (proxy.fail_theta_ids)")

        plan, store = read_plan(env.plans_dir, task.theta_id, env.pool_dir), TokenStore.open(env.pool_dir)
        extra = {name: EvalSet.load(path) for name, path in env.extra_evals}
        shape = {k: v for k, v in env.shape.items() if k not in ("kind", "order", "ngram_counts")}
        if ngram:
            from quadmix_spark.search.ngram_lm import train_ngram_proxy

            on_step(env.fail_at_step)  # fault injection has no steps to wait for
            result = train_ngram_proxy(plan, store, EvalSet.load(env.eval_path), settings, task.theta_key, env.sample_seed,
                                       order=env.shape["order"], vocab_size=shape["vocab_size"], task_weights=env.task_weights,
                                       seq_len=shape["seq_len"], extra_eval_sets=extra, counts=env.shape["ngram_counts"])
        else:
            from quadmix_spark.search.proxy_train import train_proxy

            result = train_proxy(plan, store, EvalSet.load(env.eval_path), ModelShape(**shape), settings, task.theta_key,
                                 env.sample_seed, device=device, on_metrics=log_metrics, on_step=on_step,
                                 task_weights=env.task_weights, extra_eval_sets=extra)
        now = int(time.time() * 1000)
        metrics = {env.metric: result.target_loss, "tokens": result.tokens, "steps": result.steps, "epochs": result.epochs,
                   "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "final_train_loss": result.final_train_loss,
                   "params_non_embedding": result.params_non_embedding, "params_total": result.params_total,
                   **{f"{env.metric}.{k}": v for k, v in result.task_losses.items()}}
        for name, (loss, tasks) in result.extra_losses.items():
            metrics[f"{name}.{env.metric}"] = loss
            metrics.update({f"{name}.{env.metric}.{k}": v for k, v in tasks.items()})
        # the metric and the FINISHED tag in one batch: a run left RUNNING with its metric is settled as
        # finished by the next `quadmix proxy` (run_guard.settle_children)
        client.log_batch(task.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag(TAG_PROXY_STATUS, FINISHED)])
        faults.point("proxy.trained")
        client.set_terminated(task.run_id, "FINISHED")
        out.status, out.target_loss, out.tokens = FINISHED, result.target_loss, result.tokens
        out.seconds, out.tokens_per_s, out.task_losses = result.seconds, result.tokens_per_s, dict(result.task_losses)
        out.extra_losses = {name: loss for name, (loss, _) in result.extra_losses.items()}
    except Exception as e:  # recorded on the run; the rerun retries it
        out.error = f"{type(e).__name__}: {e}"
        try:
            client.log_batch(task.run_id, tags=[RunTag(TAG_PROXY_ERROR, (out.error + "\n" + traceback.format_exc())[-4000:]),
                                                RunTag(TAG_PROXY_STATUS, FAILED)])
            client.set_terminated(task.run_id, "FAILED")
        except Exception:  # the tracking server itself is gone: the driver still sees the outcome
            pass
    return out


def _train_partition(env: TaskEnv, rows):
    # PySpark's daemon runs a full gc.collect() in a reused worker after every task; with mlflow, pandas and the
    # pool's indexes loaded that took ~0.35 s a task on a 2-core VM, several times what an n-gram proxy trains.
    # What is alive when a task starts (modules, the caches above; the daemon has just collected) is moved out
    # of the collector's sight, so each later collect only walks what one proxy left behind.
    gc.freeze()
    for task in rows:
        yield asdict(train_one(task, env))


# ---------------------------------------------------------------- the driver side


def write_plans(spark: SparkSession, cfg: QuadmixConfig, pool: Pool, defaults: dict[str, dict[str, float]]) -> str:
    """One plan per θ (doc_hash, S, shard, offset, length) from its proxy index, as Parquet under the pool, and
    its default S per domain for the pool documents the plan does not list (``{θ id: {domain: S}}``, see
    :func:`read_plan`)."""
    plans_dir = f"{pool.folder}/plans"
    theta_ids = list(defaults)
    index = read_table(spark, cfg.storage.table(PROXY_INDEX)).where(F.col("theta_id").isin(theta_ids))
    offsets = read_table(spark, pool.offsets_table).select("doc_id", "doc_hash", "shard", "offset", "length")
    plan = index.select("theta_id", "doc_id", "S").join(offsets, "doc_id", "inner").drop("doc_id")
    n = max(1, min(len(theta_ids), spark.sparkContext.defaultParallelism * 2))
    (plan.repartition(n, "theta_id").write.mode("overwrite").option("partitionOverwriteMode", "dynamic")
     .partitionBy("theta_id").parquet(plans_dir))
    missing = [t for t in theta_ids if not (Path(plans_dir) / f"theta_id={t}").exists() and not any(v > 0 for v in defaults[t].values())]
    if missing:
        raise ValueError(f"θ {missing} select no document of the proxy pool (empty plan, no tail): nothing to train on")
    folder = Path(plans_dir) / DEFAULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for theta_id, values in defaults.items():
        tmp = folder / f".{theta_id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({d: float(v) for d, v in values.items()}, sort_keys=True))
        os.replace(tmp, folder / f"{theta_id}.json")
    return plans_dir


def tail_defaults(theta: Theta) -> dict[str, float]:
    """The S of a θ's documents beyond its cut-off ω: ε of their domain."""
    return {d: float(e) for d, e in zip(theta.domains, theta.eps)}


def task_env(cfg: QuadmixConfig, pool: Pool, plans_dir: str, eval_path: str, extra_evals: dict[str, str] | None = None) -> TaskEnv:
    pc = cfg.proxy
    return TaskEnv(
        tracking_uri=cfg.tracking_uri, pool_dir=pool.folder, plans_dir=plans_dir, eval_path=eval_path,
        shape=pc.model.model_dump(), train=pc.train.model_dump(), sample_seed=cfg.sampling.seed, device=pc.device,
        cpus=pc.cpus_per_task, metric=cfg.search.metric, task_weights=pc.target.task_weights,
        fail_theta_ids=tuple(pc.fail_theta_ids), fail_at_step=pc.fail_at_step, fingerprint=proxy_fingerprint(cfg),
        extra_evals=tuple((extra_evals or {}).items()),
    )


def task_profile(spark: SparkSession, cfg: QuadmixConfig):
    """(profile | None, why): per-task CPUs and GPUs through stage-level scheduling where it can apply."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    pc = cfg.proxy
    master = spark.sparkContext.master
    if master.startswith("local"):
        return None, f"{master}: tasks use the session's slots"
    reqs = TaskResourceRequests().cpus(pc.cpus_per_task)
    if pc.gpus_per_task > 0:
        if not spark.sparkContext.getConf().get("spark.executor.resource.gpu.amount"):
            return None, "executors declare no GPUs (spark.executor.resource.gpu.amount): proxies run on CPU"
        reqs = reqs.resource("gpu", pc.gpus_per_task)
    elif pc.cpus_per_task == int(spark.sparkContext.getConf().get("spark.task.cpus", "1")):
        return None, "default task resources"
    return ResourceProfileBuilder().require(reqs).build, f"{pc.cpus_per_task} CPU + {pc.gpus_per_task} GPU per task"


def build_ngram_index(pool_dir: str, vocab_size: int, order: int) -> None:
    """The pool's n-gram index, built once on the driver (a no-op when cached) so the tasks only read it."""
    from quadmix_spark.search.ngram_lm import ngram_index
    from quadmix_spark.search.proxy_data import VocabMap
    from quadmix_spark.search.token_store import TokenStore

    store = TokenStore.open(pool_dir)
    ngram_index(store, VocabMap.build(store.token_counts(), vocab_size, store.eos_id), order)


def execute(spark: SparkSession, cfg: QuadmixConfig, tasks: list[ProxyTask], env: TaskEnv) -> list[ProxyOutcome]:
    """Train every task: one Spark task each (one partition per task), ``proxy.submit_chunk`` tasks per Spark
    job (a job's outcomes are collected before the next is submitted), or in this process."""
    if not tasks:
        return []
    if cfg.proxy.model.kind == "ngram":
        build_ngram_index(env.pool_dir, cfg.proxy.model.vocab_size, cfg.proxy.model.order)
    if cfg.proxy.mode == "local":
        return [train_one(t, env) for t in tasks]
    profile, _why = task_profile(spark, cfg)
    size = cfg.proxy.submit_chunk
    outcomes: list[ProxyOutcome] = []
    for lo in range(0, len(tasks), size):
        chunk = tasks[lo:lo + size]
        rdd = spark.sparkContext.parallelize(chunk, len(chunk))
        if profile is not None:
            rdd = rdd.withResources(profile)
        spark.sparkContext.setJobDescription(
            f"quadmix proxy: proxies {lo + 1}-{lo + len(chunk)} of {len(tasks)}")
        outcomes += [ProxyOutcome(**r) for r in rdd.mapPartitions(lambda it: _train_partition(env, it)).collect()]
    return outcomes


def ensure_eval_set(cfg: QuadmixConfig, pool: Pool, part: str = "search") -> str:
    """The tokenized target set's ``part`` (``search``: what search proxies are scored on; ``evaluate``: the
    held-out part ``quadmix evaluate`` scores θ* on), built once on the driver, beside the pool."""
    import hashlib

    from quadmix_spark.search.proxy_data import build_eval_set

    t = cfg.proxy.target
    max_len = t.max_len or cfg.proxy.model.seq_len
    ident = json.dumps({"kind": t.kind, "tasks": t.tasks, "n": t.max_examples_per_task, "seed": t.seed, "max_len": max_len,
                        "path": t.bmk_path if t.kind == "bmk" else t.oh_path, "part": part, "holdout": t.holdout_fraction},
                       sort_keys=True)
    path = Path(pool.folder) / "eval" / f"{t.kind}-{part}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = local_path(t.bmk_path if t.kind == "bmk" else t.oh_path)
        build_eval_set(t.kind, src, pool.meta["tokenizer"], str(path), t.max_examples_per_task, t.seed, max_len, t.tasks,
                       part=part, holdout_fraction=t.holdout_fraction, fast_tokenizer=cfg.ingest.fast_tokenizer)
    return str(path)


def outcomes_frame(outcomes: list[ProxyOutcome]) -> pd.DataFrame:
    rows = []
    for o in outcomes:
        row = {k: v for k, v in asdict(o).items() if k not in ("task_losses", "extra_losses")}
        row.update({f"{name}.target_loss": v for name, v in o.extra_losses.items()})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the stage


@dataclass
class ProxyReport:
    search: str
    skipped: int
    outcomes: list[ProxyOutcome]
    pool: dict

    @property
    def failed(self) -> list[ProxyOutcome]:
        return [o for o in self.outcomes if o.status != FINISHED]

    def summary(self) -> str:
        done = [o for o in self.outcomes if o.status == FINISHED]
        lines = [f"proxy, search {self.search!r}: {len(done)} trained, {len(self.failed)} failed, {self.skipped} already finished "
                 f"(pool {self.pool.get('n_docs', 0):,} docs, {self.pool.get('n_tokens', 0):,} tokens)"]
        if done:
            losses = np.array([o.target_loss for o in done])
            speed = np.median([o.tokens_per_s for o in done])
            lines.append(f"  target loss min {losses.min():.4f} median {np.median(losses):.4f} max {losses.max():.4f}; "
                         f"median {speed:,.0f} tokens/s per proxy")
        for o in self.failed:
            lines.append(f"  FAILED {o.label or o.theta_id}: {o.error} (rerun `quadmix proxy` to retry)")
        return "\n".join(lines)


def theta_of_run(run) -> "Theta":
    """The θ of a proposal run, rebuilt from its params by name (exact: params hold repr(float))."""
    from quadmix_spark.kernel.theta import Theta, feature_names

    tags = run.data.tags
    domains, criteria = json.loads(tags[TAG_DOMAINS]), json.loads(tags[TAG_CRITERIA])
    names = feature_names(domains, criteria)
    missing = [n for n in names if n not in run.data.params]
    if missing:
        raise ValueError(f"run {run.info.run_id} lacks θ params {missing[:5]}{'...' if len(missing) > 5 else ''}")
    theta = Theta.from_vector([float(run.data.params[n]) for n in names], domains, criteria)
    if tags.get(TAG_THETA_ID) and tags[TAG_THETA_ID] != theta.theta_id:
        raise ValueError(f"run {run.info.run_id}: params give θ {theta.theta_id}, tag says {tags[TAG_THETA_ID]}")
    return theta


def train_seed(run, cfg: QuadmixConfig) -> int:
    """The training seed of a proposal run: its ``quadmix.seed`` tag (set on a replicate when it is proposed,
    ``quadmix propose --replicate``, and on every run once trained), else ``proxy.train.seed``."""
    tag = run.data.tags.get(TAG_SEED)
    return cfg.proxy.train.seed if tag is None else int(tag)


def is_finished(run, metric: str) -> bool:
    return run.info.status == "FINISHED" and metric in run.data.metrics


def prepare_pool(spark: SparkSession, cfg: QuadmixConfig, run_id: str | None = None):
    """(pool inputs, pool): the annotations restricted to the pool, and the tokenized pool."""
    from quadmix_spark.search.proxy_pool import build_pool, pool_predicate
    from quadmix_spark.curation.sample import load_inputs

    inp = load_inputs(spark, cfg, pool_predicate(cfg))
    return inp, build_pool(spark, cfg, inp.annotations.select("doc_id", "domain"), run_id=run_id)


def run_search_proxies(spark: SparkSession, cfg: QuadmixConfig, run_id: str | None = None) -> ProxyReport:
    """Train the proxies of search ``cfg.search.name`` that have not finished."""
    import mlflow

    from quadmix_spark.core.run_guard import settle_children
    from quadmix_spark.curation.sample import run_sample_many

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    parent = require_search(client, exp_id, cfg.search.name)
    children = settle_children(client, child_runs(client, exp_id, parent.info.run_id), cfg.search.metric, repair=False)
    todo = [c for c in children if not is_finished(c, cfg.search.metric)]
    skipped = len(children) - len(todo)
    fp = proxy_fingerprint(cfg)
    other = [c for c in children if is_finished(c, cfg.search.metric) and c.data.tags.get(TAG_PROXY_FINGERPRINT, fp) != fp]
    if other:
        raise ValueError(f"search {cfg.search.name!r} has {len(other)} proxies finished with other proxy settings "
                         f"(fingerprint {other[0].data.tags[TAG_PROXY_FINGERPRINT]}, now {fp}): their losses would not be "
                         "comparable; use another search.name, or the proxy/sampling settings they were trained with")
    inp, pool = prepare_pool(spark, cfg, run_id)
    if not todo:
        return ProxyReport(cfg.search.name, skipped, [], pool.meta)
    thetas = [theta_of_run(c) for c in todo]
    for c in todo:
        client.set_tag(c.info.run_id, TAG_PROXY_STATUS, PENDING)
    unique = list({t.theta_id: t for t in thetas}.values())  # a θ trained with several seeds is sampled once
    run_sample_many(spark, cfg, unique, run_id=run_id, inp=inp)
    faults.point("proxy.index.committed")
    plans_dir = write_plans(spark, cfg, pool, {t.theta_id: tail_defaults(t) for t in unique})
    env = task_env(cfg, pool, plans_dir, ensure_eval_set(cfg, pool))
    tasks = [ProxyTask(t.theta_id, t.theta_key, c.info.run_id, train_seed(c, cfg), c.info.run_name) for t, c in zip(thetas, todo)]
    outcomes = execute(spark, cfg, tasks, env)
    done = sum(o.status == FINISHED for o in outcomes)
    client.log_metric(parent.info.run_id, "proxies_finished", float(done + skipped))
    client.log_metric(parent.info.run_id, "proxies_failed", float(len(outcomes) - done))
    return ProxyReport(cfg.search.name, skipped, outcomes, pool.meta)
