"""What a proxy reads and reports, without torch (spec §2.6, §3.2): the n-gram screening proxy and the driver use
these without loading a deep-learning library; :mod:`quadmix_spark.search.proxy_train` trains the transformer on them.

- :class:`TrainSettings`: the training budget and optimizer settings of a proxy.
- :class:`VocabMap`: the model's vocabulary over the tokenizer's (identity, or the most frequent ids of the
  pool plus one shared "rare" id when the model vocabulary is smaller).
- :func:`iter_windows`: epoch ``e`` realizes each document's copies exactly like the Spark sampler
  (``realized_copies(S, hash_uniform_from_doc_hashes(doc_hash, theta_key, sample_seed + e))``), shuffles the
  instances with ``np.random.default_rng([train_seed, e])``, concatenates the documents (each followed by
  ``eos_id``) and cuts consecutive, non-overlapping windows of ``seq_len + 1`` tokens; the stream runs on
  into fresh epochs for as long as it is read.
- :func:`build_eval_set` / :class:`EvalSet`: the target set (``bmk``: the shared target validation tasks;
  ``oh``: reference assistant answers in one template), split by a hash of each example into a search and an
  evaluation part.
- :class:`ProxyResult`: what a trained proxy reports.

Only numpy is imported at module level.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NO_SELECTION = "θ selects no documents in the proxy pool"
OH_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{output}"

# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    tokens: int
    batch_size: int = 512
    micro_batch_size: int = 16
    lr: float = 4e-4
    min_lr: float = 4e-4
    warmup_steps: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    precision: str = "bf16"

    def __post_init__(self):
        if self.tokens <= 0 or self.batch_size <= 0 or self.micro_batch_size <= 0 or self.log_every <= 0:
            raise ValueError("tokens, batch_size, micro_batch_size and log_every must be positive")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision must be bf16 or fp32, got {self.precision!r}")

    def steps(self, seq_len: int) -> int:
        """Optimizer steps: ceil(tokens / (batch_size · seq_len))."""
        return math.ceil(self.tokens / (self.batch_size * seq_len))

    def micro_batches(self) -> list[int]:
        """Sequences per forward pass within one optimizer step (the last one may be smaller)."""
        mb = min(self.micro_batch_size, self.batch_size)
        full, rest = divmod(self.batch_size, mb)
        return [mb] * full + ([rest] if rest else [])


# ---------------------------------------------------------------- vocabulary


class VocabMap:
    """Token ids of the tokenizer → ids of the model.

    Identity when the model vocabulary holds every tokenizer id; otherwise the ``vocab_size - 1`` most
    frequent ids of the pool (eos always among them; ties broken by the smaller id) become ``0 ..
    vocab_size - 2`` in frequency order and every other id maps to ``vocab_size - 1``, the shared rare id.
    """

    def __init__(self, table: np.ndarray | None, vocab_size: int, identity: bool):
        self.table = table
        self.vocab_size = int(vocab_size)
        self.identity = identity
        self.rare_id = None if identity else self.vocab_size - 1

    @classmethod
    def build(cls, token_counts: np.ndarray, vocab_size: int, eos_id: int) -> VocabMap:
        counts = np.asarray(token_counts, dtype=np.int64)
        n = counts.shape[0]
        if vocab_size >= n:
            return cls(None, vocab_size, identity=True)
        if vocab_size < 2:
            raise ValueError("a compacted vocabulary needs vocab_size >= 2 (eos and the rare id)")
        if not 0 <= eos_id < n:
            raise ValueError(f"eos_id {eos_id} outside the tokenizer vocabulary of {n}")
        ids = np.arange(n, dtype=np.int64)
        order = np.lexsort((ids, -counts))  # by count descending, then id ascending
        keep = order[: vocab_size - 1]
        if eos_id not in keep:
            keep = np.concatenate([keep[:-1], [eos_id]]) if vocab_size > 2 else np.array([eos_id])
            keep = keep[np.lexsort((keep, -counts[keep]))]
        table = np.full(n, vocab_size - 1, dtype=np.int64)
        table[keep] = np.arange(len(keep), dtype=np.int64)
        return cls(table, vocab_size, identity=False)

    def apply(self, tokens) -> np.ndarray:
        """Model ids (int64) of tokenizer ids."""
        t = np.asarray(tokens).astype(np.int64, copy=False)
        if self.identity:
            if t.size and (t.min() < 0 or t.max() >= self.vocab_size):
                raise ValueError(f"token id outside the model vocabulary of {self.vocab_size}")
            return t
        if t.size and t.min() < 0:
            raise ValueError("negative token id")
        n = self.table.shape[0]
        if t.size and t.max() >= n:
            return np.where(t < n, self.table[np.minimum(t, n - 1)], self.rare_id)
        return self.table[t]


# ---------------------------------------------------------------- the θ data stream


def _plan_columns(plan) -> dict[str, np.ndarray]:
    cols = {}
    for name, dt in (("doc_hash", np.int64), ("S", np.float64), ("shard", np.int64), ("offset", np.int64), ("length", np.int64)):
        try:
            cols[name] = np.asarray(plan[name], dtype=dt)
        except KeyError:
            raise ValueError(f"the plan lacks column {name!r}") from None
    return cols


class WindowStream:
    """Iterator of training windows (int64 arrays of ``seq_len + 1`` model ids); see :func:`iter_windows`.

    ``epochs_started`` counts the epochs whose documents began streaming; ``epoch_log`` has one entry per
    epoch drawn (``epoch``, ``instances``, ``docs`` with at least one copy, ``tokens`` = Σ copies·(len+1)),
    empty epochs included.
    """

    def __init__(self, plan, store, vocab_map: VocabMap, seq_len: int, theta_key: int, sample_seed: int,
                 train_seed: int, chunk_tokens: int = 1 << 16, max_empty_epochs: int = 100_000):
        cols = _plan_columns(plan)
        if cols["S"].size == 0 or not (cols["S"] > 0).any():
            raise ValueError(NO_SELECTION)
        if not np.isfinite(cols["S"]).all() or (cols["S"] < 0).any():
            raise ValueError("plan S must be finite and >= 0")
        if (cols["length"] < 0).any():
            raise ValueError("plan lengths must be >= 0")
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        self.cols = cols
        self.store = store
        self.vocab_map = vocab_map
        self.seq_len = int(seq_len)
        self.theta_key = int(theta_key)
        self.sample_seed = int(sample_seed)
        self.train_seed = int(train_seed)
        self.chunk_tokens = max(int(chunk_tokens), self.seq_len + 1)
        self.max_empty_epochs = max_empty_epochs
        self.epochs_started = 0
        self.epoch_log: list[dict[str, int]] = []
        self.windows = 0
        self._gen = self._generate()

    def __iter__(self) -> WindowStream:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._gen)

    def epoch_copies(self, epoch: int) -> np.ndarray:
        """Realized copies of every plan row in ``epoch`` (same as the Spark sampler's epoch draw)."""
        # imported here: the kernel package needs yaml, which a bare torch machine (bench/gpu_proxy.py) may lack
        from quadmix_spark.kernel.copies import hash_uniform_from_doc_hashes, realized_copies

        u = hash_uniform_from_doc_hashes(self.cols["doc_hash"], self.theta_key, self.sample_seed + epoch)
        return realized_copies(self.cols["S"], u)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Plan row of every document instance of ``epoch``, in training order."""
        copies = self.epoch_copies(epoch)
        order = np.repeat(np.arange(copies.shape[0], dtype=np.int64), copies)
        np.random.default_rng([self.train_seed, epoch]).shuffle(order)
        return order

    def _generate(self) -> Iterator[np.ndarray]:
        W = self.seq_len + 1
        store, vmap = self.store, self.vocab_map
        shard, offset, length = self.cols["shard"], self.cols["offset"], self.cols["length"]
        eos = np.array([store.eos_id], dtype=np.int64)
        buf = np.zeros(0, dtype=np.int64)
        epoch, empty_run = 0, 0
        while True:
            order = self.epoch_order(epoch)
            sizes = length[order] + 1
            self.epoch_log.append({"epoch": epoch, "instances": int(order.shape[0]),
                                   "docs": int(np.unique(order).shape[0]), "tokens": int(sizes.sum())})
            if order.shape[0] == 0:
                empty_run += 1
                if empty_run >= self.max_empty_epochs:
                    raise RuntimeError(f"{empty_run} consecutive epochs realized no document")
                epoch += 1
                continue
            empty_run = 0
            self.epochs_started += 1
            # chunk boundaries: consecutive instances holding about chunk_tokens tokens
            ends = np.cumsum(sizes)
            cuts = np.searchsorted(ends, np.arange(self.chunk_tokens, int(ends[-1]), self.chunk_tokens), side="left") + 1
            bounds = np.unique(np.concatenate([[0], cuts, [order.shape[0]]]))
            for a, b in zip(bounds[:-1], bounds[1:]):
                pieces = []
                for i in order[a:b]:
                    pieces.append(store.doc(shard[i], offset[i], length[i]))
                    pieces.append(eos)
                raw = np.concatenate(pieces)
                full = np.concatenate([buf, vmap.apply(raw)])
                n = full.shape[0] // W
                for k in range(n):
                    self.windows += 1
                    yield full[k * W : (k + 1) * W]
                buf = full[n * W :].copy()
            epoch += 1


def iter_windows(plan, store, vocab_map: VocabMap, seq_len: int, theta_key: int, sample_seed: int,
                 train_seed: int) -> WindowStream:
    """The endless window stream of a θ plan (spec §2.6); raises ``ValueError(NO_SELECTION)`` at once when
    the plan is empty or all its S are zero.  ``plan``: a DataFrame (or mapping of arrays) with columns
    ``doc_hash, S, shard, offset, length``.  The returned iterator records ``epochs_started``."""
    return WindowStream(plan, store, vocab_map, seq_len, theta_key, sample_seed, train_seed)


# ---------------------------------------------------------------- the target set


@dataclass
class EvalSet:
    """Tokenized target examples: ``tokens`` (tokenizer ids, every example starting with ``eos_id`` so its
    first text token is predicted), ``offsets``/``lengths`` into it, ``task_index`` into ``task_names``."""

    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    task_index: np.ndarray
    task_names: list[str]
    eos_id: int
    kind: str = "bmk"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i] + self.lengths[i]]

    def save(self, path: str | Path) -> None:
        """Write the .npz atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, tokens=self.tokens, offsets=self.offsets, lengths=self.lengths,
                         task_index=self.task_index, task_names=np.array(self.task_names, dtype=str),
                         eos_id=np.int64(self.eos_id), kind=np.array(self.kind),
                         meta=np.array(json.dumps(self.meta, sort_keys=True)))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> EvalSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(tokens=z["tokens"], offsets=z["offsets"].astype(np.int64), lengths=z["lengths"].astype(np.int64),
                       task_index=z["task_index"].astype(np.int64), task_names=[str(t) for t in z["task_names"]],
                       eos_id=int(z["eos_id"]), kind=str(z["kind"]), meta=json.loads(str(z["meta"])))


