"""Token counting as ingest does it: the exact fast byte-level BPE path against ``tokenizers``.

``tokenize_count_docs_per_core``: documents per CPU second of ``quadmix_udfs.bpe_fast`` counting the tokens of
the shared web pages and the multilingual robustness crawl (9,409 texts) with the shared GPT-NeoX
``tokenizer.json``. Baseline: ``tokenizers`` on the same texts in the same process, as ingest counted before
(``encode_batch_fast`` in batches of 256; the library may use several threads, so both sides are measured in
CPU seconds of this process: documents per core). Each timed run of the fast path starts from a new encoder
(empty caches), as a new Python worker would; ``details.warm_docs_per_cpu_s`` is a second pass over the same
texts with the caches filled, and ``details.steady_*`` the odd-numbered texts counted by an encoder that
counted the even-numbered ones first (a worker well into its partition), against ``tokenizers`` on the same
odd texts. Medians of ``--token-count-repeats`` interleaved runs; the ids of both sides
are compared on every text first and must be identical (``details.identical``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from typing import Any

from bench.common import add_option, log, shared_dir, standalone_main, write_result

NAME = "tokenize_count_docs_per_core"
METRIC = "documents per CPU second"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--token-count-repeats", type=int, default=5, help="interleaved runs of each side (default 5)")


def _texts() -> list[str]:
    out = []
    for rel in ("web/weborganizer_dev.jsonl.gz", "robustness/cc_raw_multilingual.jsonl.gz"):
        with gzip.open(shared_dir() / "data" / rel, "rt", encoding="utf-8") as f:
            out.extend(t for t in (json.loads(line).get("text") for line in f) if isinstance(t, str))
    return out


def _cpu_seconds(fn) -> tuple[float, Any]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from quadmix_udfs.bpe_fast import load_encoder

    path = str(shared_dir() / "data" / "models" / "tokenizers" / "gpt_neox_20b.json")
    texts = _texts()
    reference = Tokenizer.from_file(path)

    def with_tokenizers() -> list[int]:
        out = []
        for start in range(0, len(texts), 256):
            out.extend(len(e.ids) for e in reference.encode_batch_fast(texts[start:start + 256], add_special_tokens=False))
        return out

    encoder = load_encoder(path)  # the Unicode-class probes run once here, cached for the timed runs
    if encoder.fast is None:
        raise RuntimeError(f"the fast path refused the shared GPT-NeoX file: {encoder.reason}")
    want = [e.ids for e in reference.encode_batch_fast(texts, add_special_tokens=False)]
    identical = encoder.encode_batch(texts) == want
    if not identical:
        raise RuntimeError("the fast path gave other ids than tokenizers")

    # steady: a worker that has counted other pages first (the even ones), timed on the odd ones
    odd, even = texts[1::2], texts[0::2]

    def odd_with_tokenizers() -> None:
        for start in range(0, len(odd), 256):
            reference.encode_batch_fast(odd[start:start + 256], add_special_tokens=False)

    cpu: dict[str, list[float]] = {"tokenizers": [], "fast": [], "warm": [], "tokenizers_odd": [], "steady_odd": []}
    for i in range(args.token_count_repeats):
        s, base_counts = _cpu_seconds(with_tokenizers)
        cpu["tokenizers"].append(s)
        fresh = load_encoder(path)
        s, counts = _cpu_seconds(lambda: fresh.count_batch(texts))
        cpu["fast"].append(s)
        s, _ = _cpu_seconds(lambda: fresh.count_batch(texts))
        cpu["warm"].append(s)
        cpu["tokenizers_odd"].append(_cpu_seconds(odd_with_tokenizers)[0])
        primed = load_encoder(path)
        primed.count_batch(even)
        cpu["steady_odd"].append(_cpu_seconds(lambda: primed.count_batch(odd))[0])
        if list(counts) != base_counts:
            raise RuntimeError("the fast path counted other numbers of tokens than tokenizers")
        log(f"repeat {i + 1}/{args.token_count_repeats}: tokenizers {cpu['tokenizers'][-1]:.2f} CPU-s, "
            f"fast {cpu['fast'][-1]:.2f} (warm {cpu['warm'][-1]:.2f})")
    n = len(texts)
    value, base = n / statistics.median(cpu["fast"]), n / statistics.median(cpu["tokenizers"])
    details = {
        "tokenizer": "shared gpt_neox_20b.json",
        "texts": n,
        "megabytes": round(sum(len(t.encode("utf-8")) for t in texts) / 1e6, 2),
        "identical": identical,
        "warm_docs_per_cpu_s": round(n / statistics.median(cpu["warm"]), 1),
        "steady_docs_per_cpu_s": round(len(odd) / statistics.median(cpu["steady_odd"]), 1),
        "steady_ratio": round(statistics.median(cpu["tokenizers_odd"]) / statistics.median(cpu["steady_odd"]), 3),
        "cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "paired_ratios": [round(b / f, 3) for f, b in zip(cpu["fast"], cpu["tokenizers"])],
    }
    log(f"fast {value:,.0f} vs tokenizers {base:,.0f} documents per CPU second (ratio {value / base:.2f}; "
        f"steady {details['steady_ratio']:.2f}x; warm {details['warm_docs_per_cpu_s']:,.0f})")
    return write_result(NAME, METRIC, round(value, 1), round(base, 1), n, details)


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_token_count", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
