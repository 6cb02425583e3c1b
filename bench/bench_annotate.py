"""Annotate throughput: documents/s per core of ``run_annotate`` (Delta in, Delta out) against the models alone.

Four parts, each writing its own result file (``--annotate-parts``, default ``fasttext,minilm,causal_lm``):

- ``fasttext`` -> ``annotate_fasttext_docs_per_core``: the annotate stage with two fastText scorers (a
  24-topic domain classifier and a DCLM-style quality classifier, trained like ``quadmix train-scorers`` does)
  on ``--docs`` documents (default 1,000,000: the shared web corpus replicated with fresh ids by
  ``bench.sample_data``, ~3.2 GB of text, 16 files), ``local[2]``. Value: documents / wall s of
  ``run_annotate`` into a fresh storage root (an empty ``annotations`` table, ``histograms=False``) / 2 cores.
  Baseline: in the same process, fastText's own ``predict(list)`` of both models (``k`` as the adapter asks) on
  texts already prepared as the adapter prepares them (cut to ``max_chars``, newlines replaced), the first
  ``--fasttext-baseline-copies`` copies of every page of the same table (the same page mix), documents / s on
  one core. Goal ratio >= 0.85.
- ``minilm`` -> ``annotate_minilm_docs_per_core``: the annotate stage with the two MiniLM embedding-head
  scorers of ``conf/scorers.yaml`` (24-topic domain and reference-likeness heads, one shared encoder pass,
  ``max_length`` 128, ``max_chars`` 1000, batch 32, int8 model, one intra-op thread per task) on
  ``--minilm-docs`` documents (default 2,000: MiniLM runs ~15-20 documents/s per core here). Baseline: a raw onnxruntime session (one intra-op thread) on
  the same token batches (the encoder's tokenizer, length-sorted, ``batch_size`` rows, padded as the adapter
  pads; tokenization and padding untimed): documents / s of ``session.run`` alone, on
  ``--minilm-baseline-docs`` of the same documents. Goal ratio >= 0.85.
- ``causal_lm`` -> ``annotate_causal_lm_docs_per_core``: the annotate stage with an ``onnx_causal_lm``
  perplexity scorer (a reference LM trained like the demo's ``ref_lm``: 4,096 token classes expanded to the
  GPT-NeoX vocabulary, d=128, 2 layers; ``max_length`` 63 after ``<|endoftext|>``, batch 8, one intra-op
  thread) as the quality criterion and lid.176 as the domain, on ``--causal-lm-docs`` documents (default
  8,000: at 2,000 the stage's fixed cost per run, ~5 s, is a quarter of its time). Baseline: the same model session (the adapter's graph: model + its log-probability head), one
  intra-op thread, on the same token batches (the adapter's sequences, grouped by width and padded as the
  adapter does; tokenization and padding untimed), documents / s of ``session.run`` alone on
  ``--causal-lm-baseline-docs`` of the same documents. The lid.176 domain scorer costs ~1% of the LM. Goal
  ratio >= 0.85.
- ``text_stats`` -> ``annotate_text_stats`` (opt-in: ``--annotate-parts text_stats``): the heuristic scorer added
  to an annotated corpus, the stage's incremental path. Untimed and cached: ``--text-stats-docs`` documents
  (default 200,000, the same generator) annotated with lid.176 as domain (``output: label``) and as a quality
  criterion (P(en)). Each timed run copies that table and runs ``run_annotate`` with a ``text_stats`` scorer
  added: only it scores, every row, and the result is merged in (Delta MERGE). Value: documents / wall s / 2
  cores. Baseline: the adapter alone (``score_arrow``) on Arrow batches of 2,048 texts of the same table (the
  first ``--text-stats-baseline-copies`` copies of every page), one core. A third case, the scoring pass alone
  (documents read and scored by the same ``mapInArrow`` as the stage, written to Spark's ``noop`` sink: no join
  to the annotations, no MERGE), says how the stage's time splits. Goal: 20,000 documents/s per core.

Value and baseline repeats are interleaved (baseline first, and once more at the end, so every annotate run
has a baseline run just before and just after it), after ``--annotate-warmup`` untimed rounds of each
(default 1: the JVM compiles the stage's code paths there; reported as ``warmup_times_s``). The ratio is the
median over annotate runs of (that run's rate / the mean rate of the two baseline runs beside it): this
shared VM's speed drifts by tens of percent within minutes, so a run is compared with the machine it had.
``details`` also keep the plain medians of each side and their ratio (``median_ratio``), and both again per
CPU second of the process tree. The scorer models are trained once and cached under
``$QUADMIX_BENCH_DIR/inputs/annotate-models-*``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    add_option,
    bench_config,
    bench_spark,
    cached_input,
    fresh_dir,
    git_commit,
    interleave,
    log,
    machine_info,
    remove,
    scratch_dir,
    shared_dir,
    spark_info,
    spark_overrides,
    standalone_main,
    stop_spark,
    write_result,
)

NAME = "annotate_fasttext_docs_per_core"
MINILM_NAME = "annotate_minilm_docs_per_core"
CAUSAL_LM_NAME = "annotate_causal_lm_docs_per_core"
CAUSAL_LM_SETTINGS = {"max_length": 63, "batch_size": 8, "prefix_token": "<|endoftext|>"}
METRIC = "documents/s per core"
DEFAULT_DOCS = 1_000_000
DEFAULT_PARTS = 16
DEFAULT_MINILM_DOCS = 2_000
CORES = 2  # local[2]
MODELS_VERSION = 1  # bump when the training recipe changes (invalidates the cached models)
CAUSAL_LM_VERSION = 2  # of the reference LM's export (2: it declares its class-factored vocabulary)

MINILM_SETTINGS = {"max_length": 128, "max_chars": 1000, "batch_size": 32}
TEXT_STATS_NAME = "annotate_text_stats"
DEFAULT_TEXT_STATS_DOCS = 200_000


# ---------------------------------------------------------------- CPU accounting


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of this process and all its descendants (the Spark JVM, the PySpark daemon and
    its Python workers), including children already reaped (``cutime``/``cstime``): a load-independent cost.

    Linux ``/proc`` only; 0.0 elsewhere.
    """
    import os

    root = root or os.getpid()
    stats: dict[int, tuple[int, float]] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[pid] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total


