"""Named fault points in the stages, for the fault tests (``tests/faults``).

``QUADMIX_FAULT=<point>[@<n>][:wait=<file>]`` arms one point for a process and the Spark tasks it starts:
at the ``n``-th hit (default the first) of :func:`point` with that name, in one process, the process
records the hit (a file ``<point>.<pid>`` in ``$QUADMIX_FAULT_DIR``, when set) and then

- SIGKILLs the driver's whole process group (and its own, for a Spark task in a Python worker), as an OOM
  killer or a lost machine would: nothing in the stage gets to clean up; or
- with ``:wait=<file>``, blocks until ``<file>`` exists (at most :data:`WAIT_LIMIT_S`), so that a test can
  line two runs up at a known place.

:func:`during` arms a point inside the tasks of a Spark job (a write whose commit has not happened yet).
Unset, a point costs one environment lookup and :func:`during` returns its frame unchanged.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV, DIR_ENV, PGID_ENV = "QUADMIX_FAULT", "QUADMIX_FAULT_DIR", "QUADMIX_FAULT_PGID"
WAIT_LIMIT_S = 600.0

_hits: dict[str, int] = {}


def arm() -> None:
    """Called by the CLI before Spark starts: remember the driver's process group for the Spark tasks
    (Python workers run in a process group of their own), which inherit the environment."""
    if os.environ.get(FAULT_ENV) and not os.environ.get(PGID_ENV):
        os.environ[PGID_ENV] = str(os.getpgid(0))


def _parse(spec: str) -> tuple[str, int, str]:
    target, _, action = spec.partition(":")
    name, _, nth = target.partition("@")
    return name, int(nth or 1), action


def armed(name: str) -> bool:
    spec = os.environ.get(FAULT_ENV)
    return bool(spec) and _parse(spec)[0] == name


def point(name: str) -> None:
    """A named place in a stage; does nothing unless ``QUADMIX_FAULT`` names it (see the module doc)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, nth, action = _parse(spec)
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != nth:
        return
    folder = os.environ.get(DIR_ENV)
    if folder:
        Path(folder, f"{name}.{os.getpid()}").write_text(f"{time.time()}\n")
    if action.startswith("wait="):
        release = Path(action.removeprefix("wait="))
        deadline = time.monotonic() + WAIT_LIMIT_S
        while not release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"fault point {name}: {release} did not appear within {WAIT_LIMIT_S:.0f} s")
            time.sleep(0.05)
        return
    if action:
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r} (use wait=<file>, or none to kill)")
    own = os.getpgid(0)
    driver = int(os.environ.get(PGID_ENV) or own)
    if driver != own:
        os.killpg(driver, signal.SIGKILL)
    os.killpg(own, signal.SIGKILL)


def during(df, name: str):
    """``df`` with point ``name`` in its tasks (at the first Arrow batch a task hands on), when armed."""
    if not armed(name):
        return df

    def passing(batches):
        for batch in batches:
            point(name)
            yield batch

    return df.mapInArrow(passing, df.schema)
