"""Transformer scorers: a Hugging Face ``tokenizer.json`` plus an ONNX model, run with onnxruntime.

Heads
- ``regression``: the model outputs one number per document (e.g. FineWeb-Edu's ``logits[:, 0]``);
- ``softmax``: the model outputs class logits; with ``labels`` -> the top label and its probability
  (output=label, e.g. NVIDIA's domain classifier), or one label's probability (output=score);
- ``embedding``: the model outputs ``last_hidden_state [B, T, H]`` (or a pooled ``[B, H]``); the
  attention-masked mean is fed to a small head file (``.npz`` or ``.json``: ``weight [H, C]``, ``bias [C]``,
  ``labels``, ``kind`` = logistic | linear, ``normalize``).

Batching: texts are cut to ``max_chars`` characters, tokenized (truncated to ``max_length`` tokens; a long text
by the head those tokens need when that gives the same ids, see :mod:`quadmix_udfs.token_prefix`), grouped by
length bucket, run ``batch_size`` at a time, and the results put back in input order.

Batch invariance: a document's score does not depend on which documents share its batch, on the batch's
size or on partitioning. Kernels pick their blocking and accumulation order by the input's *shape* (cuBLAS
chooses its algorithm by shape; a row's reduction over a longer padded width can group its terms differently),
never by the other rows' *values*. So every model call has a shape fixed by the document alone:
``(max(batch_size, 2), width)`` where ``width`` is the document's length bucket (:func:`bucket_width`: 16, 24, 32, 48,
64, 96, ... up to ``max_length``; its exact length for a model without an ``attention_mask`` input, where
padding would change the result), and a batch short of ``batch_size`` rows is filled with copies of its first
row whose outputs are dropped. Never a single row: onnxruntime's CPU matrix product has a kernel of its own
for one row, which rounds differently from the many-row kernel; with two rows or more the rows' products do not
depend on their number, so on CPU ``batch_size`` changes speed, not scores. The pooling and the embedding head are computed row by row in numpy for the same
reason (numpy's matrix product goes through BLAS, whose kernels depend on the number of rows). Left over:
scores from a CPU and a GPU, or from two CPU instruction sets, can differ in their last bits; and on a GPU a
changed ``batch_size`` is a changed shape, which may change them too.

Device: on a Spark executor that assigned this task a GPU (``TaskContext.resources()["gpu"]``) the session
uses the CUDA execution provider on that GPU; ``device: cuda`` with no GPU resource (local mode on a GPU
box) uses GPU 0; otherwise CPU with ``intra_op_threads`` threads, so Spark's task slots are not
oversubscribed. Sessions and tokenizers are loaded once per Python worker (``lru_cache``).

Profiling: with ``QUADMIX_TRACE_DIR`` set on the executors, every tokenization and model call is written as a
span (:mod:`quadmix_udfs.trace`), which says whether the GPU was kept busy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from quadmix_udfs import trace
from quadmix_udfs.fasttext_scorer import ModelLoadError
from quadmix_udfs.model_cache import stamp
from quadmix_udfs.token_prefix import PREFIX_CHARS_PER_TOKEN, tokenize_heads, tokenizer_split_rule


# ---------------------------------------------------------------- loaders (once per Python worker)


def load_session(path: str, device_id: int | None = None, threads: int = 1):
    """An onnxruntime session for ``path`` on GPU ``device_id`` (CUDA provider) or on CPU (``None``)."""
    return _load_session(*stamp(path), device_id, threads)


@lru_cache(maxsize=8)
def _load_session(local: str, _size: int, _mtime: int, device_id: int | None, threads: int):
    return new_session(local, local, device_id, threads)


def new_session(model: str | bytes, path: str, device_id: int | None, threads: int, config: dict[str, str] | None = None):
    """An onnxruntime session of ``model`` (a file, or a serialized graph) on GPU ``device_id`` or on CPU, with
    deterministic kernels; ``path`` names the model in errors; ``config`` adds session config entries."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.use_deterministic_compute = True  # CUDA kernels without atomics: the same input gives the same bits
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    providers: list = ["CPUExecutionProvider"]
    if device_id is not None:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"GPU {device_id} was asked for but onnxruntime has no CUDA execution provider "
                "(install onnxruntime-gpu instead of onnxruntime on the GPU executors)"
            )
        preload_cuda_libraries(ort)
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ModelLoadError(f"ONNX model {path!r} cannot be loaded: {str(e).strip()[:500]}") from None
    if device_id is not None and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime falls back to CPU with only a log line when the CUDA/cuDNN libraries do not load;
        # a GPU stage silently running a transformer on CPU would be ~100x slower, so say so instead
        raise RuntimeError(
            f"GPU {device_id} was asked for but onnxruntime's CUDA provider did not load for {path!r} "
            f"(providers: {session.get_providers()}); check that the CUDA 12/13 and cuDNN 9 libraries "
            "onnxruntime-gpu was built for are on LD_LIBRARY_PATH or installed as nvidia-* wheels"
        )
    return session