class CpuClock:
    """Wraps a timed function: records the process tree's CPU seconds it used (``cpu[label]``)."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}

    def wrap(self, label: str, fn):
        def timed(i: int):
            c0 = tree_cpu_seconds()
            out = fn(i)
            self.cpu.setdefault(label, []).append(tree_cpu_seconds() - c0)
            return out

        return timed


# ---------------------------------------------------------------- models


def _minilm_dir() -> Path:
    return shared_dir() / "data" / "models" / "minilm_l6_v2"


def _read_jsonl(path: Path, field: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [str(r[field]) for r in map(json.loads, f) if str(r.get(field) or "").strip()]


def _train_models(folder: Path) -> dict[str, Any]:
    """fastText topic + DCLM-style quality models and MiniLM topic + reference heads, like train-scorers."""
    from sklearn.linear_model import LogisticRegression

    from bench.sample_data import read_source, source_path
    from quadmix_spark.curation.fasttext_train import train_in_subprocess
    from quadmix_spark.curation.train_scorers import paragraphs, slug
    from quadmix_udfs.fasttext_scorer import prepare_lines
    from quadmix_udfs.onnx_transformer import Encoder

    rng = np.random.default_rng(13)
    pages = read_source(source_path())
    ref_dir = shared_dir() / "data" / "reference"
    alpaca = _read_jsonl(ref_dir / "alpaca_eval_outputs.jsonl.gz", "output")
    wiki = [c for t in _read_jsonl(ref_dir / "enwiki_sample.jsonl.gz", "text") for c in paragraphs(t, 2000)]

    lines = prepare_lines([p["text"] for p in pages], 20_000)
    with open(folder / "topic.txt", "w") as f:
        for p, line in zip(pages, lines):
            f.write(f"__label__{slug(p['topic'])} {line}")
    train_in_subprocess(str(folder / "topic.txt"), str(folder / "topic.bin"),
                        {"dim": 16, "epoch": 20, "lr": 0.5, "wordNgrams": 1, "minCount": 2, "bucket": 100_000, "seed": 13})
    neg = rng.choice(len(pages), 4000, replace=False)
    pos = prepare_lines(alpaca + wiki, 20_000)
    with open(folder / "dclm.txt", "w") as f:
        for line in pos:
            f.write(f"__label__hq {line}")
        for i in neg:
            f.write(f"__label__cc {lines[i]}")
    train_in_subprocess(str(folder / "dclm.txt"), str(folder / "dclm.bin"),
                        {"dim": 16, "epoch": 10, "lr": 0.5, "wordNgrams": 2, "minCount": 3, "bucket": 100_000, "seed": 13})
    (folder / "topic.txt").unlink()
    (folder / "dclm.txt").unlink()

    mini = _minilm_dir()
    enc = Encoder(str(mini / "model_int8.onnx"), str(mini / "tokenizer.json"), device="cpu", **MINILM_SETTINGS)

    def head(name: str, texts: list[str], labels: list[str]) -> None:
        emb = enc.embed(texts, enc.session(None))
        x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        clf = LogisticRegression(C=10.0, max_iter=3000, random_state=13).fit(x, np.array(labels))
        if len(clf.classes_) == 2:
            weight = np.stack([np.zeros_like(clf.coef_[0]), clf.coef_[0]], 1)
            bias = np.array([0.0, clf.intercept_[0]])
        else:
            weight, bias = clf.coef_.T, clf.intercept_
        np.savez(folder / f"{name}.npz", weight=weight.astype(np.float32), bias=bias.astype(np.float32),
                 labels=np.array([str(c) for c in clf.classes_]), kind=np.array("logistic"), normalize=np.array(True))

    by_topic: dict[str, list[int]] = {}
    for i, p in enumerate(pages):
        by_topic.setdefault(p["topic"], []).append(i)
    picked = [i for idx in by_topic.values() for i in idx[:25]]
    head("topic_head", [pages[i]["text"] for i in picked], [pages[i]["topic"] for i in picked])
    refs = [alpaca[i] for i in rng.choice(len(alpaca), 200, replace=False)] + wiki[:200]
    cc = [pages[i]["text"] for i in neg[:400]]
    head("ref_head", refs + cc, ["hq"] * len(refs) + ["cc"] * len(cc))
    return {"files": ["topic.bin", "dclm.bin", "topic_head.npz", "ref_head.npz"], "version": MODELS_VERSION}


def scorer_models() -> Path:
    """The cached folder of the benchmark's trained scorer models."""
    folder, _ = cached_input(f"annotate-models-v{MODELS_VERSION}", _train_models)
    return folder


