"""Proxy training (spec §2.6, §3.2, §6.2): the transformer proxy trained on the θ data stream and evaluated on
the target set. The data side (settings, vocabulary map, stream, target set, result) is
:mod:`quadmix_spark.search.proxy_data`, which needs no torch.

- :func:`evaluate`: the target set's per-task mean token loss under a model.
- :func:`train_proxy`: AdamW, linear warm-up then cosine to ``min_lr``, gradient accumulation, bf16 autocast
  on CUDA; returns a :class:`~quadmix_spark.search.proxy_data.ProxyResult`.

Only numpy and torch are imported at module level (pandas is not needed: a plan is read column by column),
so ``bench/gpu_proxy.py`` runs on a machine with just torch and numpy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from quadmix_spark.search.proxy_data import EvalSet, ProxyResult, TrainSettings, VocabMap, _task_weights, iter_windows
from quadmix_spark.search.proxy_model import ModelShape, ProxyLM, count_params


def lr_at(step: int, steps: int, s: TrainSettings) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then cosine from ``lr``
    to ``min_lr`` over the remaining steps (constant when ``min_lr == lr``)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.min_lr == s.lr:
        return s.lr
    span = max(1, steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, s: TrainSettings, device: str | torch.device = "cpu") -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights only (fused on CUDA)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), **extra)


def autocast_for(device: str | torch.device, precision: str):
    """bf16 autocast on CUDA when ``precision == "bf16"``; a no-op elsewhere (CPU always trains in fp32)."""
    dev = torch.device(device)
    if dev.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: ProxyLM, eval_set: EvalSet, vocab_map: VocabMap, device: str | torch.device = "cpu",
             batch_size: int = 32, task_weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """``(target_loss, {task: loss})``: per task the mean token cross-entropy over every predicted token of
    its examples (each example its own sequence, batched by length with padding masked out, at most the
    model's ``seq_len`` inputs); target_loss is the equal-weight mean over tasks, or the ``task_weights``
    mean (normalized; tasks without a weight count 0).  Runs in float32."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    n_tasks = len(eval_set.task_names)
    sums = np.zeros(n_tasks, dtype=np.float64)
    counts = np.zeros(n_tasks, dtype=np.int64)
    max_in = model.shape.seq_len
    lengths = np.minimum(eval_set.lengths, max_in + 1)
    order = np.argsort(lengths, kind="stable")
    ce_chunk = max(1, (1 << 27) // (4 * model.shape.vocab_size))  # logits rows per chunk: ~128 MiB in fp32
    try:
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size]
            T = int(lengths[idx].max()) - 1
            inp = np.zeros((len(idx), T), dtype=np.int64)
            tgt = np.zeros((len(idx), T), dtype=np.int64)
            mask = np.zeros((len(idx), T), dtype=bool)
            for r, i in enumerate(idx):
                seq = vocab_map.apply(eval_set.example(i)[: lengths[i]])
                n = seq.shape[0] - 1
                inp[r, :n], tgt[r, :n], mask[r, :n] = seq[:-1], seq[1:], True
            h = model.hidden(torch.from_numpy(inp).to(dev))
            m = torch.from_numpy(mask).to(dev)
            hs, ts = h[m], torch.from_numpy(tgt).to(dev)[m]
            row_task = np.repeat(eval_set.task_index[idx], lengths[idx] - 1)
            ce = torch.cat([
                torch.nn.functional.cross_entropy(model.head(hs[c : c + ce_chunk]).float(), ts[c : c + ce_chunk],
                                                  reduction="none")
                for c in range(0, hs.shape[0], ce_chunk)
            ]).double().cpu().numpy()
            sums += np.bincount(row_task, weights=ce, minlength=n_tasks)
            counts += np.bincount(row_task, minlength=n_tasks)
    finally:
        model.train(was_training)
    present = [i for i in range(n_tasks) if counts[i] > 0]
    names = [eval_set.task_names[i] for i in present]
    losses = {eval_set.task_names[i]: float(sums[i] / counts[i]) for i in present}
    if not names:
        raise ValueError("the target set has no predicted tokens")
    w = _task_weights(names, task_weights)
    return float(np.dot(w, [losses[t] for t in names])), losses


# ---------------------------------------------------------------- training


def _next_batch(windows: Iterator[np.ndarray], n: int, device: torch.device) -> torch.Tensor:
    arr = torch.from_numpy(np.stack([next(windows) for _ in range(n)]))
    if device.type == "cuda":
        return arr.pin_memory().to(device, non_blocking=True)
    return arr


def run_training(model: torch.nn.Module, windows: Iterator[np.ndarray], settings: TrainSettings, seq_len: int,
                 device: str | torch.device = "cpu", steps: int | None = None,
                 on_metrics: Callable[[dict, int], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 forward_model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The optimizer loop over ``windows`` (arrays of ``seq_len + 1`` ids): ``steps`` (default
    ``settings.steps(seq_len)``) steps of ``settings.batch_size`` sequences in micro-batches.

    ``forward_model`` (e.g. ``torch.compile(LossModule(model))``), when given, is called as
    ``forward_model(idx, targets) -> mean loss``; ``model`` owns the parameters.  ``on_step(step)`` follows every optimizer step with ``step`` = steps done (1-based);
    ``on_metrics({"train_loss", "lr", "tokens"}, step)`` every ``log_every`` steps and after the last,
    train_loss being the mean step loss since the previous report.  Returns
    ``{"steps", "tokens", "final_train_loss"}``."""
    dev = torch.device(device)
    steps = settings.steps(seq_len) if steps is None else int(steps)
    fwd = forward_model if forward_model is not None else model
    opt = build_optimizer(model, settings, dev)
    micro = settings.micro_batches()
    total = float(sum(micro))
    model.train()
    window_loss = torch.zeros((), device=dev)
    window_steps, last = 0, float("nan")
    tokens = 0
    for step in range(steps):
        lr = lr_at(step, steps, settings)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=dev)
        for n in micro:
            batch = _next_batch(windows, n, dev)
            with autocast_for(dev, settings.precision):
                loss = fwd.loss(batch[:, :-1], batch[:, 1:]) if forward_model is None else fwd(batch[:, :-1], batch[:, 1:])
            (loss * (n / total)).backward()
            step_loss += loss.detach().float() * (n / total)
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += settings.batch_size * seq_len
        window_loss += step_loss
        window_steps += 1
        done = step + 1
        if on_step is not None:
            on_step(done)
        if done % settings.log_every == 0 or done == steps:
            mean = float(window_loss) / window_steps
            last = float(step_loss)
            if on_metrics is not None:
                on_metrics({"train_loss": mean, "lr": lr, "tokens": tokens}, done)
            window_loss.zero_()
            window_steps = 0
    return {"steps": steps, "tokens": tokens, "final_train_loss": last}


class LossModule(torch.nn.Module):
    """``forward(idx, targets) -> mean loss`` of a :class:`ProxyLM`, a single graph for ``torch.compile``."""

    def __init__(self, model: ProxyLM):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(idx, targets)


def train_proxy(plan, store, eval_set: EvalSet, shape: ModelShape, settings: TrainSettings, theta_key: int,
                sample_seed: int, device: str = "cpu", on_metrics: Callable[[dict, int], None] | None = None,
                on_step: Callable[[int], None] | None = None,
                task_weights: dict[str, float] | None = None,
                extra_eval_sets: dict[str, EvalSet] | None = None) -> ProxyResult:
    """Train one proxy on the θ plan and evaluate it on the target set (spec §3.2), and on each of
    ``extra_eval_sets`` (``ProxyResult.extra_losses``).

    The vocabulary map comes from ``store.token_counts()`` and ``shape.vocab_size``; torch is seeded with
    ``settings.seed`` (init) and the data order with it too.  Deterministic on CPU for a fixed seed.
    ``on_step`` exceptions propagate (fault injection)."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    vocab_map = VocabMap.build(store.token_counts(), shape.vocab_size, store.eos_id)
    stream = iter_windows(plan, store, vocab_map, shape.seq_len, theta_key, sample_seed, settings.seed)
    torch.manual_seed(settings.seed)
    model = ProxyLM(shape).to(dev)
    non_emb, total = count_params(model)
    t_train = time.perf_counter()
    out = run_training(model, stream, settings, shape.seq_len, dev, on_metrics=on_metrics, on_step=on_step)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_s = time.perf_counter() - t_train
    target_loss, task_losses = evaluate(model, eval_set, vocab_map, dev, task_weights=task_weights)
    extra = {name: evaluate(model, es, vocab_map, dev, task_weights=task_weights) for name, es in (extra_eval_sets or {}).items()}
    return ProxyResult(
        target_loss=target_loss,
        task_losses=task_losses,
        tokens=out["tokens"],
        steps=out["steps"],
        epochs=stream.epochs_started,
        seconds=time.perf_counter() - t0,
        tokens_per_s=out["tokens"] / train_s if train_s > 0 else float("nan"),
        final_train_loss=out["final_train_loss"],
        params_non_embedding=non_emb,
        params_total=total,
        extra_losses=extra,
    )
