"""Proxy training on CPU: tokens/s of ``train_proxy`` (θ stream over the token pool + training) against the same
training loop fed from memory.

Input (cached under ``$QUADMIX_BENCH_DIR/inputs/proxy-pool-*``): the first ``--proxy-docs`` pages (default 2,000,
~1.6M tokens) of the shared web corpus tokenized with the GPT-NeoX tokenizer into a 4-shard token pool
(``quadmix_spark.search.token_store``), a plan with every page and S ~ U[0, 2) (seed 0), and a small ``bmk`` target
set (8 examples per task, at most seq_len tokens each).

Shape (a CPU-sized proxy, not the paper's): vocab 8,192 (compacted from the pool's token counts), 2 layers,
4 heads, d 64, SwiGLU 128, seq 256; batch 16 sequences in micro-batches of 8, ``--proxy-steps`` steps
(default 24); AdamW as ``TrainSettings``; fp32; ``--proxy-threads`` torch threads (default 1).

Measured in one process, repeats interleaved (baseline, value, ...):

- value: ``quadmix_spark.search.proxy_train.train_proxy`` (vocabulary map, window stream over the memory-mapped
  shards, training loop, then the target-set evaluation, which is not counted): ``ProxyResult.tokens_per_s``.
- baseline: ``run_training`` of the same shape and settings on uniform random windows already in memory
  (no store, no stream): tokens / wall seconds.

Result ``proxy_train_tokens_per_s`` (metric ``tokens/s``), ratio = value / baseline (1.0: the data stream
costs nothing).  ``details.stream_tokens_per_s`` is the stream alone (windows of 2,048 + 1 ids through the
identity vocabulary, no training): what it could feed a GPU (the paper-scale goal needs ~1.1M tokens/s).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    add_option,
    cached_input,
    interleave,
    log,
    machine_info,
    shared_dir,
    standalone_main,
    write_result,
)

NAME = "proxy_train_tokens_per_s"
METRIC = "tokens/s"
DEFAULT_DOCS = 2000
DEFAULT_STEPS = 24
DEFAULT_REPEATS = 3
N_SHARDS = 4
GENERATOR_VERSION = 1


def shape_and_settings(steps: int):
    from quadmix_spark.search.proxy_model import ModelShape
    from quadmix_spark.search.proxy_data import TrainSettings

    shape = ModelShape(vocab_size=8192, n_layer=2, n_head=4, d_model=64, ffn=128, seq_len=256)
    settings = TrainSettings(tokens=steps * 16 * shape.seq_len, batch_size=16, micro_batch_size=8, warmup_steps=4,
                             log_every=10**6, seed=0)
    return shape, settings


def build_pool(n_docs: int) -> tuple[Path, dict[str, Any]]:
    shared = shared_dir() / "data"
    web = shared / "web" / "weborganizer_dev.jsonl.gz"
    tok_path = shared / "models" / "tokenizers" / "gpt_neox_20b.json"
    st = web.stat()
    fp = hashlib.sha256(f"{web.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tok_path.stat().st_size}|v{GENERATOR_VERSION}".encode()).hexdigest()[:10]

    def build(folder: Path) -> dict[str, Any]:
        import numpy as np
        from tokenizers import Tokenizer

        from quadmix_spark.kernel.copies import doc_hashes
        from quadmix_spark.search.proxy_data import build_eval_set
        from quadmix_spark.search.token_store import count_tokens, dtype_for_vocab, shard_name, write_meta, write_shard, write_token_counts

        rows = []
        with gzip.open(web, "rt", encoding="utf-8") as f:
            for line in f:
                if len(rows) >= n_docs:
                    break
                if line.strip():
                    r = json.loads(line)
                    rows.append((str(r["id"]), r["text"]))
        tok = Tokenizer.from_file(str(tok_path))
        vocab = tok.get_vocab_size(with_added_tokens=True)
        eos = tok.token_to_id("<|endoftext|>")
        log(f"tokenizing {len(rows)} pages")
        arrays = [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch([t for _, t in rows], add_special_tokens=False)]
        shard_of = np.arange(len(rows)) % N_SHARDS
        offset = np.zeros(len(rows), dtype=np.int64)
        length = np.zeros(len(rows), dtype=np.int64)
        (folder / "shards").mkdir()
        for s in range(N_SHARDS):
            idx = np.nonzero(shard_of == s)[0]
            offs, lens = write_shard(str(folder / "shards" / shard_name(s)), [arrays[i] for i in idx], dtype_for_vocab(vocab))
            offset[idx], length[idx] = offs, lens
        write_meta(str(folder), {"dtype": dtype_for_vocab(vocab), "eos_id": eos, "tokenizer_vocab": vocab,
                                 "shards": [shard_name(s) for s in range(N_SHARDS)]})
        write_token_counts(str(folder), count_tokens(arrays, vocab))
        S = np.random.default_rng(0).uniform(0.0, 2.0, size=len(rows))
        np.savez(folder / "plan.npz", doc_hash=doc_hashes([i for i, _ in rows]), S=S, shard=shard_of.astype(np.int32),
                 offset=offset, length=length.astype(np.int32))
        shape, _ = shape_and_settings(1)
        build_eval_set("bmk", str(shared / "target" / "target_val_texts.jsonl.gz"), str(tok_path), str(folder / "eval.npz"),
                       max_examples_per_task=8, seed=0, max_len=shape.seq_len)
        files = ["pool.json", "token_counts.npy", "plan.npz", "eval.npz"] + [f"shards/{shard_name(s)}" for s in range(N_SHARDS)]
        return {"files": files, "docs": len(rows), "tokens": int(length.sum()), "source": str(web)}

    return cached_input(f"proxy-pool-{n_docs}docs-{fp}", build)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--repeats", type=int, default=None, help="repeats of both value and baseline")
    group = parser.add_argument_group("proxy benchmark")
    add_option(group, "--proxy-docs", type=int, default=DEFAULT_DOCS, help="web pages tokenized into the pool")
    add_option(group, "--proxy-steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per repeat")
    add_option(group, "--proxy-threads", type=int, default=1, help="torch CPU threads")


def _stream_rate(plan, store, windows: int = 4000) -> float:
    from quadmix_spark.search.proxy_data import VocabMap, iter_windows

    vmap = VocabMap.build(store.token_counts(), 50432, store.eos_id)
    stream = iter_windows(plan, store, vmap, 2048, theta_key=1, sample_seed=0, train_seed=0)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(windows):
        next(stream)
    return windows * 2049 / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from quadmix_spark.search.proxy_model import ProxyLM, count_params
    from quadmix_spark.search.proxy_data import EvalSet
    from quadmix_spark.search.proxy_train import run_training, train_proxy
    from quadmix_spark.search.token_store import TokenStore

    t_start = time.perf_counter()
    repeats = args.repeats or DEFAULT_REPEATS
    if repeats <= 0 or args.proxy_steps <= 0 or args.proxy_docs <= 0 or args.proxy_threads <= 0:
        raise ValueError("--repeats, --proxy-steps, --proxy-docs and --proxy-threads must be positive")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.proxy_threads)
    folder, manifest = build_pool(args.proxy_docs)
    store = TokenStore.open(folder)
    with np.load(folder / "plan.npz") as z:
        plan = {k: z[k] for k in z.files}
    eval_set = EvalSet.load(folder / "eval.npz")
    shape, settings = shape_and_settings(args.proxy_steps)
    tokens = settings.steps(shape.seq_len) * settings.batch_size * shape.seq_len
    log(f"pool: {manifest['docs']} pages, {manifest['tokens']} tokens; {tokens} training tokens per repeat")

    def value(i: int):
        return train_proxy(plan, store, eval_set, shape, settings, theta_key=1, sample_seed=0)

    def baseline(i: int):
        rng = np.random.default_rng(i)
        windows = iter(rng.integers(0, shape.vocab_size, size=(settings.steps(shape.seq_len) * settings.batch_size,
                                                                 shape.seq_len + 1), dtype=np.int64))
        torch.manual_seed(settings.seed)
        model = ProxyLM(shape)
        t0 = time.perf_counter()
        run_training(model, windows, settings, shape.seq_len)
        return tokens / (time.perf_counter() - t0)

    try:
        timings = interleave({"baseline": (baseline, repeats), "proxy": (value, repeats)})
        stream_rate = _stream_rate(plan, store)
    finally:
        torch.set_num_threads(threads_before)
    results = timings["proxy"].results
    value_rates = [r.tokens_per_s for r in results]
    base_rates = timings["baseline"].results
    value_rate, base_rate = float(np.median(value_rates)), float(np.median(base_rates))
    non_emb, total = count_params(ProxyLM(shape))
    details = {
        "value": "median ProxyResult.tokens_per_s of train_proxy (stream over the memory-mapped pool + training; eval not counted)",
        "baseline": "median tokens/s of run_training on random windows already in memory",
        "value_rates": [round(r, 1) for r in value_rates],
        "baseline_rates": [round(r, 1) for r in base_rates],
        "proxy_calls": timings["proxy"].as_dict(),
        "stream_tokens_per_s": round(stream_rate, 1),
        "target_loss": [round(r.target_loss, 4) for r in results],
        "final_train_loss": [round(r.final_train_loss, 4) for r in results],
        "shape": shape.__dict__,
        "params_non_embedding": non_emb,
        "params_total": total,
        "settings": settings.__dict__,
        "tokens_per_repeat": tokens,
        "torch_threads": args.proxy_threads,
        "torch": torch.__version__,
        "pool": {"folder": str(folder), "docs": manifest["docs"], "tokens": manifest["tokens"], "shards": N_SHARDS},
        "repeats": {"value": repeats, "baseline": repeats, "order": "interleaved, baseline first"},
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = write_result(NAME, METRIC, value_rate, base_rate, manifest["docs"], details, machine=machine_info())
    log(f"train_proxy {value_rate:.0f} tokens/s, in-memory loop {base_rate:.0f} tokens/s, ratio {result['ratio']:.3f}; "
        f"stream alone {stream_rate:.0f} tokens/s")
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_proxy", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
