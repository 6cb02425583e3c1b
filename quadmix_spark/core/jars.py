"""Delta Lake jars: resolved once from Maven Central through Spark's Ivy, then reused offline.

The Delta Python package does not carry its jars. ``resolve_delta_jars()`` starts a throwaway local
Spark with ``spark.jars.packages`` so Spark's own Ivy fetches ``DELTA_PACKAGE`` and its dependencies,
keeps the jars pyspark does not already ship, and writes them with a manifest under the cache folder.
Later sessions put those files on ``spark.jars`` and start without any resolution.

Run ``python -m quadmix_spark.core.jars`` (``make setup`` does) to fill the cache;
``python -m quadmix_spark.core.jars --submit-jars`` prints the comma-separated list for ``spark-submit --jars``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

DELTA_VERSION = "4.4.0"
DELTA_PACKAGE = f"io.delta:delta-spark_4.2_2.13:{DELTA_VERSION}"
_MANIFEST = "manifest.json"


def cache_root() -> Path:
    """Folder for the Ivy cache and the resolved jars (``$QUADMIX_CACHE`` or ``~/.cache/quadmix-spark``)."""
    return Path(os.environ.get("QUADMIX_CACHE", Path.home() / ".cache" / "quadmix-spark")).expanduser()


def jars_dir(package: str = DELTA_PACKAGE) -> Path:
    return cache_root() / "jars" / re.sub(r"[^A-Za-z0-9_.-]", "_", package)


def cached_delta_jars(package: str = DELTA_PACKAGE) -> list[str] | None:
    """Absolute paths of the resolved jars, or None when ``resolve_delta_jars`` has not run yet."""
    manifest = jars_dir(package) / _MANIFEST
    if not manifest.exists():
        return None
    jars = json.loads(manifest.read_text())["jars"]
    paths = [str(jars_dir(package) / name) for name in jars]
    return paths if all(Path(p).exists() for p in paths) else None


def _artifact_name(jar_file: str, ivy: bool) -> str:
    """Ivy's ``group_artifact-1.2.3.jar`` (``ivy=True``) or pyspark's ``artifact-1.2.3.jar`` -> ``artifact``."""
    stem = jar_file.removesuffix(".jar")
    if ivy:
        stem = stem.split("_", 1)[1]
    return re.sub(r"-\d[\w.\-]*$", "", stem)


def _pyspark_artifacts() -> set[str]:
    import pyspark

    return {_artifact_name(f, ivy=False) for f in os.listdir(Path(pyspark.__file__).parent / "jars")}


def resolve_delta_jars(package: str = DELTA_PACKAGE, force: bool = False) -> list[str]:
    """Resolve ``package`` through Spark's Ivy once and cache the jars pyspark lacks."""
    if not force and (cached := cached_delta_jars(package)):
        return cached
    from pyspark.sql import SparkSession

    ivy = cache_root() / "ivy"
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("quadmix-resolve-jars")
        .config("spark.jars.packages", package)
        .config("spark.jars.ivy", str(ivy))
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.stop()
    provided = _pyspark_artifacts()
    fetched = sorted(f for f in os.listdir(ivy / "jars") if f.endswith(".jar"))
    keep = [f for f in fetched if _artifact_name(f, ivy=True) not in provided]
    if not any(f.startswith("io.delta_delta-spark") for f in keep):
        raise RuntimeError(f"Ivy did not fetch {package}; look at the log above (is Maven Central reachable?)")
    out = jars_dir(package)
    out.mkdir(parents=True, exist_ok=True)
    for f in keep:
        shutil.copy2(ivy / "jars" / f, out / f)
    (out / _MANIFEST).write_text(json.dumps({"package": package, "jars": keep}, indent=1))
    return [str(out / f) for f in keep]


if __name__ == "__main__":
    paths = resolve_delta_jars(force="--force" in sys.argv[1:])
    if "--submit-jars" in sys.argv[1:]:  # the value for spark-submit --jars
        print(",".join(paths))
    else:
        print(f"{len(paths)} Delta jars cached in {jars_dir()}")
