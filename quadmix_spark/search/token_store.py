"""Packed token store of the proxy pool (spec §8: one tokenized pool, read by every proxy through an index).

Folder layout::

    <dir>/pool.json                 meta, written by the pool builder (see :func:`write_meta`)
    <dir>/shards/shard-00000.bin    raw little-endian token ids (uint16, or uint32 when an id >= 65536),
    <dir>/shards/shard-00001.bin    the documents of one shard concatenated, no separators
    <dir>/token_counts.npy          int64 frequency of every token id over the pool (length tokenizer_vocab)

``pool.json`` holds at least ``{"format": "quadmix-token-pool/1", "dtype": "uint16", "eos_id": int,
"tokenizer_vocab": int, "shards": [names]}``; a document is addressed by (shard index into ``shards``,
token offset inside the shard, length in tokens).  Only numpy here: the module is imported by Spark tasks
and by the proxy trainer.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "quadmix-token-pool/1"
SHARDS_DIR = "shards"
META_FILE = "pool.json"
COUNTS_FILE = "token_counts.npy"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def shard_name(index: int) -> str:
    """``shard-00000.bin`` for shard 0."""
    return f"shard-{index:05d}.bin"


def _np_dtype(dtype: str) -> np.dtype:
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"token dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def dtype_for_vocab(vocab: int) -> str:
    """The narrowest store dtype holding ids ``0 .. vocab-1``."""
    return "uint16" if vocab <= 65536 else "uint32"


def _atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` into a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_shard(path: str, token_arrays: list[np.ndarray], dtype: str = "uint16") -> tuple[np.ndarray, np.ndarray]:
    """Write one shard file atomically (temporary file in the same folder, then ``os.replace``).

    Returns ``(offsets, lengths)`` (int64, one per array): token indices into the shard.  A retried Spark
    task rewrites the same file with the same content.  Raises ``ValueError`` when an id does not fit
    ``dtype`` or is negative.
    """
    with ShardWriter(path, dtype) as writer:
        return writer.append(token_arrays)


class ShardWriter:
    """One shard written as its documents come: ``append`` writes a batch of token arrays at once (memory holds
    one batch, never the shard) and returns their (offsets, lengths); the file appears, atomically, when the
    ``with`` block ends without an error or at ``close()`` (a temporary file in the same folder, then
    ``os.replace``); an error or ``abort()`` leaves nothing behind. With ``vocab``, ``counts`` is the frequency of every id 0 .. vocab-1."""

    def __init__(self, path: str | Path, dtype: str = "uint16", vocab: int | None = None):
        self.path = Path(path)
        self.dtype = _np_dtype(dtype)
        self.dtype_name = str(dtype)
        self.tokens = 0
        self.counts = np.zeros(vocab, dtype=np.int64) if vocab else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> ShardWriter:
        return self

    def append(self, token_arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        limit = np.iinfo(self.dtype).max
        lengths = np.fromiter((len(a) for a in token_arrays), dtype=np.int64, count=len(token_arrays))
        offsets = self.tokens + np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
        for a in token_arrays:
            arr = np.asarray(a)
            if arr.size == 0:
                continue
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise ValueError(f"token arrays must be 1-D integer arrays, got {arr.dtype} with shape {arr.shape}")
            if arr.min() < 0 or arr.max() > limit:
                raise ValueError(f"token id out of range for {self.dtype_name}: [{arr.min()}, {arr.max()}]")
            if self.counts is not None:
                self.counts += count_tokens([arr], len(self.counts))
            self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.tokens += int(lengths.sum())
        return offsets, lengths

    def close(self) -> None:
        """The file is complete: it appears under its name."""
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop what was written: no file appears."""
        self._file.close()
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __exit__(self, kind, error, tb) -> None:
        self.close() if kind is None else self.abort()


