"""Scorer registry: a scorer name and version -> a model adapter (``quadmix_udfs``), with its output columns.

- Adapter types are registered by name (``fasttext``, ``onnx_transformer``, ``onnx_causal_lm``, ``onnx_text``,
  ``text_stats``); a new type is a function ``ScorerConfig -> adapter`` decorated with :func:`register_adapter`.
  An adapter has
  ``validate()`` (driver side: load, probe, raise :class:`ModelLoadError`) and
  ``score(texts) -> (scores, labels | None)``. An adapter that fills more columns than its score
  (``text_stats``) also has ``extra_columns(name) -> [(column, Arrow type)]`` and
  ``score_arrow(texts) -> (scores, [Arrow arrays of those columns])``. An adapter with more than one
  implementation of the same values (``text_stats``: a compiled kernel or numpy) says which one runs here in
  ``describe() -> str``; annotate's summary and run show it.
- A scorer's recorded version is ``<config version>.<fingerprint>``; the fingerprint hashes the model files
  (model, tokenizer, head) and every setting that changes the output (not batch size, device or threads),
  plus what the adapter says decides its output (``fingerprint_settings()``: for ``text_stats`` its
  definitions' version and effective rules), so the meaning of an annotation column never changes silently.
- Columns: the domain scorer fills ``domain`` and ``domain_conf`` (version key ``domain``); quality scorer
  ``x`` fills ``q_x`` (version key ``q_x``), and its extra columns (``x_stats``, ``x_rejected``) under the same
  key. Each annotation row records ``{key: "<scorer>@<version>"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from quadmix_spark.curation.config import ScorerConfig
from quadmix_spark.core.config import ConfigError, QuadmixConfig
from quadmix_spark.core.tables import SCORE_PREFIX
from quadmix_udfs.fasttext_scorer import FastTextScorer, ModelLoadError
from quadmix_udfs.onnx_causal_lm import CausalLMScorer
from quadmix_udfs.onnx_text import OnnxTextScorer
from quadmix_udfs.onnx_transformer import Encoder, OnnxTransformerScorer
from quadmix_udfs.scoring import ScorerRun
from quadmix_udfs.text_stats import TextStatsScorer, resolve_filter, resolve_rules

DOMAIN_COLUMNS = ("domain", "domain_conf")
_SCORER_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# settings that change how fast a scorer runs, never what it outputs: left out of the fingerprint
_NOT_IN_FINGERPRINT = {"version", "batch_size", "device", "intra_op_threads"}
_OPTIONAL = {"model", "filter", "thresholds", "prompt", "answer_tokens", "prefix_token"}


class ScorerError(ConfigError):
    """A scorer that cannot be used: unknown, misconfigured, or its model files are unusable."""


ADAPTERS: dict[str, Callable[[ScorerConfig], Any]] = {}


def register_adapter(type_name: str) -> Callable:
    def deco(fn: Callable[[ScorerConfig], Any]) -> Callable[[ScorerConfig], Any]:
        ADAPTERS[type_name] = fn
        return fn

    return deco


@register_adapter("fasttext")
def _fasttext(c: ScorerConfig) -> FastTextScorer:
    return FastTextScorer(model=c.model, output=c.output, label=c.label, max_chars=c.max_chars)


@register_adapter("onnx_transformer")
def _onnx_transformer(c: ScorerConfig) -> OnnxTransformerScorer:
    encoder = Encoder(
        model=c.model,
        tokenizer=c.tokenizer or "",
        max_chars=c.max_chars,
        max_length=c.max_length,
        batch_size=c.batch_size,
        device=c.device,
        intra_op_threads=c.intra_op_threads,
        output_name=c.output_name,
    )
    return OnnxTransformerScorer(
        encoder=encoder,
        head=c.head or "",
        output=c.output,
        label=c.label,
        labels=tuple(c.labels) if c.labels else None,
        head_file=c.head_file,
        probabilities=c.outputs_are_probabilities,
    )


@register_adapter("onnx_causal_lm")
def _onnx_causal_lm(c: ScorerConfig) -> CausalLMScorer:
    return CausalLMScorer(
        model=c.model,
        tokenizer=c.tokenizer or "",
        head=c.head or "",
        max_chars=c.max_chars,
        max_length=c.max_length,
        batch_size=c.batch_size,
        device=c.device,
        intra_op_threads=c.intra_op_threads,
        output_name=c.output_name,
        prompt=c.prompt,
        answer_tokens=tuple(c.answer_tokens) if c.answer_tokens is not None else None,
        prefix_token=c.prefix_token,
    )


@register_adapter("onnx_text")
def _onnx_text(c: ScorerConfig) -> OnnxTextScorer:
    return OnnxTextScorer(
        model=c.model,
        output=c.output,
        label=c.label,
        labels=tuple(c.labels) if c.labels else None,
        max_chars=c.max_chars,
        batch_size=c.batch_size,
        output_name=c.output_name,
    )


@register_adapter("text_stats")
def _text_stats(c: ScorerConfig) -> TextStatsScorer:
    bounds = tuple((r.name, r.lo, r.hi) for r in resolve_rules(c.thresholds))
    return TextStatsScorer(max_chars=c.max_chars, filter=resolve_filter(c.filter), thresholds=bounds)


# ---------------------------------------------------------------- versions

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """SHA-256 of a file (cached by path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def scorer_files(c: ScorerConfig) -> dict[str, str]:
    return {k: v for k, v in (("model", c.model), ("tokenizer", c.tokenizer), ("head_file", c.head_file)) if v}


def fingerprint(c: ScorerConfig, adapter: Any = None) -> str:
    """8 hex digits over the model files' contents, the output-affecting settings and what ``adapter`` says
    decides its output. Settings left unset that only some types have (``filter``, ``thresholds``, a missing
    ``model``) are left out, so adding them to the config changed no existing scorer's version."""
    settings = {k: v for k, v in c.model_dump().items()
                if k not in _NOT_IN_FINGERPRINT and k not in scorer_files(c) and not (k in _OPTIONAL and v is None)}
    files = {k: file_digest(v) for k, v in scorer_files(c).items()}
    extra = adapter.fingerprint_settings() if hasattr(adapter, "fingerprint_settings") else None
    blob = json.dumps({"settings": settings, "files": files, **({"adapter": extra} if extra else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


# ---------------------------------------------------------------- scorers


@dataclass(frozen=True)
class Scorer:
    name: str
    config: ScorerConfig
    adapter: Any
    version: str  # "<config version>.<fingerprint>"

    @property
    def tag(self) -> str:
        """What an annotation row records for the columns this scorer fills."""
        return f"{self.name}@{self.version}"

    @property
    def gpu_capable(self) -> bool:
        return self.config.type in ("onnx_transformer", "onnx_causal_lm") and self.config.device != "cpu"

    def extra_columns(self) -> list[tuple[str, Any]]:
        """(column, Arrow type) of what a quality scorer fills besides ``q_<name>`` (none for most)."""
        extra = getattr(self.adapter, "extra_columns", None)
        return list(extra(self.name)) if extra else []

    def run(self, columns: tuple[str, ...]) -> ScorerRun:
        return ScorerRun(self.name, self.adapter, self.config.output, columns)


def _absolute_paths(c: ScorerConfig) -> ScorerConfig:
    """The config with local model files made absolute: the adapter is shipped to executors, which run in
    other working directories (URIs are left as they are)."""
    from quadmix_spark.core.config import local_path

    update = {k: local_path(v) for k in ("model", "tokenizer", "head_file") if isinstance(v := getattr(c, k, None), str) and v}
    return c.model_copy(update=update)


def build_scorer(name: str, c: ScorerConfig, validate: bool = True) -> Scorer:
    """The adapter of scorer ``name``; with ``validate`` its files are loaded and probed (clear errors here)."""
    if not _SCORER_NAME.match(name):
        raise ScorerError(f"scorer name {name!r} must be lower-case letters, digits and '_' (starting with a letter)")
    if c.type not in ADAPTERS:
        raise ScorerError(f"scorer {name!r}: unknown type {c.type!r} (registered: {', '.join(sorted(ADAPTERS))})")
    for key, path in scorer_files(c).items():
        if not os.path.isfile(path):
            raise ScorerError(f"scorer {name!r}: {key} file {path!r} does not exist")
    adapter = ADAPTERS[c.type](_absolute_paths(c))
    if validate:
        try:
            adapter.validate()
        except ModelLoadError as e:
            raise ScorerError(f"scorer {name!r}: {e}") from None
    return Scorer(name, c, adapter, f"{c.version}.{fingerprint(c, adapter)}")


@dataclass(frozen=True)
class ScorerSet:
    """The scorers of an annotate run: the domain scorer and the quality criteria, by output column key."""

    domain: Scorer
    quality: tuple[Scorer, ...]

    def by_key(self) -> dict[str, Scorer]:
        """Version key -> scorer: ``domain`` and ``q_<name>``."""
        return {"domain": self.domain, **{f"{SCORE_PREFIX}{s.name}": s for s in self.quality}}

    def versions(self) -> dict[str, str]:
        return {key: s.tag for key, s in self.by_key().items()}

    def value_columns(self) -> list[str]:
        return [*DOMAIN_COLUMNS, *(c for s in self.quality for c in self._columns(s))]

    def quality_fields(self) -> list:
        """Spark fields of the quality columns in table order: each scorer's ``q_<name>`` (double), then its extra
        columns (``<name>_stats``, ``<name>_rejected``)."""
        from pyspark.sql import types as T
        from pyspark.sql.pandas.types import from_arrow_type

        return [f for s in self.quality for f in [T.StructField(f"{SCORE_PREFIX}{s.name}", T.DoubleType()),
                                                  *(T.StructField(c, from_arrow_type(t)) for c, t in s.extra_columns())]]

    def filters(self) -> dict[str, tuple[str, ...]]:
        """Quality scorer name -> the pre-filter rules it enforces (``text_stats``; empty for the others)."""
        return {s.name: tuple(getattr(s.adapter, "filter", ())) for s in self.quality}

    def implementations(self) -> dict[str, str]:
        """Scorer name -> which implementation computes it on this machine, for the adapters that say
        (``describe()``); executors built otherwise (no compiled module) may use another one, with the same values."""
        return {s.name: s.adapter.describe() for s in self.by_key().values() if callable(getattr(s.adapter, "describe", None))}

    @staticmethod
    def _columns(s: Scorer) -> tuple[str, ...]:
        return (f"{SCORE_PREFIX}{s.name}", *(c for c, _ in s.extra_columns()))

    def runs(self) -> list[tuple[str, Scorer, ScorerRun]]:
        out = [("domain", self.domain, self.domain.run(DOMAIN_COLUMNS))]
        out += [(f"{SCORE_PREFIX}{s.name}", s, s.run(self._columns(s))) for s in self.quality]
        return out


def resolve_scorers(cfg: QuadmixConfig, validate: bool = True) -> ScorerSet:
    """The configured domain and quality scorers, every model file checked before any Spark job."""
    ac = cfg.annotate
    if not ac.domain_scorer:
        raise ScorerError("annotate.domain_scorer is not set (the scorer, output=label, that gives each document's domain)")
    if not ac.quality_scorers:
        raise ScorerError("annotate.quality_scorers is empty (the scorers, output=score, that give the q_<name> columns)")
    defined = ", ".join(sorted(cfg.scorers)) or "none"
    for name in [ac.domain_scorer, *ac.quality_scorers]:
        if name not in cfg.scorers:
            raise ScorerError(f"annotate names scorer {name!r}, which is not in `scorers` (defined: {defined})")
    if ac.domain_scorer in ac.quality_scorers:
        raise ScorerError(f"scorer {ac.domain_scorer!r} cannot be both the domain scorer and a quality criterion")
    if cfg.scorers[ac.domain_scorer].output != "label":
        raise ScorerError(f"domain scorer {ac.domain_scorer!r} must have output=label (a label and its confidence)")
    for name in ac.quality_scorers:
        if cfg.scorers[name].output != "score":
            raise ScorerError(f"quality scorer {name!r} must have output=score (one number per document)")
    unknown = [n for n in ac.rescore if n != "all" and n not in cfg.scorers]
    if unknown:
        raise ScorerError(f"annotate.rescore names unknown scorer(s) {', '.join(unknown)} (defined: {defined})")
    domain = build_scorer(ac.domain_scorer, cfg.scorers[ac.domain_scorer], validate)
    quality = tuple(build_scorer(n, cfg.scorers[n], validate) for n in ac.quality_scorers)
    for s in quality:
        clash = [c for c, _ in s.extra_columns() if c.startswith(SCORE_PREFIX)]
        if clash:
            raise ScorerError(f"scorer {s.name!r}: its column(s) {', '.join(clash)} would be read as quality criteria "
                              "(the q_ prefix): give the scorer a name that does not start with 'q_'")
    return ScorerSet(domain, quality)
