"""fastText classifiers (``.bin`` or ``.ftz``): probability of one label, or the top label and its confidence.

Texts are prepared the way fastText reads a line: cut to ``max_chars``, every newline turned into a space
(fastText ends a line at the first one) and the line terminator added, so the batch goes straight to
fastText's multi-line predict without its per-row Python check. In the annotate stage
(:func:`arrow_lines`) that is three Arrow compute kernels over the batch's buffers and the lines reach
fastText as UTF-8 ``bytes``, never decoded into Python ``str``; :func:`prepare_lines` does the same for
Python strings with ``str.replace`` (the cheapest full scan in CPython: regex or ``str.translate`` cost more
than the model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from quadmix_udfs.model_cache import stamp

LABEL_PREFIX = "__label__"


class ModelLoadError(ValueError):
    """A model or tokenizer file that is missing, unreadable or not what the adapter expects."""


def load_fasttext(path: str):
    """The fastText model at ``path``, loaded once per Python worker (and again if the file changes)."""
    return _load_fasttext(*stamp(path))


@lru_cache(maxsize=8)
def _load_fasttext(local: str, size: int, _mtime: int):
    import fasttext

    path = local
    if size == 0:
        raise ModelLoadError(f"fastText model {path!r} is empty")
    try:
        fasttext.FastText.eprint = lambda *a, **k: None  # silence the load-time deprecation banner
        return fasttext.load_model(local)
    except (ValueError, RuntimeError, MemoryError) as e:
        raise ModelLoadError(f"fastText model {path!r} cannot be loaded: {e}") from None


def prepare_lines(texts: Sequence[str | None], max_chars: int) -> list[str]:
    """One fastText input line per text: at most ``max_chars`` characters, no newline inside, ``\\n`` at the end."""
    return [(t if len(t) <= max_chars else t[:max_chars]).replace("\n", " ") + "\n" if t is not None else "\n" for t in texts]


def arrow_lines(texts, max_chars: int) -> list[bytes]:
    """:func:`prepare_lines` of an Arrow string array, as UTF-8 ``bytes`` (fastText reads UTF-8 either way)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = texts.type
    texts = texts.fill_null(pa.scalar("", kind))
    if len(texts) and pc.max(pc.binary_length(texts)).as_py() > max_chars:  # bytes >= characters: else no cut
        texts = pc.utf8_slice_codeunits(texts, 0, max_chars)  # code points, as Python slicing counts
    flat = pc.replace_substring(texts, "\n", " ")
    lines = pc.binary_join_element_wise(flat, pa.scalar("", kind), pa.scalar("\n", kind))  # text + "\n" + ""
    return lines.cast(pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()).to_pylist()


def strip_label(label: str) -> str:
    return label[len(LABEL_PREFIX):] if label.startswith(LABEL_PREFIX) else label


def _predict(model, lines: list[str], k: int) -> tuple[list, list]:
    # lines are already single, newline-terminated lines: call the multi-line predict directly
    return model.f.multilinePredict(lines, k, 0.0, "replace")


@dataclass(frozen=True)
class FastTextScorer:
    """Adapter ``fasttext``: ``label`` set -> its probability (output=score); else the top label + confidence."""

    model: str
    output: str = "score"
    label: str | None = None
    max_chars: int = 20_000

    def labels(self) -> list[str]:
        return [strip_label(x) for x in load_fasttext(self.model).get_labels()]

    def validate(self) -> None:
        model = load_fasttext(self.model)
        if model.f.getArgs().model.name != "supervised":
            raise ModelLoadError(f"fastText model {self.model!r} is not a supervised classifier")
        if self.output == "score":
            if self.label is None:
                raise ModelLoadError(f"fastText scorer on {self.model!r}: output=score needs `label` (one of the model's labels)")
            if strip_label(self.label) not in self.labels():
                known = ", ".join(self.labels()[:30])
                raise ModelLoadError(f"label {self.label!r} is not a label of {self.model!r} (labels: {known})")

    def score(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores, labels): probability of ``label`` (labels None), or top-label confidence and the labels."""
        return self.score_lines(prepare_lines(texts, self.max_chars))

    def score_lines(self, lines: list[str] | list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`score` of texts already prepared by :func:`prepare_lines` or :func:`arrow_lines` with this
        scorer's ``max_chars`` (several fastText scorers of one batch share one preparation)."""
        model = load_fasttext(self.model)
        if self.output == "score":
            wanted = LABEL_PREFIX + strip_label(self.label or "")
            labels, probs = _predict(model, lines, -1)
            out = np.zeros(len(lines), dtype=np.float64)
            for i, (ls, ps) in enumerate(zip(labels, probs)):
                try:
                    out[i] = ps[ls.index(wanted)]
                except ValueError:  # below fastText's output threshold: probability ~0
                    pass
            return np.minimum(out, 1.0), None
        labels, probs = _predict(model, lines, 1)
        names = np.array([strip_label(ls[0]) if ls else None for ls in labels], dtype=object)
        conf = np.array([min(float(ps[0]), 1.0) if len(ps) else 0.0 for ps in probs], dtype=np.float64)
        return conf, names