def fasttext_scorers(models: Path) -> dict[str, dict]:
    return {
        "topic_ft": {"type": "fasttext", "model": str(models / "topic.bin"), "output": "label"},
        "dclm": {"type": "fasttext", "model": str(models / "dclm.bin"), "label": "hq"},
    }


def minilm_scorers(models: Path) -> dict[str, dict]:
    mini = _minilm_dir()
    common = {"type": "onnx_transformer", "model": str(mini / "model_int8.onnx"), "tokenizer": str(mini / "tokenizer.json"),
              "head": "embedding", "device": "cpu", "intra_op_threads": 1, **MINILM_SETTINGS}
    return {"topic_mini": {**common, "head_file": str(models / "topic_head.npz"), "output": "label"},
            "ref_mini": {**common, "head_file": str(models / "ref_head.npz"), "label": "hq"}}


def annotate_overrides(scorers: dict[str, dict], domain: str, quality: list[str]) -> list[str]:
    return [f"scorers={json.dumps(scorers)}", f"annotate.domain_scorer={domain}", f"annotate.quality_scorers={json.dumps(quality)}"]


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--docs", type=int, default=None, help=f"documents in the generated corpus (annotate fastText: {DEFAULT_DOCS})")
    add_option(parser, "--repeats", type=int, default=None, help="repeats of both value and baseline (overrides the per-benchmark ones)")
    add_option(parser, "--event-log", default=None, help="write Spark event logs to this folder (diagnosis; off by default)")
    add_option(parser, "--keep", action="store_true", help="keep the tables written while timing (default: deleted)")
    group = parser.add_argument_group("annotate benchmark")
    add_option(group, "--annotate-parts", default="fasttext,minilm,causal_lm",
               help="comma-separated: fasttext, minilm, causal_lm, text_stats")
    add_option(group, "--annotate-repeats", type=int, default=3, help="timed run_annotate repeats (each part)")
    add_option(group, "--annotate-warmup", type=int, default=1,
               help="untimed warm-up rounds (model + annotate) before the timed repeats (each part)")
    add_option(group, "--model-repeats", type=int, default=None,
               help="timed model-alone repeats (each part; default: annotate repeats + 1, so a model run brackets "
                    "every annotate run)")
    add_option(group, "--fasttext-baseline-copies", type=int, default=6,
               help="copies of each page (x 8,712 pages) the fastText baseline predicts on")
    add_option(group, "--minilm-docs", type=int, default=DEFAULT_MINILM_DOCS, help="documents of the MiniLM part")
    add_option(group, "--minilm-baseline-docs", type=int, default=500, help="documents the raw onnxruntime baseline runs on")
    add_option(group, "--causal-lm-docs", type=int, default=8_000, help="documents of the causal LM part")
    add_option(group, "--causal-lm-baseline-docs", type=int, default=500, help="documents the causal LM baseline runs on")
    add_option(group, "--text-stats-docs", type=int, default=DEFAULT_TEXT_STATS_DOCS, help="documents of the text_stats part")
    add_option(group, "--text-stats-baseline-copies", type=int, default=3,
               help="copies of each page (x 8,712 pages) the text_stats adapter baseline scores")
    add_option(group, "--arrow-batch", type=int, default=None,
               help="spark.sql.execution.arrow.maxRecordsPerBatch for the session (default: the project's)")


def _event_conf(folder: str | None, part: str) -> dict[str, str]:
    if not folder:
        return {}
    path = Path(folder).resolve() / part
    path.mkdir(parents=True, exist_ok=True)
    return {"spark.eventLog.enabled": "true", "spark.eventLog.dir": str(path), "spark.eventLog.compress": "false"}


def _session(args, part: str):
    conf = _event_conf(args.event_log, part)
    if args.arrow_batch:
        conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = str(args.arrow_batch)
    spark, _ = bench_spark(fresh_dir("runs", "annotate", "session"), conf=conf)
    return spark, conf


def _time_annotate(spark, conf, docs_folder: Path, scorer_args: list[str], n_docs: int, repeats: int,
                   baseline, baseline_repeats: int, keep: bool, label: str, warmup: int = 0) -> tuple[dict, Any]:
    """Interleaved baseline / annotate timings; every annotate repeat writes a fresh annotations table."""
    from bench.sample_data import link_inputs
    from quadmix_spark.curation.annotate import run_annotate
    from quadmix_spark.curation.scorers import resolve_scorers

    sc = spark.sparkContext
    roots: dict[int, Path] = {}
    cfgs: dict[int, Any] = {}
    resolved: dict[int, Any] = {}

    def setup(case: str, i: int) -> None:
        sc.setJobDescription(f"{case} r{i}")
        if case == "annotate":
            roots[i] = fresh_dir("runs", "annotate", f"{label}-{i}")
            link_inputs(roots[i], docs_folder, ("documents",))
            cfgs[i] = bench_config(roots[i], *spark_overrides(conf), *scorer_args)
            resolved[i] = resolve_scorers(cfgs[i])  # model checks untimed (annotate_job does them before Spark starts)

    def annotate(i: int):
        return run_annotate(spark, cfgs[i], scorers=resolved[i], histograms=False)

    def teardown(case: str, i: int, result) -> None:
        sc.setJobDescription(None)
        if case == "annotate":
            if result.new_documents != n_docs or any(v != n_docs for v in result.scored.values()):
                raise RuntimeError(f"annotate scored {result.scored} of {n_docs} documents\n{result.summary()}")
            if not keep:
                remove(roots[i])

    cases = {"model": (baseline, baseline_repeats), "annotate": (annotate, repeats)}
    timings, cpu = timed_cases(cases, setup, teardown, warmup)
    return timings, timings["annotate"].results[-1], cpu


