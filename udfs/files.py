"""Locating model files on an executor: the configured path, else a copy shipped with ``--files``."""

from __future__ import annotations

import os


def local_path(path: str) -> str:
    """``path`` when it exists here, else the file of the same name distributed through SparkFiles."""
    if os.path.exists(path):
        return path
    from pyspark import SparkFiles

    shipped = os.path.join(SparkFiles.getRootDirectory(), os.path.basename(path))
    if os.path.exists(shipped):
        return shipped
    raise FileNotFoundError(f"model file {path!r} is not on this executor (ship it with --files or use shared storage)")
