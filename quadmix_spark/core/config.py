"""Typed configuration: pydantic models loaded from ``conf/*.yaml`` plus ``--set key=value`` overrides.

Loading order: the model defaults, then each YAML file in order (deep-merged), then each override.
Strings may use ``${VAR}`` or ``${VAR:-default}`` environment references. Unknown keys and invalid
values raise ``ConfigError`` naming the key, the value and what is allowed, before any Spark work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_FILE = Path("conf/default.yaml")


from quadmix_spark.curation.config import AnnotateConfig, ScorerConfig, TrainScorersConfig
from quadmix_spark.core.config_base import ConfigError, Section as _Section
from quadmix_spark.search.config import EvaluateConfig, ProxyConfig, SearchConfig


class StorageConfig(_Section):
    """Where Delta tables live: folders under ``root`` (default) or ``catalog.schema.<table>`` names."""

    root: str = Field(".quadmix", description="local (or cloud URI) root folder for tables, MLflow store, exports")
    catalog: str | None = Field(None, description="Unity/Hive catalog; with `schema`, tables are catalog.schema.name")
    schema_: str | None = Field(None, alias="schema", description="schema (database) for catalog tables")

    @model_validator(mode="after")
    def _catalog_pair(self) -> StorageConfig:
        if (self.catalog is None) != (self.schema_ is None):
            raise ValueError("set both storage.catalog and storage.schema, or neither")
        return self

    @property
    def uses_catalog(self) -> bool:
        return self.catalog is not None

    def table(self, name: str) -> str:
        """Identifier of table ``name``: a path under ``root/tables`` or ``catalog.schema.name``."""
        if self.uses_catalog:
            return f"{self.catalog}.{self.schema_}.{name}"
        return _join(local_path(self.root), "tables", name)

    def path(self, *parts: str) -> str:
        """A location under the storage root (exports, scratch); a relative local root is made absolute
        (Delta's table builder rejects relative paths, and executors run in other folders)."""
        return _join(local_path(self.root), *parts)


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<storage.root>/mlflow.db")
    experiment: str = "quadmix"


class SparkConfig(_Section):
    """Used only for the embedded default session; a launcher's (spark-submit, Databricks) settings win."""

    master: str = "local[*]"
    app_name: str = "quadmix"
    driver_memory: str = "4g"
    shuffle_partitions: int = Field(8, gt=0)
    conf: dict[str, str] = Field(default_factory=dict, description="extra Spark confs for the embedded session")


class IngestConfig(_Section):
    input: list[str] = Field(default_factory=list, description="paths or globs (local or cloud URIs)")
    format: Literal["auto", "jsonl", "parquet", "delta"] = "auto"
    text_column: str = "text"
    id_column: str | None = Field("id", description="column holding a document id; null = hash of the text")
    metadata_columns: list[str] | None = Field(None, description="passthrough columns; null = every other column")
    max_chars: int = Field(1_000_000, gt=0, description="longer documents are rejected as too_large")
    invalid_utf8: Literal["reject", "replace"] = "reject"
    json_schema: str | None = Field(None, description="DDL schema of the JSONL metadata; null = inferred")
    tokenizer: str = Field(..., description="tokenizer.json used for token counts")
    batch_size: int = Field(256, gt=0, description="texts per tokenizer call")
    fast_tokenizer: bool = Field(True, description="count and encode byte-level BPE files with the exact fast path "
                                 "(quadmix_udfs.bpe_fast; the same ids as tokenizers); false = tokenizers everywhere")
    source_name: str | None = Field(None, description="value of the `source` column; default = input file path")
    broadcast_rejects_rows: int = Field(200_000, ge=0, description="id-rule rejections (duplicates, conflicts) applied to "
                                        "the rows by broadcast up to this many (the text never moves), else by a join")

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class NormalizeConfig(_Section):
    method: Literal["percentile", "zscore"] = Field("percentile", description="σ: flipped token-weighted percentile, or z-score")
    n_knots: int = Field(1001, ge=2, description="knots per criterion (percentile σ)")


class SamplingConfig(_Section):
    """The sampler: S(r̄) per document, realized copies, the token budget, the export."""

    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="name of the selection run (a slice of the tables)")
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1, description="seed of the copies' hash")
    eta_mode: Literal["exponent", "multiplier"] = "exponent"
    sigma_saturation: float | None = Field(
        None, gt=0, description="c of g(σ) = (1+c)σ/(σ+c), applied to each percentile σ before Eq. 1's merge (not in "
        "the paper): small c makes q̄ favour documents at the top of any one criterion over documents good on all; "
        "null = the paper's merge of σ as is. Part of what a θ means: a search's proxies, θ* and its sample must share it")
    budget_tokens: int | None = Field(None, gt=0, description="fit the output to this many tokens; null = one realization")
    max_epochs: int = Field(256, gt=0, description="most epochs (fresh Bernoulli draws) when under budget")
    rank_region: float = Field(0.2, gt=0, le=1, description="exact ranks for r̄ <= max(rank_region, ω)")
    coarse_bins: int = Field(1024, ge=16, le=65536, description="bins of the first-pass q̄ histogram per (θ, domain)")
    export_format: Literal["parquet", "jsonl", "tokens"] = Field(
        "parquet", description="parquet | jsonl: the text of every copy in training order; tokens: each unique "
        "document's token ids (ingest.tokenizer) once and the order as pointers, Megatron's .bin/.idx layout")
    export_shards: int = Field(8, gt=0)
    baseline_fraction: float = Field(0.1, gt=0, le=1, description="token share kept by the top-k/random baselines")
    broadcast_copies_rows: int = Field(2_000_000, ge=0, description="broadcast up to this many copies in the join with text")
    theta_chunk: int = Field(64, gt=0, description="θ ranked together by `sample --params-set` and `proxy`: memory per task "
                             "and on the driver grows with chunk × domains × coarse_bins, not with the number of θ")


class QuadmixConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ingest: IngestConfig = Field(
        default_factory=lambda: IngestConfig(tokenizer="${QUADMIX_SHARED:-../shared}/data/models/tokenizers/gpt_neox_20b.json")
    )
    scorers: dict[str, ScorerConfig] = Field(default_factory=dict, description="scorer name -> model adapter")
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    train_scorers: TrainScorersConfig = Field(default_factory=TrainScorersConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        root = self.storage.root
        if "://" in root:
            raise ConfigError(f"tracking.uri must be set when storage.root is a URI ({root!r})")
        return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, environment references expanded, then references to other keys."""
        data = _expand(self.model_dump(by_alias=True))
        return _expand_refs(data, data)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# ``${section.key}``: the value of another key of the config (at least one dot, unlike environment names).
# Names whose first part is no section of ours (``${hadoop.tmp.dir}``) and Spark's own confs (which have
# their own ``${...}`` substitution) are left as written.
_KEY_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+)\}")
_VERBATIM = "spark.conf"


def _expand_refs(value: Any, root: dict[str, Any], where: str = "", depth: int = 0) -> Any:
    if where == _VERBATIM:
        return value
    if isinstance(value, str):
        return _KEY_REF.sub(
            lambda m: _ref_value(m.group(1), root, where, depth) if m.group(1).split(".")[0] in root else m.group(0), value
        )
    if isinstance(value, dict):
        return {k: _expand_refs(v, root, f"{where}.{k}" if where else k, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_refs(v, root, where, depth) for v in value]
    return value


def _ref_value(path: str, root: dict[str, Any], where: str, depth: int) -> str:
    node: Any = root
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None or isinstance(node, (dict, list)):
        raise ConfigError(f"{where}: ${{{path}}} names no key with a value (a string or number) in the config")
    if depth > 8:
        raise ConfigError(f"{where}: ${{{path}}}: references nest too deeply (a cycle?)")
    return str(_expand_refs(node, root, path, depth + 1))


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def local_path(path: str) -> str:
    """An absolute path for a local file named relative to the working directory (URIs unchanged).

    Executors run in other working directories, so a relative model path must be made absolute on
    the driver before it is shipped in a UDF."""
    if "://" in path or path.startswith("/"):
        return path
    return str(Path(path).resolve())


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _describe(error: dict[str, Any], data: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc)
    value: Any = data
    for part in loc:
        value = value.get(part, "<unset>") if isinstance(value, dict) else "<unset>"
    if error["type"] == "extra_forbidden":
        section = ".".join(loc[:-1]) or "top level"
        fields = _fields_at(loc[:-1])
        return f"{key}: unknown key in {section} (allowed: {', '.join(fields)})"
    return f"{key} = {value!r}: {error['msg']}"


def _fields_at(loc: list[str]) -> list[str]:
    """The keys allowed at ``loc`` (a path of keys; a ``dict[str, Model]`` field takes any key, then Model's)."""
    model: type[BaseModel] = QuadmixConfig
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part) or next((f for f in model.model_fields.values() if f.alias == part), None)
        ann = _model_of(getattr(field, "annotation", None))
        if typing.get_origin(ann) is dict:
            if not parts:
                return []
            parts.pop(0)  # the user's own key (a scorer's name, say)
            ann = _model_of(typing.get_args(ann)[1])
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _model_of(ann: Any) -> Any:
    """``X`` for ``X | None`` / ``Optional[X]``, else ``ann``."""
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return ann


def load_config(files: list[str | Path] | None = None, overrides: list[str] | None = None) -> QuadmixConfig:
    """Build the config from YAML files (default: ``conf/default.yaml`` when present) and overrides."""
    paths = [Path(f) for f in files] if files else ([DEFAULT_CONFIG_FILE] if DEFAULT_CONFIG_FILE.exists() else [])
    data: dict[str, Any] = {}
    for path in paths:
        data = _deep_merge(data, _read_yaml(path))
    for text in overrides or []:
        data = _deep_merge(data, parse_override(text))
    try:
        cfg = QuadmixConfig.model_validate(data)
    except ValidationError as e:
        problems = "\n  ".join(_describe(err, data) for err in e.errors())
        raise ConfigError(f"invalid configuration ({', '.join(map(str, paths)) or 'defaults'}):\n  {problems}") from None
    return QuadmixConfig.model_validate(cfg.resolved())
