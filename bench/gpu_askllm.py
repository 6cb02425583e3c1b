"""GPU AskLLM benchmark: a ~0.5B-parameter decoder scoring documents at 512 tokens through the annotate stage.

Run on a machine with one NVIDIA GPU (H100/H200)::

    python -m bench.gpu_askllm                       # -> bench/results/gpu_askllm_docs_per_gpu.json
    python -m bench.gpu_askllm --smoke --out X.json  # CPU, tiny decoder, seconds (what the tests run)

What it builds (nothing is downloaded; ``--work DIR``, default ``$QUADMIX_BENCH_DIR/gpu-askllm``):

- a decoder of Qwen2.5-0.5B's shape with random weights (:class:`quadmix_spark.search.proxy_model.ProxyLM`:
  24 layers, hidden 896, 14 heads, SwiGLU 4,864, a 151,936-token output layer; full multi-head attention
  and an untied output layer, so ~660M weights and the FLOPs of a 0.5B model with its 152k vocabulary),
  exported with ``torch.onnx.export`` (``input_ids`` -> ``logits``, dynamic batch and sequence; fp16 on GPU);
- the tokenizer of ``bench.gpu_annotate`` (BERT's vocabulary, shared or synthetic; a causal LM scorer does not
  care which tokenizer feeds it as long as its ids are below the model's vocabulary) and its texts (the shared
  web pages, or synthetic ones of web-like lengths);
- the ``onnx_causal_lm`` scorer with ``head: askllm`` (the default AskLLM prompt, the document cut to
  ``--max-length`` tokens: ~620 tokens per sequence at 512), ``device: cuda``, and, as annotate needs a domain,
  the tiny BERT domain head of ``bench.gpu_annotate`` (2 layers, hidden 32: ~0.1% of the decoder's time).

What it measures (medians of ``--repeats``, interleaved):

- **value**: ``run_annotate`` on ``local[--tasks]`` with both scorers on the GPU: documents/s per GPU;
- **baseline**: the adapter's onnxruntime CUDA session (the decoder plus the AskLLM head the adapter appends)
  on the same batches the adapter forms (its sequences, grouped by width within each Arrow batch, padded
  as it pads; tokenization untimed): documents/s;
- where the stage's time went (model-call spans of the workers, NVML utilization), as ``gpu_annotate``.

Needs onnxruntime-gpu (the CPU wheel has no CUDA provider; the script installs nothing); without it the
result records the torch-on-CUDA forward pass of the same model and batches instead, labelled. Goal (issue
19): >= 400 documents/s per H100/H200 through the stage, >= 0.85 of the raw session.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NAME = "gpu_askllm_docs_per_gpu"
QWEN05 = {"vocab": 151936, "d_model": 896, "layers": 24, "heads": 14, "ffn": 4864}
TINY = {"vocab": 30522, "d_model": 64, "layers": 2, "heads": 2, "ffn": 128}


def log(msg: str) -> None:
    print(f"[gpu_askllm] {msg}", flush=True)


def build_decoder(shape: dict[str, int], positions: int, seed: int = 0):
    import torch

    from quadmix_spark.search.proxy_model import ModelShape, ProxyLM

    torch.manual_seed(seed)
    return ProxyLM(ModelShape(vocab_size=shape["vocab"], n_layer=shape["layers"], n_head=shape["heads"],
                              d_model=shape["d_model"], ffn=shape["ffn"], seq_len=positions)).eval()


def export_decoder(model, path: Path, dtype: str, device: str) -> None:
    import warnings

    import torch

    m = model.to(device)
    if dtype == "fp16":
        m = m.half()
    ids = torch.ones((2, 16), dtype=torch.int64, device=device)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (ids,), str(path), input_names=["input_ids"], output_names=["logits"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def adapter_batches(adapter, texts: list[str], session, window: int) -> list[dict]:
    """The adapter's own model calls (:meth:`CausalLMScorer.plan`) over each ``window`` documents."""
    from quadmix_udfs.onnx_transformer import MIN_ROWS

    rows = max(adapter.batch_size, MIN_ROWS)
    out = []
    for w in range(0, len(texts), window):
        seqs = adapter.sequences(texts[w : w + window])
        out += [adapter.batch_feeds(session, [seqs[i] for i in idx], width, rows) for idx, width in adapter.plan(seqs)]
    return out


def _decoder_inputs():
    """What :meth:`CausalLMScorer.batch_feeds` asks of a session: the exported decoder's inputs with the head's."""
    from types import SimpleNamespace

    from quadmix_udfs.onnx_causal_lm import ANSWER_IDS, POSITION

    return SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n, type="tensor(int64)") for n in ("input_ids", POSITION, ANSWER_IDS)])


def time_session(session, batches: list[dict]) -> float:
    name = session.get_outputs()[0].name
    t0 = time.perf_counter()
    for feeds in batches:
        session.run([name], feeds)
    return time.perf_counter() - t0


def time_torch(model, batches: list[dict], device: str) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        for feeds in batches:
            logits = model(torch.from_numpy(feeds["input_ids"]).to(device, non_blocking=True))
            pos = torch.from_numpy(feeds["quadmix_answer_position"]).to(device)
            last = logits[torch.arange(len(pos), device=device), pos].float().log_softmax(-1)
            last[:, :2].cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0


