"""Config sections of the annotate and train-scorers stages (scorers, annotate, train_scorers)."""

from __future__ import annotations

from pydantic import Field

from quadmix_spark.config_base import Section


class ScorerConfig(Section):
    """One model adapter, registered by name and version."""

    type: str
    version: str = "v1"


class AnnotateConfig(Section):
    domain_scorer: str | None = None
    quality_scorers: list[str] = Field(default_factory=list)


class TrainScorersConfig(Section):
    enabled: bool = False
