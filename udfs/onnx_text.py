"""scikit-learn text pipelines exported with skl2onnx (string input ``[N, 1]``), run with onnxruntime.

A classifier pipeline gives class probabilities (a ``[N, C]`` tensor, or skl2onnx's ZipMap list of dicts);
the class names come from the scorer's ``labels``, else the model's ``labels`` metadata, else the
classifier node's ``classlabels_*`` attribute. A regressor pipeline gives one number per text.

Export pitfalls (see the project's stack notes): use the word analyzer with
``tokenexp=r"[\\pL\\pN_]{2,}"`` and ``locale="C.UTF-8"`` on the TF-IDF step, or the ONNX tokenizer disagrees
with scikit-learn's.

Every model call has ``batch_size`` rows (at least 2; a short batch is filled with empty strings), so a text's
score does not depend on its batch neighbours, their number or ``batch_size`` (see
:mod:`quadmix_udfs.onnx_transformer`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from quadmix_udfs.fasttext_scorer import ModelLoadError
from quadmix_udfs.model_cache import stamp
from quadmix_udfs.onnx_transformer import MIN_ROWS, load_session


def model_labels(path: str) -> tuple[str, ...]:
    """Class names carried by the model file (``labels`` metadata, else the classifier node), or ()."""
    return _model_labels(*stamp(path))


@lru_cache(maxsize=8)
def _model_labels(local: str, _size: int, _mtime: int) -> tuple[str, ...]:
    import onnx

    path = local
    try:
        proto = onnx.load(local, load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"ONNX model {path!r} cannot be read: {e}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "labels" in meta:
        return tuple(str(x) for x in json.loads(meta["labels"]))
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name == "classlabels_strings":
                return tuple(s.decode() for s in attr.strings)
            if attr.name in ("classlabels_ints", "classlabels_int64s"):
                return tuple(str(i) for i in attr.ints)
    return ()


@dataclass(frozen=True)
class OnnxTextScorer:
    """Adapter ``onnx_text``: probability of ``label`` (output=score), top label + confidence (output=label),
    or a regressor's value (output=score, no labels)."""

    model: str
    output: str = "score"
    label: str | None = None
    labels: tuple[str, ...] | None = None
    max_chars: int = 20_000
    batch_size: int = 256
    output_name: str | None = None

    def class_labels(self) -> tuple[str, ...]:
        return self.labels or model_labels(self.model)

    def _outputs(self, session) -> tuple[str, str]:
        """(output name, kind): kind is 'proba' (a [N, C] tensor), 'zipmap' (list of dicts) or 'value'."""
        outs = session.get_outputs()
        if self.output_name:
            chosen = [o for o in outs if o.name == self.output_name]
            if not chosen:
                raise ModelLoadError(f"ONNX model {self.model!r} has no output {self.output_name!r}")
        else:
            chosen = [o for o in outs if o.type.startswith("seq(map") or (o.type == "tensor(float)" and len(o.shape) == 2)]
            chosen = chosen or [o for o in outs if o.type in ("tensor(float)", "tensor(double)")]
            if not chosen:
                raise ModelLoadError(f"ONNX model {self.model!r} has no float or probability output")
        o = chosen[0]
        if o.type.startswith("seq(map"):
            return o.name, "zipmap"
        return o.name, ("proba" if self.class_labels() else "value")

    def validate(self) -> None:
        session = load_session(self.model, None, 1)
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(string)":
            desc = ", ".join(f"{i.name}: {i.type}" for i in inputs)
            raise ModelLoadError(f"ONNX model {self.model!r} is not a text pipeline with one string input ({desc})")
        name, kind = self._outputs(session)
        labels = self.class_labels()
        probe = self._run(session, ["probe text for validation"])
        if kind != "value":
            if probe.shape[1] != len(labels):
                raise ModelLoadError(f"scorer labels ({len(labels)}) do not match the {probe.shape[1]} outputs of {self.model!r}")
            if self.output == "score" and self.label not in labels:
                raise ModelLoadError(f"output=score needs `label`, one of the model's labels ({', '.join(labels)}); got {self.label!r}")
        elif self.output == "label":
            raise ModelLoadError(f"ONNX model {self.model!r} gives numbers, not classes: use output=score")

    def _run(self, session, texts: list[str]) -> np.ndarray:
        name, kind = self._outputs(session)
        feed = {session.get_inputs()[0].name: np.asarray(texts, dtype=object).reshape(-1, 1)}
        (raw,) = session.run([name], feed)
        if kind == "zipmap":
            labels = self.class_labels() or (tuple(str(k) for k in raw[0]) if raw else ())
            return np.array([[float(d.get(lab, d.get(_maybe_int(lab), 0.0))) for lab in labels] for d in raw], dtype=np.float64)
        arr = np.asarray(raw, dtype=np.float64)
        return arr.reshape(len(texts), -1)

    def _run_fixed(self, session, texts: list[str]) -> np.ndarray:
        """:meth:`_run` ``batch_size`` texts at a time, a short last batch filled with empty strings: every call
        has the same shape, so a text's result never depends on how many others came with it. Never one row:
        onnxruntime's CPU matrix product has a kernel of its own for a single row, which rounds differently."""
        size = max(self.batch_size, MIN_ROWS)
        parts = []
        for i in range(0, len(texts), size):
            chunk = texts[i : i + size]
            parts.append(self._run(session, chunk + [""] * (size - len(chunk)))[: len(chunk)])
        return np.concatenate(parts) if parts else np.empty((0, 1))

    def score(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray | None]:
        session = load_session(self.model, None, 1)
        mc = self.max_chars
        cut = [("" if t is None else t if len(t) <= mc else t[:mc]) for t in texts]
        values = self._run_fixed(session, cut)
        labels = self.class_labels()
        if not labels:
            return values[:, 0], None
        if self.output == "score":
            return values[:, list(labels).index(self.label)], None
        top = values.argmax(axis=1)
        return values[np.arange(len(values)), top], np.asarray(labels, dtype=object)[top]


def _maybe_int(label: str):
    try:
        return int(label)
    except ValueError:
        return label
