"""Quick checks of the annotate benchmarks' own machinery (the benchmarks themselves run in ``make bench``)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_tree_cpu_seconds_counts_child_processes():
    from bench.bench_annotate import tree_cpu_seconds

    before = tree_cpu_seconds()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"],
                   check=True)
    assert tree_cpu_seconds() - before >= 0.3  # a reaped child's CPU still counts (cutime)


def test_annotate_benchmark_options_and_parts():
    from bench import bench_annotate

    parser = argparse.ArgumentParser()
    bench_annotate.add_arguments(parser)
    args = parser.parse_args(["--annotate-parts", "gpu"])
    with pytest.raises(ValueError, match="unknown"):
        bench_annotate.run(args)
    assert parser.parse_args([]).annotate_parts == "fasttext,minilm,causal_lm"
    assert bench_annotate._repeats(parser.parse_args([])) == (3, 4)  # a model run before and after each annotate run
    assert bench_annotate._repeats(parser.parse_args(["--repeats", "2", "--model-repeats", "5"])) == (2, 5)


def test_bracketed_ratios_compare_each_run_with_the_baselines_beside_it():
    from bench.bench_annotate import bracketed_ratios

    # run i is compared with the mean of baselines i and i + 1 (the machine slowed down after run 0)
    assert bracketed_ratios([0.9, 0.45], [1.0, 1.0, 0.5]) == pytest.approx([0.9, 0.6])
    assert bracketed_ratios([0.9, 0.45, 0.45], [1.0, 0.5, 0.5, 0.5]) == pytest.approx([1.2, 0.9, 0.9])
    assert bracketed_ratios([2.0, 4.0], [1.0]) == pytest.approx([2.0, 4.0])  # fewer baselines: the last one


def test_gpu_benchmark_smoke_mode_exports_a_model_and_writes_a_result(tmp_path):
    """``bench.gpu_annotate --smoke`` on CPU (tiny BERT-shaped model, raw onnxruntime session; no Spark)."""
    from bench import gpu_annotate

    out = tmp_path / "gpu.json"
    assert gpu_annotate.main(["--smoke", "--skip-annotate", "--docs", "40", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result)[:8] == ["name", "machine", "metric", "value", "baseline", "ratio", "n_docs", "when"]
    assert result["name"] == "gpu_annotate_docs_per_gpu" and result["n_docs"] == 40 and result["value"] > 0
    d = result["details"]
    assert d["smoke"] and d["device"] == "cpu" and d["value_source"].startswith("raw onnxruntime")
    assert d["model"]["shape"]["layers"] == 2 and d["batches"]["max_length"] == 64
    assert "skipped" in d["notes"]["annotate"]
    assert d["model"]["fused_operators"] == {} and d["model"]["fused_max_abs_difference"] is None


def test_gpu_benchmark_fuse_gives_one_fused_attention_per_layer_and_the_same_outputs(tmp_path):
    """``--fuse``: onnxruntime's transformer optimizer recognises the export as BERT; outputs stay the plain export's."""
    from bench import gpu_annotate

    out = tmp_path / "gpu.json"
    assert gpu_annotate.main(["--smoke", "--skip-annotate", "--fuse", "--docs", "24", "--work", str(tmp_path / "w"),
                              "--out", str(out)]) == 0
    model = json.loads(out.read_text())["details"]["model"]
    assert model["file"].endswith("_fused.onnx")
    assert model["fused_operators"]["Attention"] == 2 and model["fused_operators"]["EmbedLayerNormalization"] == 1
    assert model["fused_max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_runs_the_annotate_stage(tmp_path):
    """The whole smoke run, annotate stage included (its own Spark, so in a fresh process)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_annotate", "--smoke", "--docs", "48", "--work", str(tmp_path / "w"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # the ratio is there; its value is not a figure here (48 documents: Spark's start-up against a tiny model)
    assert result["details"]["value_source"].startswith("annotate stage") and result["ratio"] is not None and result["value"] > 0
    (spent,) = result["details"]["annotate_time"]  # the workers' model-call spans of the timed run
    assert spent["docs"] == 48 and spent["workers"] >= 1 and spent["model_calls"] >= 48 // 16
    assert 0 < spent["model_busy_s"] <= spent["run_s"] and spent["before_first_model_s"] >= spent["before_first_batch_s"] > 0
    assert result["details"]["annotate_time_median_run"] == spent


def test_tokenize_benchmark_checks_identical_ids_and_writes_its_result(tmp_path, monkeypatch):
    import bench.common
    from bench import bench_tokenize

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    parser = argparse.ArgumentParser()
    bench_tokenize.add_arguments(parser)
    result = bench_tokenize.run(parser.parse_args(["--tokenize-docs", "300", "--tokenize-repeats", "1",
                                                   "--tokenize-max-length", "32"]))
    saved = json.loads((tmp_path / "tokenize_head_docs_per_cpu_s.json").read_text())
    assert saved["value"] == result["value"] > 0 and saved["n_docs"] == 300
    d = saved["details"]
    assert d["identical"] and d["head_chars"] == 256 and d["longer_than_head"] > 200


def test_gpu_benchmark_baseline_batches_are_sorted_within_each_arrow_batch_as_the_workers_sort():
    from bench.gpu_annotate import arrow_batch_rows, token_batches
    from quadmix_udfs.onnx_transformer import Encoder
    from tests.udfs.test_scorers import BERT_TOK

    assert arrow_batch_rows() == 2048
    texts = [" ".join(["word"] * n) for n in (9, 1, 5, 3, 7, 2, 8, 4, 6, 10, 1, 2)]
    enc = Encoder("unused.onnx", BERT_TOK, max_length=64, batch_size=2)
    widths = [b["input_ids"].shape[1] - 2 for b in token_batches(enc, texts, None, window=5)]  # words per row, [CLS]/[SEP] off
    assert widths == [3, 7, 9, 4, 8, 10, 2]  # windows (9 1 5 3 7) (2 8 4 6 10) (1 2), each sorted, cut in twos
    assert len(token_batches(enc, texts, None)) == 6  # one window: the 12 sorted together


def test_gpu_askllm_smoke_mode_scores_a_decoder_and_writes_a_result(tmp_path):
    """``bench.gpu_askllm --smoke`` on CPU: a tiny decoder through the adapter's own batches (no Spark)."""
    from bench import gpu_askllm

    out = tmp_path / "askllm.json"
    assert gpu_askllm.main(["--smoke", "--skip-annotate", "--docs", "24", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["name"] == "gpu_askllm_docs_per_gpu" and result["n_docs"] == 24 and result["value"] > 0
    d = result["details"]
    assert d["smoke"] and d["device"] == "cpu" and d["value_source"].startswith("raw onnxruntime")
    assert d["model"]["shape"]["layers"] == 2 and d["batches"]["max_length"] == 48
    assert d["batches"]["tokens_per_doc"] > 48  # the prompt around the document
    assert "skipped" in d["notes"]["annotate"]


@pytest.mark.slow
def test_gpu_askllm_smoke_mode_runs_the_annotate_stage(tmp_path):
    """``bench.gpu_askllm --smoke`` whole: the decoder's AskLLM scorer through the annotate stage (a fresh process)."""
    out = tmp_path / "askllm.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_askllm", "--smoke", "--docs", "32", "--work", str(tmp_path / "w"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["details"]["value_source"].startswith("annotate stage") and result["ratio"] is not None
    (spent,) = result["details"]["annotate_time"]
    assert spent["docs"] == 2 * 32 and spent["model_calls"] >= 32 // 8  # model calls of both scorers
