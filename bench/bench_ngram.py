"""Cost per θ of the n-gram screening proxy (``quadmix_spark.search.ngram_lm.train_ngram_proxy``) against the transformer
proxy (``quadmix_spark.search.proxy_train.train_proxy``) at the same token budgets, on the same pool, plans and target set.

Input: the 8,712 shared web pages tokenized with GPT-NeoX into a 4-shard token pool (``bench.bench_proxy``'s cached
pool, ``--ngram-docs`` pages); the target set of ``conf/search-demo.yaml`` (``bmk``, 32 examples per task, at most
seq_len tokens).  θ: ``--ngram-thetas`` draws of Algorithm 1 (seed 0) over the pages' 24 topics as domains and two
criteria, the page's topic and format confidences; S from the kernel (σ = token-weighted flipped percentile, q̄, r̄
within the topic, Eq. 3); the plan lists every page with S > 0 (the kept ones and the ε tail, whose copies every
epoch redraws).

Shapes: the transformer is conf/search-demo.yaml's proxy (vocab 2,048 compacted, 2 layers, d 64, seq 128, batch 16,
fp32 on CPU, one torch thread, as ``proxy.cpus_per_task: 1``); the n-gram model is order ``--ngram-order`` (3) over
the same compacted vocabulary.  Per budget (``--ngram-budgets``, default 200k and 1M tokens) both run on every θ,
interleaved; the n-gram index is built once first (in a child process, to record its peak memory) and every
n-gram call after an untimed warm-up reads it from the cache.

Result ``ngram_proxy_s_per_theta`` (seconds per θ): value = median seconds of ``train_ngram_proxy`` per θ at the
smallest budget, baseline = median seconds of ``train_proxy`` there (both the whole call, evaluation included),
ratio = value / baseline (goal <= 0.02, i.e. 50x cheaper).  ``details.budgets`` has every budget's medians, ratio,
each θ's target losses both ways and their Spearman correlation; ``details.index`` the one-time build.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO, add_option, fresh_dir, interleave, log, machine_info, shared_dir, standalone_main, write_result

NAME = "ngram_proxy_s_per_theta"
METRIC = "seconds per θ"
DEFAULT_DOCS = 8712
DEFAULT_THETAS = 5
DEFAULT_BUDGETS = "200000,1000000"
CRITERIA = ("topic_confidence", "format_confidence")
_BUILD_CHILD = """
import json, resource, sys, time
from quadmix_spark.search import ngram_lm
from quadmix_spark.search.proxy_data import VocabMap
from quadmix_spark.search.token_store import TokenStore
import numpy as np
folder, cache, vocab, order = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = TokenStore.open(folder)
with np.load(f"{folder}/plan.npz") as z:
    docs = {k: z[k] for k in ("shard", "offset", "length")}
vm = VocabMap.build(store.token_counts(), vocab, store.eos_id)
before = int(open("/proc/self/statm").read().split()[1]) * 4096
t0 = time.perf_counter()
index = ngram_lm.ngram_index(store, vm, order, docs=docs, cache_dir=cache)
print(json.dumps({"seconds": time.perf_counter() - t0, "rss_before_bytes": before,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "meta": index.meta,
                  "disk_bytes": sum(p.stat().st_size for p in index.path.iterdir())}))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("n-gram proxy benchmark")
    add_option(group, "--ngram-docs", type=int, default=DEFAULT_DOCS, help="web pages in the pool")
    add_option(group, "--ngram-thetas", type=int, default=DEFAULT_THETAS, help="θ per budget")
    add_option(group, "--ngram-budgets", default=DEFAULT_BUDGETS, help="comma-separated token budgets")
    add_option(group, "--ngram-order", type=int, default=3, help="n-gram order")


def demo_config():
    from quadmix_spark.core.config import load_config

    return load_config([REPO / "conf" / "default.yaml", REPO / "conf" / "search-demo.yaml"], [])


