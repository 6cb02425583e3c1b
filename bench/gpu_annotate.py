"""GPU annotate benchmark: a BERT-base-size ONNX classifier at up to 512 tokens through the annotate stage.

Run on a machine with one NVIDIA GPU (H100/H200)::

    python -m bench.gpu_annotate                      # -> bench/results/gpu_annotate_docs_per_gpu.json
    python -m bench.gpu_annotate --smoke --out X.json # CPU, tiny model, seconds (what the tests run)

What it builds (nothing is downloaded; ``--work DIR``, default ``$QUADMIX_BENCH_DIR/gpu-annotate``):

- a WordPiece ``tokenizer.json`` with BERT's vocabulary size (30,522): the shared MiniLM tokenizer (BERT
  uncased) when ``$QUADMIX_SHARED/data/models/minilm_l6_v2/tokenizer.json`` exists, else a synthetic one;
- a randomly initialised BERT-base-shaped encoder (12 layers, hidden 768, 12 heads, FFN 3072, 512 positions,
  ~110M parameters) defined in torch, whose graph ends with the attention-masked mean pool ``[B, 768]``,
  exported with ``torch.onnx.export`` (dynamic batch and sequence axes; ``--dtype fp16`` by default on GPU);
- two heads on that pooled output (a 26-label domain classifier, ``output: label``, and a 2-label quality
  classifier, ``output: score``): one encoder pass per document serves both annotate columns;
- ``--docs`` documents (default 60,000): the shared web pages when present (most exceed 512 tokens), else
  synthetic texts with a web-like length mix, written as a Delta ``documents`` table.

What it measures (medians of ``--repeats``, interleaved):

- **value**: ``run_annotate`` (Delta in, Delta out) on ``local[--tasks]`` with both scorers on ``device: cuda``
  (every Python worker opens its own onnxruntime CUDA session on GPU 0), documents/s: the figure per GPU;
- **baseline**: a raw onnxruntime CUDA session on the same token batches (``--max-length``,
  ``--batch-size``, length-sorted within each 2,048 documents as a worker sorts its Arrow batch, tokenization
  untimed), documents/s;
- **where the stage's time went** (``details.annotate_time``, per timed run): the workers' model-call spans
  (``quadmix_udfs.trace``): seconds before the first call, with at least one call running (``model_busy_s``),
  idle between calls, after the last call (write, commit); and NVML's mean GPU utilization where present.

**onnxruntime-gpu must be installed** for the ONNX figures: the CPU-only ``onnxruntime`` wheel has no
``CUDAExecutionProvider``, and this script installs nothing (the GPU machine has no network). Install
``onnxruntime-gpu`` (matching the machine's CUDA 12/13; its CUDA/cuDNN libraries can come from the torch
wheels' ``nvidia-*`` packages, which ``onnxruntime.preload_dlls()`` loads) in place of ``onnxruntime``.
Without it the script still produces a figure: the **same model in torch on CUDA** (``--dtype``, same
batches), labelled ``value_source: torch-cuda-fallback``; the annotate stage is then skipped (its
``onnx_transformer`` scorer needs the CUDA provider) and the reason recorded. The annotate part also needs
what ``quadmix`` needs (pyspark, Java 17+, the cached Delta jars: ``python -m quadmix_spark.core.jars``); without
them the raw-session figure is recorded, labelled, with the reason.

The result keeps the benchmarks' fixed keys (``name, machine, metric, value, baseline, ratio, n_docs, when``)
plus ``details`` with the GPU name, ``value_source``, providers and versions. Goal (issue 3): >= 2,000
documents/s per GPU through the annotate stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

NAME = "gpu_annotate_docs_per_gpu"
METRIC = "documents/s per GPU"
N_DOMAINS = 26

BERT_BASE = {"vocab": 30522, "hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "positions": 512}
TINY = {"vocab": 30522, "hidden": 32, "layers": 2, "heads": 2, "ffn": 64, "positions": 128}


def log(msg: str) -> None:
    print(f"[gpu_annotate] {msg}", flush=True)


# ---------------------------------------------------------------- tokenizer and texts


def _shared_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("QUADMIX_SHARED") or repo.parent / "shared")


def build_tokenizer(folder: Path, vocab_size: int) -> tuple[Path, str]:
    """(tokenizer.json, where it came from): the shared BERT-uncased vocabulary, else a synthetic WordPiece one."""
    shared = _shared_dir() / "data" / "models" / "minilm_l6_v2" / "tokenizer.json"
    if shared.is_file():
        return shared, "shared minilm_l6_v2 (BERT uncased vocabulary)"
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path, "synthetic WordPiece (w0..wN)"


def make_texts(n: int, synthetic_vocab: bool, seed: int = 7) -> tuple[list[str], str]:
    """``n`` documents: the shared web pages (copies get a suffix) or synthetic ones of web-like lengths."""
    import gzip

    import numpy as np

    corpus = _shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz"
    if corpus.is_file() and not synthetic_vocab:
        with gzip.open(corpus, "rt", encoding="utf-8") as f:
            pages = [json.loads(line)["text"] for line in f if line.strip()]
        return [pages[j % len(pages)] + f"\n[copy {j // len(pages)}]" for j in range(n)], "shared web corpus"
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(600), 0.8, n), 20, 4000).astype(int)  # words (~tokens), median 600
    words = rng.integers(0, 30000, int(lengths.sum()))
    out, pos = [], 0
    for length in lengths:
        out.append(" ".join(f"w{w}" for w in words[pos : pos + length]))
        pos += length
    return out, "synthetic (lognormal lengths, median 600 words)"


# ---------------------------------------------------------------- the model


def build_torch_model(shape: dict[str, int], seed: int = 0):
    """A BERT-shaped encoder (post-LN, GELU) returning the attention-masked mean of its last layer ``[B, H]``."""
    import math

    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = shape["hidden"]
            self.q, self.k, self.v, self.out = (nn.Linear(h, h) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(h, eps=1e-12), nn.LayerNorm(h, eps=1e-12)
            self.ff1, self.ff2 = nn.Linear(h, shape["ffn"]), nn.Linear(shape["ffn"], h)

        def forward(self, x, bias):
            # written the way Hugging Face's BertSelfAttention is, so the exported graph has the shape that
            # onnxruntime's transformer optimizer recognises (--fuse) as it does for a real BERT export
            b, t, h = x.shape
            nh = shape["heads"]

            def heads(y):
                return y.view(b, t, nh, h // nh).permute(0, 2, 1, 3)

            q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
            att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(h // nh) + bias, dim=-1)
            ctx = torch.matmul(att, v).permute(0, 2, 1, 3).contiguous().view(b, t, h)
            x = self.ln1(self.out(ctx) + x)
            return self.ln2(self.ff2(nn.functional.gelu(self.ff1(x))) + x)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h = shape["hidden"]
            self.words, self.pos, self.types = nn.Embedding(shape["vocab"], h), nn.Embedding(shape["positions"], h), nn.Embedding(2, h)
            self.ln = nn.LayerNorm(h, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(shape["layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            t = input_ids.shape[1]
            positions = torch.arange(t, device=input_ids.device).unsqueeze(0)
            x = self.ln(self.words(input_ids) + self.pos(positions) + self.types(token_type_ids))
            m = attention_mask.to(x.dtype)
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0  # BERT's extended mask
            for layer in self.layers:
                x = layer(x, bias)
            return (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)

    torch.manual_seed(seed)
    model = Encoder().eval()
    for p in model.parameters():  # BERT's init scale, so activations stay in fp16 range
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
    return model


def export_onnx(model, path: Path, dtype: str, device: str) -> None:
    import torch

    m = model.to(device)
    if dtype == "fp16":
        m = m.half()
    ids = torch.ones((2, 16), dtype=torch.int64, device=device)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
            "token_type_ids": {0: "batch", 1: "seq"}, "pooled": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(m, (ids, ids, torch.zeros_like(ids)), str(path), input_names=list(axes)[:3],
                          output_names=["pooled"], dynamic_axes=axes, opset_version=17, dynamo=False)


def fuse_onnx(plain: Path, path: Path, shape: dict[str, int], dtype: str, use_gpu: bool) -> dict[str, int]:
    """onnxruntime's transformer optimizer on the fp32 export (attention, embedding, LayerNorm and GELU fusions),
    then fp16 weights if asked: what a production export of a BERT classifier goes through. Returns the counts
    of fused operators (``Attention`` must be one per layer, or the graph was not recognised)."""
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(str(plain), model_type="bert", num_heads=shape["heads"], hidden_size=shape["hidden"],
                                   use_gpu=use_gpu)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if fused.get("Attention", 0) != shape["layers"]:
        raise RuntimeError(f"the optimizer fused {fused.get('Attention', 0)} of {shape['layers']} attention blocks: {fused}")
    if dtype == "fp16":
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(str(path))
    return fused


def max_output_difference(a, b, batches: list[dict]) -> float:
    """Largest |difference| of the pooled outputs of two sessions over ``batches`` (inputs cast per session)."""
    import numpy as np

    from quadmix_udfs.onnx_transformer import session_feeds

    worst = 0.0
    for feeds in batches:
        wide = {k: v.astype(np.int64) for k, v in feeds.items()}
        outs = [s.run(None, session_feeds(s, wide, "the benchmark model"))[0].astype(np.float32) for s in (a, b)]
        worst = max(worst, float(np.abs(outs[0] - outs[1]).max()))
    return worst


def write_heads(folder: Path, hidden: int, seed: int = 1) -> dict[str, str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    domain = folder / "domain_head.npz"
    np.savez(domain, weight=rng.normal(0, 0.05, (hidden, N_DOMAINS)).astype(np.float32), bias=np.zeros(N_DOMAINS, np.float32),
             labels=np.array([f"domain_{i:02d}" for i in range(N_DOMAINS)]), kind=np.array("logistic"))
    quality = folder / "quality_head.npz"
    np.savez(quality, weight=rng.normal(0, 0.05, (hidden, 2)).astype(np.float32), bias=np.zeros(2, np.float32),
             labels=np.array(["cc", "hq"]), kind=np.array("logistic"))
    return {"domain": str(domain), "quality": str(quality)}


# ---------------------------------------------------------------- timing sides


class _Int64Inputs:
    """Stands in for a session when only the input names/types are needed (torch fallback: no ONNX session)."""

    def get_inputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name=n, type="tensor(int64)") for n in ("input_ids", "attention_mask", "token_type_ids")]


def arrow_batch_rows() -> int:
    """Rows per Arrow batch the annotate stage's workers receive (the project's session setting)."""
    try:
        from quadmix_spark.core.session import ARROW_CONFS
    except ImportError:  # no pyspark here: the raw-session figures only; the project's value
        return 2048
    return int(ARROW_CONFS["spark.sql.execution.arrow.maxRecordsPerBatch"])


def token_batches(encoder, texts: list[str], session, window: int | None = None) -> list[dict]:
    """The adapter's own batches: its tokenizer, length-sorted within each ``window`` documents (the Arrow
    batch a worker scores at once, :func:`arrow_batch_rows`), ``batch_size`` rows, padded as it pads."""
    import numpy as np

    session = session or _Int64Inputs()
    window = window or arrow_batch_rows()
    bs = encoder.batch_size
    out = []
    for w in range(0, len(texts), window):
        ids = encoder.tokenize(texts[w : w + window])
        order = np.argsort([len(x) for x in ids], kind="stable")
        out += [encoder.feeds(session, [ids[i] for i in order[s : s + bs]]) for s in range(0, len(ids), bs)]
    return out


def time_ort(session, batches: list[dict]) -> float:
    t0 = time.perf_counter()
    for feeds in batches:
        session.run(["pooled"], feeds)
    return time.perf_counter() - t0


def time_torch(model, batches: list[dict], device: str) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        for feeds in batches:
            args = [torch.from_numpy(feeds[k]).to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "token_type_ids")]
            model(*args).float().cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def scorer_settings(model: Path, tokenizer: Path, heads: dict[str, str], args) -> dict[str, dict]:
    common = {"type": "onnx_transformer", "model": str(model), "tokenizer": str(tokenizer), "head": "embedding",
              "max_length": args.max_length, "max_chars": args.max_chars, "batch_size": args.batch_size,
              "device": args.device, "intra_op_threads": 1}
    return {"bert_domain": {**common, "head_file": heads["domain"], "output": "label"},
            "bert_quality": {**common, "head_file": heads["quality"], "label": "hq"}}


class GpuUtilization:
    """GPU 0's utilization (NVML: the share of each sample period with a kernel running), sampled every
    ``interval`` s on a thread while the block runs; ``summary()`` is empty when NVML is not there (CPU)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.samples = interval, []
        self._stop = None

    def __enter__(self):
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML (CPU machine, no nvidia-ml-py): nothing to sample
            return self
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            import pynvml

            self._stop.set()
            self._thread.join()
            pynvml.nvmlShutdown()  # nvmlInit counts its callers; one shutdown per init

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        return {"gpu_util_mean_pct": round(statistics.fmean(self.samples), 1),
                "gpu_util_samples": len(self.samples)}


