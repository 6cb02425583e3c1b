"""Proxy-training throughput on one GPU: can a 1B-token proxy run (spec §3.2) fit in 15 minutes on an H100?

Standalone: needs torch (with CUDA) and numpy, plus this repository's ``quadmix_spark/search/proxy_model.py`` and
``quadmix_spark/search/proxy_train.py`` (found through the repository root, no install needed)::

    python bench/gpu_proxy.py --out DIR [--compile] [--store POOL_DIR] [--steps 8 --warmup 3]
    python bench/gpu_proxy.py --out DIR --smoke          # tiny shape, runs on CPU in seconds

Shape: RegMix tinyllama_1M (``ModelShape()`` defaults: 2 layers, d 256, 8 heads, SwiGLU 512, vocab 50,432,
seq 2048), global batch 512 sequences in micro-batches (``--micro-batch``, default 16), AdamW as in
``TrainSettings``, bf16 autocast.  Data: uniform random token ids (``--store``: the pool's shards read as one
flat token stream through its ``VocabMap``; the θ plan does not matter for speed).

Timing: ``--warmup`` optimizer steps (compilation, allocator, cuDNN/cuBLAS heuristics) are run and not
counted, then ``--steps`` steps are timed with a device synchronize after each; tokens/s = timed tokens /
timed seconds.  ``projected_minutes_1b`` = 1e9 tokens at that rate (goal: <= 15 minutes, one H100).
Writes ``DIR/gpu_proxy.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quadmix_spark.search.proxy_model import ModelShape, ProxyLM, count_params  # noqa: E402
from quadmix_spark.search.proxy_data import TrainSettings, VocabMap  # noqa: E402
from quadmix_spark.search.proxy_train import LossModule, run_training  # noqa: E402

GOAL_MINUTES = 15.0
SMOKE_SHAPE = ModelShape(vocab_size=512, n_layer=1, n_head=2, d_model=32, ffn=64, seq_len=32)


def random_windows(vocab: int, seq_len: int, seed: int):
    """Endless uniform random windows of ``seq_len + 1`` ids (int64), generated in blocks."""
    rng = np.random.default_rng(seed)
    while True:
        block = rng.integers(0, vocab, size=(64, seq_len + 1), dtype=np.int64)
        yield from block


def store_windows(store_dir: str, vocab_size: int, seq_len: int):
    """Endless windows over a token pool's shards read as one flat stream (mapped to the model vocabulary)."""
    from quadmix_spark.search.token_store import TokenStore

    store = TokenStore.open(store_dir)
    vmap = VocabMap.build(store.token_counts(), vocab_size, store.eos_id)
    W = seq_len + 1
    while True:
        any_window = False
        for i in range(len(store.shards)):
            shard = store.shard(i)
            n = shard.shape[0] // W
            for a in range(0, n, 64):
                block = vmap.apply(np.asarray(shard[a * W : min(n, a + 64) * W])).reshape(-1, W)
                any_window = True
                yield from block
        if not any_window:
            raise ValueError(f"the pool at {store_dir} holds fewer than {W} tokens per shard")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu_proxy.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_proxy.json")
    p.add_argument("--store", default=None, help="token pool folder (default: random tokens)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--batch", type=int, default=512, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--seq-len", type=int, default=None, help="override the shape's seq_len")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss module")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape (vocab 512, d 32, 1 layer, seq 32), batch 8 / micro 4, 2+1 steps: a CPU check")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.micro_batch = min(args.batch, 8), min(args.micro_batch, 4)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.steps <= 0 or args.warmup < 0:
        raise SystemExit("--steps must be positive and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = SMOKE_SHAPE if args.smoke else ModelShape()
    if args.seq_len:
        shape = ModelShape(**{**shape.__dict__, "seq_len": args.seq_len})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = TrainSettings(tokens=1, batch_size=args.batch, micro_batch_size=args.micro_batch, warmup_steps=100,
                             seed=args.seed, log_every=10**9, precision=args.precision)
    total_steps = args.warmup + args.steps
    windows = (store_windows(args.store, shape.vocab_size, shape.seq_len) if args.store
               else random_windows(shape.vocab_size, shape.seq_len, args.seed))

    torch.manual_seed(args.seed)
    model = ProxyLM(shape).to(device)
    non_emb, total = count_params(model)
    fwd = LossModule(model)
    if args.compile:
        fwd = torch.compile(fwd)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    marks: list[float] = []
    losses: list[float] = []

    def on_step(done: int) -> None:
        if done >= args.warmup:
            sync()
            marks.append(time.perf_counter())

    def on_metrics(m: dict, step: int) -> None:
        losses.append(m["train_loss"])

    t_start = time.perf_counter()
    if args.warmup == 0:
        sync()
        marks.append(time.perf_counter())
    run_training(model, windows, settings, shape.seq_len, device, steps=total_steps, on_step=on_step,
                 on_metrics=on_metrics, forward_model=fwd)
    wall = time.perf_counter() - t_start
    step_s = [b - a for a, b in zip(marks[:-1], marks[1:])]
    tokens_per_step = args.batch * shape.seq_len
    timed_s = marks[-1] - marks[0]
    tps = tokens_per_step * len(step_s) / timed_s
    result = {
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shape": shape.__dict__,
        "params_non_embedding": non_emb,
        "params_total": total,
        "batch_sequences": args.batch,
        "micro_batch": args.micro_batch,
        "tokens_per_step": tokens_per_step,
        "precision": args.precision if device.type == "cuda" else "fp32",
        "compile": bool(args.compile),
        "data": f"store {args.store}" if args.store else "uniform random tokens",
        "warmup_steps": args.warmup,
        "timed_steps": len(step_s),
        "step_seconds": [round(s, 4) for s in step_s],
        "median_step_s": statistics.median(step_s),
        "tokens_per_s": tps,
        "projected_minutes_1b": 1e9 / tps / 60.0,
        "goal_minutes": GOAL_MINUTES,
        "goal_met": 1e9 / tps / 60.0 <= GOAL_MINUTES,
        "train_loss": losses[-1] if losses else None,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": wall,
        "smoke": bool(args.smoke),
        "host": platform.node(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_proxy.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "gpu_proxy.json")
    print(json.dumps(result, indent=2), flush=True)
    return result


if __name__ == "__main__":
    main()
    raise SystemExit(0)
