"""A screening proxy (spec §3.2): an interpolated modified Kneser–Ney n-gram LM fitted on a θ's data.

The transformer proxy (:mod:`quadmix_spark.search.proxy_train`) costs seconds to hours per θ; this one costs a
sparse product and a few sorts, so thousands of θ can be screened on CPU.  It reads the same pool, the same
plan and the same epochs, and reports the same ``target_loss``.

**The pool's n-gram index** (:func:`ngram_index`, built once, cached beside the pool).  Documents are the
pool's, in canonical (shard, offset, length) order.  Each is read as ``[eos] + doc + [eos]`` in the compact
vocabulary of :class:`~quadmix_spark.search.proxy_data.VocabMap` (the transformer's ids): the trailing eos is the
one the window stream appends after every document, the leading one is the previous instance's, which is
what the stream puts before every document but the very first.  For each order k = 1..n the index holds
the sorted k-gram keys (base-V numbers, first token most significant), each type's prefix and suffix
(k-1)-gram ids, and M_k: a CSR matrix (documents × k-gram types, int32 counts) of every k-gram of each
document's sequence, except the leading eos as a unigram (it is the previous instance's token).  k-grams
whose context reaches past that leading eos into the previous document (for order 3: (last token of the
previous document, eos, first token), one per instance) are ignored.  Built shard by shard in two passes
(the distinct keys, then the counts), so memory holds one shard's work plus the key tables: measured
(tracemalloc, order 3) ~80 bytes per token of the largest shard plus ~20 bytes per distinct n-gram type; the
8.7k shared web pages (6.5M tokens in 4 shards, 1.9M types at 2,048 ids) peak at +230 MiB RSS, one shard
of 26M tokens at +2.1 GiB.  A pool of 300M tokens in 16 shards (19M tokens each; say 200M distinct types)
needs ~1.5 GiB for the shard and ~4 GiB for the tables, ~6 GiB while the largest order's keys are merged:
well within a 24 GB machine (a single 300M-token shard would not be: keep shards below ~100M tokens).
The index is a folder of ``.npy``/``.bin`` files read through memory maps (tasks on one machine share the
page cache), written under a temporary name and renamed into place.

**Per θ, no text.**  :func:`instance_weights` replays the epochs of
:class:`~quadmix_spark.search.proxy_data.WindowStream` (its ``epoch_copies``/``epoch_order``: the same realized
copies and shuffles as the transformer reads) up to the token budget: whole epochs count all their
instances, the last one the instances that start before the budget runs out, in its shuffled order (an
instance is length + 1 tokens, its eos included).  The θ's k-gram counts are ``weights @ M_k``.

**Interpolated modified Kneser–Ney** (Chen & Goodman 1998, as KenLM): the highest order uses raw counts;
a lower order uses continuation counts N1+(•g), except k-grams (k >= 2) starting with eos, which cannot be
extended to the left here and keep their raw counts (like ``<s>`` in KenLM).  Per order, discounts D1, D2,
D3+ from the count-of-counts n1..n4 of those adjusted counts (Y = n1/(n1+2n2), D_r = r - (r+1)Y n_{r+1}/n_r);
where a formula's denominator is 0, :data:`FALLBACK_DISCOUNTS`; each D_r is clipped to
[:data:`MIN_DISCOUNT`, r] so every context keeps some back-off mass and no word gets probability 0.
P_k(w|h) = (a(hw) - D(a(hw)) + γ(h)·P_{k-1}(w|h')) / A(h) with γ(h) = D1·N1(h•) + D2·N2(h•) + D3·N3+(h•)
and A(h) = Σ_w a(hw); an unseen context (A = 0) gives P_{k-1}; P_0 = 1/V over the model vocabulary.  A
history shorter than n-1 (the start of an example) uses the order its length allows.  Exactly normalized.

Only numpy at import (scipy for :meth:`NgramIndex.matrix`); :mod:`quadmix_spark.search.proxy_train` (torch) is
imported inside the functions that need its VocabMap, WindowStream and ProxyResult.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "quadmix-ngram-index/1"
DEFAULT_ORDER = 3
DEFAULT_VOCAB_SIZE = 50432  # ModelShape's default: the transformer proxy's vocabulary
CACHE_DIR = "ngram"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
MIN_DISCOUNT = 0.1
_MERGE_ITEMS = 1 << 24  # distinct keys of shards collected at least before they are merged
_LOADED: dict[tuple[str, int], NgramIndex] = {}
_LOADED_MAX = 4


# ---------------------------------------------------------------- small array helpers


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), int64."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)


def _kgram_keys(seq: np.ndarray, starts: np.ndarray, k: int, V: int) -> np.ndarray:
    """Base-V key of the k tokens of ``seq`` from each start (first token most significant)."""
    key = seq[starts].astype(np.int64)
    for j in range(1, k):
        key = key * V + seq[starts + j]
    return key


def _lookup(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of ``keys`` in the sorted ``table``; position is 0 where not found."""
    if table.shape[0] == 0:
        return np.zeros(keys.shape[0], dtype=np.int64), np.zeros(keys.shape[0], dtype=bool)
    pos = np.searchsorted(table, keys)
    pos = np.minimum(pos, table.shape[0] - 1)
    found = table[pos] == keys
    return np.where(found, pos, 0), found