def annotate_runner(work: Path, texts: list[str], scorers: dict[str, dict], tasks: int, domain: str = "bert_domain",
                    quality: tuple[str, ...] = ("bert_quality",)):
    """(spark, fn(i) -> (seconds, where the time went)): ``run_annotate`` into a fresh annotations table per call,
    ``domain`` and ``quality`` naming the scorers of ``scorers`` annotate uses.

    The workers trace their model calls (:mod:`quadmix_udfs.trace`, set before the first job so the warm-up's
    workers are the measured ones); each run's spans are summarized over its own wall-clock window.
    """
    import shutil

    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import bench_config, bench_spark, spark_overrides
    from quadmix_spark.curation.annotate import run_annotate
    from quadmix_spark.curation.scorers import resolve_scorers
    from quadmix_udfs import trace

    spark, _ = bench_spark(work / "session", master=f"local[{tasks}]")
    trace_root = work / "trace"
    shutil.rmtree(trace_root, ignore_errors=True)
    spark.sparkContext.environment[trace.ENV] = str(trace_root)  # shipped with each Python function to its workers
    docs_path = work / "documents"
    shutil.rmtree(docs_path, ignore_errors=True)
    pdf = pd.DataFrame({"doc_id": [f"d{i:07d}" for i in range(len(texts))], "text": texts,
                        "n_tokens": [len(t) // 4 for t in texts]})
    # one file per task slot, read as one partition each and scored where it is read: the steady state of a
    # large table (no `annotate.partitions`: its shuffle would leave the GPU idle first; more, smaller
    # partitions than slots would leave a tail with fewer tasks feeding the GPU)
    spark.createDataFrame(pdf).repartition(max(tasks, 1)).write.format("delta").save(str(docs_path))
    scorer_args = [f"scorers={json.dumps(scorers)}", f"annotate.domain_scorer={domain}",
                   f"annotate.quality_scorers={json.dumps(list(quality))}"]

    def run(i: int):
        root = work / f"store-{i}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "tables").mkdir(parents=True)
        os.symlink(docs_path, root / "tables" / "documents", target_is_directory=True)
        cfg = bench_config(root, *spark_overrides(master=f"local[{tasks}]"), *scorer_args)
        resolved = resolve_scorers(cfg, validate=False)  # the CPU probe of validate() is not what is measured
        with GpuUtilization() as util:
            w0, t0 = time.time(), time.perf_counter()
            report = run_annotate(spark, cfg, scorers=resolved, histograms=False)
            seconds, w1 = time.perf_counter() - t0, time.time()
        if report.new_documents != len(texts):
            raise RuntimeError(f"annotate scored {report.scored}, expected {len(texts)} documents")
        shutil.rmtree(root, ignore_errors=True)
        return seconds, {**trace.summarize(trace.read_spans(trace_root), w0, w1), **util.summary()}

    return spark, run


# ---------------------------------------------------------------- main


def median_run(spent: list[dict], seconds: list[float]) -> dict | None:
    """The ``spent`` entry of the run whose time is the median (the upper middle of an even count)."""
    if not spent:
        return None
    order = sorted(range(len(seconds)), key=seconds.__getitem__)
    return spent[order[len(order) // 2]]


def start_annotate(args, facts: dict, work: Path, texts: list[str], scorers: dict[str, dict], notes: dict[str, str],
                   domain: str = "bert_domain", quality: tuple[str, ...] = ("bert_quality",)):
    """(spark, annotate runner) of :func:`annotate_runner`, or (None, None) with the reason in ``notes``:
    ``--skip-annotate``, no CUDA provider on a GPU machine, or no Spark here. The missing CUDA provider is noted
    too (the model figures then come from torch)."""
    cuda = bool(facts.get("cuda_available")) and not args.smoke
    ort_cuda = "CUDAExecutionProvider" in facts.get("ort_providers", [])
    if cuda and not ort_cuda:
        notes["onnxruntime"] = ("no CUDAExecutionProvider in onnxruntime " + str(facts.get("onnxruntime"))
                                + ": install onnxruntime-gpu for the ONNX figures; measured torch on CUDA instead")
    if args.skip_annotate:
        notes["annotate"] = "skipped (--skip-annotate)"
    elif cuda and not ort_cuda:
        notes["annotate"] = "skipped: the ONNX scorers need onnxruntime's CUDAExecutionProvider (onnxruntime-gpu)"
    else:
        try:
            return annotate_runner(work, texts, scorers, args.tasks, domain, quality)
        except Exception as e:  # noqa: BLE001 - no pyspark / Java / Delta jars: record why, keep the model figures
            notes["annotate"] = f"skipped: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return None, None


def timed_rounds(models: dict[str, Any], run_annotate_fn, repeats: int, warmup: int) -> tuple[dict, list[float], list[dict]]:
    """Interleaved repeats: each model-alone side of ``models`` (label -> fn() -> seconds), then one annotate run
    (``run_annotate_fn(i) -> (seconds, where the time went)``, when given), after ``warmup`` untimed annotate
    runs. Returns (seconds per side, warm-up seconds, where each timed annotate run spent its time)."""
    warmup_s = []
    for i in range(warmup if run_annotate_fn is not None else 0):
        warmup_s.append(run_annotate_fn(-1 - i)[0])
        log(f"warm-up {i + 1}/{warmup}: annotate {warmup_s[-1]:.2f} s")
    sides: dict[str, list[float]] = {}
    where: list[dict] = []
    for i in range(repeats):
        for label, fn in models.items():
            sides.setdefault(label, []).append(fn())
        if run_annotate_fn is not None:
            seconds, spent = run_annotate_fn(i)
            sides.setdefault("annotate", []).append(seconds)
            where.append(spent)
            log(f"annotate {i + 1}: " + ", ".join(f"{k} {v}" for k, v in spent.items()))
        log(f"repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in sides.items()))
    return sides, warmup_s, where


def result_head(name: str, sides: dict[str, list[float]], n_docs: int, n_base: int, cuda: bool) -> tuple[dict, str, dict]:
    """(the result's fixed keys, where its value came from, documents/s per side): the annotate stage's rate
    when it ran, else the raw session's, else torch's; the baseline is the raw session (or torch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import RESULT_KEYS, machine_info, utc_now

    rates = {k: round((n_docs if k == "annotate" else n_base) / statistics.median(v), 1) for k, v in sides.items()}
    if "annotate" in rates:
        value, source = rates["annotate"], "annotate stage (run_annotate, onnxruntime " + ("CUDA)" if cuda else "CPU, smoke)")
    elif "onnxruntime" in rates:
        value, source = rates["onnxruntime"], "raw onnxruntime session (annotate skipped: see details.notes)"
    else:
        value, source = rates["torch"], "torch-cuda-fallback (onnxruntime-gpu missing: same model and batches in torch)"
    baseline = rates.get("onnxruntime") or rates.get("torch")
    result = {"name": name, "machine": machine_info(), "metric": METRIC, "value": value, "baseline": baseline,
              "ratio": round(value / baseline, 3) if "annotate" in rates and baseline else None,
              "n_docs": n_docs, "when": utc_now()}
    assert tuple(result) == RESULT_KEYS
    return result, source, rates


def write_gpu_result(result: dict, out: str | None, source: str, notes: dict[str, str]) -> Path:
    """The result file (default ``bench/results/<name>.json``), and a log line of its figures and notes."""
    path = Path(out) if out else Path(__file__).resolve().parent / "results" / f"{result['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    value, baseline = result["value"], result["baseline"]
    log(f"{source}: {value:,.1f} documents/s" + (f" (baseline {baseline:,.1f}, ratio {result['ratio']})" if result["ratio"] else "")
        + f"; wrote {path}")
    for k, v in notes.items():
        log(f"note {k}: {v}")
    return path


def gpu_facts() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            out["gpu_name"] = torch.cuda.get_device_name(0)
            out["gpu_count"] = torch.cuda.device_count()
            out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        out["torch"] = None
    from quadmix_udfs.onnx_transformer import preload_cuda_libraries  # the adapter's own loading, as the workers do

    try:
        import onnxruntime as ort

        if failed := preload_cuda_libraries(ort):
            out["ort_preload_dlls"] = failed
        out["onnxruntime"] = ort.__version__
        out["ort_providers"] = ort.get_available_providers()
    except ImportError:
        out["onnxruntime"] = None
        out["ort_providers"] = []
    return out


def gpu_arguments(prog: str, description: str, name: str, full: dict[str, Any], smoke: dict[str, Any]) -> argparse.ArgumentParser:
    """The options the GPU benchmarks share; ``full`` and ``smoke`` give the defaults shown in the help and
    applied by :func:`gpu_defaults` (docs, baseline_docs, max_length, batch_size, tasks, repeats, warmup)."""
    def both(key: str) -> str:
        return f"default {full[key]}; smoke {smoke[key] if smoke[key] is not None else 'all'}"

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny model, few documents (what the tests run)")
    p.add_argument("--docs", type=int, default=None, help=f"documents ({both('docs')})")
    p.add_argument("--baseline-docs", type=int, default=None, help=f"documents of the raw-session baseline ({both('baseline_docs')})")
    p.add_argument("--max-length", type=int, default=None, help=f"tokens per document ({both('max_length')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"documents per model call ({both('batch_size')})")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default=None, help="exported weights (default fp16 on GPU, fp32 on CPU)")
    p.add_argument("--tasks", type=int, default=None, help=f"Spark tasks feeding the GPU (local[N]; {both('tasks')})")
    p.add_argument("--repeats", type=int, default=None, help=f"repeats of each side ({both('repeats')})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed annotate runs first (JIT, CUDA context, autotuning in every worker; {both('warmup')})")
    p.add_argument("--work", default=None, help=f"scratch folder (default $QUADMIX_BENCH_DIR/{name})")
    p.add_argument("--out", default=None, help="result file (default bench/results/<name>.json)")
    p.add_argument("--skip-annotate", action="store_true", help="only the model-alone figures")
    return p


def gpu_defaults(a: argparse.Namespace, full: dict[str, Any], smoke: dict[str, Any]) -> argparse.Namespace:
    for key, value in (smoke if a.smoke else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


FULL = {"docs": 60_000, "baseline_docs": 10_000, "max_length": 512, "batch_size": 64, "tasks": 4, "repeats": 3, "warmup": 1}
SMOKE = {"docs": 96, "baseline_docs": None, "max_length": 64, "batch_size": 16, "tasks": 2, "repeats": 1, "warmup": 0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = gpu_arguments("python -m bench.gpu_annotate", __doc__.splitlines()[0], "gpu-annotate", FULL, SMOKE)
    p.add_argument("--max-chars", type=int, default=20_000)
    p.add_argument("--fuse", action="store_true",
                   help="run onnxruntime's transformer optimizer on the export (fused attention), as production exports do")
    p.add_argument("--torch", action="store_true",
                   help="also time the same model in torch on CUDA (always done when onnxruntime has no CUDA provider)")
    return gpu_defaults(p.parse_args(argv), FULL, SMOKE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from bench.common import setup_env, stop_spark

    setup_env()
    facts = gpu_facts()
    cuda = bool(facts.get("cuda_available")) and not args.smoke
    ort_cuda = "CUDAExecutionProvider" in facts.get("ort_providers", [])
    if not args.smoke and not cuda:
        log("no CUDA GPU visible to torch: use --smoke for a CPU check; measuring on CPU anyway would not be the GPU figure")
        return 2
    args.device = "cuda" if cuda else "cpu"
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    shape = TINY if args.smoke else BERT_BASE
    if args.max_length > shape["positions"]:
        raise SystemExit(f"--max-length {args.max_length} exceeds the model's {shape['positions']} positions")
    base = Path(os.environ.get("QUADMIX_BENCH_DIR") or "/tmp/quadmix-bench")
    work = Path(args.work or base / ("gpu-annotate-smoke" if args.smoke else "gpu-annotate")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    tokenizer, tok_source = build_tokenizer(work, shape["vocab"])
    texts, text_source = make_texts(args.docs, synthetic_vocab="synthetic" in tok_source)
    stem = f"bert2_{'tiny' if args.smoke else 'base'}"  # bert2: q/k/v written as Hugging Face's BERT writes them
    model_path = work / f"{stem}_{dtype}{'_fused' if args.fuse else ''}.onnx"
    torch_model = build_torch_model(shape)
    n_params = sum(p.numel() for p in torch_model.parameters())
    fused: dict[str, int] = {}
    plain_fp32 = work / f"{stem}_fp32.onnx"
    if args.fuse and not plain_fp32.exists():
        export_onnx(torch_model, plain_fp32, "fp32", "cpu")
    if args.fuse:
        fused = fuse_onnx(plain_fp32, model_path, shape, dtype, use_gpu=cuda)
    elif not model_path.exists():
        export_onnx(torch_model, model_path, dtype, "cuda" if cuda and dtype == "fp16" else "cpu")
    torch_model = torch_model.to(args.device)
    if dtype == "fp16":
        torch_model = torch_model.half()
    heads = write_heads(work, shape["hidden"])
    log(f"model {model_path.name} ({n_params / 1e6:.1f}M parameters, {dtype}), tokenizer: {tok_source}, "
        f"{len(texts)} documents ({text_source}), max_length {args.max_length}, batch {args.batch_size}")

    from quadmix_udfs.onnx_transformer import Encoder, load_session

    encoder = Encoder(str(model_path), str(tokenizer), max_chars=args.max_chars, max_length=args.max_length,
                      batch_size=args.batch_size, device=args.device)
    n_base = min(args.baseline_docs or len(texts), len(texts))
    if cuda:  # the CUDA session, or none (torch fallback: the CPU provider may lack fp16 kernels)
        session = load_session(str(model_path), 0, 1) if ort_cuda else None
    else:
        session = load_session(str(model_path), None, 1)
    batches = token_batches(encoder, texts[:n_base], session)
    fuse_check = None
    if args.fuse and session is not None:  # the fused graph against the plain fp32 export, same device
        plain = load_session(str(plain_fp32), 0 if cuda else None, 1)
        fuse_check = max_output_difference(plain, session, batches[:2])
        log(f"fused operators {fused}; max |pooled difference| against the plain fp32 export: {fuse_check:.2e}")
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))

    notes: dict[str, str] = {}
    spark, run_annotate_fn = start_annotate(args, facts, work, texts, scorer_settings(model_path, tokenizer, heads, args), notes)
    use_torch = cuda and (args.torch or not ort_cuda)
    if cuda:  # warm-up (CUDA context, cuDNN/cuBLAS autotuning)
        (time_ort(session, batches[:3]) if ort_cuda else time_torch(torch_model, batches[:3], "cuda"))
    models = {}
    if ort_cuda or not cuda:
        models["onnxruntime"] = lambda: time_ort(session, batches)
    if use_torch:
        models["torch"] = lambda: time_torch(torch_model, batches, "cuda")
    sides, warmup_s, where = timed_rounds(models, run_annotate_fn, args.repeats, args.warmup)
    if spark is not None:
        stop_spark()
    result, source, rates = result_head(NAME, sides, len(texts), n_base, cuda)
    result["details"] = {
        "gpu_name": facts.get("gpu_name") if cuda else None,
        "device": args.device,
        "smoke": args.smoke,
        "value_source": source,
        "baseline_source": "raw onnxruntime session, same token batches" if "onnxruntime" in rates else "torch on CUDA, same token batches",
        "goal": ">= 2000 documents/s per GPU through the annotate stage (issue 3)",
        "rates_docs_per_s": rates,
        "times_s": {k: [round(x, 3) for x in v] for k, v in sides.items()},
        "warmup_times_s": [round(x, 3) for x in warmup_s],
        # per timed annotate run, from the workers' model-call spans (udfs/trace.py) and NVML where present
        "annotate_time": where,
        "annotate_time_median_run": median_run(where, sides.get("annotate", [])),
        "notes": notes,
        "model": {"shape": shape, "parameters": n_params, "dtype": dtype, "file": model_path.name,
                  "bytes": model_path.stat().st_size, "fused_operators": fused, "fused_max_abs_difference": fuse_check},
        "batches": {"max_length": args.max_length, "batch_size": args.batch_size, "baseline_docs": n_base,
                    "tokens_per_doc": round(tokens / max(n_base, 1), 1), "count": len(batches)},
        "tasks": args.tasks,
        "tokenizer": tok_source,
        "texts": text_source,
        "versions": {k: facts.get(k) for k in ("torch", "onnxruntime", "ort_providers", "gpu_count", "gpu_memory_gib")},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_gpu_result(result, args.out, source, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
