"""A small causal language model of reference text, exported as an ``onnx_causal_lm`` perplexity scorer.

The CCNet / DCLM idea of a perplexity criterion: a language model of text we want (here the reference
sets: Wikipedia pieces and assistant answers) gives each document its mean log-likelihood per token, higher =
closer to the reference. The model is the proxy model (:class:`~quadmix_spark.search.proxy_model.ProxyLM`) trained
with the proxy trainer's loop (:func:`~quadmix_spark.search.proxy_train.run_training`) on the reference pieces of
the training split, each followed by the end-of-text token, in consecutive windows (order fixed by ``seed``).

Vocabulary: the model predicts the ``lm_vocab - 1`` most frequent token ids of its training text plus one
shared "rare" class (:class:`~quadmix_spark.search.proxy_data.VocabMap`). The exported graph takes the tokenizer's
ids and gives logits over the tokenizer's whole vocabulary: a rare token's logit is its class's minus the
log of the class's size, so the softmax spreads the rare class's probability evenly over its members and the
exported model is a proper distribution over every token id (what the scorer's log-softmax assumes). It also
outputs the class logits and declares the token-to-class table in its metadata
(:data:`quadmix_udfs.onnx_causal_lm.CLASSES_KEY`), so the scorer takes the softmax over 4,096 classes instead
of 50,280 logits per token.

Deterministic on CPU for a given seed and training text (torch's CPU kernels, one thread).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from quadmix_spark.search.proxy_model import ModelShape, ProxyLM
from quadmix_spark.search.proxy_data import TrainSettings, VocabMap
from quadmix_spark.search.proxy_train import run_training
from quadmix_udfs.tokens import eos_id


@dataclass(frozen=True)
class LMSettings:
    vocab: int = 4096
    d_model: int = 128
    layers: int = 2
    seq_len: int = 128
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 13


class FullVocabLM(torch.nn.Module):
    """``forward(input_ids[B, T]) -> (logits[B, T, tokenizer vocabulary], class_logits[B, T, classes])`` of a
    compact-vocabulary model: P(token) = softmax(class_logits)[its class] / the class's size."""

    def __init__(self, lm: ProxyLM, vocab_map: VocabMap):
        super().__init__()
        self.lm = lm
        table = torch.from_numpy(np.asarray(vocab_map.table, dtype=np.int64))
        members = torch.bincount(table, minlength=vocab_map.vocab_size).clamp_min(1).double()
        self.register_buffer("table", table)
        self.register_buffer("offset", (-members.log()).float())  # per class, added before the expansion

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        compact = self.lm(self.table[input_ids])
        return (compact + self.offset).index_select(-1, self.table), compact


def token_stream(texts: list[str], tokenizer_path: str) -> tuple[np.ndarray, int, int]:
    """(every text's ids followed by end-of-text, concatenated; the end-of-text id; the tokenizer's vocabulary)."""
    from quadmix_udfs.tokens import load_encoder, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    eos = eos_id(tok)
    encoded = load_encoder(tokenizer_path).encode_batch(texts)
    stream = np.concatenate([np.append(np.asarray(ids, dtype=np.int64), eos) for ids in encoded]) if texts else np.zeros(0, np.int64)
    return stream, eos, tok.get_vocab_size(with_added_tokens=True)


def _windows(stream: np.ndarray, seq_len: int, seed: int):
    """Endless windows of ``seq_len + 1`` ids: the stream's consecutive windows, reshuffled every pass."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the training text has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(n):
            yield stream[i * seq_len: i * seq_len + seq_len + 1]


def train_causal_lm(texts: list[str], tokenizer_path: str, s: LMSettings) -> tuple[FullVocabLM, dict]:
    """The trained model (in eval mode) and its training figures."""
    stream, eos, vocab = token_stream(texts, tokenizer_path)
    counts = np.bincount(stream, minlength=vocab)
    vocab_map = VocabMap.build(counts, min(s.vocab, vocab), eos)
    if vocab_map.identity:
        vocab_map = VocabMap(np.arange(vocab, dtype=np.int64), vocab, identity=False)
    heads = max(1, s.d_model // 32)
    shape = ModelShape(vocab_size=vocab_map.vocab_size, n_layer=s.layers, n_head=heads, d_model=s.d_model,
                       ffn=2 * s.d_model, seq_len=s.seq_len)
    torch.manual_seed(s.seed)
    lm = ProxyLM(shape)
    compact = (vocab_map.apply(w) for w in _windows(stream, s.seq_len, s.seed))
    settings = TrainSettings(tokens=s.steps * s.batch_size * s.seq_len, batch_size=s.batch_size,
                             micro_batch_size=s.batch_size, lr=s.lr, min_lr=s.lr / 10,
                             warmup_steps=max(1, s.steps // 10), seed=s.seed, precision="fp32")
    out = run_training(lm, compact, settings, s.seq_len, "cpu", steps=s.steps)
    lm.eval()
    stats = {"train_tokens": int(len(stream)), "lm_train_loss": float(out["final_train_loss"]),
             "lm_train_ppl": float(math.exp(out["final_train_loss"])), "lm_vocab": int(vocab_map.vocab_size)}
    return FullVocabLM(lm, vocab_map).eval(), stats


def export_onnx(model: FullVocabLM, path: str) -> None:
    """The model as ONNX (``input_ids [batch, sequence] -> logits [batch, sequence, vocabulary], class_logits
    [batch, sequence, classes]``, opset 17), declaring its token-to-class table (``table``) in its metadata."""
    import json
    import warnings

    import onnx

    from quadmix_udfs.onnx_causal_lm import CLASSES_KEY

    example = torch.zeros((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), path, input_names=["input_ids"], output_names=["logits", "class_logits"],
                          dynamic_axes={"input_ids": axes, "logits": axes, "class_logits": axes},
                          opset_version=17, dynamo=False)
    exported = onnx.load(path)
    if not any(t.name == "table" and list(t.dims) == [len(model.table)] for t in exported.graph.initializer):
        raise RuntimeError(f"the ONNX export of {path} has no initializer 'table' [{len(model.table)}] to declare")
    entry = exported.metadata_props.add()
    entry.key, entry.value = CLASSES_KEY, json.dumps({"class_logits": "class_logits", "token_class": "table"})
    onnx.save(exported, path)
