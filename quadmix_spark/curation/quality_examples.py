"""Training examples for quality classifiers that cannot win by length or source (pure functions, no Spark).

A classifier of reference text (``hq``) against web documents (``cc``) is happiest separating them by
whatever differs most: reference answers are short and clean, web pages long and full of navigation. Scored
on web pages, such a model ranks by length and layout, not by quality. Two things take those cues away:

- **The same chunking for both classes** (:func:`chunk_text`): every text, positive or negative, is cut at
  line breaks into pieces of about ``chunk_chars`` characters (a line longer than that at its last space
  before the limit), pieces shorter than ``min_chars`` dropped. A classifier then sees pieces of pages and
  pieces of reference documents, never a whole page against a whole answer.
- **Matched lengths** (:func:`match_lengths`): pieces are binned by length (half-octaves of characters,
  :func:`length_bins`) and every bin keeps as many positives as negatives (a deterministic choice by hash),
  so the two classes have the same length histogram and length alone predicts nothing (AUC 0.5 up to the
  resolution of a bin).

Negatives can also be restricted to well-formed documents (``negatives_filter`` in the model's config): the
DCLM classifier was trained on a pool already cleaned by heuristic filters, so it learned content rather than
boilerplate, which the heuristic criterion (``text_stats``) measures on its own.
"""

from __future__ import annotations

import hashlib

import numpy as np

BIN_MIN_CHARS = 64  # length bins start here: each is a half-octave [64·2^(k/2), 64·2^((k+1)/2))


def chunk_text(text: str, chunk_chars: int, min_chars: int = 100) -> list[str]:
    """Pieces of about ``chunk_chars`` characters, cut at line breaks (see the module docstring)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            pieces.append("\n".join(current))
        current, size = [], 0

    for line in text.split("\n"):
        while len(line) > chunk_chars:
            cut = line.rfind(" ", chunk_chars // 2, chunk_chars)
            cut = cut if cut > 0 else chunk_chars
            flush()
            pieces.append(line[:cut])
            line = line[cut:].lstrip(" ")
        if current and size + len(line) + 1 > chunk_chars:
            flush()
        current.append(line)
        size += len(line) + 1
    flush()
    return [p for p in pieces if len(p.strip()) >= min_chars]


def length_bins(lengths: np.ndarray) -> np.ndarray:
    """Half-octave bin of each length in characters (0 for anything below :data:`BIN_MIN_CHARS`)."""
    n = np.maximum(np.asarray(lengths, dtype=np.float64), BIN_MIN_CHARS)
    return np.floor(2.0 * np.log2(n / BIN_MIN_CHARS) + 1e-9).astype(np.int64)


def _rank(keys: list[str], seed: int) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}/{k}".encode()).digest()[:8], "little") for k in keys], dtype=np.uint64)


def match_lengths(keys: list[str], positive: np.ndarray, lengths: np.ndarray, seed: int,
                  max_per_class: int | None = None) -> np.ndarray:
    """Which examples to keep so every length bin holds as many positives as negatives: ``n_b = min(#pos,
    #neg)`` of each class in bin ``b`` (all bins scaled down alike when their sum exceeds ``max_per_class``),
    those with the smallest hash of (``seed``, key). Returns a boolean mask."""
    positive = np.asarray(positive, dtype=bool)
    bins = length_bins(lengths)
    rank = _rank(keys, seed)
    groups = []
    for b in np.unique(bins):
        pos = np.flatnonzero((bins == b) & positive)
        neg = np.flatnonzero((bins == b) & ~positive)
        groups.append((pos, neg, min(len(pos), len(neg))))
    total = sum(n for _, _, n in groups)
    scale = 1.0 if not max_per_class or total <= max_per_class else max_per_class / total
    keep = np.zeros(len(keys), dtype=bool)
    for pos, neg, n in groups:
        n = int(np.floor(n * scale))
        for idx in (pos, neg):
            keep[idx[np.argsort(rank[idx], kind="stable")[:n]]] = True
    return keep
