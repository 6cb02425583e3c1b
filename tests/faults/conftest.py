"""The fault tests' reference: the pipeline (``tests/faults/pipeline.py``) run once per session, uninterrupted."""

from __future__ import annotations

import pytest

from tests.faults.pipeline import Pipeline, build_reference


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, spark) -> Pipeline:
    return build_reference(tmp_path_factory.mktemp("faults-reference"), spark)
