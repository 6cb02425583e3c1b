"""The fault tests' pipeline: its stages, their commands and inputs, and the uninterrupted reference run.

Stages and their commands (``tests/faults/faults.yaml`` on top of ``conf/default.yaml``): ingest of two
overlapping JSONL files of real pages (with bad rows) → annotate → normalize → sample (one θ) → sample
(many θ) → propose → proxy. A test of stage S copies the store as it was before S, interrupts S, reruns it,
and compares with the store as it was after S.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from tests.cluster.conftest import bad_rows
from tests.conftest import DATA
from tests.faults.harness import copy_store, run_ok

STAGES = ("ingest", "annotate", "normalize", "sample", "sample-many", "propose", "proxy")
SEARCH = "faults"  # search.name in faults.yaml


@dataclass(frozen=True)
class Pipeline:
    base: Path

    @property
    def inputs(self) -> tuple[Path, Path]:
        return self.base / "input" / "a.jsonl", self.base / "input" / "b.jsonl"

    @property
    def theta_set(self) -> Path:
        return self.base / "input" / "thetas.json"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    def command(self, stage: str) -> list[str]:
        a, b = self.inputs
        return {
            "ingest": ["ingest", "--input", str(a), "--input", str(b)],
            "annotate": ["annotate"],
            "normalize": ["normalize"],
            "sample": ["sample", "--random-theta", "7", "--set", "sampling.run=t1"],
            "sample-many": ["sample", "--params-set", str(self.theta_set)],
            "propose": ["propose"],
            "proxy": ["proxy"],
        }[stage]

    def before(self, stage: str) -> Path:
        return self.base / f"store-{STAGES.index(stage)}"

    def after(self, stage: str) -> Path:
        return self.base / f"store-{STAGES.index(stage) + 1}"


def write_inputs(a: Path, b: Path) -> None:
    """a: 200 pages of the shared sample and every bad row; b: pages 150-299 (50 of them also in a)."""
    a.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(DATA / "web" / "weborganizer_dev.jsonl.gz", "rt", encoding="utf-8") as src:
        pages = [next(src) for _ in range(300)]
    a.write_text("".join(pages[:200]) + "\n".join(bad_rows(json.loads(pages[0]))) + "\n")
    b.write_text("".join(pages[150:300]))


def write_theta_set(spark, store: Path, path: Path) -> None:
    from quadmix_spark.kernel.theta import sample_thetas
    from quadmix_spark.curation.normalize import criteria_of
    from quadmix_spark.core.storage import read_table

    ann = read_table(spark, str(store / "tables" / "annotations"))
    domains = sorted(r[0] for r in ann.select("domain").distinct().collect())
    thetas = sample_thetas(domains, criteria_of(ann), 3, 11)
    path.write_text(json.dumps({"thetas": [t.to_dict() for t in thetas]}))


def build_reference(base: Path, spark) -> Pipeline:
    """Run every stage once, uninterrupted, keeping a copy of the store before each stage and after the last."""
    p = Pipeline(base)
    write_inputs(*p.inputs)
    reference = p.base / "reference"
    copy_store(reference, p.before(STAGES[0]))
    for stage in STAGES:
        run_ok(p.command(stage), reference, p.logs)
        if stage == "annotate":
            write_theta_set(spark, reference, p.theta_set)
        copy_store(reference, p.after(stage))
    return p
