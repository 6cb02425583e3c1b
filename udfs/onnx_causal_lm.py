"""Causal language model scorers: an ONNX export of a decoder-only model plus its ``tokenizer.json``.

Heads (both give higher = better):
- ``perplexity``: the mean log-likelihood per token of the document's first ``max_length`` tokens (the
  negated mean negative log-likelihood, i.e. minus log perplexity). With ``prefix_token`` (e.g.
  ``<|endoftext|>``) that token goes first, so the document's first token is scored too; a document with
  fewer than two tokens to score from gets NaN (a missing score).
- ``askllm``: the document cut to ``max_length`` tokens inside a prompt (``prompt``, with one ``{text}`` slot;
  default :data:`ASKLLM_PROMPT`, the AskLLM paper's question of whether a text is informative enough to
  pre-train a language model on), score = log P(yes) − log P(no) of the token after the prompt, the answer
  tokens (``answer_tokens``, default " yes" / " no") each required to be one token of the tokenizer.

A model may declare a class-factored vocabulary (what train-scorers' reference LM exports): each token id
belongs to one class, and P(token) = P(its class) / (members of the class). It says so in its ONNX metadata,
key :data:`CLASSES_KEY`, a JSON object ``{"class_logits": <output [B, T, classes]>, "token_class": <int64
initializer [vocabulary]>}``. The head then takes the log-softmax over the classes and subtracts the log of
the class size, and the graph's nodes that only feed the full-vocabulary logits are dropped: the same
log-probabilities (to float32 rounding) for a 4,096-class model at a fraction of the cost of 50,280 logits a
token. ``validate`` checks the declaration against the full logits when the model has them.

One forward pass per batch, no generation and no KV cache: the model is an export with inputs
``input_ids`` and, as it asks, ``attention_mask`` and ``position_ids`` (``optimum-cli export onnx --task
text-generation``; a ``-with-past`` export is refused). The adapter appends the head to the graph when it
loads it (:func:`scoring_graph`): log-softmax of the logits in float32, then the log-probability of each next
token (perplexity, ``[B, T]``) or of the answer tokens at each row's last prompt position (askllm, ``[B, 2]``).
So only those leave the session, never the ``[B, T, vocabulary]`` logits, which at 512 tokens and a
150k vocabulary are 300 MB per document row in float32. Weights stored as ONNX external data stay where
they are (the session reads them from the model's folder).

Padding and batch invariance: sequences are padded on the right, where a causal model's tokens never see the
pads, to the width of their length bucket (:func:`quadmix_udfs.onnx_transformer.bucket_widths`), and every
model call has ``max(batch_size, 2)`` rows (a short batch is filled with copies of its first row), so a
document's score is computed at a shape fixed by the document alone and does not depend on its batch
neighbours, the batch size or partitioning (see :mod:`quadmix_udfs.onnx_transformer`). The per-document
mean is taken row by row in float64.

Device: as the other ONNX adapters (the task's GPU under Spark, ``device: cuda`` for GPU 0, otherwise CPU with
``intra_op_threads`` threads); an fp16 export runs on GPU with the head still computed in float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from quadmix_udfs import trace
from quadmix_udfs.fasttext_scorer import ModelLoadError
from quadmix_udfs.model_cache import stamp
from quadmix_udfs.onnx_transformer import MIN_ROWS, Encoder, bucket_widths, device_for, load_tokenizer, new_session, session_feeds

HEADS = ("perplexity", "askllm")
ASKLLM_PROMPT = (
    "###\n{text}\n###\n\n"
    "Does the text between the ### marks contain informative signal for pre-training a large language model? "
    "An informative text is well formatted, contains usable knowledge of the world, and has no harmful, "
    "racist, sexist or otherwise offensive content.\n\n"
    "OPTIONS:\n- yes\n- no\n\nANSWER:"
)
ANSWER_TOKENS = (" yes", " no")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# names of the inputs and outputs the head adds to the graph
TARGETS, POSITION, ANSWER_IDS = "quadmix_targets", "quadmix_answer_position", "quadmix_answer_ids"
TOKEN_LOGPROB, ANSWER_LOGPROB = "quadmix_token_logprob", "quadmix_answer_logprob"
GRAPH_VERSION = 1  # of what scoring_graph appends (in the scorer's fingerprint)
CLASSES_KEY = "quadmix.vocabulary_classes"  # ONNX metadata declaring a class-factored vocabulary
CLASS_LOG_SIZE, CLASS_MASK = "quadmix_class_log_size", "quadmix_class_mask"


def declared_classes(model, path: str) -> tuple[str, str, np.ndarray] | None:
    """(the class-logits output, the token-to-class initializer's name, its values) a ``ModelProto`` declares
    under :data:`CLASSES_KEY`, or None; a declaration naming what the graph lacks is an error."""
    import json

    from onnx import numpy_helper

    raw = next((p.value for p in model.metadata_props if p.key == CLASSES_KEY), None)
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
        output, table_name = spec["class_logits"], spec["token_class"]
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(f"ONNX model {path!r}: metadata {CLASSES_KEY} is not "
                             '{"class_logits": <output>, "token_class": <initializer>}') from None
    if output not in {o.name for o in model.graph.output}:
        raise ModelLoadError(f"ONNX model {path!r}: {CLASSES_KEY} names output {output!r}, which the graph lacks")
    init = next((t for t in model.graph.initializer if t.name == table_name), None)
    table = numpy_helper.to_array(init) if init is not None else None
    if table is None or table.ndim != 1 or table.dtype.kind not in "iu" or not len(table) or table.min() < 0:
        raise ModelLoadError(f"ONNX model {path!r}: {CLASSES_KEY} names {table_name!r}, which is not a 1-D "
                             "non-negative integer initializer (token id -> class)")
    return output, table_name, table.astype(np.int64)


def logits_output(outputs: list[str], logits_name: str | None) -> str:
    """The output the full-vocabulary head reads: ``logits_name``, else ``logits``, else the first."""
    return logits_name or ("logits" if "logits" in outputs else outputs[0])


def prune(graph) -> None:
    """Drop the nodes that no graph output depends on (nodes are in topological order: ONNX requires it); a node
    with subgraphs keeps every name its subgraphs read. Initializers left unused are onnxruntime's to drop."""
    def reads(node) -> set[str]:
        names = {i for i in node.input if i}
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                for inner in g.node:
                    names |= reads(inner)
        return names

    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= reads(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)


# ---------------------------------------------------------------- the graph


def scoring_graph(path: str, head: str, logits_name: str | None = None, classes: bool = True):
    """The model of ``path`` with ``head``'s computation appended and the logits no longer an output: a
    ``ModelProto`` whose external data (if any) still points into ``path``'s folder. With ``classes`` (and no
    ``logits_name``), a model that declares a class-factored vocabulary is scored through its class logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"ONNX model {path!r} cannot be read: {str(e).strip()[:300]}") from None
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ModelLoadError(f"ONNX model {path!r}: opset {opset} < 13 is not supported (export with opset >= 13)")
    initializers = {t.name for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    past = [n for n in inputs if n.startswith("past_key_values") or n in ("use_cache_branch", "cache_position")]
    if past:
        raise ModelLoadError(
            f"ONNX model {path!r} takes a KV cache ({past[0]}, ...): export it without one "
            "(optimum-cli export onnx --task text-generation, not text-generation-with-past)"
        )
    unknown = [n for n in inputs if n not in MODEL_INPUTS]
    if unknown or "input_ids" not in inputs:
        raise ModelLoadError(
            f"ONNX model {path!r} has inputs {inputs}; a causal LM scorer feeds {', '.join(MODEL_INPUTS)} "
            "(input_ids required)"
        )
    outputs = [o.name for o in graph.output]
    name = logits_output(outputs, logits_name)
    if name not in outputs:
        raise ModelLoadError(f"ONNX model {path!r} has no output {name!r} (outputs: {', '.join(outputs)})")
    factored = declared_classes(model, path) if classes and logits_name is None else None
    if factored is not None:
        name, token_class, table = factored
        members = np.bincount(table)
        # log of each class's size; a class without members gets -inf in the softmax (no token can have it)
        graph.initializer.append(numpy_helper.from_array(np.log(np.maximum(members, 1)).astype(np.float32), CLASS_LOG_SIZE))
        graph.initializer.append(numpy_helper.from_array(np.where(members > 0, 0.0, -np.inf).astype(np.float32), CLASS_MASK))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "quadmix_last_axis"))
    dtype = next(o.type.tensor_type.elem_type for o in graph.output if o.name == name)
    nodes = []

    def as_float(x: str) -> str:
        """``x`` in float32 (as it is when it already is: a Cast to the same type would still copy it)."""
        if dtype == TensorProto.FLOAT:
            return x
        nodes.append(helper.make_node("Cast", [x], [f"{x}_f32"], to=TensorProto.FLOAT))
        return f"{x}_f32"

    def log_softmax(x: str, out: str) -> None:
        if factored is not None:
            nodes.append(helper.make_node("Add", [x, CLASS_MASK], [f"{x}_masked"]))
            x = f"{x}_masked"
        nodes.append(helper.make_node("LogSoftmax", [x], [out], axis=-1))

    def pick(ids: str) -> str:
        """What to gather from the log-softmax's last axis: the token ids, or (factored) their classes."""
        if factored is None:
            return ids
        nodes.append(helper.make_node("Gather", [token_class, ids], [f"{ids}_class"], axis=0))
        return f"{ids}_class"

    def per_token(picked: str, class_ids: str, out: str) -> None:
        """``out`` = ``picked`` less the log of each class's size (factored), or ``picked`` itself."""
        if factored is None:
            nodes[-1].output[0] = out
            return
        nodes.append(helper.make_node("Gather", [CLASS_LOG_SIZE, class_ids], [f"{class_ids}_log_size"], axis=0))
        nodes.append(helper.make_node("Sub", [picked, f"{class_ids}_log_size"], [out]))

    if head == "perplexity":
        logits = as_float(name)
        graph.input.append(helper.make_tensor_value_info(TARGETS, TensorProto.INT64, ["batch", "sequence"]))
        # LogSoftmax, not ReduceLogSumExp: onnxruntime's LogSoftmax is vectorized and sums accurately; its
        # ReduceLogSumExp was 8x slower and 20x less accurate over a 50k vocabulary (measured)
        log_softmax(logits, "quadmix_logp")
        targets = pick(TARGETS)
        nodes += [
            helper.make_node("Unsqueeze", [targets, "quadmix_last_axis"], ["quadmix_targets3"]),
            helper.make_node("GatherElements", ["quadmix_logp", "quadmix_targets3"], ["quadmix_picked"], axis=2),
            helper.make_node("Squeeze", ["quadmix_picked", "quadmix_last_axis"], ["quadmix_picked2"]),
        ]
        per_token("quadmix_picked2", targets, TOKEN_LOGPROB)
        out = helper.make_tensor_value_info(TOKEN_LOGPROB, TensorProto.FLOAT, ["batch", "sequence"])
    elif head == "askllm":
        graph.input.append(helper.make_tensor_value_info(POSITION, TensorProto.INT64, ["batch"]))
        graph.input.append(helper.make_tensor_value_info(ANSWER_IDS, TensorProto.INT64, ["answers"]))
        nodes += [
            helper.make_node("Unsqueeze", [POSITION, "quadmix_last_axis"], ["quadmix_position2"]),
            helper.make_node("GatherND", [name, "quadmix_position2"], ["quadmix_last"], batch_dims=1),
        ]
        last = as_float("quadmix_last")  # [B, V]: only the answer position's logits, in float32
        log_softmax(last, "quadmix_last_logp")
        answers = pick(ANSWER_IDS)
        nodes.append(helper.make_node("Gather", ["quadmix_last_logp", answers], ["quadmix_answer_picked"], axis=1))
        per_token("quadmix_answer_picked", answers, ANSWER_LOGPROB)
        out = helper.make_tensor_value_info(ANSWER_LOGPROB, TensorProto.FLOAT, ["batch", "answers"])
    else:
        raise ModelLoadError(f"unknown causal LM head {head!r} (one of: {', '.join(HEADS)})")
    graph.node.extend(nodes)
    del graph.output[:]
    graph.output.append(out)
    if factored is not None:
        prune(graph)  # the full-vocabulary logits are no longer computed
    return model


def load_scoring_session(path: str, head: str, logits_name: str | None, device_id: int | None, threads: int,
                         classes: bool = True):
    """A session of :func:`scoring_graph` (once per Python worker and file version)."""
    return _load_scoring_session(*stamp(path), head, logits_name, device_id, threads, classes)


@lru_cache(maxsize=4)
def _load_scoring_session(local: str, _size: int, _mtime: int, head: str, logits_name: str | None,
                          device_id: int | None, threads: int, classes: bool):
    from onnx import TensorProto

    model = scoring_graph(local, head, logits_name, classes)
    external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    # a graph given as bytes has no folder: say where its external weights are
    config = {"session.model_external_initializers_file_folder_path": os.path.dirname(os.path.abspath(local))} if external else None
    return new_session(model.SerializeToString(), local, device_id, threads, config)


# ---------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class CausalLMScorer:
    """Adapter ``onnx_causal_lm`` (see the module docstring)."""

    model: str
    tokenizer: str
    head: str
    max_chars: int = 20_000
    max_length: int = 512
    batch_size: int = 16
    device: str = "auto"
    intra_op_threads: int = 1
    output_name: str | None = None
    prompt: str | None = None
    answer_tokens: tuple[str, ...] | None = None
    prefix_token: str | None = None

    @property
    def encoder(self) -> Encoder:
        """Tokenization of the documents (cut to ``max_chars``, then ``max_length`` tokens)."""
        return Encoder(self.model, self.tokenizer, self.max_chars, self.max_length)

    def effective_prompt(self) -> str:
        return ASKLLM_PROMPT if self.prompt is None else self.prompt

    def effective_answers(self) -> tuple[str, ...]:
        return ANSWER_TOKENS if self.answer_tokens is None else tuple(self.answer_tokens)

    def fingerprint_settings(self) -> dict:
        """What decides the output besides the files and the config's settings: the defaults in force."""
        out: dict = {"graph": GRAPH_VERSION}
        if self.classes() is not None:
            out["classes"] = True  # the factored head: the same log-probabilities to float32 rounding, other bits
        if self.head == "askllm":
            out.update(prompt=self.effective_prompt(), answer_tokens=list(self.effective_answers()))
        return out

    def session(self, device_id: int | None | str = "task"):
        dev = device_for(self.device) if device_id == "task" else device_id
        return load_scoring_session(self.model, self.head, self.output_name, dev, self.intra_op_threads)

    # ---- token ids

    def _plain_ids(self, text: str, special: bool = False) -> list[int]:
        """``text``'s ids without truncation (prompt parts, answers), with the tokenizer's special tokens or not;
        encoded once per worker and tokenizer file (these are asked for on every batch)."""
        return list(_encode_once(*stamp(self.tokenizer), text, special))

    def prompt_parts(self) -> tuple[list[int], list[int]]:
        """askllm: ids of the prompt before ``{text}`` (with the tokenizer's special tokens) and after it."""
        before, after = self.effective_prompt().split("{text}")
        return self._plain_ids(before, special=True), self._plain_ids(after)

    def answer_ids(self) -> list[int]:
        """askllm: one token id per answer (an error if an answer is not exactly one token)."""
        ids = []
        for answer in self.effective_answers():
            got = self._plain_ids(answer)
            if len(got) != 1:
                raise ModelLoadError(
                    f"answer {answer!r} is {len(got)} tokens of {self.tokenizer!r}, not one: set answer_tokens "
                    "to single tokens of this tokenizer (e.g. ' yes'/' no' or 'Yes'/'No')"
                )
            ids.append(got[0])
        return ids

    def prefix_ids(self) -> list[int]:
        if self.prefix_token is None:
            return []
        tok, _ = load_tokenizer(self.tokenizer, 1 << 30)
        i = tok.token_to_id(self.prefix_token)
        if i is None:
            raise ModelLoadError(f"prefix_token {self.prefix_token!r} is not a token of {self.tokenizer!r}")
        return [int(i)]

    def sequences(self, texts: Sequence[str | None]) -> list[list[int]]:
        """The ids fed to the model for each text."""
        if self.head == "askllm":
            before, after = self.prompt_parts()
            return [before + ids + after for ids in self.encoder.tokenize(texts, special=False)]
        prefix = self.prefix_ids()
        return [prefix + ids for ids in self.encoder.tokenize(texts)]

    def max_width(self) -> int:
        if self.head == "askllm":
            before, after = self.prompt_parts()
            return len(before) + self.max_length + len(after)
        return len(self.prefix_ids()) + self.max_length

    # ---- the model

    def batch_feeds(self, session, seqs: list[list[int]], width: int, rows: int) -> dict[str, np.ndarray]:
        """Inputs of one model call: ``seqs`` right-padded to ``width``, filled to ``rows`` with copies of the first."""
        _, pad_id = load_tokenizer(self.tokenizer, self.max_length)
        input_ids, mask = self.encoder.pad(seqs, width, rows)
        n, lengths = len(input_ids), mask.sum(axis=1)
        available = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), (n, width)).copy(),
        }
        if self.head == "perplexity":
            targets = np.full_like(input_ids, pad_id)
            targets[:, :-1] = input_ids[:, 1:]
            available[TARGETS] = targets
        else:
            available[POSITION] = np.maximum(lengths - 1, 0)
            available[ANSWER_IDS] = np.asarray(self.answer_ids(), dtype=np.int64)
        return session_feeds(session, available, self.model)

    def _row_scores(self, out: np.ndarray, seqs: list[list[int]]) -> np.ndarray:
        scores = np.empty(len(seqs), dtype=np.float64)
        for i, seq in enumerate(seqs):
            if self.head == "askllm":
                scores[i] = float(out[i, 0]) - float(out[i, 1])
            else:
                n = len(seq) - 1  # tokens predicted from the ones before them
                scores[i] = out[i, :n].astype(np.float64).sum() / n if n > 0 else np.nan
        return scores

    def plan(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, int]]:
        """The model calls for ``seqs``: (positions in ``seqs``, padded width) each, grouped by length bucket
        (in input order within one), at most ``max(batch_size, 2)`` sequences a call."""
        lengths = np.fromiter((len(x) for x in seqs), dtype=np.int64, count=len(seqs))
        widths = bucket_widths(lengths, self.max_width())
        order = np.lexsort((np.arange(len(seqs)), widths))
        rows = max(self.batch_size, MIN_ROWS)
        bounds = np.flatnonzero(np.diff(widths[order])) + 1
        return [(group[start : start + rows], max(1, int(widths[group[0]])))
                for group in (np.split(order, bounds) if len(order) else []) for start in range(0, len(group), rows)]

    def run(self, seqs: list[list[int]], session=None) -> np.ndarray:
        """The score of every sequence, each computed at a shape fixed by its length (module docstring)."""
        session = session or self.session()
        out_name = session.get_outputs()[0].name
        rows = max(self.batch_size, MIN_ROWS)
        scores = np.full(len(seqs), np.nan)
        for idx, width in self.plan(seqs):
            batch = [seqs[i] for i in idx]
            feeds = self.batch_feeds(session, batch, width, rows)
            with trace.span("model", docs=len(idx), tokens=int(rows * width)):
                (out,) = session.run([out_name], feeds)
            scores[idx] = self._row_scores(out, batch)
        return scores

    def score(self, texts: Sequence[str | None]) -> tuple[np.ndarray, None]:
        with trace.span("tokenize", docs=len(texts)):
            seqs = self.sequences(texts)
        return self.run(seqs), None

    def validate(self) -> None:
        """Load the model and tokenizer and run one probe batch on CPU: an unusable graph, a tokenizer whose ids
        the model has no logits for, a prompt without one ``{text}`` slot or answers that are not single tokens
        fail here, on the driver."""
        if self.head not in HEADS:
            raise ModelLoadError(f"unknown causal LM head {self.head!r} (one of: {', '.join(HEADS)})")
        if self.head == "askllm" and self.effective_prompt().count("{text}") != 1:
            raise ModelLoadError("the askllm prompt needs exactly one {text} slot, where the document goes")
        session = load_scoring_session(self.model, self.head, self.output_name, None, 1)
        tok, _ = load_tokenizer(self.tokenizer, self.max_length)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if self.head == "askllm":
            self.answer_ids()
        self.prefix_ids()
        width = self.max_width()
        classes = self.classes()
        if classes is not None and len(classes[2]) < vocab:
            raise ModelLoadError(f"ONNX model {self.model!r} maps {len(classes[2])} token ids to classes ({CLASSES_KEY}), "
                                 f"{self.tokenizer!r} has {vocab} tokens")
        probe = [[vocab - 1] * width, [0, vocab - 1]]
        try:
            (out,) = session.run(None, self.batch_feeds(session, probe, width, 2))
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(
                f"tokenizer {self.tokenizer!r} does not fit ONNX model {self.model!r}: token id {vocab - 1} (its "
                f"vocabulary) or {width} tokens (max_length with the prompt) is out of the model's range "
                f"({str(e).strip().splitlines()[0][:300]})"
            ) from None
        if not np.isfinite(out).all():
            # GatherElements/Gather past the logits' width is an error on some providers and garbage on
            # others; a vocabulary larger than the logits shows up here either way
            raise ModelLoadError(
                f"ONNX model {self.model!r} gives no finite log-probability for some ids of {self.tokenizer!r} "
                f"({vocab} tokens): are they the model's tokenizer and logits?"
            )
        if classes is None:
            logits = _logits_width(self.model, self.output_name)
            if logits is not None and logits < vocab:
                raise ModelLoadError(f"ONNX model {self.model!r} has {logits} logits per token, {self.tokenizer!r} has {vocab} tokens")
        elif classes[0] != _logits_name(self.model):
            self._check_classes(session, classes[2], vocab, width)

    def classes(self) -> tuple[str, str, np.ndarray] | None:
        """The class-factored vocabulary the model declares (module docstring), when the head uses it."""
        return None if self.output_name is not None else _model_classes(*stamp(self.model))

    def _check_classes(self, session, table: np.ndarray, vocab: int, width: int, rows: int = 8) -> None:
        """The factored head against the same head over the model's full logits, on up to ``rows`` sequences of
        one id of each class in class order (the first classes, the most frequent tokens' in train-scorers'
        export), then ids spread over the vocabulary."""
        _, first = np.unique(table[:vocab], return_index=True)
        ids = np.concatenate([first, np.linspace(0, vocab - 1, rows * width).astype(np.int64)])[: rows * width]
        probe = ids.reshape(rows, width).tolist()
        (factored,) = session.run(None, self.batch_feeds(session, probe, width, rows))
        full_session = load_scoring_session(self.model, self.head, self.output_name, None, 1, classes=False)
        (full,) = full_session.run(None, self.batch_feeds(full_session, probe, width, rows))
        gap = float(np.max(np.abs(factored[:, :-1] - full[:, :-1]))) if self.head == "perplexity" else float(np.max(np.abs(factored - full)))
        if not gap <= 1e-3:
            raise ModelLoadError(
                f"ONNX model {self.model!r} declares a class-factored vocabulary ({CLASSES_KEY}) that its full logits "
                f"disagree with: log-probabilities differ by up to {gap:.3g} (a wrong token_class table or class logits)"
            )


@lru_cache(maxsize=16)
def _model_classes(local: str, _size: int, _mtime: int) -> tuple[str, str, np.ndarray] | None:
    import onnx

    return declared_classes(onnx.load(local, load_external_data=False), local)


def _logits_name(path: str) -> str:
    """The output the full-vocabulary head reads when no ``output_name`` is set."""
    import onnx

    return logits_output([o.name for o in onnx.load(path, load_external_data=False).graph.output], None)


def _logits_width(path: str, logits_name: str | None) -> int | None:
    """The vocabulary dimension of the logits output when the graph states it (None when symbolic)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    outputs = {o.name: o for o in graph.output}
    name = logits_output(list(outputs), logits_name)
    dims = outputs[name].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else None


@lru_cache(maxsize=64)
def _encode_once(local: str, _size: int, _mtime: int, text: str, special: bool) -> tuple[int, ...]:
    tok, _ = load_tokenizer(local, 1 << 30)
    return tuple(tok.encode(text, add_special_tokens=special).ids)