def _read_jsonl_gz(path: str) -> list[dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


SEARCH_PART, EVALUATE_PART = "search", "evaluate"


def target_part(task: str, text: str, holdout_fraction: float) -> str:
    """Which part of the target set an example belongs to: ``evaluate`` for a ``holdout_fraction`` share by a
    hash of its task and text (so two copies of one text never land in both parts), ``search`` otherwise."""
    digest = hashlib.blake2b(f"{task}\0{text}".encode(), digest_size=8).digest()
    return EVALUATE_PART if int.from_bytes(digest, "little") / 2.0**64 < holdout_fraction else SEARCH_PART


def build_eval_set(kind: str, path: str, tokenizer_path: str, out_path: str, max_examples_per_task: int, seed: int,
                   max_len: int, tasks: list[str] | None = None, part: str | None = None,
                   holdout_fraction: float = 0.5, fast_tokenizer: bool = True) -> EvalSet:
    """Draw, tokenize and save the target set.

    ``bmk``: rows of ``target/target_val_texts.jsonl.gz`` (``task``, ``text``), at most
    ``max_examples_per_task`` per task, only ``tasks`` when given.  ``oh``: rows of
    ``reference/alpaca_eval_outputs.jsonl.gz`` rendered with :data:`OH_TEMPLATE`, all one task ``"oh"``.
    ``part`` (``search`` | ``evaluate``; None = both) keeps only the examples of that part
    (:func:`target_part`): the search's proxies are scored on one part, ``quadmix evaluate`` on the other,
    so θ* is judged on text the search never optimised.
    The draw is ``np.random.default_rng([seed, crc32(task)])`` without replacement, kept in file order.
    Each example is ``[eos] + tokens(text)`` truncated to ``max_len`` tokens; examples with fewer than two
    tokens are dropped. ``fast_tokenizer``: encode with :mod:`quadmix_udfs.bpe_fast` where the file allows
    (the same ids), else ``tokenizers``.
    """
    from quadmix_udfs.bpe_fast import load_encoder
    from quadmix_udfs.tokens import eos_id

    if max_examples_per_task <= 0 or max_len < 2:
        raise ValueError("max_examples_per_task must be positive and max_len at least 2")
    rows = _read_jsonl_gz(path)
    by_task: dict[str, list[tuple[str, str]]] = {}
    if kind == "bmk":
        for r in rows:
            text = r.get("text")
            if isinstance(text, str) and text.strip():
                by_task.setdefault(str(r["task"]), []).append((str(r.get("id", "")), text))
        if tasks is not None:
            unknown = sorted(set(tasks) - set(by_task))
            if unknown:
                raise ValueError(f"unknown target tasks {unknown}; the file has {sorted(by_task)}")
            by_task = {t: by_task[t] for t in tasks}
    elif kind == "oh":
        items = []
        for i, r in enumerate(rows):
            ins, out = r.get("instruction"), r.get("output")
            if isinstance(ins, str) and isinstance(out, str) and out.strip():
                items.append((str(r.get("id", i)), OH_TEMPLATE.format(instruction=ins.strip(), output=out.strip())))
        by_task = {"oh": items}
    else:
        raise ValueError(f"target kind must be 'bmk' or 'oh', got {kind!r}")
    if part is not None:
        if part not in (SEARCH_PART, EVALUATE_PART):
            raise ValueError(f"part must be {SEARCH_PART!r} or {EVALUATE_PART!r}, got {part!r}")
        by_task = {t: [x for x in items if target_part(t, x[1], holdout_fraction) == part] for t, items in by_task.items()}
    if not any(by_task.values()):
        raise ValueError(f"no target examples in {path}" + (f" in its {part} part" if part else ""))

    encoder = load_encoder(str(tokenizer_path), fast=fast_tokenizer)
    tok = encoder.tokenizer
    eos = eos_id(tok)
    task_names = sorted(by_task)
    seqs, task_idx, ids = [], [], []
    for ti, task in enumerate(task_names):
        items = by_task[task]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(task.encode())])
        pick = np.sort(rng.choice(len(items), size=min(max_examples_per_task, len(items)), replace=False))
        chosen = [items[i] for i in pick]
        encs = encoder.encode_batch([t for _, t in chosen])
        for (ex_id, _), ids in zip(chosen, encs):
            seq = np.array([eos] + ids[: max_len - 1], dtype=np.int64)
            if seq.shape[0] >= 2:
                seqs.append(seq)
                task_idx.append(ti)
                ids.append(ex_id)
    lengths = np.array([s.shape[0] for s in seqs], dtype=np.int64)
    offsets = np.zeros_like(lengths)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tokens = np.concatenate(seqs).astype(np.uint16 if vocab <= 65536 else np.uint32)
    meta = {"path": str(path), "tokenizer": str(tokenizer_path), "seed": int(seed), "max_len": int(max_len), "part": part or "all",
            "holdout_fraction": float(holdout_fraction),
            "max_examples_per_task": int(max_examples_per_task), "template": OH_TEMPLATE if kind == "oh" else "text",
            "examples_per_task": {t: int(np.sum(np.array(task_idx) == i)) for i, t in enumerate(task_names)},
            "tokens": int(tokens.shape[0]), "first_ids": ids[:5]}
    es = EvalSet(tokens=tokens, offsets=offsets, lengths=lengths, task_index=np.array(task_idx, dtype=np.int64),
                 task_names=task_names, eos_id=eos, kind=kind, meta=meta)
    es.save(out_path)
    return es


def _task_weights(names: Sequence[str], task_weights: dict[str, float] | None) -> np.ndarray:
    if task_weights is None:
        return np.full(len(names), 1.0 / len(names))
    w = np.array([float(task_weights.get(t, 0.0)) for t in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum over the tasks {list(names)}")
    return w / w.sum()


@dataclass
class ProxyResult:
    target_loss: float
    task_losses: dict[str, float]
    tokens: int
    steps: int
    epochs: int
    seconds: float
    tokens_per_s: float
    final_train_loss: float
    params_non_embedding: int
    params_total: int
    extra_losses: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)  # other target sets