def timed_cases(cases: dict, setup, teardown, warmup: int) -> tuple[dict, dict[str, list[float]]]:
    """``interleave`` of ``{label: (fn, repeats)}``, also recording each timed run's CPU seconds (warm-up rounds
    not counted): (timings, {label: CPU seconds per run})."""
    clock = CpuClock()
    wrapped = {label: (clock.wrap(label, fn), n) for label, (fn, n) in cases.items()}
    timings = interleave(wrapped, setup=setup, teardown=teardown, warmup=warmup)
    return timings, {k: v[warmup:] for k, v in clock.cpu.items()}


def _repeats(args) -> tuple[int, int]:
    """(annotate, model) repeats: the model runs once more, so one model run comes before and one after every
    annotate run (the interleaving starts with the model)."""
    annotate = args.repeats or args.annotate_repeats
    return annotate, args.model_repeats or annotate + 1


def bracketed_ratios(values: list[float], baselines: list[float]) -> list[float]:
    """``values[i] / mean(baselines[i], baselines[i + 1])``: each annotate rate against the model runs just
    before and after it (the last value uses its only neighbour when there is no later baseline). The speed
    of a shared VM drifts by tens of percent within minutes; a model run minutes away from an annotate run
    says little about the machine that run had, the ones beside it do."""
    out = []
    for i, v in enumerate(values):
        near = baselines[i : i + 2] or baselines[-1:]
        out.append(v / (sum(near) / len(near)))
    return out


def _paired_details(timings: dict, cpu: dict[str, list[float]], n_docs: int, n_base: int) -> dict[str, Any]:
    import statistics

    ann = [n_docs / t / CORES for t in timings["annotate"].times]
    mod = [n_base / t for t in timings["model"].times]
    wall = bracketed_ratios(ann, mod)
    per_cpu = bracketed_ratios([n_docs / c for c in cpu["annotate"]], [n_base / c for c in cpu["model"]])
    return {"what": "each annotate run's rate / the mean rate of the model runs just before and after it",
            "ratios": [round(x, 3) for x in wall], "median": round(statistics.median(wall), 3),
            "cpu_ratios": [round(x, 3) for x in per_cpu], "cpu_median": round(statistics.median(per_cpu), 3)}


def _write(name: str, part: str, baseline: str, value: float, base: float, n_docs: int, details: dict[str, Any],
           digits: int) -> dict[str, Any]:
    """The part's result file: ratio = the bracketed median; the plain ratio of the medians kept in details."""
    details["median_ratio"] = round(value / base, 3)  # medians of the two sides, each taken alone
    result = write_result(name, METRIC, value, base, n_docs, details, ratio=details["paired"]["median"], machine=machine_info())
    log(f"annotate {part} {value:.{digits}f} docs/s/core, {baseline} {base:.{digits}f} docs/s/core, bracketed ratio "
        f"{result['ratio']:.3f} (per CPU second {details['paired']['cpu_median']:.3f}; of the medians "
        f"{details['median_ratio']:.3f}, per CPU second {details['cpu']['ratio']:.3f})")
    return result


def _cpu_details(cpu: dict[str, list[float]], n_docs: int, n_base: int) -> dict[str, Any]:
    """Documents per CPU second (the whole process tree) of both sides, and their ratio: a cross-check of the
    wall-clock ratio that machine load does not move (other jobs on the machine take wall time, not our CPU)."""
    import statistics

    ann = statistics.median(cpu["annotate"])
    mod = statistics.median(cpu["model"])
    return {"annotate_cpu_s": [round(x, 2) for x in cpu["annotate"]], "model_cpu_s": [round(x, 2) for x in cpu["model"]],
            "annotate_docs_per_cpu_s": round(n_docs / ann, 1), "model_docs_per_cpu_s": round(n_base / mod, 1),
            "ratio": round((n_docs / ann) / (n_base / mod), 3)}


# ---------------------------------------------------------------- fastText


