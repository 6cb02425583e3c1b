"""Config sections of the annotate and train-scorers stages: ``scorers``, ``annotate``, ``train_scorers``.

``scorers`` maps a scorer name to an adapter (``fasttext``, ``onnx_transformer``, ``onnx_text`` read a model
file; ``text_stats`` computes heuristic statistics and needs none). The
``annotate`` section says which scorer gives the domain and which give the quality criteria (column
``q_<scorer name>``). ``train_scorers`` names the reference sets and the models to train.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from quadmix_spark.core.config_base import Section
from quadmix_udfs.onnx_causal_lm import HEADS as CAUSAL_LM_HEADS

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
TEXT_STATS = "text_stats"
CAUSAL_LM = "onnx_causal_lm"


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} {name!r} must be lower-case letters, digits and '_' (starting with a letter)")
    return name


class ScorerConfig(Section):
    """One model adapter, registered by name and version.

    The version recorded in each annotation row is ``<version>.<fingerprint>``, the fingerprint being a hash
    of the model files and of every setting that changes the output, so a column's meaning never changes
    silently: replacing the model file or changing ``max_length`` is a new version even when ``version``
    stays the same.
    """

    type: str = Field(..., description="adapter: fasttext | onnx_transformer | onnx_causal_lm | onnx_text | text_stats (or a registered one)")
    model: str | None = Field(None, description="model file: fastText .bin/.ftz, or .onnx (every type but text_stats)")
    version: str = Field("v1", description="your version label; the recorded version adds a fingerprint of files and settings")
    output: Literal["score", "label"] = Field(
        "score", description="score: one number per document (quality); label: top label + confidence (domain)"
    )
    label: str | None = Field(None, description="output=score on a classifier: the label whose probability is the score")
    labels: list[str] | None = Field(None, description="class names of a softmax head / onnx_text model that carries none")
    tokenizer: str | None = Field(None, description="onnx_transformer, onnx_causal_lm: tokenizer.json")
    head: Literal["regression", "softmax", "embedding", "perplexity", "askllm"] | None = Field(
        None, description="how the model output becomes a score or label: regression | softmax | embedding "
        "(onnx_transformer); perplexity | askllm (onnx_causal_lm)"
    )
    head_file: str | None = Field(None, description="head=embedding: weights (.npz or .json: weight, bias, labels, kind)")
    outputs_are_probabilities: bool = Field(
        False, description="head=softmax: the model already outputs probabilities (e.g. NVIDIA's domain classifier)"
    )
    output_name: str | None = Field(None, description="ONNX output to read (default: the first)")
    max_chars: int = Field(20_000, gt=0, description="characters kept before tokenizing / predicting")
    max_length: int = Field(512, gt=1, description="onnx_transformer, onnx_causal_lm: tokens per document (truncation)")
    prompt: str | None = Field(
        None, description="onnx_causal_lm head=askllm: the prompt, with one {text} slot for the document; null = the "
        "AskLLM paper's question (quadmix_udfs.onnx_causal_lm.ASKLLM_PROMPT)"
    )
    answer_tokens: list[str] | None = Field(
        None, description="onnx_causal_lm head=askllm: the yes and no answers, each one token; null = [' yes', ' no']"
    )
    prefix_token: str | None = Field(
        None, description="onnx_causal_lm head=perplexity: a token put before each document (e.g. <|endoftext|>) so "
        "its first token is scored too"
    )
    batch_size: int = Field(64, gt=0, description="documents per model call (onnx_*)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the task's GPU when Spark assigned one, else CPU; cuda: GPU required"
    )
    intra_op_threads: int = Field(1, gt=0, description="onnxruntime threads per Python worker (CPU)")
    filter: list[str] | Literal["all"] | None = Field(
        None, description="text_stats: rules a document must pass (names, families or 'all'); failures go to "
        "<name>_rejected and the sampler leaves those documents out. null = no pre-filter"
    )
    thresholds: dict[str, dict[str, float | None]] | None = Field(
        None, description="text_stats: {rule: {min: x, max: y}} replacing a rule's default bounds"
    )

    @model_validator(mode="after")
    def _fields_of_type(self) -> ScorerConfig:
        if self.type == TEXT_STATS:
            from quadmix_udfs.text_stats import MAX_CHARS_LIMIT, resolve_filter, resolve_rules

            for key in ("model", "label", "labels"):
                if getattr(self, key) is not None:
                    raise ValueError(f"a text_stats scorer reads no model: remove `{key}`")
            if self.output != "score":
                raise ValueError("a text_stats scorer gives a score (output=score), not a label")
            if self.max_chars > MAX_CHARS_LIMIT:
                raise ValueError(f"a text_stats scorer reads at most {MAX_CHARS_LIMIT:,} characters (max_chars)")
            resolve_filter(self.filter)
            resolve_rules(self.thresholds)
        else:
            if not self.model:
                raise ValueError(f"a {self.type} scorer needs `model` (the model file)")
            for key in ("filter", "thresholds"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` is only for text_stats scorers")
        if self.type == CAUSAL_LM:
            if not self.tokenizer:
                raise ValueError("an onnx_causal_lm scorer needs `tokenizer` (the model's tokenizer.json)")
            if self.head not in CAUSAL_LM_HEADS:
                raise ValueError(f"an onnx_causal_lm scorer needs `head`: {' or '.join(CAUSAL_LM_HEADS)}")
            if self.output != "score":
                raise ValueError("an onnx_causal_lm scorer gives a score (output=score), not a label")
            for key in ("head_file", "label", "labels"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` is not for onnx_causal_lm scorers")
            wrong = [k for k in (("prefix_token",) if self.head == "askllm" else ("prompt", "answer_tokens")) if getattr(self, k) is not None]
            if wrong:
                raise ValueError(f"`{wrong[0]}` is not for head={self.head}")
            if self.prompt is not None and self.prompt.count("{text}") != 1:
                raise ValueError("the askllm prompt needs exactly one {text} slot, where the document goes")
        elif self.type == "onnx_transformer":
            if not self.tokenizer:
                raise ValueError("an onnx_transformer scorer needs `tokenizer` (a tokenizer.json)")
            if self.head is None:
                raise ValueError("an onnx_transformer scorer needs `head`: regression, softmax or embedding")
            if self.head in CAUSAL_LM_HEADS:
                raise ValueError(f"head={self.head} is for onnx_causal_lm scorers")
            if self.head == "embedding" and not self.head_file:
                raise ValueError("head=embedding needs `head_file` (the trained head's weights)")
            if self.head == "regression" and self.output == "label":
                raise ValueError("head=regression gives a number: use output=score")
            if self.outputs_are_probabilities and self.head != "softmax":
                raise ValueError("outputs_are_probabilities is only for head=softmax")
        else:
            for key in ("tokenizer", "head", "head_file"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` is only for onnx_transformer and onnx_causal_lm scorers")
        if self.type != CAUSAL_LM:
            for key in ("prompt", "answer_tokens", "prefix_token"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` is only for onnx_causal_lm scorers")
        return self


class AnnotateConfig(Section):
    """Which scorers annotate, and how the stage runs."""

    domain_scorer: str | None = Field(None, description="scorer (output=label) giving `domain` and `domain_conf`")
    quality_scorers: list[str] = Field(default_factory=list, description="scorers (output=score) giving q_<name> columns")
    rescore: list[str] = Field(
        default_factory=list, description="scorers whose changed version may replace existing annotations ('all' = every one)"
    )
    partitions: int | None = Field(None, gt=0, description="repartition the documents to score into this many tasks; null = as read, spread over every core when the read would leave one idle")
    histogram_bins: int = Field(20, gt=1, le=200, description="bins of the per-domain score histograms logged to MLflow")
    stage_level_scheduling: bool = Field(
        False,
        description="GPU scorers run in their own stage asking each task for `task_gpus` GPUs (clusters with GPU "
        "resources only; never in local mode)",
    )
    task_gpus: float = Field(1.0, gt=0, le=1, description="GPUs per GPU-scoring task under stage-level scheduling")
    task_cpus: int = Field(1, gt=0, description="CPUs per GPU-scoring task under stage-level scheduling")

    @field_validator("quality_scorers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({n for n in v if v.count(n) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v


class ReferenceSetConfig(Section):
    """A file of reference (high-quality) text: JSONL (plain or gzip)."""

    path: str
    text_field: str = "text"
    max_docs: int = Field(20_000, gt=0, description="cap on documents read (a deterministic sample, collected to the driver)")
    chunk_chars: int | None = Field(None, gt=100, description="split long documents at paragraphs into ~this many characters "
                                    "first (every quality model then cuts both classes into its own chunk_chars pieces)")


class TrainModelConfig(Section):
    """One scorer to train.

    task=quality: binary classifier, positives from ``positives`` (reference set names), label ``hq``, against
    ``negatives`` documents sampled from the ``documents`` table, label ``cc`` (the DCLM recipe).
    task=domain: multi-class classifier of ``label_column`` (a passthrough column of ``documents``); labels
    are slugged (``Science & Technology`` -> ``science_and_technology``).
    model=fasttext: a fastText supervised model (.ftz when ``quantize``, else .bin);
    model=tfidf: scikit-learn TF-IDF + logistic regression exported with skl2onnx (``onnx_text`` scorer);
    model=embedding: a logistic head on mean-pooled ``encoder`` embeddings (``onnx_transformer`` head=embedding);
    model=causal_lm (task=quality): a small causal language model of the positives, exported to ONNX and scored
    as a perplexity criterion (``onnx_causal_lm`` head=perplexity; :mod:`quadmix_spark.curation.causal_lm_train`).
    """

    task: Literal["quality", "domain"]
    model: Literal["fasttext", "tfidf", "embedding", "causal_lm"]
    enabled: bool = True
    positives: list[str] = Field(default_factory=list, description="quality: names of train_scorers.reference sets")
    negatives: int = Field(4000, gt=0, description="quality: documents sampled from `documents` as negatives")
    chunk_chars: int = Field(2000, gt=100, description="quality: positives and negatives are both cut at line breaks into "
                             "pieces of about this many characters (the same chunking for both classes)")
    length_match: bool = Field(True, description="quality: keep as many positives as negatives in every length bin, "
                               "so that length cannot tell the classes apart")
    negatives_filter: list[str] | Literal["all"] | None = Field(
        None, description="quality: text_stats rules (names, families or 'all') a document must pass to be a negative: "
        "well-formed pages, so the model learns content rather than boilerplate; null = any document"
    )
    label_column: str = Field("topic", description="domain: the documents column holding the class")
    max_docs: int = Field(10_000, gt=0, description="cap on training + held-out examples (collected to the driver)")
    min_class_docs: int = Field(5, gt=0, description="domain: labels with fewer examples are left out")
    max_chars: int = Field(20_000, gt=0)
    # fastText
    dim: int = Field(64, gt=0)
    epoch: int = Field(10, gt=0)
    lr: float = Field(0.5, gt=0)
    word_ngrams: int = Field(2, gt=0)
    min_count: int = Field(2, gt=0)
    bucket: int = Field(200_000, ge=0, description="hashed n-gram buckets (fastText's 2M default makes 400 MB models)")
    quantize: bool = Field(False, description="fastText: write a quantized .ftz (smaller; quantizing takes minutes)")
    # tfidf / logistic heads
    max_features: int = Field(50_000, gt=0)
    c: float = Field(1.0, gt=0, description="inverse L2 regularisation of the logistic regression")
    # embedding
    encoder: str | None = Field(None, description="embedding: encoder .onnx (outputs last_hidden_state)")
    tokenizer: str | None = Field(None, description="embedding: the encoder's tokenizer.json; causal_lm: the tokenizer to train on")
    max_length: int = Field(128, gt=1, description="embedding: tokens per document")
    batch_size: int = Field(32, gt=0, description="embedding: documents per encoder call; causal_lm: sequences per step")
    # causal_lm
    lm_vocab: int = Field(4096, gt=1, description="causal_lm: token classes predicted (the most frequent ids + one rare class)")
    lm_d_model: int = Field(128, gt=0, description="causal_lm: model width (heads of 32 dimensions)")
    lm_layers: int = Field(2, gt=0)
    lm_seq_len: int = Field(128, gt=1, description="causal_lm: training window; the scorer reads this many tokens")
    lm_steps: int = Field(300, gt=0, description="causal_lm: optimizer steps")
    lm_lr: float = Field(2e-3, gt=0)

    @model_validator(mode="after")
    def _by_task(self) -> TrainModelConfig:
        if self.task == "quality" and not self.positives:
            raise ValueError("a quality model needs `positives` (names of train_scorers.reference sets)")
        if self.model == "embedding" and not (self.encoder and self.tokenizer):
            raise ValueError("model=embedding needs `encoder` and `tokenizer`")
        if self.model == "causal_lm" and (self.task != "quality" or not self.tokenizer):
            raise ValueError("model=causal_lm is a quality model (task: quality) and needs `tokenizer`")
        if self.model == "causal_lm" and self.lm_d_model % 32:
            raise ValueError("causal_lm: lm_d_model must be a multiple of 32 (heads of 32 dimensions)")
        return self


class TrainScorersConfig(Section):
    """What ``quadmix train-scorers`` trains; models land in ``<models_dir>/<name>/<version>/`` and ``current/``."""

    models_dir: str | None = Field(None, description="local folder for trained models; null = <storage.root>/models")
    seed: int = 13
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of examples kept out of training for metrics")
    reference: dict[str, ReferenceSetConfig] = Field(default_factory=dict, description="named reference text sets")
    report_docs: int = Field(2000, ge=0, description="quality models: corpus documents scored for the report (length "
                             "correlation, domains of the top 10%); 0 = no corpus report")
    report_domain_column: str | None = Field(None, description="documents column of domains for the report; null = the "
                                             "label_column of the first enabled domain model, if documents have it")
    models: dict[str, TrainModelConfig] = Field(default_factory=dict, description="model name -> what to train")

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, TrainModelConfig]) -> dict[str, TrainModelConfig]:
        for name in v:
            _check_name(name, "model name")
        return v

    @model_validator(mode="after")
    def _known_references(self) -> TrainScorersConfig:
        for name, m in self.models.items():
            missing = [p for p in m.positives if p not in self.reference]
            if missing:
                known = ", ".join(sorted(self.reference)) or "none"
                raise ValueError(f"model {name}: unknown reference set(s) {', '.join(missing)} (defined: {known})")
        return self
