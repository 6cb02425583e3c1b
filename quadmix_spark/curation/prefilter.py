"""The ``text_stats`` pre-filter on the Spark side: which annotation columns hold rejections, the one
predicate the sampler applies, and the per-rule counts annotate reports.

A ``text_stats`` scorer ``x`` writes ``x_rejected`` (array<string>): the rules of its ``filter`` a document
fails, empty when it passes (or when no rule is enforced). The sampler ranks only the documents every such
column leaves in (:func:`keep_passing`, applied in :func:`quadmix_spark.curation.sample.load_inputs`), so a rejected
document never gets copies, for one θ, many θ, the baselines and the dry run alike, and r̄ is computed among
the documents that remain. σ (``normalize``) is still fitted on every annotated document: it is the
corpus-wide normalization, as with a proxy pool that ranks a subset.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from quadmix_spark.core.tables import SCORE_PREFIX
from quadmix_udfs.text_stats import REJECTED_SUFFIX

_REJECTED_TYPE = T.ArrayType(T.StringType())


def rejected_columns(annotations: DataFrame) -> list[str]:
    """The annotation columns that hold pre-filter rejections (``<scorer>_rejected``, array<string>)."""
    return [f.name for f in annotations.schema.fields
            if f.name.endswith(REJECTED_SUFFIX) and not f.name.startswith(SCORE_PREFIX) and f.dataType == _REJECTED_TYPE]


def passes_prefilter(annotations: DataFrame) -> Column | None:
    """True for the documents no pre-filter rejected (an unscored row, null, counts as passing); None when the
    table has no rejection column."""
    cols = rejected_columns(annotations)
    if not cols:
        return None
    ok = [F.col(c).isNull() | (F.size(c) == 0) for c in cols]
    out = ok[0]
    for c in ok[1:]:
        out = out & c
    return out


def keep_passing(annotations: DataFrame) -> DataFrame:
    """The annotations the sampler ranks: the documents no pre-filter rejected."""
    keep = passes_prefilter(annotations)
    return annotations if keep is None else annotations.where(keep)


def prefilter_counts(annotations: DataFrame, filters: dict[str, tuple[str, ...]]) -> dict[str, dict[str, int]]:
    """{scorer: {rule: documents failing it, ..., "rejected": documents failing any}} for the scorers with
    enforced rules (``filters``: scorer name -> rule names), in one pass over the annotations."""
    filters = {name: rules for name, rules in filters.items() if rules and name + REJECTED_SUFFIX in annotations.columns}
    if not filters:
        return {}
    aggs = []
    for name, rules in filters.items():
        col = F.col(name + REJECTED_SUFFIX)
        aggs.append(F.sum((F.size(col) > 0).cast("long")).alias(f"{name}|rejected"))
        aggs += [F.sum(F.array_contains(col, rule).cast("long")).alias(f"{name}|{rule}") for rule in rules]
    row = annotations.agg(*aggs).first().asDict()
    out: dict[str, dict[str, int]] = {}
    for key, value in row.items():
        name, rule = key.split("|")
        out.setdefault(name, {})[rule] = int(value or 0)
    return out