def page_fields(n_docs: int) -> dict[str, list]:
    """Topic and the criteria of the first ``n_docs`` pages, in file order (the pool's row order)."""
    import gzip

    out: dict[str, list] = {"id": [], "topic": [], **{c: [] for c in CRITERIA}}
    with gzip.open(shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if len(out["id"]) >= n_docs:
                break
            if line.strip():
                r = json.loads(line)
                for k in out:
                    out[k].append(r[k])
    return out


def theta_plans(pool: dict, pages: dict, n: int) -> list[tuple[str, int, dict]]:
    """(θ id, θ key, plan) of ``n`` Algorithm-1 θ: every page the θ can draw (S > 0, S from the kernel; the
    trainer redraws the fractional copies, the ε tail's included, each epoch), in read_plan's order."""
    import numpy as np

    from quadmix_spark.kernel import flipped_percentile, merged_score, sample_thetas, sampling_value, within_domain_rank

    domains = sorted(set(pages["topic"]))
    d = np.array([domains.index(t) for t in pages["topic"]])
    tokens = np.maximum(pool["length"], 1).astype(np.float64)
    sigma = np.stack([flipped_percentile(np.asarray(pages[c], dtype=np.float64), tokens) for c in CRITERIA], axis=1)
    order = np.lexsort((pool["offset"], pool["shard"], pool["doc_hash"]))
    out = []
    for theta in sample_thetas(domains, list(CRITERIA), n, seed=0):
        rbar = within_domain_rank(merged_score(sigma, d, theta.alpha), d, tokens)
        S = sampling_value(rbar, theta.lam[d], theta.omega[d], theta.eta[d], theta.eps[d])
        rows = order[S[order] > 0]
        plan = {"S": S[rows], **{c: pool[c][rows].astype(np.int64) for c in ("doc_hash", "shard", "offset", "length")}}
        out.append((theta.theta_id, theta.theta_key, plan))
    return out


def _spearman(a, b) -> float | None:
    import numpy as np
    from scipy.stats import spearmanr

    return None if len(a) < 3 else round(float(spearmanr(np.asarray(a), np.asarray(b)).statistic), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from bench.bench_proxy import build_pool
    from quadmix_spark.search import ngram_lm
    from quadmix_spark.kernel.copies import doc_hashes
    from quadmix_spark.search.proxy_model import ModelShape
    from quadmix_spark.search.proxy_data import TrainSettings, build_eval_set
    from quadmix_spark.search.proxy_train import train_proxy
    from quadmix_spark.search.token_store import TokenStore

    t_start = time.perf_counter()
    budgets = sorted(int(b) for b in str(args.ngram_budgets).split(","))
    if args.ngram_thetas <= 0 or args.ngram_docs <= 0 or not budgets or budgets[0] <= 0:
        raise ValueError("--ngram-thetas, --ngram-docs and the budgets must be positive")
    cfg = demo_config()
    shape, train = ModelShape(**cfg.proxy.model.model_dump()), cfg.proxy.train.model_dump()
    sample_seed = cfg.sampling.seed
    folder, manifest = build_pool(args.ngram_docs)
    store = TokenStore.open(folder)
    with np.load(folder / "plan.npz") as z:
        pool = {k: z[k] for k in z.files}
    pages = page_fields(args.ngram_docs)
    if not np.array_equal(doc_hashes(pages["id"]), pool["doc_hash"]):
        raise RuntimeError("the cached pool's rows are not the pages in file order")
    work = fresh_dir("ngram")
    target = cfg.proxy.target
    eval_set = build_eval_set(target.kind, str(shared_dir() / "data" / "target" / "target_val_texts.jsonl.gz"),
                              str(shared_dir() / "data" / "models" / "tokenizers" / "gpt_neox_20b.json"),
                              str(work / "eval.npz"), target.max_examples_per_task, target.seed,
                              target.max_len or shape.seq_len, target.tasks)
    plans = theta_plans(pool, pages, args.ngram_thetas)
    kept = [int((p["S"] >= 1).sum()) for _, _, p in plans]
    log(f"pool {manifest['docs']} pages, {manifest['tokens']} tokens; {len(plans)} θ keeping {kept} pages (S >= 1); "
        f"target set {len(eval_set)} examples")

    cache = work / "index"
    child = subprocess.run([sys.executable, "-c", _BUILD_CHILD, str(folder), str(cache), str(shape.vocab_size),
                            str(args.ngram_order)], capture_output=True, text=True, cwd=REPO, check=True)
    build = json.loads(child.stdout.strip().splitlines()[-1])
    log(f"n-gram index built in {build['seconds']:.1f} s, peak RSS {build['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({build['rss_before_bytes'] / 2**20:.0f} MiB before), {build['disk_bytes'] / 2**20:.0f} MiB on disk")

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)

    def ngram(settings, i):
        _, key, plan = plans[i]
        return ngram_lm.train_ngram_proxy(plan, store, eval_set, settings, key, sample_seed, order=args.ngram_order,
                                          vocab_size=shape.vocab_size, task_weights=target.task_weights, cache_dir=cache,
                                          seq_len=shape.seq_len)

    def transformer(settings, i):
        _, key, plan = plans[i]
        return train_proxy(plan, store, eval_set, shape, settings, key, sample_seed, task_weights=target.task_weights)

    per_budget = []
    try:
        t0 = time.perf_counter()
        ngram(TrainSettings(**{**train, "tokens": budgets[0]}), 0)  # loads the index, caches the target queries
        first_call_s = time.perf_counter() - t0
        for budget in budgets:
            settings = TrainSettings(**{**train, "tokens": budget})
            log(f"budget {budget:,} tokens")
            timings = interleave({"ngram": (lambda i: ngram(settings, i), len(plans)),
                                  "transformer": (lambda i: transformer(settings, i), len(plans))})
            ng_res, tf_res = timings["ngram"].results, timings["transformer"].results
            ng_loss, tf_loss = [r.target_loss for r in ng_res], [r.target_loss for r in tf_res]
            per_budget.append({
                "tokens": budget, "ngram_median_s": timings["ngram"].median,
                "transformer_median_s": timings["transformer"].median,
                "ratio": timings["ngram"].median / timings["transformer"].median,
                "speedup": timings["transformer"].median / timings["ngram"].median,
                "ngram": timings["ngram"].as_dict(), "transformer": timings["transformer"].as_dict(),
                "ngram_target_loss": [round(x, 4) for x in ng_loss], "transformer_target_loss": [round(x, 4) for x in tf_loss],
                "spearman_ngram_vs_transformer": _spearman(ng_loss, tf_loss),
                "ngram_tokens": [r.tokens for r in ng_res], "transformer_tokens": [r.tokens for r in tf_res],
                "ngram_epochs": [r.epochs for r in ng_res], "transformer_epochs": [r.epochs for r in tf_res],
                "ngram_types": [r.params_total for r in ng_res],
            })
            log(f"budget {budget:,}: n-gram {per_budget[-1]['ngram_median_s']:.3f} s, transformer "
                f"{per_budget[-1]['transformer_median_s']:.1f} s per θ: {per_budget[-1]['speedup']:.0f}x")
    finally:
        torch.set_num_threads(threads_before)
    head = per_budget[0]
    details = {
        "value": f"median seconds per θ of train_ngram_proxy (order {args.ngram_order}) at {head['tokens']:,} tokens",
        "baseline": f"median seconds per θ of train_proxy (conf/search-demo.yaml shape, CPU, 1 thread) at {head['tokens']:,} tokens",
        "budgets": per_budget,
        "index": {**build, "first_call_s": round(first_call_s, 3)},
        "thetas": [t for t, _, _ in plans],
        "kept_docs": kept,
        "expected_tokens_per_epoch": [round(float(p["S"] @ (p["length"] + 1))) for _, _, p in plans],
        "shape": shape.__dict__, "train": train, "order": args.ngram_order,
        "target": {"examples": len(eval_set), "tasks": len(eval_set.task_names)},
        "pool": {"folder": str(folder), "docs": manifest["docs"], "tokens": manifest["tokens"]},
        "torch_threads": 1, "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = write_result(NAME, METRIC, head["ngram_median_s"], head["transformer_median_s"], manifest["docs"], details,
                          machine=machine_info())
    log("; ".join(f"{b['tokens']:,} tokens: {b['ngram_median_s']:.3f} s vs {b['transformer_median_s']:.1f} s "
                  f"({b['speedup']:.0f}x)" for b in per_budget))
    return result


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_ngram", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
