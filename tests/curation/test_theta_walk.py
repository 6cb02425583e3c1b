"""The walk of one θ from ``quadmix sample --params`` to the ``selection`` table, traced call by call in the driver.

Run as a script it prints the walk (files in order of first visit, cross-file calls, returns to a file already
left), which is how issue 20's before/after figures were measured::

    python -m tests.curation.test_theta_walk /tmp/walk
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONF, REPO, make_config
from tests.sampling_data import a_theta, make_corpus

LIBRARY = (str(REPO / "quadmix_spark") + "/", str(REPO / "udfs") + "/")


@dataclass
class Walk:
    files: list[str]  # library files in order of first visit
    calls: list[str]  # every call from one library file into another, "caller.py:f -> callee.py:g"
    returns: int  # visits to a file the walk had already left
    entered: Counter  # "file.py:function" -> calls



def _rel(filename: str) -> str | None:
    for root in LIBRARY:
        if filename.startswith(root):
            return ("udfs/" if root.endswith("udfs/") else "") + filename[len(root):]
    return None


def _importing(frame) -> bool:
    while frame is not None:  # a module body (and the class bodies and decorators it runs) is not a step
        if frame.f_code.co_name == "<module>" and _rel(frame.f_code.co_filename) is not None:
            return True
        frame = frame.f_back
    return False


def trace(argv: list[str]) -> Walk:
    """Run the CLI with ``argv`` in this process and record the library files its Python visits (Spark's
    workers run elsewhere and are not traced; config reads are left out of the calls, they are everywhere)."""
    from typer.testing import CliRunner

    from quadmix_spark.cli import app

    sequence: list[str] = []
    calls: list[str] = []
    entered: Counter = Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        rel = _rel(frame.f_code.co_filename)
        if rel is None or _importing(frame):
            return
        if not (frame.f_back is not None and frame.f_back.f_code.co_name == "__exit__"):  # a context manager's end
            entered[f"{rel}:{frame.f_code.co_name}"] += 1
        if not sequence or sequence[-1] != rel:
            sequence.append(rel)
        caller = _rel(frame.f_back.f_code.co_filename) if frame.f_back is not None else None
        if caller is not None and caller != rel and not rel.endswith("config.py"):
            calls.append(f"{caller}:{frame.f_back.f_code.co_name} -> {rel}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        result = CliRunner().invoke(app, argv)
    finally:
        sys.setprofile(None)
    assert result.exit_code == 0, result.output + repr(result.exception)
    left: set[str] = set()
    returns = 0
    for prev, cur in zip(sequence, sequence[1:]):
        left.add(prev)
        returns += cur in left
    return Walk(list(dict.fromkeys(sequence)), calls, returns, entered)


def walk_one_theta(spark, root: Path) -> Walk:
    """A small normalized store under ``root`` and the traced ``quadmix sample --params`` of one θ on it."""
    from typer.testing import CliRunner

    from quadmix_spark.cli import app
    from quadmix_spark.kernel.theta import save_theta

    cfg = make_config(root / "store")
    base = ["-c", str(DEFAULT_CONF), "--set", f"storage.root={root / 'store'}", "--set", "sampling.coarse_bins=64"]
    data = make_corpus(spark, cfg, n=300, n_domains=3, big_share=0.6)
    assert CliRunner().invoke(app, ["normalize", *base]).exit_code == 0
    save_theta(a_theta(data["domains"]), root / "theta.yaml")
    return trace(["sample", *base, "--params", str(root / "theta.yaml"), "--set", "sampling.run=walk"])


@pytest.mark.spark
def test_one_theta_walks_the_curation_workflow_once(spark, tmp_path):
    walk = walk_one_theta(spark, tmp_path)
    once = ("curation/sample.py:load_inputs", "curation/sample.py:run_sample", "curation/ranking.py:rank_and_sample")
    assert [walk.entered[f] for f in once] == [1, 1, 1], walk.entered
    packages = Counter(f.split("/")[0] if "/" in f else f for f in walk.files if f != "search/config.py")
    assert "search" not in packages, walk.files  # one θ needs nothing of the search workflow but its config section
    assert {"cli.py", "jobs.py", "core", "curation", "kernel"} <= set(packages), walk.files
    assert any(c.startswith("core/tracking.py:stage_run -> core/run_guard.py") for c in walk.calls)  # the shared plumbing


if __name__ == "__main__":
    from quadmix_spark.core.session import get_spark

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/theta-walk")
    w = walk_one_theta(get_spark(make_config(out / "store")), out)
    print(json.dumps({"files": w.files, "n_files": len(w.files), "cross_file_calls": len(w.calls),
                      "returns_to_a_file_left": w.returns, "calls": list(dict.fromkeys(w.calls))}, indent=1))
