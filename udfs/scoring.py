"""The annotate stage's worker side: several scorers applied to batches of documents (``mapInArrow``).

Input batches carry ``text`` and one boolean ``_need_<scorer>`` column per scorer (which rows that scorer
must score: the others get null and cost nothing). Every other input column passes through untouched (the
Arrow arrays Spark sent are sent back; nothing goes through pandas). Embedding scorers that share an encoder
(same model, tokenizer, truncation) run the encoder once per batch and apply each head to the shared
embeddings; fastText scorers with the same ``max_chars`` share one preparation of the texts (cut, newlines
replaced, done by Arrow's compute kernels on the batch's buffers), so each text is scanned once per batch.
Adapters with ``score_arrow`` (``text_stats``) take the Arrow text array itself and fill, besides the score,
their extra columns (``ScorerRun.columns[1:]``), null on the rows they did not score.

Scores are stored as the adapters compute them, unrounded: every adapter gives a document the same bits
whatever its batch neighbours, batch size and partitioning (each one's docstring says how), so the
annotations, and the ranks and selections made from them, do not depend on how Spark cut the work.

Everything here is importable (``quadmix_udfs.scoring``) and the adapters are frozen dataclasses holding only
paths and settings, so what Spark pickles with the function is small; models load once per Python worker
through the adapters' ``lru_cache`` loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from quadmix_udfs.fasttext_scorer import FastTextScorer, arrow_lines
from quadmix_udfs.onnx_transformer import OnnxTransformerScorer


@dataclass(frozen=True)
class ScorerRun:
    """One scorer as the workers see it: its name, adapter, and the output columns it fills."""

    name: str
    adapter: Any
    output: str  # "score" -> (q_<name>, *extra columns) ; "label" -> (domain, domain_conf)
    columns: tuple[str, ...]

    @property
    def need_column(self) -> str:
        return need_column(self.name)


def need_column(name: str) -> str:
    return f"_need_{name}"


def _shares_encoder(run: ScorerRun) -> bool:
    return isinstance(run.adapter, OnnxTransformerScorer) and run.adapter.head == "embedding"


def _shares_lines(run: ScorerRun) -> bool:
    # exactly the stock adapter: a subclass may override score() and must keep being called through it
    return type(run.adapter) is FastTextScorer


def _scores_arrow(run: ScorerRun) -> bool:
    return hasattr(run.adapter, "score_arrow")


def _spread(values: pa.Array, need: np.ndarray) -> pa.Array:
    """``values`` (one per row ``need`` selects) placed on those rows of the batch, null on the others."""
    if need.all():
        return values
    where = np.cumsum(need) - 1
    return values.take(pa.array(where, mask=~need))


def _mask(batch: pa.RecordBatch, column: str) -> np.ndarray:
    return batch.column(column).fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _union(groups: dict[Any, np.ndarray], key: Any, need: np.ndarray) -> None:
    groups[key] = groups[key] | need if key in groups else need


def _subset(rows: np.ndarray, values: Sequence, need: np.ndarray):
    """``values`` (computed for ``rows``) restricted to the rows ``need`` selects (a subset of ``rows``)."""
    if len(rows) == int(need.sum()):
        return values
    pos = np.searchsorted(rows, np.flatnonzero(need))
    return values[pos] if isinstance(values, np.ndarray) else [values[i] for i in pos]


def score_batch(runs: Sequence[ScorerRun], batch: pa.RecordBatch, out_columns: Sequence[str]) -> pa.RecordBatch:
    """Score one batch: every run fills its columns (float64 scores, string labels) on the rows its ``_need_``
    flag selects, null elsewhere; ``out_columns`` that are no scorer's are the batch's own arrays."""
    text = batch.column("text")
    needs = {run.name: _mask(batch, run.need_column) for run in runs}
    encoders: dict[Any, np.ndarray] = {}
    line_sets: dict[int, np.ndarray] = {}
    for run in runs:
        if _shares_encoder(run):
            _union(encoders, run.adapter.encoder, needs[run.name])
        elif _shares_lines(run):
            _union(line_sets, run.adapter.max_chars, needs[run.name])
    embedded = {key: (np.flatnonzero(rows), key.embed(text.filter(rows).to_pylist())) for key, rows in encoders.items() if rows.any()}
    lines = {key: (np.flatnonzero(rows), arrow_lines(text.filter(rows), key)) for key, rows in line_sets.items() if rows.any()}
    columns = {}
    for run in runs:
        need = needs[run.name]
        values = np.full(len(need), np.nan)
        labels = np.full(len(need), None, dtype=object)
        extra = [pa.nulls(len(need), t) for _, t in run.adapter.extra_columns(run.name)] if _scores_arrow(run) else []
        if need.any():
            if _scores_arrow(run):
                scores, scored = run.adapter.score_arrow(text if need.all() else text.filter(need))
                extra, names = [_spread(arr, need) for arr in scored], None
            elif _shares_encoder(run):
                scores, names = run.adapter.score_embeddings(_subset(*embedded[run.adapter.encoder], need))
            elif _shares_lines(run):
                scores, names = run.adapter.score_lines(_subset(*lines[run.adapter.max_chars], need))
            else:
                scores, names = run.adapter.score(text.filter(need).to_pylist())
            values[need] = scores
            if names is not None:
                labels[need] = names
        col = pa.array(values, type=pa.float64(), mask=~need)
        if run.output == "label":
            columns[run.columns[0]] = pa.array(labels, type=pa.string())
            columns[run.columns[1]] = col
        else:
            columns[run.columns[0]] = col
            columns.update(zip(run.columns[1:], extra))
    arrays = [columns[c] if c in columns else batch.column(c) for c in out_columns]
    return pa.RecordBatch.from_arrays(arrays, names=list(out_columns))


def score_partitions(runs: Sequence[ScorerRun], out_columns: Sequence[str], batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: use as ``functools.partial(score_partitions, runs, out_columns)``."""
    for batch in batches:
        yield score_batch(runs, batch, out_columns)
