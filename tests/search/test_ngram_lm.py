"""The n-gram screening proxy (quadmix_spark.search.ngram_lm) on a real token pool: index, instance weights, the
modified Kneser–Ney model against a brute-force reference, the target loss, caching (no Spark)."""

from __future__ import annotations

import gzip
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from quadmix_spark.search import ngram_lm as ng
from quadmix_spark.kernel.copies import doc_hashes
from quadmix_spark.search.proxy_data import NO_SELECTION, TrainSettings, VocabMap, WindowStream, build_eval_set
from quadmix_spark.search.token_store import TokenStore, count_tokens, shard_name, write_meta, write_shard, write_token_counts

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("QUADMIX_SHARED", REPO.parent / "shared")).resolve()
TOKENIZER = SHARED / "data" / "models" / "tokenizers" / "gpt_neox_20b.json"
TARGET = SHARED / "data" / "target" / "target_val_texts.jsonl.gz"
WEB = SHARED / "data" / "web" / "weborganizer_dev.jsonl.gz"
N_PAGES = 300
V = 2048

pytestmark = pytest.mark.skipif(not (TOKENIZER.exists() and TARGET.exists() and WEB.exists()), reason="shared data missing")


def write_pool(root: Path, arrays: list[np.ndarray], ids: list[str], n_shards: int, eos: int, vocab: int) -> tuple[TokenStore, pd.DataFrame]:
    """A token pool of ``arrays`` (document i in shard i % n_shards) and its documents table (S = 1)."""
    shard = np.arange(len(arrays)) % n_shards
    offset = np.zeros(len(arrays), dtype=np.int64)
    length = np.zeros(len(arrays), dtype=np.int64)
    for s in range(n_shards):
        idx = np.flatnonzero(shard == s)
        offset[idx], length[idx] = write_shard(str(root / "shards" / shard_name(s)), [arrays[i] for i in idx])
    write_meta(str(root), {"dtype": "uint16", "eos_id": eos, "tokenizer_vocab": vocab,
                           "shards": [shard_name(s) for s in range(n_shards)]})
    write_token_counts(str(root), count_tokens(arrays, vocab))
    docs = pd.DataFrame({"doc_hash": doc_hashes(ids), "S": 1.0, "shard": shard, "offset": offset, "length": length})
    return TokenStore.open(root), docs


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The first 300 shared web pages tokenized with GPT-NeoX into 3 shards: (store, docs with format, arrays)."""
    from tokenizers import Tokenizer

    rows = []
    with gzip.open(WEB, "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == N_PAGES:
                break
    tok = Tokenizer.from_file(str(TOKENIZER))
    arrays = [np.array(e.ids, dtype=np.int64) for e in tok.encode_batch([r["text"] for r in rows], add_special_tokens=False)]
    store, docs = write_pool(tmp_path_factory.mktemp("pool"), arrays, [r["id"] for r in rows], 3,
                             tok.token_to_id("<|endoftext|>"), tok.get_vocab_size(with_added_tokens=True))
    docs["format"] = [r["format"] for r in rows]
    return store, docs, arrays


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    return build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path_factory.mktemp("eval") / "bmk.npz"),
                          max_examples_per_task=4, seed=0, max_len=64)


def vmap(store, size: int = V) -> VocabMap:
    return VocabMap.build(store.token_counts(), size, store.eos_id)


def direct_kgrams(doc_ids: list[int], eos: int, k: int) -> Counter:
    """The k-grams the index promises for one document: windows of [eos] + doc + [eos], not the leading eos alone."""
    seq = [eos] + list(doc_ids) + [eos]
    return Counter(tuple(seq[p:p + k]) for p in range(len(seq) - k + 1) if not (k == 1 and p == 0))


def decode(key: int, k: int, size: int) -> tuple[int, ...]:
    out = []
    for _ in range(k):
        key, r = divmod(int(key), size)
        out.append(r)
    return tuple(reversed(out))


# ---------------------------------------------------------------- the index


def test_index_counts_equal_a_direct_count(pool, tmp_path):
    store, docs, arrays = pool
    vm = vmap(store)
    index = ng.ngram_index(store, vm, 3, docs=docs, cache_dir=tmp_path)
    assert index.docs.shape == (N_PAGES, 3) and index.meta["n_tokens"] == int(docs["length"].sum())
    np.testing.assert_array_equal(np.lexsort((index.docs[:, 1], index.docs[:, 0])), np.arange(N_PAGES))
    for i in (0, 7, 151, 299):
        row = int(index.doc_rows(docs["shard"][i:i + 1], docs["offset"][i:i + 1], docs["length"][i:i + 1])[0])
        ids = vm.apply(arrays[i]).tolist()
        for k in (1, 2, 3):
            lo, hi = index.indptr[k - 1][row], index.indptr[k - 1][row + 1]
            got = Counter({decode(index.keys[k - 1][t], k, V): int(c)
                           for t, c in zip(index.indices[k - 1][lo:hi], index.data[k - 1][lo:hi])})
            assert got == direct_kgrams(ids, index.eos, k)
    for k in (2, 3):  # a type's prefix and suffix ids name its (k-1)-grams
        keys, lower = np.asarray(index.keys[k - 1]), np.asarray(index.keys[k - 2])
        np.testing.assert_array_equal(lower[index.prefix[k - 1]], keys // V)
        np.testing.assert_array_equal(lower[index.suffix[k - 1]], keys % V ** (k - 1))


def test_theta_counts_are_weights_times_the_matrix(pool, tmp_path):
    store, docs, _ = pool
    index = ng.ngram_index(store, vmap(store), 3, docs=docs, cache_dir=tmp_path)
    rng = np.random.default_rng(5)
    w = rng.integers(0, 4, size=N_PAGES) * (rng.random(N_PAGES) < 0.3)
    for k in (1, 2, 3):
        expected = w @ index.matrix(k)
        types, counts = index.counts(w, k)
        dense = np.zeros(index.keys[k - 1].shape[0], dtype=np.int64)
        dense[types] = counts
        np.testing.assert_array_equal(dense, expected)
        assert (counts > 0).all() and (np.diff(types) > 0).all()


# ---------------------------------------------------------------- what a θ reads


def reference_weights(sizes, epoch_order, budget: int, n_epochs: int = 200) -> np.ndarray:
    """Instances read within the budget: epochs' orders concatenated, each instance counted when it starts
    before the budget runs out."""
    order = np.concatenate([epoch_order(e) for e in range(n_epochs)])
    starts = np.cumsum(sizes[order]) - sizes[order]
    assert starts[-1] >= budget, "not enough epochs drawn for this budget"
    return np.bincount(order[starts < budget], minlength=sizes.shape[0])


def test_instance_weights_equal_the_window_streams_epochs(pool):
    store, docs, _ = pool
    plan = docs.copy()
    plan["S"] = np.random.default_rng(1).uniform(0.0, 2.5, size=N_PAGES)
    plan.loc[plan.index[::7], "S"] = 0.0
    stream = WindowStream(plan, store, vmap(store), 64, theta_key=11, sample_seed=3, train_seed=4)
    sizes = plan["length"].to_numpy() + 1
    epoch0 = int(stream.epoch_copies(0) @ sizes)
    budgets = [1, 5_000, epoch0, epoch0 + 1, 3 * epoch0 + 777]
    for budget in budgets:
        got = ng.instance_weights(sizes, stream.epoch_copies, stream.epoch_order, budget)
        ref = reference_weights(sizes, stream.epoch_order, budget)
        np.testing.assert_array_equal(got.weights, ref)
        assert got.tokens == int(ref @ sizes) >= budget
        assert got.tokens - budget < sizes.max()
    assert ng.instance_weights(sizes, stream.epoch_copies, stream.epoch_order, epoch0).epochs == 1
    assert ng.instance_weights(sizes, stream.epoch_copies, stream.epoch_order, epoch0 + 1).epochs == 2
    # the train seed moves only the partial epoch
    other = WindowStream(plan, store, vmap(store), 64, theta_key=11, sample_seed=3, train_seed=5)
    a = ng.instance_weights(sizes, stream.epoch_copies, stream.epoch_order, epoch0 // 2).weights
    b = ng.instance_weights(sizes, other.epoch_copies, other.epoch_order, epoch0 // 2).weights
    assert not np.array_equal(a, b)
    two = epoch0 + int(stream.epoch_copies(1) @ sizes)
    np.testing.assert_array_equal(ng.instance_weights(sizes, stream.epoch_copies, stream.epoch_order, two).weights,
                                  ng.instance_weights(sizes, other.epoch_copies, other.epoch_order, two).weights)


def test_instance_weights_take_any_epoch_draw():
    """Copies from a callable: here every epoch draws other rows (like an ε tail redrawn per epoch), some none."""
    sizes = np.array([3, 10, 1, 7, 4, 20], dtype=np.int64)

    def copies(e: int) -> np.ndarray:
        return np.zeros(6, dtype=np.int64) if e % 3 == 1 else np.random.default_rng([9, e]).integers(0, 3, size=6)

    def order(e: int) -> np.ndarray:
        rows = np.repeat(np.arange(6), copies(e))
        np.random.default_rng([2, e]).shuffle(rows)
        return rows

    for budget in (1, 30, 61, 400):
        got = ng.instance_weights(sizes, copies, order, budget)
        np.testing.assert_array_equal(got.weights, reference_weights(sizes, order, budget))
    with pytest.raises(RuntimeError, match="consecutive epochs realized no document"):
        ng.instance_weights(sizes, lambda e: np.zeros(6), order, 10, max_empty_epochs=5)
    with pytest.raises(ValueError, match="budget"):
        ng.instance_weights(sizes, copies, order, 0)


# ---------------------------------------------------------------- the model


def test_discounts_follow_chen_goodman_with_fallbacks():
    np.testing.assert_allclose(ng.kn_discounts([1, 1, 1, 2, 2, 3, 4]), [0, 3 / 7, 19 / 14, 9 / 7], rtol=1e-15)
    # every count >= 3: no n1, n2 -> the fallbacks; clipped to [MIN_DISCOUNT, r]
    np.testing.assert_array_equal(ng.kn_discounts([3, 5, 9]), [0.0, *ng.FALLBACK_DISCOUNTS])
    d = ng.kn_discounts([1, 2, 3, 3, 3, 3, 3, 3])  # D2 = 2 - 3·(1/5)·6 < 0
    assert d[2] == ng.MIN_DISCOUNT and 0 < d[1] <= 1 and ng.MIN_DISCOUNT <= d[3] <= 3
    assert np.isfinite(ng.kn_discounts([])).all()


@pytest.mark.parametrize("size", [V, 50432])
def test_probabilities_sum_to_one(pool, tmp_path, size):
    store, docs, arrays = pool
    vm = vmap(store, size)
    index = ng.ngram_index(store, vm, 3, docs=docs, cache_dir=tmp_path)
    plan = docs.copy()
    plan["S"] = np.where(np.arange(N_PAGES) % 4 == 0, 1.5, 0.0)
    model = ng.fit_kneser_ney(index, ng.theta_doc_weights(index, plan, store, 30_000, 1, 0, 0)[0])
    ids = vm.apply(arrays[0][:6])
    unseen = int(np.flatnonzero(store.token_counts() == 0)[5]) if size > store.tokenizer_vocab else size - 1
    histories = [[], [index.eos], [index.eos, ids[0]], [ids[1], ids[2]], [ids[3], ids[4], ids[5]],
                 [unseen, unseen], [ids[0], unseen], [size - 1, index.eos]]
    words = np.arange(size)
    for h in histories:
        p = model.prob(h, words)
        assert np.isfinite(p).all() and (p > 0).all()
        assert abs(p.sum() - 1.0) < 1e-9, h
    # a model of one short document: orders without singletons or doubletons stay normalized
    one = np.zeros(N_PAGES, dtype=np.int64)
    one[int(np.argmin(index.docs[:, 2]))] = 3
    small = ng.fit_kneser_ney(index, one)
    for h in histories[:4]:
        assert abs(small.prob(h, words).sum() - 1.0) < 1e-9


def brute_force_kn(docs: list[list[int]], weights: list[int], eos: int, size: int, n: int):
    """P(w | h) of interpolated modified Kneser–Ney, from the definitions, with dictionaries."""
    raw = {k: Counter() for k in range(1, n + 1)}
    for doc, w in zip(docs, weights):
        for k in range(1, n + 1):
            for g, c in direct_kgrams(doc, eos, k).items():
                raw[k][g] += c * w
    adj = {n: {g: c for g, c in raw[n].items() if c > 0}}
    for k in range(n - 1, 0, -1):
        cont = Counter(g[1:] for g, c in raw[k + 1].items() if c > 0)
        adj[k] = {g: (raw[k][g] if k >= 2 and g[0] == eos else cont[g]) for g in set(raw[k]) | set(cont)}
        adj[k] = {g: a for g, a in adj[k].items() if a > 0}
    disc, ctx = {}, {}
    for k in range(1, n + 1):
        nr = Counter(adj[k].values())
        y = nr[1] / (nr[1] + 2 * nr[2]) if nr[1] + 2 * nr[2] else None
        d = [0.0]
        for r in (1, 2, 3):
            v = r - (r + 1) * y * nr[r + 1] / nr[r] if y is not None and nr[r] else ng.FALLBACK_DISCOUNTS[r - 1]
            d.append(min(max(v, ng.MIN_DISCOUNT), r))
        disc[k] = d
        ctx[k] = {}
        for g, a in adj[k].items():
            tot, gam = ctx[k].get(g[:-1], (0, 0.0))
            ctx[k][g[:-1]] = (tot + a, gam + d[min(a, 3)])

    def prob(w: int, h: tuple) -> float:
        k = len(h) + 1
        lower = prob(w, h[1:]) if k > 1 else 1.0 / size
        if h not in ctx[k]:
            return lower
        total, gamma = ctx[k][h]
        a = adj[k].get(h + (w,), 0)
        return (a - disc[k][min(a, 3)]) / total + gamma / total * lower

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_loss_matches_a_brute_force_kneser_ney(pool, tmp_path, order):
    """A tiny pool (real page heads, an empty and a one-token document) in a 40-id vocabulary."""
    big, _, arrays = pool
    lengths = [30, 0, 1, 12, 25, 7, 40, 3, 18, 9]
    tiny = [arrays[i][:n] for i, n in enumerate(lengths)]
    store, plan = write_pool(tmp_path / "tiny", tiny, [f"d{i}" for i in range(len(tiny))], 2, big.eos_id, big.tokenizer_vocab)
    plan["S"] = [1.5, 1.0, 0.7, 2.2, 1.0, 0.3, 1.9, 1.0, 2.5, 0.0]
    es = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "e.npz"), 3, 0, 12, ["copa", "piqa"])
    settings = TrainSettings(tokens=400, seed=2)
    size, seq_len = 40, 8
    vm = vmap(store, size)
    index = ng.ngram_index(store, vm, order, docs=plan, cache_dir=tmp_path / "c")
    weights, inst = ng.theta_doc_weights(index, plan, store, settings.tokens, 5, 1, settings.seed)
    assert inst.epochs >= 2 and weights.max() >= 2  # a partial epoch after whole ones; some document read twice
    docs = [vm.apply(store.doc(*row)).tolist() for row in index.docs]

    def reference(doc_weights) -> dict[str, float]:
        prob = brute_force_kn(docs, doc_weights, index.eos, size, order)
        sums, counts = Counter(), Counter()
        for i in range(len(es)):
            seq = vm.apply(es.example(i)[: seq_len + 1]).tolist()
            task = es.task_names[es.task_index[i]]
            for t in range(1, len(seq)):
                sums[task] -= math.log(prob(seq[t], tuple(seq[max(0, t - order + 1):t])))
                counts[task] += 1
        return {t: sums[t] / counts[t] for t in sums}

    # counts "repeated": every instance read counts; "unique" (the default): every document read counts once
    for mode, doc_weights in (("repeated", weights.tolist()), ("unique", np.minimum(weights, 1).tolist())):
        res = ng.train_ngram_proxy(plan, store, es, settings, theta_key=5, sample_seed=1, order=order, vocab_size=size,
                                   cache_dir=tmp_path / "c", pool_docs=plan, seq_len=seq_len, counts=mode)
        assert res.tokens == inst.tokens
        ref = reference(doc_weights)
        assert res.task_losses == pytest.approx(ref, rel=1e-12), mode
        assert res.target_loss == pytest.approx(np.mean(list(ref.values())), rel=1e-12)
    weighted = ng.train_ngram_proxy(plan, store, es, settings, 5, 1, order=order, vocab_size=size, cache_dir=tmp_path / "c",
                                    seq_len=seq_len, task_weights={"copa": 3.0, "piqa": 1.0})
    assert weighted.target_loss == pytest.approx(0.75 * ref["copa"] + 0.25 * ref["piqa"], rel=1e-12)


# ---------------------------------------------------------------- the proxy


def test_better_matched_text_gets_a_lower_loss(pool, eval_set, tmp_path):
    """Plan A: the pages closest to held-out target texts (mean log-probability under their token
    frequencies); plan B: the Structured Data pages (tables, listings). Same budget, one epoch each."""
    store, docs, arrays = pool
    held_out = build_eval_set("bmk", str(TARGET), str(TOKENIZER), str(tmp_path / "ref.npz"), 16, 1, 64)
    freq = np.bincount(held_out.tokens.astype(np.int64), minlength=store.tokenizer_vocab) + 0.1
    logp = np.log(freq / freq.sum())
    similarity = np.array([logp[a].mean() for a in arrays])
    budget = 10_000
    near = docs.iloc[np.argsort(-similarity, kind="stable")]
    plan_a = near[near["length"].cumsum() <= 1.2 * budget]
    plan_b = docs[docs["format"] == "Structured Data"]
    assert plan_b["length"].sum() > budget
    settings = TrainSettings(tokens=budget)
    a = ng.train_ngram_proxy(plan_a, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=tmp_path, pool_docs=docs)
    b = ng.train_ngram_proxy(plan_b, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=tmp_path)
    assert a.epochs == b.epochs == 1
    assert a.target_loss < b.target_loss - 0.1
    assert a.target_loss < math.log(V)


def test_result_is_deterministic_and_follows_theta(pool, eval_set, tmp_path):
    store, docs, _ = pool
    plan = docs.copy()
    plan["S"] = np.random.default_rng(2).uniform(0.0, 2.0, size=N_PAGES)
    settings = TrainSettings(tokens=60_000, seed=1)

    def run(theta_key=7, s=settings):
        return ng.train_ngram_proxy(plan, store, eval_set, s, theta_key, 0, vocab_size=V, cache_dir=tmp_path, pool_docs=docs)

    first, again = run(), run()
    assert first.target_loss == again.target_loss and first.task_losses == again.task_losses
    assert (first.tokens, first.epochs, first.params_total) == (again.tokens, again.epochs, again.params_total)
    assert first.steps == 0 and math.isnan(first.final_train_loss) and first.params_total == first.params_non_embedding > 0
    assert first.seconds > 0 and first.tokens_per_s > 0 and set(first.task_losses) == set(eval_set.task_names)
    assert run(theta_key=8).target_loss != first.target_loss
    assert run(s=TrainSettings(tokens=60_000, seed=2)).target_loss != first.target_loss


def test_index_is_cached_and_keyed(pool, eval_set, tmp_path, monkeypatch):
    store, docs, _ = pool
    cache = tmp_path / "cache"
    builds = []
    real_build = ng.build_ngram_index
    monkeypatch.setattr(ng, "build_ngram_index", lambda *a: (builds.append(a[3]), real_build(*a))[1])
    settings = TrainSettings(tokens=20_000)
    with pytest.raises(FileNotFoundError, match="pass the pool's documents"):
        ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=cache)
    first = ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=cache, pool_docs=docs)
    (folder,) = list(cache.iterdir())
    assert folder.name.startswith(f"{V}-3-")
    stamp = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]
    ng._LOADED.clear()  # read it back from disk, without the documents, then with them
    second = ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=cache)
    third = ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=cache, pool_docs=docs)
    assert second.target_loss == third.target_loss == first.target_loss and builds == [3]
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())] == stamp
    ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, order=2, vocab_size=V, cache_dir=cache, pool_docs=docs)
    ng.train_ngram_proxy(docs, store, eval_set, settings, 1, 0, vocab_size=1024, cache_dir=cache, pool_docs=docs)
    names = sorted(p.name for p in cache.iterdir())
    assert builds == [3, 2, 3] and len(names) == 3 and not [n for n in names if n.startswith(".")]
    assert {n.split("-")[0] + "-" + n.split("-")[1] for n in names} == {f"{V}-3", f"{V}-2", "1024-3"}
    with pytest.raises(ValueError, match="other pool documents"):
        ng.ngram_index(store, vmap(store), 3, docs=docs.iloc[:-1], cache_dir=cache)


def test_index_builds_from_the_pools_document_arrays(pool, tmp_path):
    """Without ``docs``, the pool's own ``docs/`` arrays (written by the pool builder's writer) name its documents."""
    proxy_pool = pytest.importorskip("quadmix_spark.search.proxy_pool")
    if not hasattr(proxy_pool, "load_doc_index"):
        pytest.skip("this proxy_pool writes no document arrays")
    big, _, arrays = pool
    store, docs = write_pool(tmp_path / "p", arrays[:40], [f"p{i}" for i in range(40)], 2, big.eos_id, big.tokenizer_vocab)
    frame = docs.assign(domain=np.where(np.arange(40) % 2, "a", "b"))
    (tmp_path / "p" / proxy_pool.DOCS_DIR).mkdir()
    written = pd.concat(proxy_pool._write_doc_shards(str(tmp_path / "p"), [frame]))
    (tmp_path / "p" / proxy_pool.DOCS_DONE).write_text(json.dumps({"shards": written["shard"].tolist(), "docs": 40}))
    own = ng.ngram_index(store, vmap(store), 2)
    assert own.path.parent == tmp_path / "p" / ng.CACHE_DIR
    given = ng.ngram_index(store, vmap(store), 2, docs=docs, cache_dir=tmp_path / "given")
    np.testing.assert_array_equal(own.docs, given.docs)
    for k in (1, 2):
        for a, b in ((own.keys, given.keys), (own.indptr, given.indptr), (own.indices, given.indices), (own.data, given.data)):
            np.testing.assert_array_equal(a[k - 1], b[k - 1])


def test_refuses_empty_selections_and_foreign_documents(pool, eval_set, tmp_path):
    store, docs, _ = pool
    settings = TrainSettings(tokens=1000)
    plan = docs.copy()
    plan["S"] = 0.0
    with pytest.raises(ValueError, match=NO_SELECTION):
        ng.train_ngram_proxy(plan, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=tmp_path, pool_docs=docs)
    plan = docs.iloc[:5].copy()
    plan.loc[plan.index[0], "offset"] += 1
    with pytest.raises(ValueError, match="is not in the n-gram index"):
        ng.train_ngram_proxy(plan, store, eval_set, settings, 1, 0, vocab_size=V, cache_dir=tmp_path)