def _take(values: np.ndarray, pos: np.ndarray, found: np.ndarray, fill) -> np.ndarray:
    """``values[pos]`` where found, ``fill`` elsewhere (``values`` may be empty)."""
    if values.shape[0] == 0:
        return np.full(pos.shape[0], fill, dtype=np.result_type(values, type(fill)))
    return np.where(found, values[pos], fill)


def _sum_by_key(keys: np.ndarray, values: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys ascending, int64 sum of ``values`` per key) for integer ``values``; dense bincount when
    the key space is small against the items, a sort otherwise (both exact, the same result)."""
    if keys.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if n_keys <= 4 * keys.shape[0]:
        sums = np.bincount(keys, weights=values, minlength=n_keys)
        nz = np.flatnonzero(sums)
        return nz.astype(np.int64), sums[nz].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    return sk[starts].astype(np.int64), np.add.reduceat(np.asarray(values, dtype=np.int64)[order], starts)


def _atomic_dir(final: Path, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` fills a temporary folder beside ``final``, which is then renamed into place; when another
    process got there first, its folder is kept and ours removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the pool's n-gram index


def _docs_table(docs) -> np.ndarray:
    """(n, 3) int64 shard, offset, length of ``docs`` (a DataFrame or mapping of arrays), distinct, in (shard,
    offset, length) order (an empty document shares its offset with the next one)."""
    try:
        cols = [np.asarray(docs[c], dtype=np.int64) for c in ("shard", "offset", "length")]
    except KeyError as e:
        raise ValueError(f"the pool documents lack column {e}") from None
    table = np.stack(cols, axis=1) if cols[0].size else np.zeros((0, 3), dtype=np.int64)
    if (table < 0).any() or (table[:, 0] >= 1 << 22).any() or (table[:, 1] >= 1 << 40).any():
        raise ValueError("pool documents need 0 <= shard < 2^22, 0 <= offset < 2^40 and length >= 0")
    table = np.unique(table, axis=0)
    if table.shape[0] > 1 and not (np.diff(_doc_keys(*table.T)) > 0).all():
        raise ValueError("pool documents overlap: two non-empty documents start at one (shard, offset)")
    return table


def _doc_keys(shard, offset, length) -> np.ndarray:
    """A distinct int64 per document: at one (shard, offset) there is at most one empty and one other."""
    shard, offset, length = (np.asarray(x, dtype=np.int64) for x in (shard, offset, length))
    return (((shard << 40) | offset) << 1) | (length > 0)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:12]


def vocab_digest(vocab_map) -> str:
    """What the index's ids depend on: the VocabMap's table (or identity and size)."""
    table = b"identity" if vocab_map.identity else np.ascontiguousarray(vocab_map.table, dtype=np.int64).tobytes()
    return _digest(FORMAT.encode(), str(vocab_map.vocab_size).encode(), table)


def index_path(cache_dir: str | Path, vocab_map, order: int) -> Path:
    """``<cache_dir>/<vocab size>-<order>-<vocab digest>``: another vocabulary map or order, another folder."""
    return Path(cache_dir) / f"{vocab_map.vocab_size}-{order}-{vocab_digest(vocab_map)}"


def _shard_sequences(store, docs: np.ndarray, vocab_map, eos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shard's documents as one array of ``[eos] + model ids + [eos]`` per document: (seq, start of each
    document's sequence, document lengths)."""
    shard = int(docs[0, 0])
    tokens = store.shard(shard)
    offset, length = docs[:, 1], docs[:, 2]
    if (offset + length > tokens.shape[0]).any():
        raise IndexError(f"a pool document lies outside shard {shard} of {tokens.shape[0]} tokens")
    start = np.cumsum(length + 2) - (length + 2)
    seq = np.full(int((length + 2).sum()), eos, dtype=np.int64)
    seq[_ranges(start + 1, length)] = vocab_map.apply(tokens[_ranges(offset, length)])
    return seq, start, length


