"""Transformer tokenization by the head a text needs: documents per CPU second against tokenizing whole texts.

``tokenize_head_docs_per_cpu_s``: the ``onnx_transformer`` encoder's ``tokenize`` (``max_length``
``--tokenize-max-length``, default 512; ``max_chars`` 20,000, as a FineWeb-Edu-style scorer and
``bench.gpu_annotate`` are set) on the shared web pages, which tokenizes a long text by the head its
``max_length`` tokens need (``quadmix_udfs.token_prefix``). Baseline: the same tokenizer, truncating to the
same ``max_length``, on the whole texts cut to ``max_chars`` (what the encoder did before). Both run the
tokenizer's batch encode; the figure is documents per CPU second of this process (all the tokenizer's
threads), medians of ``--tokenize-repeats`` interleaved runs, and the ids of both must be identical (checked,
recorded as ``details.identical``). Ratio > 1 is the CPU the head saves; texts shorter than the head gain nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from typing import Any

from bench.common import add_option, log, shared_dir, standalone_main, write_result

NAME = "tokenize_head_docs_per_cpu_s"
METRIC = "documents per CPU second"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--tokenize-max-length", type=int, default=512, help="tokens kept per document (default 512)")
    add_option(parser, "--tokenize-docs", type=int, default=4_000, help="shared web pages tokenized per run (default 4,000)")
    add_option(parser, "--tokenize-repeats", type=int, default=5, help="interleaved runs of each side (default 5)")


def _cpu_seconds(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from quadmix_udfs.onnx_transformer import Encoder
    from quadmix_udfs.token_prefix import PREFIX_CHARS_PER_TOKEN

    tok_path = str(shared_dir() / "data" / "models" / "minilm_l6_v2" / "tokenizer.json")
    with gzip.open(shared_dir() / "data" / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.tokenize_docs), f)]
    max_length, max_chars = args.tokenize_max_length, 20_000
    encoder = Encoder("unused.onnx", tok_path, max_chars=max_chars, max_length=max_length)
    whole = Tokenizer.from_file(tok_path)
    whole.no_padding()
    whole.enable_truncation(max_length)
    cut = [t[:max_chars] for t in texts]

    def by_head():
        return encoder.tokenize(texts)

    def by_whole():
        return [e.ids for e in whole.encode_batch_fast(cut)]

    identical = by_head() == by_whole()  # also the warm-up of both
    if not identical:
        raise RuntimeError("head tokenization gave other ids than whole-text tokenization")
    cpu: dict[str, list[float]] = {"head": [], "whole": []}
    for i in range(args.tokenize_repeats):
        for label, fn in (("whole", by_whole), ("head", by_head)):
            cpu[label].append(_cpu_seconds(fn))
        log(f"repeat {i + 1}/{args.tokenize_repeats}: whole {cpu['whole'][-1]:.2f} CPU-s, head {cpu['head'][-1]:.2f} CPU-s")
    n = len(texts)
    value, base = n / statistics.median(cpu["head"]), n / statistics.median(cpu["whole"])
    head_chars = PREFIX_CHARS_PER_TOKEN * max_length
    details = {
        "tokenizer": "shared minilm_l6_v2 (BERT uncased WordPiece)",
        "max_length": max_length,
        "max_chars": max_chars,
        "head_chars": head_chars,
        "longer_than_head": sum(len(t) > head_chars for t in texts),
        "mean_chars": round(statistics.fmean(len(t) for t in texts), 1),
        "identical": identical,
        "cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "paired_ratios": [round(w / h, 3) for h, w in zip(cpu["head"], cpu["whole"])],
    }
    log(f"head {value:,.0f} vs whole {base:,.0f} documents per CPU second (ratio {value / base:.3f})")
    return write_result(NAME, METRIC, round(value, 1), round(base, 1), n, details)


def main(argv: list[str] | None = None) -> int:
    return standalone_main("bench_tokenize", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
