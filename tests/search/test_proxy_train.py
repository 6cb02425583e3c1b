"""Token store, proxy LM, θ data stream, training loop and target-set evaluation (no Spark; tiny shapes)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from quadmix_spark.kernel.copies import doc_hashes, hash_uniform_from_doc_hashes, realized_copies
from quadmix_spark.search.proxy_model import ModelShape, ProxyLM, count_params
from quadmix_spark.search.proxy_data import EvalSet, TrainSettings, VocabMap, build_eval_set, iter_windows
from quadmix_spark.search.proxy_train import evaluate, lr_at, train_proxy
from quadmix_spark.search.token_store import TokenStore, count_tokens, write_meta, write_shard, write_token_counts

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("QUADMIX_SHARED", REPO.parent / "shared")).resolve()
TOKENIZER = SHARED / "data" / "models" / "tokenizers" / "gpt_neox_20b.json"
TARGET = SHARED / "data" / "target" / "target_val_texts.jsonl.gz"
OH = SHARED / "data" / "reference" / "alpaca_eval_outputs.jsonl.gz"

TINY = ModelShape(vocab_size=512, n_layer=1, n_head=2, d_model=32, ffn=64, seq_len=32)
EOS = 0


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: stable speed on a shared 2-core machine (and the same numbers on every run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_store(root: Path, docs: list[np.ndarray], vocab: int = 600, n_shards: int = 2) -> tuple[TokenStore, pd.DataFrame]:
    """A pool of ``docs`` over ``n_shards`` shards, and a plan (S = 1) addressing every document."""
    rows = []
    names = []
    for s in range(n_shards):
        mine = [(i, d) for i, d in enumerate(docs) if i % n_shards == s]
        name = f"shard-{s:05d}.bin"
        names.append(name)
        offs, lens = write_shard(str(root / "shards" / name), [d for _, d in mine])
        rows += [(i, s, int(o), int(n)) for (i, _), o, n in zip(mine, offs, lens)]
    write_meta(str(root), {"dtype": "uint16", "eos_id": EOS, "tokenizer_vocab": vocab, "shards": names})
    write_token_counts(str(root), count_tokens(docs, vocab))
    rows.sort()
    ids = [f"doc-{i}" for i, *_ in rows]
    plan = pd.DataFrame({
        "doc_hash": doc_hashes(ids),
        "S": np.ones(len(rows)),
        "shard": np.array([r[1] for r in rows], dtype=np.int32),
        "offset": np.array([r[2] for r in rows], dtype=np.int64),
        "length": np.array([r[3] for r in rows], dtype=np.int32),
    })
    return TokenStore.open(root), plan


def random_docs(n: int, seed: int = 0, vocab: int = 600, lo: int = 5, hi: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=rng.integers(lo, hi)).astype(np.int64) for _ in range(n)]


def marker_docs(n: int, length: int = 6) -> list[np.ndarray]:
    """Document i = [i+1, 1000+i, 1000+i, ...]: its first token identifies it (ids < 65536)."""
    return [np.array([i + 1] + [1000 + i] * (length - 1), dtype=np.int64) for i in range(n)]


# ---------------------------------------------------------------- token store


def test_store_round_trip(tmp_path):
    docs = random_docs(30, vocab=60000) + [np.zeros(0, dtype=np.int64)]
    store, plan = make_store(tmp_path, docs, vocab=60000, n_shards=3)
    assert store.eos_id == EOS and store.tokenizer_vocab == 60000
    for i, row in plan.iterrows():
        got = store.doc(row["shard"], row["offset"], row["length"])
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, docs[i])
    assert store.n_tokens() == sum(len(d) for d in docs)
    np.testing.assert_array_equal(store.token_counts(), count_tokens(docs, 60000))
    # offsets/lengths are token indices; a rewrite (retried task) gives the same file
    path = tmp_path / "again.bin"
    offs, lens = write_shard(str(path), docs[:3])
    np.testing.assert_array_equal(lens, [len(d) for d in docs[:3]])
    np.testing.assert_array_equal(offs, [0, len(docs[0]), len(docs[0]) + len(docs[1])])
    first = path.read_bytes()
    write_shard(str(path), docs[:3])
    assert path.read_bytes() == first and len(first) == 2 * int(lens.sum())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    meta = json.loads((tmp_path / "pool.json").read_text())
    assert meta["format"] == "quadmix-token-pool/1"


def test_store_uint32_and_range_checks(tmp_path):
    arr = np.array([70000, 3, 65536], dtype=np.int64)
    write_shard(str(tmp_path / "shards" / "shard-00000.bin"), [arr], dtype="uint32")
    write_meta(str(tmp_path), {"dtype": "uint32", "eos_id": 3, "tokenizer_vocab": 70001, "shards": ["shard-00000.bin"]})
    store = TokenStore.open(tmp_path)
    np.testing.assert_array_equal(store.doc(0, 0, 3), arr)
    with pytest.raises(ValueError, match="out of range"):
        write_shard(str(tmp_path / "x.bin"), [arr], dtype="uint16")
    with pytest.raises(IndexError):
        store.doc(0, 2, 5)
    with pytest.raises(ValueError):
        count_tokens([arr], 100)


# ---------------------------------------------------------------- vocabulary


def test_vocab_map_identity_and_compaction():
    counts = np.array([5, 0, 9, 9, 1, 7, 2, 0], dtype=np.int64)  # ids 0..7
    ident = VocabMap.build(counts, 8, eos_id=1)
    assert ident.identity
    np.testing.assert_array_equal(ident.apply(np.array([7, 0, 3], dtype=np.uint16)), [7, 0, 3])
    assert VocabMap.build(counts, 50, eos_id=1).apply([7]).dtype == np.int64

    vm = VocabMap.build(counts, 5, eos_id=1)  # keep 4: eos (count 0) forced in; frequency order 2,3 (tie: id), 5, then eos
    assert not vm.identity and vm.rare_id == 4
    np.testing.assert_array_equal(vm.apply(np.arange(8)), [4, 3, 0, 1, 4, 2, 4, 4])
    # eos (5th by count) displaces the 3rd; ids beyond the tokenizer table fall in the rare bucket
    vm2 = VocabMap.build(counts, 4, eos_id=0)
    np.testing.assert_array_equal(vm2.apply([0, 2, 3, 5, 4, 100]), [2, 0, 1, 3, 3, 3])
    # deterministic
    np.testing.assert_array_equal(VocabMap.build(counts, 5, 1).table, vm.table)
    with pytest.raises(ValueError):
        ident.apply([8])


# ---------------------------------------------------------------- the θ data stream


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_realizes_kernel_copies_each_epoch(tmp_path):
    n_docs, L = 40, 6
    docs = marker_docs(n_docs, L)
    store, plan = make_store(tmp_path, docs, vocab=2000)
    rng = np.random.default_rng(3)
    plan["S"] = rng.uniform(0, 2.5, size=n_docs)
    plan.loc[[0, 1], "S"] = 0.0
    vm = VocabMap.build(store.token_counts(), 4000, EOS)  # identity
    seq = 15
    theta_key, sample_seed = 77, 5
    stream = iter_windows(plan, store, vm, seq, theta_key, sample_seed, train_seed=9)
    # per epoch: realized copies of the kernel, each doc (L tokens + eos) contiguous in the concatenation
    for epoch in range(3):
        expected = realized_copies(plan["S"].to_numpy(), hash_uniform_from_doc_hashes(plan["doc_hash"].to_numpy(), theta_key, sample_seed + epoch))
        np.testing.assert_array_equal(stream.epoch_copies(epoch), expected)
        order = stream.epoch_order(epoch)
        np.testing.assert_array_equal(np.bincount(order, minlength=n_docs), expected)
    assert not (stream.epoch_copies(0)[:2]).any()
    # the concatenated windows equal docs-in-order + eos over epochs 0 and 1
    tokens_e01 = sum(int(stream.epoch_copies(e).sum()) for e in (0, 1)) * (L + 1)
    n_win = tokens_e01 // (seq + 1)
    got = np.concatenate(_take(stream, n_win))
    ref = np.concatenate([np.concatenate([np.append(docs[i], EOS) for i in stream.epoch_order(e)]) for e in (0, 1)])
    np.testing.assert_array_equal(got, ref[: n_win * (seq + 1)])
    assert stream.epochs_started == 2 and stream.epoch_log[0]["instances"] == int(stream.epoch_copies(0).sum())
    # docs whose first marker appears in epoch 0's part = realized docs of epoch 0
    seen = np.unique(ref[: int(stream.epoch_copies(0).sum()) * (L + 1)])
    assert set(seen[(seen >= 1) & (seen <= n_docs)] - 1) == set(np.nonzero(stream.epoch_copies(0))[0])


def test_stream_deterministic_fresh_draws_and_budget(tmp_path):
    docs = marker_docs(60, 5)
    store, plan = make_store(tmp_path, docs, vocab=2000)
    plan["S"] = 0.5
    vm = VocabMap.build(store.token_counts(), 4000, EOS)
    a = iter_windows(plan, store, vm, 7, 1, 2, 3)
    b = iter_windows(plan, store, vm, 7, 1, 2, 3)
    np.testing.assert_array_equal(np.stack(_take(a, 40)), np.stack(_take(b, 40)))
    # fresh Bernoulli draws per epoch: epoch 0 and 1 realize different documents
    assert not np.array_equal(a.epoch_copies(0), a.epoch_copies(1))
    # another train seed: same copies, another order
    c = iter_windows(plan, store, vm, 7, 1, 2, 4)
    np.testing.assert_array_equal(np.sort(c.epoch_order(0)), np.sort(a.epoch_order(0)))
    assert not np.array_equal(c.epoch_order(0), a.epoch_order(0))
    # another θ key: other copies
    d = iter_windows(plan, store, vm, 7, 2, 2, 3)
    assert not np.array_equal(d.epoch_copies(0), a.epoch_copies(0))

    # budget smaller than one epoch: training reads exactly steps·batch windows and stops inside epoch 0
    settings = TrainSettings(tokens=50, batch_size=2, micro_batch_size=1, warmup_steps=0, log_every=1)
    shape = ModelShape(vocab_size=4000, n_layer=1, n_head=2, d_model=16, ffn=32, seq_len=8)
    es = _tiny_eval_set(vocab=2000)
    res = train_proxy(plan, store, es, shape, settings, theta_key=1, sample_seed=2)
    assert res.steps == math.ceil(50 / (2 * 8)) == 4 and res.tokens == 4 * 2 * 8
    assert res.epochs == 1
    # a long budget runs into later epochs (1 epoch ≈ 30 docs · 6 tokens ≈ 20 windows of 9)
    res2 = train_proxy(plan, store, es, shape, TrainSettings(tokens=8 * 60, batch_size=2, micro_batch_size=2,
                                                             warmup_steps=0, log_every=100), theta_key=1, sample_seed=2)
    assert res2.epochs >= 2


def test_zero_selection_raises(tmp_path):
    store, plan = make_store(tmp_path, marker_docs(5), vocab=2000)
    vm = VocabMap.build(store.token_counts(), 4000, EOS)
    plan["S"] = 0.0
    with pytest.raises(ValueError, match="θ selects no documents in the proxy pool"):
        iter_windows(plan, store, vm, 8, 1, 2, 3)
    with pytest.raises(ValueError, match="θ selects no documents in the proxy pool"):
        iter_windows(plan.iloc[:0], store, vm, 8, 1, 2, 3)
    with pytest.raises(ValueError, match="θ selects no documents"):
        train_proxy(plan, store, _tiny_eval_set(2000), TINY, TrainSettings(tokens=100), 1, 2)


def test_stream_reads_documents_lazily(tmp_path):
    from quadmix_spark.search.proxy_data import WindowStream

    store, plan = make_store(tmp_path, marker_docs(200, 10), vocab=2000)
    vm = VocabMap.build(store.token_counts(), 4000, EOS)
    calls = []
    real_doc = store.doc
    store.doc = lambda *a: (calls.append(a), real_doc(*a))[1]
    stream = WindowStream(plan, store, vm, 15, 1, 2, 3, chunk_tokens=64)
    next(stream)
    # the first window needs 16 tokens: one chunk of ~64 tokens (7 docs of 11), not the epoch's 200 docs
    assert 2 <= len(calls) <= 8
    _take(stream, 20)
    assert len(calls) <= 40


def test_stream_skips_empty_epochs(tmp_path):
    store, plan = make_store(tmp_path, marker_docs(3), vocab=2000)
    vm = VocabMap.build(store.token_counts(), 4000, EOS)
    plan["S"] = [0.02, 0.0, 0.0]
    s = iter_windows(plan, store, vm, 3, 5, 6, 7)
    w = next(s)
    assert w.shape == (4,) and w[0] == 1
    first = next(i for i, e in enumerate(s.epoch_log) if e["instances"])
    assert s.epoch_log[first]["epoch"] == first and s.epochs_started == 1
    assert all(e["instances"] == 0 for e in s.epoch_log[:first])


# ---------------------------------------------------------------- the model


def test_model_shapes_and_param_count():
    torch.manual_seed(0)
    m = ProxyLM(TINY)
    x = torch.randint(0, TINY.vocab_size, (3, 17))
    assert m(x).shape == (3, 17, TINY.vocab_size)
    loss = m.loss(x, x)
    assert loss.ndim == 0 and abs(loss.item() - math.log(TINY.vocab_size)) < 0.5
    mask = torch.zeros(3, 17, dtype=torch.bool)
    mask[0, :5] = True
    ce = m.token_losses(x, x)
    assert torch.allclose(m.loss(x, x, mask), ce[0, :5].mean())
    # causal: changing a later token leaves earlier logits unchanged
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % TINY.vocab_size
    assert torch.allclose(m(x)[:, :10], m(y)[:, :10], atol=1e-6)
    assert not torch.allclose(m(x)[:, 10:], m(y)[:, 10:])
    # longer than seq_len: rotary tables extend
    assert m(torch.randint(0, 512, (1, 40))).shape == (1, 40, 512)

    shape = ModelShape()
    d, f, V = 256, 512, 50432
    expected = 2 * (4 * d * d + 3 * d * f + 2 * d) + d
    assert expected == 1_312_000 == shape.non_embedding_params()
    non_emb, total = count_params(ProxyLM(shape))
    assert non_emb == expected and total == expected + 2 * V * d
    assert 1.2e6 < non_emb < 1.4e6


def test_lr_schedule():
    s = TrainSettings(tokens=1, lr=1e-3, min_lr=1e-4, warmup_steps=4)
    assert lr_at(0, 20, s) == pytest.approx(2.5e-4) and lr_at(3, 20, s) == pytest.approx(1e-3)
    assert lr_at(4, 20, s) == pytest.approx(1e-3) and lr_at(20, 20, s) == pytest.approx(1e-4)
    assert 1e-4 < lr_at(12, 20, s) < 1e-3
    const = TrainSettings(tokens=1, warmup_steps=2)
    assert [lr_at(i, 10, const) for i in (0, 1, 5, 9)] == pytest.approx([2e-4, 4e-4, 4e-4, 4e-4])
    assert TrainSettings(tokens=1000, batch_size=3, micro_batch_size=2).micro_batches() == [2, 1]
    assert TrainSettings(tokens=1001, batch_size=10).steps(10) == 11


# ---------------------------------------------------------------- training and evaluation


def _tiny_eval_set(vocab: int, seed: int = 0) -> EvalSet:
    rng = np.random.default_rng(seed)
    seqs = [np.concatenate([[EOS], rng.integers(1, vocab, size=rng.integers(3, 20))]) for _ in range(10)]
    lengths = np.array([len(s) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return EvalSet(tokens=np.concatenate(seqs).astype(np.uint16), offsets=offsets, lengths=lengths,
                   task_index=np.array([0] * 4 + [1] * 6), task_names=["a", "b"], eos_id=EOS)


def _repetitive_corpus(tmp_path):
    """A few fixed phrases: a model that learns them drives the loss far below log(V)."""
    rng = np.random.default_rng(1)
    phrases = [rng.integers(1, 500, size=12) for _ in range(4)]
    docs = [np.concatenate([phrases[i % 4], phrases[(i + 1) % 4]]) for i in range(40)]
    return make_store(tmp_path, docs, vocab=500)


def test_training_decreases_loss_and_is_deterministic(tmp_path):
    store, plan = _repetitive_corpus(tmp_path)
    # eval set = the corpus' own documents, as two tasks
    es = EvalSet(tokens=np.concatenate([np.concatenate([[EOS], store.doc(r.shard, r.offset, r.length)]) for r in plan.itertuples()]).astype(np.uint16),
                 offsets=np.arange(40) * 25, lengths=np.full(40, 25), task_index=np.arange(40) % 2,
                 task_names=["even", "odd"], eos_id=EOS)
    settings = TrainSettings(tokens=60 * 8 * 32, batch_size=8, micro_batch_size=4, lr=1e-2, min_lr=1e-3,
                             warmup_steps=5, log_every=10, seed=0)
    metrics, steps_seen = [], []
    res = train_proxy(plan, store, es, TINY, settings, theta_key=3, sample_seed=0,
                      on_metrics=lambda m, s: metrics.append((s, m)), on_step=steps_seen.append)
    assert res.steps == 60 and steps_seen == list(range(1, 61))
    assert [s for s, _ in metrics] == [10, 20, 30, 40, 50, 60]
    assert set(metrics[0][1]) == {"train_loss", "lr", "tokens"} and metrics[-1][1]["tokens"] == res.tokens
    first, last = metrics[0][1]["train_loss"], metrics[-1][1]["train_loss"]
    assert first > 4.0 and last < 0.5 * first
    assert res.final_train_loss < 0.5 * first
    assert res.target_loss < 0.5 * math.log(TINY.vocab_size)
    assert set(res.task_losses) == {"even", "odd"}
    assert res.params_non_embedding == TINY.non_embedding_params() and res.tokens_per_s > 0

    res2 = train_proxy(plan, store, es, TINY, settings, theta_key=3, sample_seed=0)
    assert res2.target_loss == res.target_loss and res2.final_train_loss == res.final_train_loss
    res3 = train_proxy(plan, store, es, TINY, TrainSettings(**{**settings.__dict__, "seed": 1}), theta_key=3, sample_seed=0)
    assert res3.target_loss != res.target_loss


def test_on_step_exception_propagates(tmp_path):
    store, plan = _repetitive_corpus(tmp_path)

    def boom(step):
        if step == 2:
            raise RuntimeError("injected failure at step 2")

    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        train_proxy(plan, store, _tiny_eval_set(500), TINY, TrainSettings(tokens=10 * 4 * 32, batch_size=4),
                    theta_key=1, sample_seed=0, on_step=boom)


def test_evaluate_per_task_and_weighted_mean():
    torch.manual_seed(0)
    m = ProxyLM(TINY)
    es = _tiny_eval_set(TINY.vocab_size)
    vm = VocabMap.build(np.ones(TINY.vocab_size, dtype=np.int64), TINY.vocab_size, EOS)
    target, losses = evaluate(m, es, vm, "cpu", batch_size=3)
    # reference: each example alone, unpadded; per task token-weighted mean
    sums, counts = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    with torch.no_grad():
        for i in range(len(es)):
            seq = torch.from_numpy(es.example(i).astype(np.int64))[None]
            ce = m.token_losses(seq[:, :-1], seq[:, 1:])
            t = es.task_names[es.task_index[i]]
            sums[t] += ce.sum().item()
            counts[t] += ce.numel()
    ref = {t: sums[t] / counts[t] for t in sums}
    assert losses == pytest.approx(ref, rel=1e-5)
    assert target == pytest.approx((ref["a"] + ref["b"]) / 2, rel=1e-6)
    wt, _ = evaluate(m, es, vm, "cpu", task_weights={"a": 3.0, "b": 1.0})
    assert wt == pytest.approx(0.75 * ref["a"] + 0.25 * ref["b"], rel=1e-5)
    # batch size does not change the result
    assert evaluate(m, es, vm, "cpu", batch_size=32)[0] == pytest.approx(target, rel=1e-5)


@pytest.mark.skipif(not (TOKENIZER.exists() and TARGET.exists() and OH.exists()), reason="shared data missing")
def test_build_eval_set_on_shared_files(tmp_path):
    es = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "bmk.npz"), max_examples_per_task=3, seed=0,
                        max_len=64, tasks=["arc_easy", "hellaswag", "copa"])
    assert es.task_names == ["arc_easy", "copa", "hellaswag"] and len(es) == 9
    np.testing.assert_array_equal(np.bincount(es.task_index), [3, 3, 3])
    assert (es.lengths <= 64).all() and (es.lengths >= 2).all()
    assert all(es.example(i)[0] == es.eos_id == 50279 for i in range(len(es)))
    loaded = EvalSet.load(tmp_path / "bmk.npz")
    np.testing.assert_array_equal(loaded.tokens, es.tokens)
    assert loaded.task_names == es.task_names and loaded.eos_id == es.eos_id
    again = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "again.npz"), 3, 0, 64, ["arc_easy", "hellaswag", "copa"])
    np.testing.assert_array_equal(again.tokens, es.tokens)
    other = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "o.npz"), 3, 1, 64, ["arc_easy", "hellaswag", "copa"])
    assert not np.array_equal(other.tokens, es.tokens)
    with pytest.raises(ValueError, match="unknown target tasks"):
        build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "x.npz"), 3, 0, 64, ["no_such_task"])

    oh = build_eval_set("oh", str(OH), str(TOKENIZER), str(tmp_path / "oh.npz"), 4, 0, 128, None)
    assert oh.task_names == ["oh"] and len(oh) == 4 and (oh.lengths <= 128).all()
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(TOKENIZER)).decode(oh.example(0)[1:].tolist())
    assert text.startswith("### Instruction:\n")

    # a tiny model with a compacted vocabulary evaluates it
    vm = VocabMap.build(np.arange(50280, dtype=np.int64), 512, es.eos_id)
    torch.manual_seed(0)
    target, losses = evaluate(ProxyLM(TINY), es, vm, "cpu")
    assert set(losses) == set(es.task_names) and target == pytest.approx(np.mean(list(losses.values())))


def test_gpu_proxy_smoke_runs_on_cpu(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_proxy", REPO / "bench" / "gpu_proxy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_proxy.json").read_text())
    assert saved["tokens_per_s"] == res["tokens_per_s"] > 0
    assert saved["timed_steps"] == 2 and saved["tokens_per_step"] == 8 * 32
    assert saved["params_non_embedding"] == mod.SMOKE_SHAPE.non_embedding_params()
    assert math.isfinite(saved["train_loss"]) and saved["projected_minutes_1b"] == pytest.approx(1e9 / res["tokens_per_s"] / 60)


@pytest.mark.skipif(not (TOKENIZER.exists() and TARGET.exists()), reason="shared data missing")
def test_search_and_evaluation_parts_of_the_target_set_never_share_an_example(tmp_path):
    """The search's proxies are scored on one part, `quadmix evaluate` on the other: split by a hash of task and
    text, so even a text that occurs twice lands in one part only."""
    import gzip

    from quadmix_spark.search.proxy_data import EVALUATE_PART, SEARCH_PART, target_part

    tasks = ["arc_easy", "copa", "boolq"]
    with gzip.open(TARGET, "rt") as f:
        rows = [r for r in map(json.loads, f) if r["task"] in tasks and r["text"].strip()]
    parts = {}
    for part in (SEARCH_PART, EVALUATE_PART):
        es = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / f"{part}.npz"), 10**6, 0, 10**6, tasks, part=part)
        parts[part] = {(es.task_names[es.task_index[i]], es.example(i).tobytes()) for i in range(len(es))}
        assert es.meta["part"] == part
    assert parts[SEARCH_PART] and parts[EVALUATE_PART] and not parts[SEARCH_PART] & parts[EVALUATE_PART]
    held_out = sum(target_part(r["task"], r["text"], 0.5) == EVALUATE_PART for r in rows)
    assert 0.4 < held_out / len(rows) < 0.6
    assert len(parts[SEARCH_PART]) + len(parts[EVALUATE_PART]) <= len(rows)
    everything = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "all.npz"), 10**6, 0, 10**6, tasks)
    assert parts[SEARCH_PART] | parts[EVALUATE_PART] == {
        (everything.task_names[everything.task_index[i]], everything.example(i).tobytes()) for i in range(len(everything))}
    assert target_part("copa", "a text", 0.3) == target_part("copa", "a text", 0.3)  # a function of task and text alone
    with pytest.raises(ValueError, match="part must be"):
        build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "x.npz"), 3, 0, 64, tasks, part="train")