def _kgram_starts(start: np.ndarray, length: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(start positions, count per document) of the counted k-grams: every window of ``[eos] doc [eos]``
    but the leading eos alone."""
    if k == 1:
        return _ranges(start + 1, length + 1), length + 1
    n = np.maximum(length + 3 - k, 0)
    return _ranges(start, n), n


def _merge_unique(parts: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(parts))


def build_ngram_index(store, docs, vocab_map, order: int, out_dir: str | Path) -> None:
    """Write the index of ``docs`` (pool documents: shard, offset, length) into the empty folder ``out_dir``
    (see the module docstring; :func:`ngram_index` is the cached entry point)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    V = int(vocab_map.vocab_size)
    if order < 1:
        raise ValueError("order must be >= 1")
    if V**order > np.iinfo(np.int64).max:
        raise ValueError(f"order {order} over {V} ids does not fit 64-bit keys")
    table = _docs_table(docs)
    eos = int(vocab_map.apply(np.array([store.eos_id]))[0])
    shards = [table[table[:, 0] == s] for s in np.unique(table[:, 0])]

    # pass 1: the distinct keys of every order; a shard's keys wait in `pending` until they outgrow the merged
    # ones (and _MERGE_ITEMS), so each key is re-sorted O(log shards) times
    merged = [np.zeros(0, dtype=np.int64) for _ in range(order)]
    pending: list[list[np.ndarray]] = [[] for _ in range(order)]
    for docs_s in shards:
        seq, start, length = _shard_sequences(store, docs_s, vocab_map, eos)
        for k in range(1, order + 1):
            pos, _ = _kgram_starts(start, length, k)
            pending[k - 1].append(np.unique(_kgram_keys(seq, pos, k, V)))
            if sum(p.shape[0] for p in pending[k - 1]) > max(_MERGE_ITEMS, merged[k - 1].shape[0]):
                merged[k - 1], pending[k - 1] = _merge_unique([merged[k - 1], *pending[k - 1]]), []
    keys = [_merge_unique([m, *p]) for m, p in zip(merged, pending)]
    del merged, pending
    for k in range(1, order + 1):
        if keys[k - 1].shape[0] >= 2**31:
            raise ValueError(f"{keys[k - 1].shape[0]} distinct {k}-grams: more than int32 column ids hold")
        np.save(out / f"keys_{k}.npy", keys[k - 1])
        if k >= 2:
            for name, sub in (("prefix", keys[k - 1] // V), ("suffix", keys[k - 1] % V ** (k - 1))):
                pos, found = _lookup(keys[k - 2], sub)
                if not found.all():  # impossible by construction: every k-gram's parts are counted (k-1)-grams
                    raise RuntimeError(f"{name} of a {k}-gram missing from the {k - 1}-grams")
                np.save(out / f"{name}_{k}.npy", pos.astype(np.int32))

    # pass 2: per document counts of every type, appended shard by shard (rows are in canonical order)
    row_nnz = [[] for _ in range(order)]
    files = [[open(out / f"{name}_{k}.bin", "wb") for name in ("indices", "data")] for k in range(1, order + 1)]
    try:
        for docs_s in shards:
            seq, start, length = _shard_sequences(store, docs_s, vocab_map, eos)
            for k in range(1, order + 1):
                pos, per_doc = _kgram_starts(start, length, k)
                n_types = keys[k - 1].shape[0]
                tid = np.searchsorted(keys[k - 1], _kgram_keys(seq, pos, k, V))
                row = np.repeat(np.arange(docs_s.shape[0], dtype=np.int64), per_doc)
                pair, count = np.unique(row * n_types + tid, return_counts=True)
                row_nnz[k - 1].append(np.bincount(pair // n_types, minlength=docs_s.shape[0]))
                files[k - 1][0].write((pair % n_types).astype(np.int32).tobytes())
                files[k - 1][1].write(count.astype(np.int32).tobytes())
    finally:
        for fs in files:
            for f in fs:
                f.close()
    nnz = []
    for k in range(1, order + 1):
        counts = np.concatenate(row_nnz[k - 1]) if row_nnz[k - 1] else np.zeros(0, dtype=np.int64)
        indptr = np.zeros(table.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        np.save(out / f"indptr_{k}.npy", indptr)
        nnz.append(int(indptr[-1]))
    np.save(out / "docs.npy", table)
    meta = {"format": FORMAT, "order": order, "vocab_size": V, "vocab_digest": vocab_digest(vocab_map), "eos": eos,
            "n_docs": int(table.shape[0]), "n_tokens": int(table[:, 2].sum()), "docs_digest": _digest(table.tobytes()),
            "types": [int(k.shape[0]) for k in keys], "nnz": nnz, "build_s": round(time.perf_counter() - t0, 3)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def _memmap(path: Path, dtype, n: int) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)


@dataclass(eq=False)
class NgramIndex:
    """A loaded index (memory-mapped): ``docs`` (n, 3) shard/offset/length in canonical order, and per order k
    (list position k-1) ``keys``, ``prefix``/``suffix`` (k >= 2; None for k = 1), ``indptr``, ``indices``,
    ``data`` (CSR of M_k); ``eos`` is the model id of eos.  ``vocab_map`` maps the target set's tokens."""

    path: Path
    meta: dict[str, Any]
    vocab_map: Any
    docs: np.ndarray
    keys: list[np.ndarray]
    prefix: list[np.ndarray | None]
    suffix: list[np.ndarray | None]
    indptr: list[np.ndarray]
    indices: list[np.ndarray]
    data: list[np.ndarray]
    order: int
    vocab_size: int
    eos: int
    _eval: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, vocab_map) -> NgramIndex:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta["vocab_digest"] != vocab_digest(vocab_map):
            raise ValueError(f"{path} was built with another vocabulary map")
        n = meta["order"]

        def npy(name):
            return np.load(path / name, mmap_mode="r")

        return cls(path=path, meta=meta, vocab_map=vocab_map, docs=np.load(path / "docs.npy"),
                   keys=[npy(f"keys_{k}.npy") for k in range(1, n + 1)],
                   prefix=[None] + [npy(f"prefix_{k}.npy") for k in range(2, n + 1)],
                   suffix=[None] + [npy(f"suffix_{k}.npy") for k in range(2, n + 1)],
                   indptr=[npy(f"indptr_{k}.npy") for k in range(1, n + 1)],
                   indices=[_memmap(path / f"indices_{k}.bin", np.int32, meta["nnz"][k - 1]) for k in range(1, n + 1)],
                   data=[_memmap(path / f"data_{k}.bin", np.int32, meta["nnz"][k - 1]) for k in range(1, n + 1)],
                   order=n, vocab_size=int(meta["vocab_size"]), eos=int(meta["eos"]))

    def matrix(self, k: int):
        """M_k as a ``scipy.sparse.csr_matrix`` (documents × k-gram types; a copy with int64 indices)."""
        from scipy.sparse import csr_matrix

        return csr_matrix((np.asarray(self.data[k - 1], dtype=np.int64), np.asarray(self.indices[k - 1], dtype=np.int64),
                           np.asarray(self.indptr[k - 1])), shape=(self.docs.shape[0], self.keys[k - 1].shape[0]))

    def doc_rows(self, shard, offset, length) -> np.ndarray:
        """Index row of each (shard, offset, length); ``ValueError`` when one is not a pool document."""
        pos, found = _lookup(_doc_keys(*self.docs.T), _doc_keys(shard, offset, length))
        found &= self.docs[pos, 2] == np.asarray(length, dtype=np.int64)
        if not found.all():
            i = int(np.flatnonzero(~found)[0])
            raise ValueError(f"document (shard {int(np.asarray(shard)[i])}, offset {int(np.asarray(offset)[i])}) is not in "
                             f"the n-gram index at {self.path}")
        return pos

    def counts(self, doc_weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``doc_weights @ M_k`` as (type ids with a positive count, ascending; int64 counts), reading only the
        rows of documents with a positive weight."""
        w = np.asarray(doc_weights, dtype=np.int64)
        rows = np.flatnonzero(w)
        indptr = self.indptr[k - 1]
        starts = indptr[rows]
        lens = indptr[rows + 1] - starts
        pos = _ranges(starts, lens)
        cols = self.indices[k - 1][pos].astype(np.int64)
        vals = self.data[k - 1][pos] * np.repeat(w[rows], lens)
        return _sum_by_key(cols, vals, self.keys[k - 1].shape[0])

    def type_ids(self, k: int, keys: np.ndarray) -> np.ndarray:
        """Type id of each k-gram key, -1 where the pool has no such k-gram."""
        pos, found = _lookup(self.keys[k - 1], keys)
        return np.where(found, pos, -1)


def ngram_index(store, vocab_map, order: int = DEFAULT_ORDER, docs=None, cache_dir: str | Path | None = None) -> NgramIndex:
    """The pool's index for ``vocab_map`` and ``order``, from ``<cache_dir>`` (default ``<pool>/ngram``), built
    there first when missing.  Building needs the pool's documents: ``docs`` (a DataFrame or mapping with
    ``shard, offset, length``, e.g. the offsets table), else the pool's own document arrays
    (:func:`~quadmix_spark.search.proxy_pool.load_doc_index`, where ``<pool>/docs.json`` exists); a cached index
    built from other documents than ``docs`` is refused.  Loaded indexes are kept per process (the files are
    memory-mapped)."""
    path = index_path(cache_dir if cache_dir is not None else Path(store.dir) / CACHE_DIR, vocab_map, order)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        if docs is None:
            if not (Path(store.dir) / "docs.json").exists():
                raise FileNotFoundError(f"no n-gram index at {path}: pass the pool's documents (its offsets table) to build it")
            from quadmix_spark.search.proxy_pool import load_doc_index

            docs = load_doc_index(str(store.dir))
        _atomic_dir(path, lambda tmp: build_ngram_index(store, docs, vocab_map, order, tmp))
    key = (str(path.resolve()), meta_path.stat().st_mtime_ns)
    index = _LOADED.get(key)
    if index is None:
        index = NgramIndex.load(path, vocab_map)
        _LOADED[key] = index
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.pop(next(iter(_LOADED)))
    if docs is not None and index.meta["docs_digest"] != _digest(_docs_table(docs).tobytes()):
        raise ValueError(f"the n-gram index at {path} was built from other pool documents")
    return index


# ---------------------------------------------------------------- the θ's documents


@dataclass(frozen=True)
class Instances:
    """What a θ's stream reads within the budget: ``weights`` (instances per row), ``tokens`` (Σ weights·size)
    and ``epochs`` (epochs with at least one instance read)."""

    weights: np.ndarray
    tokens: int
    epochs: int


def instance_weights(sizes, epoch_copies: Callable[[int], np.ndarray], epoch_order: Callable[[int], np.ndarray],
                     budget_tokens: int, max_empty_epochs: int = 100_000) -> Instances:
    """How many instances of each row the stream reads within ``budget_tokens``.

    ``sizes``: tokens of one instance of each row (length + 1 with its eos); ``epoch_copies(e)``: instances
    of each row in epoch e; ``epoch_order(e)``: the rows of epoch e's instances in reading order (only asked
    for the last, partial epoch).  Epochs are read in turn, skipping empty ones (``RuntimeError`` after
    ``max_empty_epochs`` in a row); an instance counts when it starts before the budget runs out."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if budget_tokens <= 0:
        raise ValueError("the token budget must be positive")
    weights = np.zeros(sizes.shape[0], dtype=np.int64)
    tokens, epoch, epochs, empty = 0, 0, 0, 0
    while tokens < budget_tokens:
        copies = np.asarray(epoch_copies(epoch), dtype=np.int64)
        if not copies.any():
            empty += 1
            if empty >= max_empty_epochs:
                raise RuntimeError(f"{empty} consecutive epochs realized no document")
            epoch += 1
            continue
        empty = 0
        epochs += 1
        epoch_tokens = int(copies @ sizes)
        if tokens + epoch_tokens <= budget_tokens:
            weights += copies
            tokens += epoch_tokens
        else:
            order = np.asarray(epoch_order(epoch), dtype=np.int64)
            size = sizes[order]
            read = order[tokens + np.cumsum(size) - size < budget_tokens]
            weights += np.bincount(read, minlength=sizes.shape[0])
            tokens += int(sizes[read].sum())
        epoch += 1
    return Instances(weights, tokens, epochs)


def theta_doc_weights(index: NgramIndex, plan, store, budget_tokens: int, theta_key: int, sample_seed: int,
                      train_seed: int) -> tuple[np.ndarray, Instances]:
    """(instances of every index document, the plan rows' :class:`Instances`) for a θ plan (columns
    ``doc_hash, S, shard, offset, length``) read like the transformer's stream: the epochs of
    :class:`~quadmix_spark.search.proxy_data.WindowStream` up to ``budget_tokens``.  Raises the stream's
    ``ValueError`` when the plan selects nothing."""
    from quadmix_spark.search.proxy_data import WindowStream

    stream = WindowStream(plan, store, index.vocab_map, 1, theta_key, sample_seed, train_seed)
    cols = stream.cols
    inst = instance_weights(cols["length"] + 1, stream.epoch_copies, stream.epoch_order, budget_tokens,
                            stream.max_empty_epochs)
    rows = index.doc_rows(cols["shard"], cols["offset"], cols["length"])
    w = np.bincount(rows, weights=inst.weights, minlength=index.docs.shape[0]).astype(np.int64)
    return w, inst


# ---------------------------------------------------------------- modified Kneser–Ney


def kn_discounts(adjusted_counts) -> np.ndarray:
    """[0, D1, D2, D3+] of one order from its (positive, integer) adjusted counts (module docstring)."""
    a = np.asarray(adjusted_counts, dtype=np.int64)
    n1, n2, n3, n4 = (int(np.count_nonzero(a == r)) for r in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else None
    out = [0.0]
    for r, (nr, nnext) in enumerate(((n1, n2), (n2, n3), (n3, n4)), start=1):
        d = r - (r + 1) * y * nnext / nr if y is not None and nr > 0 else FALLBACK_DISCOUNTS[r - 1]
        out.append(min(max(d, MIN_DISCOUNT), float(r)))
    return np.array(out)


@dataclass(eq=False)
class KneserNey:
    """A fitted model: per order k (list position k-1) ``types`` (index type ids with an adjusted count,
    ascending), ``counts`` (their adjusted counts), ``contexts`` (ids of their (k-1)-gram contexts, ascending;
    ``[0]`` for the unigrams' empty context), ``totals`` A(h), ``backoff`` γ(h)·A(h) numerators, ``discounts``
    (order, 4)."""

    index: NgramIndex
    types: list[np.ndarray]
    counts: list[np.ndarray]
    contexts: list[np.ndarray]
    totals: list[np.ndarray]
    backoff: list[np.ndarray]
    discounts: np.ndarray

    @property
    def order(self) -> int:
        return len(self.types)

    @property
    def n_types(self) -> int:
        return int(sum(t.shape[0] for t in self.types))

    def probabilities(self, type_ids: list[np.ndarray], context_ids: list[np.ndarray], valid: list[np.ndarray]) -> np.ndarray:
        """P(w|h) of queries given, per order k, the index id of the k-gram (h_k, w) and of its context h_k (-1
        where the pool lacks it; context 0 for k = 1) and whether the history reaches k-1 tokens."""
        V = self.index.vocab_size
        p = np.full(type_ids[0].shape[0], 1.0 / V)
        for k in range(self.order):
            ci, cfound = _lookup(self.contexts[k], context_ids[k])
            ti, tfound = _lookup(self.types[k], type_ids[k])
            total = _take(self.totals[k], ci, cfound, 0)
            seen = valid[k] & (total > 0)
            a = _take(self.counts[k], ti, tfound, 0)
            d = self.discounts[k][np.minimum(a, 3)]
            backoff = _take(self.backoff[k], ci, cfound, 0.0)
            p = np.where(seen, (a - d + backoff * p) / np.where(seen, total, 1), p)
        return p

    def prob(self, history, words) -> np.ndarray:
        """P(w | history) for each of ``words`` (model ids); ``history`` holds model ids, the last n-1 count, and
        a shorter one is the start of a sequence."""
        V, n = self.index.vocab_size, self.order
        h = [int(x) for x in history][-(n - 1):] if n > 1 else []
        w = np.asarray(words, dtype=np.int64)
        type_ids, context_ids, valid = [], [], []
        for k in range(1, n + 1):
            ok = k - 1 <= len(h)
            hk = h[len(h) - (k - 1):] if ok and k > 1 else []
            hkey = 0
            for x in hk:
                hkey = hkey * V + x
            type_ids.append(self.index.type_ids(k, hkey * V + w) if ok else np.full(w.shape, -1))
            ctx = self.index.type_ids(k - 1, np.array([hkey]))[0] if ok and k > 1 else 0
            context_ids.append(np.full(w.shape, ctx if ok else -1, dtype=np.int64))
            valid.append(np.full(w.shape, ok))
        return self.probabilities(type_ids, context_ids, valid)


def _order_stats(k: int, index: NgramIndex, types: np.ndarray, adjusted: np.ndarray, discounts: np.ndarray):
    """(contexts, A, γ numerators) of order k's adjusted counts; contexts ascend with the types."""
    ctx = index.prefix[k - 1][types].astype(np.int64) if k > 1 else np.zeros(types.shape[0], dtype=np.int64)
    if ctx.shape[0] == 0:
        return ctx, np.zeros(0, dtype=np.int64), np.zeros(0)
    starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])
    totals = np.add.reduceat(adjusted, starts)
    d = discounts[np.minimum(adjusted, 3)]
    return ctx[starts], totals, np.add.reduceat(d, starts)


def fit_kneser_ney(index: NgramIndex, doc_weights) -> KneserNey:
    """Interpolated modified Kneser–Ney of the counts ``doc_weights @ M_k`` (module docstring)."""
    n, V = index.order, index.vocab_size
    types, counts = [None] * n, [None] * n
    types[n - 1], counts[n - 1] = index.counts(doc_weights, n)
    for k in range(n - 1, 0, -1):
        # continuation counts: distinct left extensions among the (k+1)-grams seen
        t, a = _sum_by_key(index.suffix[k][types[k]].astype(np.int64), np.ones(types[k].shape[0], dtype=np.int64),
                           index.keys[k - 1].shape[0])
        if k >= 2:
            raw_t, raw_c = index.counts(doc_weights, k)
            eos_start = (index.keys[k - 1][raw_t] // V ** (k - 1)) == index.eos
            raw_t, raw_c = raw_t[eos_start], raw_c[eos_start]
            keep = ~np.isin(t, raw_t)
            t = np.concatenate([t[keep], raw_t])
            a = np.concatenate([a[keep], raw_c])
            o = np.argsort(t, kind="stable")
            t, a = t[o], a[o]
        types[k - 1], counts[k - 1] = t, a
    discounts = np.stack([kn_discounts(c) for c in counts])
    stats = [_order_stats(k, index, types[k - 1], counts[k - 1], discounts[k - 1]) for k in range(1, n + 1)]
    return KneserNey(index, types, counts, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats], discounts)


# ---------------------------------------------------------------- the target set


@dataclass(frozen=True)
class EvalQueries:
    """Every predicted token of a target set: its task and, per order, the index ids (see
    :meth:`KneserNey.probabilities`)."""

    task: np.ndarray
    type_ids: list[np.ndarray]
    context_ids: list[np.ndarray]
    valid: list[np.ndarray]


def eval_queries(index: NgramIndex, eval_set, seq_len: int | None = None) -> EvalQueries:
    """The queries of ``eval_set`` (each example its own sequence, at most ``seq_len + 1`` tokens when given, as
    :func:`~quadmix_spark.search.proxy_train.evaluate`), cached on the index per target set."""
    lengths = np.asarray(eval_set.lengths, dtype=np.int64)
    if seq_len is not None:
        lengths = np.minimum(lengths, int(seq_len) + 1)
    cache_key = _digest(np.asarray(eval_set.tokens).tobytes(), np.asarray(eval_set.offsets, dtype=np.int64).tobytes(),
                        lengths.tobytes(), np.asarray(eval_set.task_index, dtype=np.int64).tobytes())
    hit = index._eval.get(cache_key)
    if hit is not None:
        return hit
    V = index.vocab_size
    ids = index.vocab_map.apply(np.asarray(eval_set.tokens)[_ranges(eval_set.offsets, lengths)])
    first = np.cumsum(lengths) - lengths
    pos_in = np.arange(ids.shape[0], dtype=np.int64) - np.repeat(first, lengths)
    target = np.flatnonzero(pos_in >= 1)
    task = np.repeat(np.asarray(eval_set.task_index, dtype=np.int64), lengths)[target]
    type_ids, context_ids, valid = [], [], []
    key = np.zeros(target.shape[0], dtype=np.int64)  # key of the k-1 tokens before the target
    for k in range(1, index.order + 1):
        ok = pos_in[target] >= k - 1
        if k > 1:
            back = ids[np.maximum(target - (k - 1), 0)]
            key = np.where(ok, back * V ** (k - 2) + key, 0)  # prepend the token k-1 back
            context_ids.append(np.where(ok, index.type_ids(k - 1, key), -1))
        else:
            context_ids.append(np.zeros(target.shape[0], dtype=np.int64))
        type_ids.append(np.where(ok, index.type_ids(k, key * V + ids[target]), -1))
        valid.append(ok)
    out = EvalQueries(task, type_ids, context_ids, valid)
    index._eval[cache_key] = out
    return out


def evaluate_ngram(model: KneserNey, eval_set, seq_len: int | None = None,
                   task_weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """``(target_loss, {task: loss})`` like :func:`~quadmix_spark.search.proxy_train.evaluate`: per task the mean
    negative log-likelihood (nats) over every predicted token of its examples, then the equal-weight or
    ``task_weights`` mean over the tasks that have tokens."""
    from quadmix_spark.search.proxy_data import _task_weights

    q = eval_queries(model.index, eval_set, seq_len)
    nll = -np.log(model.probabilities(q.type_ids, q.context_ids, q.valid))
    n_tasks = len(eval_set.task_names)
    sums = np.bincount(q.task, weights=nll, minlength=n_tasks)
    counts = np.bincount(q.task, minlength=n_tasks)
    present = [i for i in range(n_tasks) if counts[i] > 0]
    if not present:
        raise ValueError("the target set has no predicted tokens")
    names = [eval_set.task_names[i] for i in present]
    losses = {eval_set.task_names[i]: float(sums[i] / counts[i]) for i in present}
    w = _task_weights(names, task_weights)
    return float(np.dot(w, [losses[t] for t in names])), losses


# ---------------------------------------------------------------- the proxy


def train_ngram_proxy(plan, store, eval_set, settings, theta_key: int, sample_seed: int, order: int = DEFAULT_ORDER,
                      vocab_size: int = DEFAULT_VOCAB_SIZE, task_weights: dict[str, float] | None = None,
                      cache_dir: str | Path | None = None, pool_docs=None, seq_len: int | None = None,
                      extra_eval_sets: dict | None = None, counts: str = "unique"):
    """The n-gram counterpart of :func:`~quadmix_spark.search.proxy_train.train_proxy`: fit the order-``order`` model
    on what the θ plan's stream reads within ``settings.tokens`` (data order from ``settings.seed``) and
    evaluate it on the target set (``seq_len``: truncate examples to ``seq_len + 1`` tokens like the
    transformer's evaluation) and on each of ``extra_eval_sets`` (``ProxyResult.extra_losses``).

    ``counts``: ``unique`` (default) counts every document read within the budget once; ``repeated`` counts
    each of its instances. Kneser–Ney's discounts come from the counts of counts, which repetition wrecks
    (a document read 10 times leaves few singletons): measured on the demo's 256 θ, with ``repeated`` the
    losses spread over 4.2–5.3 nats at 1M tokens (cross-validated Spearman of the fit 0.15), with ``unique``
    over 4.18–4.35 (0.56; 0.80 with the search's domain-mix features).  The vocabulary map is the transformer's for ``vocab_size``.  The pool's index
    comes from :func:`ngram_index` (``pool_docs`` builds it when it is not cached yet).

    Returns a :class:`~quadmix_spark.search.proxy_data.ProxyResult`: ``tokens`` the tokens read (the last instance may
    run past the budget), ``steps`` 0, ``epochs`` the epochs read, ``seconds`` the whole call,
    ``tokens_per_s`` tokens over the fitting time (weights, counts, model), ``final_train_loss`` NaN, and both
    parameter counts the number of n-gram types of the fitted model.  Deterministic: the same inputs give
    the same bits."""
    from quadmix_spark.search.proxy_data import ProxyResult, VocabMap

    t0 = time.perf_counter()
    vocab_map = VocabMap.build(store.token_counts(), vocab_size, store.eos_id)
    index = ngram_index(store, vocab_map, order, docs=pool_docs, cache_dir=cache_dir)
    t_fit = time.perf_counter()
    weights, inst = theta_doc_weights(index, plan, store, settings.tokens, theta_key, sample_seed, settings.seed)
    if counts == "unique":
        weights = np.minimum(weights, 1)
    elif counts != "repeated":
        raise ValueError(f"counts must be 'unique' or 'repeated', got {counts!r}")
    model = fit_kneser_ney(index, weights)
    fit_s = time.perf_counter() - t_fit
    target_loss, task_losses = evaluate_ngram(model, eval_set, seq_len, task_weights)
    extra = {name: evaluate_ngram(model, es, seq_len, task_weights) for name, es in (extra_eval_sets or {}).items()}
    return ProxyResult(target_loss=target_loss, task_losses=task_losses, tokens=inst.tokens, steps=0, epochs=inst.epochs,
                       seconds=time.perf_counter() - t0, tokens_per_s=inst.tokens / fit_s if fit_s > 0 else math.nan,
                       final_train_loss=math.nan, params_non_embedding=model.n_types, params_total=model.n_types,
                       extra_losses=extra)