FULL = {"docs": 8_000, "baseline_docs": 2_000, "max_length": 512, "batch_size": 32, "tasks": 4, "repeats": 3, "warmup": 1}
SMOKE = {"docs": 48, "baseline_docs": None, "max_length": 48, "batch_size": 8, "tasks": 2, "repeats": 1, "warmup": 0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.gpu_annotate import gpu_arguments, gpu_defaults

    p = gpu_arguments("python -m bench.gpu_askllm", __doc__.splitlines()[0], "gpu-askllm", FULL, SMOKE)
    return gpu_defaults(p.parse_args(argv), FULL, SMOKE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    from bench.common import setup_env, stop_spark
    from bench.gpu_annotate import TINY as TINY_BERT
    from bench.gpu_annotate import (arrow_batch_rows, build_tokenizer, build_torch_model, export_onnx,
                                    gpu_facts, make_texts, median_run, result_head, start_annotate, timed_rounds, write_gpu_result,
                                    write_heads)
    from quadmix_udfs.onnx_causal_lm import CausalLMScorer

    setup_env()
    facts = gpu_facts()
    cuda = bool(facts.get("cuda_available")) and not args.smoke
    ort_cuda = "CUDAExecutionProvider" in facts.get("ort_providers", [])
    if not args.smoke and not cuda:
        log("no CUDA GPU visible to torch: use --smoke for a CPU check")
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = args.dtype or ("fp16" if cuda else "fp32")
    shape = TINY if args.smoke else QWEN05
    base = Path(os.environ.get("QUADMIX_BENCH_DIR") or "/tmp/quadmix-bench")
    work = Path(args.work or base / ("gpu-askllm-smoke" if args.smoke else "gpu-askllm")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    tokenizer, tok_source = build_tokenizer(work, TINY_BERT["vocab"])
    texts, text_source = make_texts(args.docs, synthetic_vocab="synthetic" in tok_source)
    positions = 2048
    model_path = work / f"decoder_{'tiny' if args.smoke else 'qwen05'}_{dtype}.onnx"
    decoder = build_decoder(shape, positions)
    n_params = sum(p.numel() for p in decoder.parameters())
    if not model_path.exists():
        export_decoder(decoder, model_path, dtype, device if dtype == "fp16" else "cpu")
    decoder = decoder.to(device)
    if dtype == "fp16":
        decoder = decoder.half()
    # the domain scorer annotate needs: the tiny BERT head of gpu_annotate (fp32, negligible next to the decoder)
    bert_path = work / "bert_tiny_fp32.onnx"
    if not bert_path.exists():
        export_onnx(build_torch_model(TINY_BERT), bert_path, "fp32", "cpu")
    heads = write_heads(work, TINY_BERT["hidden"])
    adapter = CausalLMScorer(str(model_path), str(tokenizer), "askllm", max_length=args.max_length,
                             batch_size=args.batch_size, device=device, answer_tokens=("yes", "no"))
    log(f"decoder {model_path.name} ({n_params / 1e6:.0f}M parameters, {dtype}), tokenizer: {tok_source}, "
        f"{len(texts)} documents ({text_source}), max_length {args.max_length} (+ prompt), batch {args.batch_size}")

    n_base = min(args.baseline_docs or len(texts), len(texts))
    session = adapter.session(0 if cuda else None) if (ort_cuda or not cuda) else None
    probe = session or _decoder_inputs()  # no CUDA session (torch fallback): the feeds' names alone
    batches = adapter_batches(adapter, texts[:n_base], probe, arrow_batch_rows())
    tokens = sum(len(x) for x in adapter.sequences(texts[:n_base]))
    notes: dict[str, str] = {}
    scorers = {
        "bert_domain": {"type": "onnx_transformer", "model": str(bert_path), "tokenizer": str(tokenizer), "head": "embedding",
                        "head_file": heads["domain"], "output": "label", "max_length": 64, "batch_size": 64,
                        "device": device, "intra_op_threads": 1},
        "askllm": {"type": "onnx_causal_lm", "model": str(model_path), "tokenizer": str(tokenizer), "head": "askllm",
                   "answer_tokens": ["yes", "no"], "max_length": args.max_length, "batch_size": args.batch_size,
                   "device": device, "intra_op_threads": 1},
    }
    spark, run_annotate_fn = start_annotate(args, facts, work, texts, scorers, notes, "bert_domain", ("askllm",))
    if cuda:  # warm-up: CUDA context, cuBLAS/cuDNN autotuning
        time_session(session, batches[:3]) if session is not None else time_torch(decoder, batches[:3], "cuda")
    models = {"onnxruntime": lambda: time_session(session, batches)} if session is not None else {
        "torch": lambda: time_torch(decoder, batches, "cuda")}
    sides, warmup_s, where = timed_rounds(models, run_annotate_fn, args.repeats, args.warmup)
    if spark is not None:
        stop_spark()
    result, source, rates = result_head(NAME, sides, len(texts), n_base, cuda)
    result["details"] = {
        "gpu_name": facts.get("gpu_name") if cuda else None,
        "device": device,
        "smoke": args.smoke,
        "value_source": source,
        "baseline_source": ("the adapter's onnxruntime session (decoder + AskLLM head), same batches" if "onnxruntime" in rates
                            else "torch on CUDA, same batches"),
        "goal": ">= 400 documents/s per GPU through the annotate stage and >= 0.85 of the raw session (issue 19)",
        "rates_docs_per_s": rates,
        "times_s": {k: [round(x, 3) for x in v] for k, v in sides.items()},
        "warmup_times_s": [round(x, 3) for x in warmup_s],
        "annotate_time": where,
        "annotate_time_median_run": median_run(where, sides.get("annotate", [])),
        "notes": notes,
        "model": {"shape": shape, "parameters": n_params, "dtype": dtype, "file": model_path.name,
                  "bytes": model_path.stat().st_size},
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