def preload_cuda_libraries(ort) -> str | None:
    """Load CUDA/cuDNN from pip's nvidia-* wheels where present (onnxruntime >= 1.21); a no-op otherwise.
    Returns why it failed, if it did (the libraries may come from LD_LIBRARY_PATH instead)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return None
    try:
        preload()
    except Exception as e:  # noqa: BLE001 - only a hint: the session creation decides
        return str(e)[:200]
    return None


def load_tokenizer(path: str, max_length: int):
    """(tokenizer truncating to ``max_length`` with padding off, pad id); loaded once per worker."""
    return _load_tokenizer(*stamp(path), max_length)


@lru_cache(maxsize=8)
def _load_tokenizer(local: str, _size: int, _mtime: int, max_length: int):
    from tokenizers import Tokenizer

    path = local
    try:
        tok = Tokenizer.from_file(local)
    except Exception as e:
        raise ModelLoadError(f"tokenizer {path!r} cannot be loaded: {e}") from None
    pad_id = (tok.padding or {}).get("pad_id")
    if pad_id is None:
        pad_id = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|padding|>") if tok.token_to_id(t) is not None), 0)
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok, int(pad_id)


def load_head(path: str) -> EmbeddingHead:
    """A linear/logistic head: ``.npz`` (arrays) or ``.json`` (lists) with weight, bias, labels, kind, normalize."""
    return _load_head(*stamp(path))


@lru_cache(maxsize=8)
def _load_head(local: str, _size: int, _mtime: int) -> EmbeddingHead:
    path = local
    try:
        if local.endswith(".json"):
            with open(local) as f:
                raw = json.load(f)
        else:
            with np.load(local, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
    except Exception as e:
        raise ModelLoadError(f"head file {path!r} cannot be read: {e}") from None
    try:
        weight = np.asarray(raw["weight"], dtype=np.float32)
        bias = np.asarray(raw["bias"], dtype=np.float32).reshape(-1)
    except KeyError as e:
        raise ModelLoadError(f"head file {path!r} has no {e.args[0]!r} array") from None
    if weight.ndim == 1:
        weight = weight[:, None]
    if weight.ndim != 2 or weight.shape[1] != bias.shape[0]:
        raise ModelLoadError(f"head file {path!r}: weight {weight.shape} and bias {bias.shape} do not fit together")
    labels = [str(x) for x in np.asarray(raw.get("labels", [])).reshape(-1).tolist()]
    kind = str(np.asarray(raw.get("kind", "logistic")))
    if kind not in ("logistic", "linear"):
        raise ModelLoadError(f"head file {path!r}: kind {kind!r} is not logistic or linear")
    if kind == "logistic" and len(labels) != weight.shape[1]:
        raise ModelLoadError(f"head file {path!r}: {len(labels)} labels for {weight.shape[1]} outputs")
    return EmbeddingHead(weight, bias, tuple(labels), kind, bool(np.asarray(raw.get("normalize", False))))


@dataclass(frozen=True, eq=False)
class EmbeddingHead:
    weight: np.ndarray
    bias: np.ndarray
    labels: tuple[str, ...]
    kind: str
    normalize: bool

    def __call__(self, emb: np.ndarray) -> np.ndarray:
        """The head of each row, computed row by row: ``x @ weight`` over many rows goes through BLAS, whose
        kernels (and so the last bits of a row's result) depend on how many rows there are."""
        x = emb.astype(np.float32, copy=False)
        if self.normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        z = np.empty((x.shape[0], self.weight.shape[1]), dtype=np.float32)
        for i in range(x.shape[0]):
            z[i] = x[i] @ self.weight
        z += self.bias
        return softmax(z) if self.kind == "logistic" else z


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- device


def task_gpu() -> int | None:
    """The GPU Spark assigned to the running task (first address), or None (driver, local mode, CPU task)."""
    try:
        from pyspark import TaskContext
    except ImportError:  # pragma: no cover - pyspark is a dependency
        return None
    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpu = ctx.resources().get("gpu")
    if gpu is None or not gpu.addresses:
        return None
    return int(gpu.addresses[0])


def device_for(device: str) -> int | None:
    """GPU id to run on for ``device`` (auto | cpu | cuda), None for CPU."""
    if device == "cpu":
        return None
    gpu = task_gpu()
    if gpu is None and device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        return 0 if visible not in ("", "-1") else None
    return gpu


# ---------------------------------------------------------------- encoder


def session_feeds(session, available: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    """The inputs ``session`` asks for, from ``available`` int64 arrays (cast to int32 where the graph wants it)."""
    out = {}
    for inp in session.get_inputs():
        if inp.name not in available:
            raise ModelLoadError(f"ONNX model {model!r} has an input {inp.name!r} this adapter does not provide")
        arr = available[inp.name]
        out[inp.name] = arr.astype(np.int32) if inp.type == "tensor(int32)" else arr
    return out


@dataclass(frozen=True)
class Encoder:
    """Tokenize, length-sort, batch and run an ONNX model; one output array per document, in input order."""

    model: str
    tokenizer: str
    max_chars: int = 20_000
    max_length: int = 512
    batch_size: int = 64
    device: str = "auto"
    intra_op_threads: int = 1
    output_name: str | None = None

    def session(self, device_id: int | None | str = "task"):
        dev = device_for(self.device) if device_id == "task" else device_id
        return load_session(self.model, dev, self.intra_op_threads)

    def tokenize(self, texts: Sequence[str | None], special: bool = True) -> list[list[int]]:
        """Token ids of each text cut to ``max_chars``, truncated to ``max_length`` (with the tokenizer's special
        tokens unless ``special`` is false). Texts longer than the head that ``max_length`` tokens need are
        tokenized by their head when that gives the same ids (:mod:`quadmix_udfs.token_prefix`)."""
        tok, _ = load_tokenizer(self.tokenizer, self.max_length)
        mc = self.max_chars
        cut = [("" if t is None else t if len(t) <= mc else t[:mc]) for t in texts]
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        head = PREFIX_CHARS_PER_TOKEN * self.max_length
        rule = tokenizer_split_rule(self.tokenizer) if head < mc else None
        normalize = tok.normalizer.normalize_str if tok.normalizer is not None else None
        return tokenize_heads(encode, cut, self.max_length, rule, head, normalize, special)

    def pad(self, ids: list[list[int]], width: int | None = None, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(``input_ids``, ``attention_mask``) of one batch, padded to ``width`` tokens (default: its longest row)
        and to ``rows`` rows (default: as many as given) with copies of the first row."""
        _, pad_id = load_tokenizer(self.tokenizer, self.max_length)
        width = width or max(1, max(len(x) for x in ids))
        n = max(rows or 0, len(ids))
        input_ids = np.full((n, width), pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        input_ids[len(ids):], mask[len(ids):] = input_ids[0], mask[0]
        return input_ids, mask

    def feeds(self, session, ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Padded model inputs of one batch (``input_ids``, ``attention_mask``, ``token_type_ids`` as the model asks)."""
        return self._feeds(session, *self.pad(ids))

    def _feeds(self, session, input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        available = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return session_feeds(session, available, self.model)

    def run(self, texts: Sequence[str | None], post: Callable[[np.ndarray, np.ndarray], np.ndarray], session=None) -> np.ndarray:
        """``post(model_output, attention_mask)`` of every document, computed at a shape fixed by the document
        alone (see the module docstring), in input order. ``post`` must work row by row."""
        session = session or self.session()
        with trace.span("tokenize", docs=len(texts)):
            ids = self.tokenize(texts)
        exact = "attention_mask" not in {i.name for i in session.get_inputs()}
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        widths = lengths if exact else bucket_widths(lengths, self.max_length)
        order = np.lexsort((np.arange(len(ids)), widths))  # by width, then input position
        out_name = self.output_name or session.get_outputs()[0].name
        result: np.ndarray | None = None
        rows = max(self.batch_size, MIN_ROWS)
        bounds = np.flatnonzero(np.diff(widths[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            width = max(1, int(widths[group[0]]))
            for start in range(0, len(group), rows):
                idx = group[start : start + rows]
                input_ids, mask = self.pad([ids[i] for i in idx], width, rows)
                feeds = self._feeds(session, input_ids, mask)
                with trace.span("model", docs=len(idx), tokens=int(mask.size)):
                    (raw,) = session.run([out_name], feeds)
                values = post(raw[: len(idx)], mask[: len(idx)])
                if result is None:
                    result = np.empty((len(ids), *values.shape[1:]), dtype=values.dtype)
                result[idx] = values
        if result is None:
            return np.empty((0,), dtype=np.float32)
        return result

    def embed(self, texts: Sequence[str | None], session=None) -> np.ndarray:
        """Mean-pooled embeddings ``[N, H]`` (attention mask weighted); a pooled ``[B, H]`` output is used as is."""
        return self.run(texts, mean_pool, session)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over tokens, each row on its own (a padded position adds nothing, even a NaN)."""
    if hidden.ndim == 2:
        return hidden.astype(np.float32, copy=False)
    m = mask.astype(bool)
    out = np.empty((hidden.shape[0], hidden.shape[2]), dtype=np.float32)
    for i in range(hidden.shape[0]):
        keep = hidden[i][m[i]]
        out[i] = keep.sum(axis=0, dtype=np.float32) / np.float32(max(len(keep), 1))
    return out


BUCKET_MIN = 16
MIN_ROWS = 2  # rows of every model call at least (see the module docstring)


def bucket_widths(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """The padded width of each document: the smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k)
    that holds it, at most ``max_length`` (which is a width too). A function of the length alone, so a
    document is always run at the same shape; a row of 16 tokens or more is at most a third padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    k = np.ceil(np.log2(np.maximum(lengths, BUCKET_MIN) / BUCKET_MIN)).astype(np.int64)
    upper = BUCKET_MIN << k  # the power-of-two width
    mid = (upper // 4) * 3  # 1.5x the next smaller one
    widths = np.where((mid >= lengths) & (mid >= BUCKET_MIN), mid, upper)
    return np.minimum(widths, max_length)


def _as_logits(raw: np.ndarray, _mask: np.ndarray) -> np.ndarray:
    return raw.reshape(raw.shape[0], -1).astype(np.float32, copy=False)


# ---------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class OnnxTransformerScorer:
    """Adapter ``onnx_transformer``: an :class:`Encoder` plus a head (regression | softmax | embedding)."""

    encoder: Encoder
    head: str
    output: str = "score"
    label: str | None = None
    labels: tuple[str, ...] | None = None
    head_file: str | None = None
    probabilities: bool = False  # head=softmax: the model outputs probabilities already

    def class_labels(self) -> tuple[str, ...]:
        if self.head == "embedding":
            return load_head(self.head_file).labels
        return self.labels or ()

    def validate(self) -> None:
        """Load everything and run one probe batch on CPU: a missing/corrupt file, a tokenizer whose ids or
        ``max_length`` do not fit the model, or labels that do not match the outputs fail here, on the driver."""
        enc = self.encoder
        session = load_session(enc.model, None, 1)
        tok, _ = load_tokenizer(enc.tokenizer, enc.max_length)
        outputs = [o.name for o in session.get_outputs()]
        if enc.output_name and enc.output_name not in outputs:
            raise ModelLoadError(f"ONNX model {enc.model!r} has no output {enc.output_name!r} (outputs: {', '.join(outputs)})")
        top_id = tok.get_vocab_size(with_added_tokens=True) - 1
        probe = [[top_id] * enc.max_length]
        try:
            feeds = enc.feeds(session, probe)
            (raw,) = session.run([enc.output_name or outputs[0]], feeds)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(
                f"tokenizer {enc.tokenizer!r} does not fit ONNX model {enc.model!r}: token id {top_id} (its vocabulary) "
                f"or max_length={enc.max_length} is out of the model's range ({str(e).strip().splitlines()[0][:300]})"
            ) from None
        if self.head == "embedding":
            head = load_head(self.head_file)
            hidden = raw.shape[-1]
            if head.weight.shape[0] != hidden:
                raise ModelLoadError(
                    f"head {self.head_file!r} expects {head.weight.shape[0]}-dim embeddings, model {enc.model!r} gives {hidden}"
                )
            width, labels = head.weight.shape[1], head.labels
            if head.kind == "linear" and (self.output == "label" or width != 1 or self.label):
                raise ModelLoadError(f"head {self.head_file!r} is linear with {width} output(s): use output=score, no label")
        else:
            width = int(np.prod(raw.shape[1:])) if raw.ndim > 1 else 1
            labels = self.labels or ()
            if self.head == "regression" and width != 1:
                raise ModelLoadError(f"head=regression needs one output per document; {enc.model!r} gives {width}")
            if self.head == "softmax" and len(labels) != width:
                raise ModelLoadError(
                    f"scorer labels ({len(labels)}) do not match the {width} outputs of {enc.model!r}"
                    + ("" if labels else ": set `labels`")
                )
        if self.output == "score" and (self.head == "softmax" or (self.head == "embedding" and labels)):
            if self.label is None:
                raise ModelLoadError(f"output=score on a classifier needs `label` (one of: {', '.join(labels)})")
            if self.label not in labels:
                raise ModelLoadError(f"label {self.label!r} is not one of the model's labels ({', '.join(labels)})")

    def score(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.head == "embedding":
            return self.score_embeddings(self.encoder.embed(texts))
        values = self.encoder.run(texts, _as_logits)
        if self.head == "regression":
            return values[:, 0].astype(np.float64), None
        return self._from_probs(values if self.probabilities else softmax(values), self.labels or ())

    def score_embeddings(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The head applied to pooled embeddings (several heads can share one encoder pass)."""
        head = load_head(self.head_file)
        out = head(emb)
        if head.kind == "linear":
            return out[:, 0].astype(np.float64), None
        return self._from_probs(out, head.labels)

    def _from_probs(self, probs: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        if self.output == "score":
            return probs[:, list(labels).index(self.label)].astype(np.float64), None
        top = probs.argmax(axis=1)
        names = np.asarray(labels, dtype=object)[top] if len(probs) else np.empty(0, dtype=object)
        return probs[np.arange(len(probs)), top].astype(np.float64), names


def embed_partitions(encoder: Encoder, batches):
    """``mapInPandas`` body (``functools.partial(embed_partitions, encoder)``): rows ``(i, text)`` ->
    ``(i, embedding)``; used to compute training embeddings on the executors."""
    import pandas as pd

    for pdf in batches:
        emb = encoder.embed(pdf["text"].tolist()) if len(pdf) else np.empty((0, 0), dtype=np.float32)
        yield pd.DataFrame({"i": pdf["i"].to_numpy(), "embedding": list(emb)})
