"""The annotate stage's worker side: several scorers applied to batches of documents (``mapInPandas``).

Input batches carry ``text`` and one boolean ``_need_<scorer>`` column per scorer (which rows that scorer
must score: the others get null and cost nothing). Every other input column passes through. Embedding
scorers that share an encoder (same model, tokenizer, truncation) run the encoder once per batch and
apply each head to the shared embeddings; fastText scorers with the same ``max_chars`` share one
preparation of the texts (cut, newlines replaced), so each text is scanned once per batch.

Everything here is importable (``quadmix_udfs.scoring``) and the adapters are frozen dataclasses holding only
paths and settings, so what Spark pickles with the function is small; models load once per Python worker
through the adapters' ``lru_cache`` loaders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from quadmix_udfs.fasttext_scorer import FastTextScorer, prepare_lines
from quadmix_udfs.onnx_transformer import OnnxTransformerScorer


# Scores are stored rounded: a transformer's output moves in the 7th digit with the padding of its batch,
# and batches depend on partitioning; rounded, the annotations do not.
DECIMALS = 6


@dataclass(frozen=True)
class ScorerRun:
    """One scorer as the workers see it: its name, adapter, and the output columns it fills."""

    name: str
    adapter: Any
    output: str  # "score" -> (q_<name>,) ; "label" -> (domain, domain_conf)
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


def score_frame(runs: Sequence[ScorerRun], pdf: pd.DataFrame, out_columns: Sequence[str]) -> pd.DataFrame:
    """Score one batch: every run fills its columns on the rows its ``_need_`` flag selects."""
    texts = pdf["text"].to_numpy(dtype=object)
    out = pdf.copy(deep=False)
    shared: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    groups: dict[Any, np.ndarray] = {}
    for run in runs:
        if _shares_encoder(run):
            need = pdf[run.need_column].to_numpy(dtype=bool)
            key = run.adapter.encoder
            groups[key] = groups[key] | need if key in groups else need
    lines: dict[int, np.ndarray] = {}  # fastText scorers: each text prepared once per max_chars
    for run in runs:
        if _shares_lines(run):
            need = pdf[run.need_column].to_numpy(dtype=bool)
            key = run.adapter.max_chars
            lines[key] = lines[key] | need if key in lines else need
    for key, rows in groups.items():
        if rows.any():
            shared[key] = (np.flatnonzero(rows), key.embed(texts[rows].tolist()))
    prepared: dict[int, tuple[np.ndarray, list[str]]] = {}
    for key, rows in lines.items():
        if rows.any():
            prepared[key] = (np.flatnonzero(rows), prepare_lines(texts[rows].tolist(), key))
    for run in runs:
        need = pdf[run.need_column].to_numpy(dtype=bool)
        values = np.full(len(pdf), np.nan)
        labels = np.full(len(pdf), None, dtype=object)
        if need.any():
            if _shares_encoder(run):
                rows, emb = shared[run.adapter.encoder]
                pos = np.searchsorted(rows, np.flatnonzero(need))
                scores, names = run.adapter.score_embeddings(emb[pos])
            elif _shares_lines(run):
                rows, prep = prepared[run.adapter.max_chars]
                if len(rows) == int(need.sum()):
                    sel = prep
                else:
                    sel = [prep[i] for i in np.searchsorted(rows, np.flatnonzero(need))]
                scores, names = run.adapter.score_lines(sel)
            else:
                scores, names = run.adapter.score(texts[need].tolist())
            values[need] = np.round(scores, DECIMALS)
            if names is not None:
                labels[need] = names
        col = pd.array(values, dtype="Float64")
        col[~need] = pd.NA
        if run.output == "label":
            out[run.columns[0]] = labels
            out[run.columns[1]] = col
        else:
            out[run.columns[0]] = col
    return out[list(out_columns)]


def score_partitions(
    runs: Sequence[ScorerRun], out_columns: Sequence[str], batches: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: use as ``functools.partial(score_partitions, runs, out_columns)``."""
    for pdf in batches:
        yield score_frame(runs, pdf, out_columns)