def run_fasttext(args: argparse.Namespace) -> dict[str, Any]:
    from pyspark.sql import functions as F

    from bench.sample_data import generate_tables
    from quadmix_spark.curation.scorers import resolve_scorers
    from quadmix_udfs.fasttext_scorer import LABEL_PREFIX, load_fasttext, prepare_lines

    t_start = time.perf_counter()
    docs = args.docs or DEFAULT_DOCS
    models = scorer_models()
    spark, conf = _session(args, "fasttext")
    folder, manifest = generate_tables(spark, docs, DEFAULT_PARTS)
    scorers = fasttext_scorers(models)
    scorer_args = annotate_overrides(scorers, "topic_ft", ["dclm"])
    resolved = resolve_scorers(bench_config(scratch_dir("runs", "annotate"), *scorer_args))
    topic, dclm = resolved.domain.adapter, resolved.quality[0].adapter

    copies = args.fasttext_baseline_copies
    table = spark.read.format("delta").load(str(folder / "tables" / "documents"))
    copy_k = F.regexp_extract("doc_id", r"-r(\d+)$", 1).cast("int")
    texts = [r[0] for r in table.where(copy_k < copies).select("text").collect()]
    # prepared as the adapter prepares them, minus the line end that predict(list) adds itself
    prepared = [line[:-1] for line in prepare_lines(texts, topic.max_chars)]
    del texts
    if topic.max_chars != dclm.max_chars:
        raise RuntimeError("the two fastText scorers must share max_chars for one prepared text list")
    m_topic, m_dclm = load_fasttext(topic.model), load_fasttext(dclm.model)
    m_topic.predict(prepared[:1000], k=1)
    m_dclm.predict(prepared[:1000], k=-1)
    log(f"fastText baseline: {len(prepared)} prepared texts ({copies} copies of each page); annotate: {docs} documents")

    def baseline(_i: int):
        t0 = time.perf_counter()
        labels, _ = m_topic.predict(prepared, k=1)
        t1 = time.perf_counter()
        ls, ps = m_dclm.predict(prepared, k=-1)
        t2 = time.perf_counter()
        assert len(labels) == len(ls) == len(prepared) and ls[0][0].startswith(LABEL_PREFIX)
        return {"topic_s": t1 - t0, "dclm_s": t2 - t1}

    try:
        repeats, model_repeats = _repeats(args)
        timings, report, cpu = _time_annotate(spark, conf, folder, scorer_args, docs, repeats, baseline, model_repeats,
                                              args.keep, "fasttext", args.annotate_warmup)
        session = spark_info(spark)
    finally:
        stop_spark()
    n_base = len(prepared)
    prepared.clear()  # the texts' memory, before the result is built
    value = timings["annotate"].rate(docs) / CORES
    base = timings["model"].rate(n_base)
    details = {
        "value": f"median run_annotate documents/s / {CORES} cores (fresh annotations table, histograms off)",
        "baseline": "median fastText predict(list) documents/s of both models on one core (prepared texts)",
        "annotate": timings["annotate"].as_dict(docs),
        "model": {**timings["model"].as_dict(n_base), "split_s": timings["model"].results, "n_texts": n_base},
        "cpu": _cpu_details(cpu, docs, n_base),
        "paired": _paired_details(timings, cpu, docs, n_base),
        "report": report.metrics(),
        "scorers": {k: {**v, "model": Path(v["model"]).name} for k, v in scorers.items()},
        "input": {"folder": str(folder), "rows": docs, "partitions": manifest["partitions"], "scheme": manifest["scheme"]},
        "commit": git_commit(),
        "spark": session,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return _write(NAME, "fastText", "model alone", value, base, docs, details, digits=0)


# ---------------------------------------------------------------- MiniLM


def run_minilm(args: argparse.Namespace) -> dict[str, Any]:
    from bench.sample_data import generate_tables, read_source, source_path
    from quadmix_spark.curation.scorers import resolve_scorers
    from quadmix_udfs.onnx_transformer import load_session

    t_start = time.perf_counter()
    docs = args.minilm_docs
    models = scorer_models()
    spark, conf = _session(args, "minilm")
    folder, manifest = generate_tables(spark, docs, DEFAULT_PARTS)
    scorers = minilm_scorers(models)
    scorer_args = annotate_overrides(scorers, "topic_mini", ["ref_mini"])
    resolved = resolve_scorers(bench_config(scratch_dir("runs", "annotate"), *scorer_args))
    enc = resolved.domain.adapter.encoder

    pages = read_source(source_path())
    n_base = min(args.minilm_baseline_docs, docs)
    texts = [pages[j % len(pages)]["text"] + f"\n[copy {j // len(pages)}]" for j in range(n_base)]  # rows 0.. of the table
    session = load_session(enc.model, None, enc.intra_op_threads)
    ids = enc.tokenize(texts)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out_name = enc.output_name or session.get_outputs()[0].name
    batches = [enc.feeds(session, [ids[i] for i in order[s : s + enc.batch_size]]) for s in range(0, n_base, enc.batch_size)]
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    session.run([out_name], batches[0])
    log(f"MiniLM baseline: {n_base} documents in {len(batches)} batches ({tokens / n_base:.0f} tokens/doc); annotate: {docs}")

    return _session_part(
        args, spark, conf, folder, manifest, scorer_args, docs, session, out_name, batches, n_base, tokens, "minilm",
        value=f"median run_annotate documents/s / {CORES} cores (fresh annotations table, histograms off; one "
              "encoder pass for both heads, 1 intra-op thread per task)",
        baseline="median raw onnxruntime session.run documents/s on the same token batches, 1 intra-op thread",
        settings={**MINILM_SETTINGS, "model": "minilm_l6_v2/model_int8.onnx", "intra_op_threads": 1},
        name=MINILM_NAME, part="MiniLM", t_start=t_start)


def _session_part(args, spark, conf, folder: Path, manifest: dict, scorer_args: list[str], docs: int, session, out_name: str,
                  batches: list[dict], n_base: int, tokens: int, label: str, value: str, baseline: str, settings: dict,
                  name: str, part: str, t_start: float) -> dict[str, Any]:
    """An ONNX part: ``run_annotate`` bracketed by the raw session on ``batches`` (the first ``n_base`` documents);
    stops ``spark`` and writes the part's result file."""

    def model(_i: int):
        for feeds in batches:
            session.run([out_name], feeds)

    try:
        repeats, model_repeats = _repeats(args)
        timings, report, cpu = _time_annotate(spark, conf, folder, scorer_args, docs, repeats, model, model_repeats,
                                              args.keep, label, args.annotate_warmup)
        info = spark_info(spark)
    finally:
        stop_spark()
    rate = timings["annotate"].rate(docs) / CORES
    base = timings["model"].rate(n_base)
    details = {
        "value": value,
        "baseline": baseline,
        "annotate": timings["annotate"].as_dict(docs),
        "model": {**timings["model"].as_dict(n_base), "n_docs": n_base, "batches": len(batches),
                  "tokens_per_doc": round(tokens / n_base, 1)},
        "cpu": _cpu_details(cpu, docs, n_base),
        "paired": _paired_details(timings, cpu, docs, n_base),
        "report": report.metrics(),
        "settings": settings,
        "input": {"folder": str(folder), "rows": docs, "partitions": manifest["partitions"]},
        "commit": git_commit(),
        "spark": info,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return _write(name, part, "raw session", rate, base, docs, details, digits=1)


# ---------------------------------------------------------------- causal LM


def _train_reference_lm(folder: Path) -> dict[str, Any]:
    """The demo's ``ref_lm`` recipe (fewer steps: the benchmark times scoring, not the model's quality)."""
    from quadmix_spark.curation.causal_lm_train import LMSettings, export_onnx, train_causal_lm

    texts = _read_jsonl(shared_dir() / "data" / "reference" / "alpaca_eval_outputs.jsonl.gz", "output")
    model, _ = train_causal_lm(texts, str(_tokenizer_path()), LMSettings(seq_len=64, steps=60))
    export_onnx(model, str(folder / "ref_lm.onnx"))
    return {"files": ["ref_lm.onnx"], "version": CAUSAL_LM_VERSION}


def _tokenizer_path() -> Path:
    return shared_dir() / "data" / "models" / "tokenizers" / "gpt_neox_20b.json"


def causal_lm_scorers(model: Path) -> dict[str, dict]:
    lid = shared_dir() / "data" / "models" / "lid" / "lid.176.ftz"
    return {"lang": {"type": "fasttext", "model": str(lid), "output": "label"},
            "ref_lm": {"type": "onnx_causal_lm", "model": str(model), "tokenizer": str(_tokenizer_path()), "head": "perplexity",
                       "device": "cpu", "intra_op_threads": 1, **CAUSAL_LM_SETTINGS}}


def run_causal_lm(args: argparse.Namespace) -> dict[str, Any]:
    from bench.sample_data import generate_tables, read_source, source_path
    from quadmix_spark.curation.scorers import resolve_scorers
    from bench.gpu_askllm import adapter_batches

    t_start = time.perf_counter()
    docs = args.causal_lm_docs
    model_dir, _ = cached_input(f"annotate-causal-lm-v{CAUSAL_LM_VERSION}", _train_reference_lm)
    spark, conf = _session(args, "causal_lm")
    folder, manifest = generate_tables(spark, docs, DEFAULT_PARTS)
    scorers = causal_lm_scorers(model_dir / "ref_lm.onnx")
    scorer_args = annotate_overrides(scorers, "lang", ["ref_lm"])
    adapter = resolve_scorers(bench_config(scratch_dir("runs", "annotate"), *scorer_args)).quality[0].adapter

    pages = read_source(source_path())
    n_base = min(args.causal_lm_baseline_docs, docs)
    texts = [pages[j % len(pages)]["text"] + f"\n[copy {j // len(pages)}]" for j in range(n_base)]  # rows 0.. of the table
    session = adapter.session(None)
    batches = adapter_batches(adapter, texts, session, len(texts))
    tokens = sum(len(x) for x in adapter.sequences(texts))
    out_name = session.get_outputs()[0].name
    session.run([out_name], batches[0])
    log(f"causal LM baseline: {n_base} documents in {len(batches)} batches ({tokens / n_base:.0f} tokens/doc); annotate: {docs}")

    return _session_part(
        args, spark, conf, folder, manifest, scorer_args, docs, session, out_name, batches, n_base, tokens, "causal_lm",
        value=f"median run_annotate documents/s / {CORES} cores (fresh annotations table, histograms off; lid.176 "
              "domain + the causal LM perplexity criterion, 1 intra-op thread per task)",
        baseline="median session.run documents/s of the adapter's graph (model + head) on the same token batches, "
                 "1 intra-op thread",
        settings={**CAUSAL_LM_SETTINGS, "model": "reference LM, 4,096 classes, d=128, 2 layers", "intra_op_threads": 1},
        name=CAUSAL_LM_NAME, part="causal LM", t_start=t_start)


# ---------------------------------------------------------------- text_stats


def text_stats_scorers() -> dict[str, dict]:
    lid = str(shared_dir() / "data" / "models" / "lid" / "lid.176.ftz")
    return {"lang": {"type": "fasttext", "model": lid, "output": "label"},
            "lang_en": {"type": "fasttext", "model": lid, "label": "en"},
            "gopher": {"type": "text_stats"}}


def text_stats_breakdown(adapter, batches: list, repeats: int = 5) -> dict[str, float | str]:
    """Microseconds per document of each step of the ``text_stats`` adapter: every step timed on its own over all
    chunks of ``batches`` (its inputs computed beforehand), the minimum of ``repeats`` runs (a shared machine's
    noise only adds). ``total`` is ``score_arrow`` and ``statistics`` the statistics, by the compiled kernel where
    it is built (``kernel`` says which); ``rules, score, Arrow output`` is what ``score_arrow`` adds to them. The
    steps below ``statistics, numpy path`` are that path's, each alone."""
    from quadmix_udfs import text_stats as ts

    n_docs = sum(len(b) for b in batches)
    chunks = [(b, int(off[-1]), off) for batch in batches for _, _, b, off in ts.text_chunks(batch, adapter.max_chars)]
    cut = [ts._cut(*c) for c in chunks]
    hashed = [ts._word_hashes(ts._u64_at(c.b), c.starts, c.ends - c.starts) for c in cut]
    steps = {
        "total": lambda: [adapter.score_arrow(b) for b in batches],
        "statistics": lambda: [ts.text_statistics(b, adapter.max_chars) for b in batches],
        "statistics, numpy path": lambda: [ts.text_statistics(b, adapter.max_chars, native=False) for b in batches],
        "Arrow cut to max_chars, chunk copies": lambda: [list(ts.text_chunks(b, adapter.max_chars)) for b in batches],
        "words, letters, characters, lines": lambda: [ts._cut(*c) for c in chunks],
        "word hashes": lambda: [ts._word_hashes(ts._u64_at(c.b), c.starts, c.ends - c.starts) for c in cut],
        "bullet / ellipsis / terminal lines": lambda: [ts._line_ends(c) for c in cut],
        "stop words": lambda: [ts._stop_words(c, f8) for c, (_, f8) in zip(cut, hashed)],
        "symbols (#, ..., {)": lambda: [ts._symbols(c) for c in cut],
        "C4 phrases (lorem, javascript, policy)": lambda: [ts._c4_phrases(c) for c in cut],
        "duplicate lines": lambda: [ts._dup_lines(c, h) for c, (h, _) in zip(cut, hashed)],
        "top 2-4-grams, repeated 5-10-grams": lambda: [ts._repetition(h, c.cum_chars, c.word_doc, c.nd)
                                                       for c, (h, _) in zip(cut, hashed)],
    }
    best = {name: min(_seconds(fn) for _ in range(repeats)) * 1e6 / n_docs for name, fn in steps.items()}
    best["rules, score, Arrow output"] = best["total"] - best["statistics"]
    return {"kernel": ts.kernel_description(), **{k: round(v, 2) for k, v in best.items()}}


def _seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _annotated_base(spark, conf, docs_folder: Path, manifest: dict, scorers: dict) -> Path:
    """The cached storage root whose ``annotations`` hold the domain and lid criterion of every document."""
    import hashlib

    from bench.sample_data import link_inputs
    from quadmix_spark.curation.annotate import run_annotate
    from quadmix_spark.curation.scorers import resolve_scorers

    args = annotate_overrides(scorers, "lang", ["lang_en"])
    versions = resolve_scorers(bench_config(scratch_dir("runs", "annotate"), *args)).versions()
    key = json.dumps([docs_folder.name, manifest["rows"], sorted(versions.items())])

    def build(tmp: Path) -> dict[str, Any]:
        link_inputs(tmp, docs_folder, ("documents",))
        report = run_annotate(spark, bench_config(tmp, *spark_overrides(conf), *args), histograms=False)
        (tmp / "tables" / "documents").unlink()
        files = [str(f.relative_to(tmp)) for f in (tmp / "tables").rglob("*") if f.is_file()]
        return {"files": files, "versions": versions, "rows": report.new_documents}

    folder, _ = cached_input(f"annotate-text-stats-base-{hashlib.sha256(key.encode()).hexdigest()[:10]}", build)
    return folder


def run_text_stats(args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import statistics

    import pyarrow as pa
    from pyspark.sql import functions as F

    from bench.sample_data import generate_tables, link_inputs
    from quadmix_spark.curation.annotate import run_annotate, score_documents
    from quadmix_spark.curation.scorers import resolve_scorers
    from quadmix_spark.core.storage import read_table
    from quadmix_udfs.scoring import need_column

    t_start = time.perf_counter()
    docs = args.text_stats_docs
    spark, conf = _session(args, "text_stats")
    folder, manifest = generate_tables(spark, docs, DEFAULT_PARTS)
    scorers = text_stats_scorers()
    base = _annotated_base(spark, conf, folder, manifest, scorers)
    scorer_args = annotate_overrides(scorers, "lang", ["lang_en", "gopher"])
    adapter = resolve_scorers(bench_config(scratch_dir("runs", "annotate"), *scorer_args)).quality[1].adapter

    table = spark.read.format("delta").load(str(folder / "tables" / "documents"))
    copy_k = F.regexp_extract("doc_id", r"-r(\d+)$", 1).cast("int")
    texts = pa.array([r[0] for r in table.where(copy_k < args.text_stats_baseline_copies).select("text").collect()])
    batch = int(conf.get("spark.sql.execution.arrow.maxRecordsPerBatch", 2048))
    batches = [texts.slice(i, batch) for i in range(0, len(texts), batch)]
    adapter.score_arrow(batches[0])
    breakdown = text_stats_breakdown(adapter, batches)
    log(f"text_stats adapter, µs per document (CPU, min of 5): {breakdown}")
    log(f"text_stats baseline: {len(texts)} texts in batches of {batch}; annotate: {docs} documents added to a copy of {base}")

    sc = spark.sparkContext
    roots: dict[int, Path] = {}
    cfgs: dict[int, Any] = {}

    def setup(case: str, i: int) -> None:
        sc.setJobDescription(f"{case} r{i}")
        if case in ("annotate", "annotate_joined", "scoring"):
            roots[i] = fresh_dir("runs", "annotate", f"text-stats-{case}-{i}")
            link_inputs(roots[i], folder, ("documents",))
            if case in ("annotate", "annotate_joined"):
                shutil.copytree(base / "tables" / "annotations", roots[i] / "tables" / "annotations")
            cfgs[i] = bench_config(roots[i], *spark_overrides(conf), *scorer_args)

    def annotate(i: int):
        return run_annotate(spark, cfgs[i], scorers=resolve_scorers(cfgs[i]), histograms=False)

    def annotate_joined(i: int):  # the stage as before 2026-12-03: the flags from the join even when uniform
        import quadmix_spark.curation.annotate as stage

        keep, stage.uniform_work = stage.uniform_work, lambda *a, **k: None
        try:
            return annotate(i)
        finally:
            stage.uniform_work = keep

    def scoring(i: int):  # what the stage's scoring pass costs without its join to the annotations and the MERGE
        resolved = resolve_scorers(cfgs[i])
        needs = [F.lit(s.name == "gopher").alias(need_column(s.name)) for s in resolved.by_key().values()]
        work = read_table(spark, cfgs[i].storage.table("documents")).select(
            "doc_id", "text", F.col("n_tokens").cast("bigint"), F.lit(False).alias("_new"), *needs)
        score_documents(work, resolved).write.format("noop").mode("overwrite").save()

    def model(_i: int):
        for b in batches:
            adapter.score_arrow(b)

    def teardown(case: str, i: int, result) -> None:
        sc.setJobDescription(None)
        if case in ("annotate", "annotate_joined") and result.scored != {"lang": 0, "lang_en": 0, "gopher": docs}:
            raise RuntimeError(f"annotate scored {result.scored}, expected gopher={docs} only\n{result.summary()}")
        if case in ("annotate", "annotate_joined", "scoring") and not args.keep:
            remove(roots[i])

    repeats, model_repeats = _repeats(args)
    cases = {"model": (model, model_repeats), "annotate": (annotate, repeats), "annotate_joined": (annotate_joined, repeats),
             "scoring": (scoring, repeats)}
    try:
        timings, cpu = timed_cases(cases, setup, teardown, args.annotate_warmup)
        session = spark_info(spark)
    finally:
        stop_spark()
    n_base = len(texts)
    value = timings["annotate"].rate(docs) / CORES
    base_rate = timings["model"].rate(n_base)
    details = {
        "value": f"median run_annotate documents/s / {CORES} cores: a text_stats scorer added to annotations holding "
                 "the domain and one criterion (only it scores; MERGE into the copied table; histograms off)",
        "baseline": "median TextStatsScorer.score_arrow documents/s on Arrow batches of the same pages, one core",
        "annotate": timings["annotate"].as_dict(docs),
        "annotate_with_join": {**timings["annotate_joined"].as_dict(docs),
                               "per_core": round(timings["annotate_joined"].rate(docs) / CORES, 1),
                               "what": "the same run with the flags taken from the join of the documents (with their "
                                       "text) to the annotations, as before 2026-12-03"},
        "scoring_pass": {**timings["scoring"].as_dict(docs), "per_core": round(timings["scoring"].rate(docs) / CORES, 1),
                         "what": "documents read, every one scored by text_stats alone, written to Spark's noop sink: "
                                 "the stage's scoring pass without the join to the annotations and the MERGE"},
        "model": {**timings["model"].as_dict(n_base), "n_texts": n_base, "batch": batch},
        "adapter_breakdown_us_per_doc": breakdown,
        "cpu": _cpu_details(cpu, docs, n_base),
        "paired": _paired_details(timings, cpu, docs, n_base),
        "cpu_scoring_pass_s": [round(x, 2) for x in cpu["scoring"]],
        "scoring_pass_docs_per_cpu_s": round(docs / statistics.median(cpu["scoring"]), 1),
        "goal_docs_per_core": 20_000,
        "scorers": {k: {**v, "model": Path(v["model"]).name} if "model" in v else v for k, v in scorers.items()},
        "input": {"folder": str(folder), "rows": docs, "partitions": manifest["partitions"], "base": str(base)},
        "commit": git_commit(),
        "spark": session,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return _write(TEXT_STATS_NAME, "text_stats", "adapter alone", value, base_rate, docs, details, digits=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The parts of ``--annotate-parts``; returns the fastText result when it ran (the others are in their own
    files)."""
    parts = [p.strip() for p in args.annotate_parts.split(",") if p.strip()]
    unknown = set(parts) - {"fasttext", "minilm", "causal_lm", "text_stats"}
    if unknown or not parts:
        raise ValueError(f"--annotate-parts: unknown {sorted(unknown)} (use fasttext, minilm, causal_lm, text_stats)")
    results = {}
    if "minilm" in parts:
        results["minilm"] = run_minilm(args)
    if "causal_lm" in parts:
        results["causal_lm"] = run_causal_lm(args)
    if "fasttext" in parts:
        results["fasttext"] = run_fasttext(args)
    if "text_stats" in parts:
        results["text_stats"] = run_text_stats(args)
    for r in results.values():
        log(f"{r['name']}: value {r['value']:.1f}, baseline {r['baseline']:.1f}, ratio {r['ratio']:.3f}")
    return results.get("fasttext") or results.get("minilm") or results.get("causal_lm") or results["text_stats"]


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_annotate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
