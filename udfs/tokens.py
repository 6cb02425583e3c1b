"""Token counts and ids for a Hugging Face ``tokenizer.json`` (the GPT-NeoX one by default).

Byte-level BPE files go through :mod:`quadmix_udfs.bpe_fast` (the ids ``tokenizers`` gives, several times
faster); other files, and those using a feature the fast path does not reproduce, through ``tokenizers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pandas as pd
from pyspark.sql import Column
from pyspark.sql.functions import pandas_udf

from quadmix_udfs.files import local_path

EOS_NAMES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>")  # the end-of-text token, by the names tokenizers give it


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The ``tokenizers`` tokenizer at ``path``, loaded once per Python worker, padding and truncation off
    (for its vocabulary and special tokens; texts are counted and encoded by :func:`load_encoder`)."""
    return load_encoder(path).tokenizer


@lru_cache(maxsize=8)
def load_encoder(path: str, fast: bool = True):
    """The :class:`~quadmix_udfs.bpe_fast.Encoder` of ``path``, loaded once per Python worker."""
    from quadmix_udfs.bpe_fast import load_encoder as load

    return load(local_path(path), fast=fast)


def count_tokens(texts: list[str], tokenizer_path: str, batch_size: int = 256, fast: bool = True) -> np.ndarray:
    """Number of tokens of each text (no special tokens added)."""
    return load_encoder(tokenizer_path, fast).count_batch(texts, batch_size)


TEXT_COUNTS = "struct<n_tokens: bigint, n_chars: int>"


def text_counts_column(text: Column, tokenizer_path: str, batch_size: int = 256, fast: bool = True) -> Column:
    """A ``struct<n_tokens bigint, n_chars int>`` column: the token count of ``text`` and its length in
    characters (code points: what Spark's ``char_length`` gives for the valid UTF-8 that reaches Python), both
    null where ``text`` is null. The length is read off the Python string the tokenizer counts, so no JVM
    pass over the text is needed for it."""

    @pandas_udf(TEXT_COUNTS)
    def _counts(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for texts in batches:
            mask = texts.notna().to_numpy()
            tokens = pd.Series(pd.NA, index=texts.index, dtype="Int64")
            chars = pd.Series(pd.NA, index=texts.index, dtype="Int32")
            if mask.any():
                kept = texts[mask].tolist()
                tokens[mask] = count_tokens(kept, tokenizer_path, batch_size, fast)
                chars[mask] = np.fromiter(map(len, kept), dtype=np.int32, count=len(kept))
            yield pd.DataFrame({"n_tokens": tokens, "n_chars": chars})

    return _counts(text)


def eos_id(tok) -> int:
    """The id of a ``tokenizers.Tokenizer``'s end-of-text token (the first of :data:`EOS_NAMES` it has): the
    separator of packed documents in the proxy pool, the token export and the reference LM."""
    for name in EOS_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError(f"the tokenizer has no end-of-text token ({', '.join(EOS_NAMES)})")
