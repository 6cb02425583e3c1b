"""Token counts with a Hugging Face ``tokenizers`` ``tokenizer.json`` (the GPT-NeoX one by default)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pandas as pd
from pyspark.sql import Column
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import LongType

from quadmix_udfs.files import local_path


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer at ``path``, loaded once per Python worker, with padding and truncation off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(local_path(path))
    tok.no_padding()
    tok.no_truncation()
    return tok


def count_tokens(texts: list[str], tokenizer_path: str, batch_size: int = 256) -> np.ndarray:
    """Number of tokens of each text (no special tokens added)."""
    tok = load_tokenizer(tokenizer_path)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out = np.empty(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        out[start : start + len(chunk)] = [len(e.ids) for e in encode(chunk, add_special_tokens=False)]
    return out


def token_count_column(text: Column, tokenizer_path: str, batch_size: int = 256) -> Column:
    """A bigint column with the token count of ``text`` (null text -> null)."""

    @pandas_udf(LongType())
    def _count(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for texts in batches:
            mask = texts.notna().to_numpy()
            counts = pd.Series(pd.NA, index=texts.index, dtype="Int64")
            if mask.any():
                counts[mask] = count_tokens(texts[mask].tolist(), tokenizer_path, batch_size)
            yield counts

    return _count(text)