def write_meta(dir: str, meta: dict[str, Any]) -> None:
    """Write ``<dir>/pool.json`` atomically; fills ``format`` and checks the required keys."""
    meta = {"format": FORMAT, **meta}
    missing = [k for k in ("dtype", "eos_id", "tokenizer_vocab", "shards") if k not in meta]
    if missing:
        raise ValueError(f"pool meta lacks {missing}")
    _np_dtype(meta["dtype"])
    data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    _atomic_write_bytes(Path(dir) / META_FILE, lambda f: f.write(data))


def count_tokens(arrays: Iterable[np.ndarray], vocab: int) -> np.ndarray:
    """int64 frequency of every id ``0 .. vocab-1`` over ``arrays`` (ids >= vocab raise ``ValueError``)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for a in arrays:
        arr = np.asarray(a)
        if arr.size == 0:
            continue
        arr = arr.astype(np.int64, copy=False)
        if arr.min() < 0 or arr.max() >= vocab:
            raise ValueError(f"token id out of range [0, {vocab}): [{arr.min()}, {arr.max()}]")
        counts += np.bincount(arr, minlength=vocab)
    return counts


def write_token_counts(dir: str, counts: np.ndarray) -> None:
    """Write ``<dir>/token_counts.npy`` atomically."""
    arr = np.asarray(counts, dtype=np.int64)
    _atomic_write_bytes(Path(dir) / COUNTS_FILE, lambda f: np.save(f, arr))


class TokenStore:
    """Read side of a token pool: ``TokenStore.open(dir)``; shards are memory-mapped on first use."""

    def __init__(self, dir: str | Path, meta: dict[str, Any]):
        self.dir = Path(dir)
        self.meta = meta
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.dtype = _np_dtype(meta["dtype"])
        self.eos_id = int(meta["eos_id"])
        self.tokenizer_vocab = int(meta["tokenizer_vocab"])
        self.shards: list[str] = list(meta["shards"])
        self._maps: dict[int, np.ndarray] = {}
        self._counts: np.ndarray | None = None

    @classmethod
    def open(cls, dir: str | Path) -> TokenStore:
        path = Path(dir) / META_FILE
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no token pool at {dir} (missing {META_FILE})") from None
        return cls(dir, meta)

    def shard_path(self, shard: int) -> Path:
        return self.dir / SHARDS_DIR / self.shards[shard]

    def shard(self, shard: int) -> np.ndarray:
        """The whole shard as a read-only memory map (an empty array for an empty file)."""
        m = self._maps.get(shard)
        if m is None:
            if not 0 <= shard < len(self.shards):
                raise IndexError(f"shard {shard} not in [0, {len(self.shards)})")
            path = self.shard_path(shard)
            if path.stat().st_size == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(path, dtype=self.dtype, mode="r")
            self._maps[shard] = m
        return m

    def doc(self, shard: int, offset: int, length: int) -> np.ndarray:
        """The tokens of one document (a view of the memory map, in the store's dtype)."""
        m = self.shard(int(shard))
        offset, length = int(offset), int(length)
        if offset < 0 or length < 0 or offset + length > m.shape[0]:
            raise IndexError(f"document [{offset}, {offset + length}) outside shard {shard} of {m.shape[0]} tokens")
        return m[offset : offset + length]

    def n_tokens(self) -> int:
        """Tokens over all shards."""
        return sum(self.shard(i).shape[0] for i in range(len(self.shards)))

    def token_counts(self) -> np.ndarray:
        """int64 frequency per token id (``token_counts.npy``), length ``tokenizer_vocab``."""
        if self._counts is None:
            counts = np.load(self.dir / COUNTS_FILE).astype(np.int64, copy=False)
            if counts.shape != (self.tokenizer_vocab,):
                raise ValueError(f"{COUNTS_FILE} has shape {counts.shape}, expected ({self.tokenizer_vocab},)")
            self._counts = counts
        return self._counts

    def __getstate__(self):  # picklable for Spark tasks: memory maps are re-opened on the other side
        return {"dir": str(self.dir), "meta": self.meta}

    def __setstate__(self, state):
        self.__init__(state["dir"], state["meta"])
