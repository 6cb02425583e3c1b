"""Cache keys for model files: a file replaced in place (a retrained ``current/`` model) is loaded afresh.

Python workers outlive Spark jobs (worker reuse), so a cache keyed by path alone would keep serving the
old model after the file changed. Loaders key their ``lru_cache`` on ``(path, size, mtime_ns)`` instead.
"""

from __future__ import annotations

import os

from quadmix_udfs.files import local_path


def stamp(path: str) -> tuple[str, int, int]:
    """(local path, size, modification time in ns) of a model file on this machine."""
    local = local_path(path)
    st = os.stat(local)
    return local, st.st_size, st.st_mtime_ns
