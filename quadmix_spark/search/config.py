"""Config sections of the search half of the pipeline: ``search`` (propose, LightGBM search),
``proxy`` (pool, proxy model shape, training, target set, task resources) and ``evaluate``.

Defaults follow spec §3 and §6 (RegMix's tinyllama_1M proxy shape; RegMix's LightGBM settings with a
faster learning rate, see ``DEFAULT_LIGHTGBM``); the demo and tests override the sizes with tiny values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from quadmix_spark.core.config_base import Section

# RegMix's regression settings exactly (spec §6.3): gbdt, L2, learning rate 0.01, up to 1,000 trees, seed 42.
REGMIX_LIGHTGBM: dict[str, Any] = {
    "boosting_type": "gbdt",
    "objective": "regression",
    "learning_rate": 0.01,
    "n_estimators": 1000,
    "num_leaves": 31,
    "min_child_samples": 20,
    "random_state": 42,
    "verbosity": -1,
}

# Our defaults: RegMix's, with three changes measured by `python -m bench.search_lr_study` (3,000 synthetic
# runs x 182 features, 10 seeds, judged by the noise-free loss of the θ* each search finds):
# - learning rate 0.1 (LightGBM's own default) instead of 0.01: early stopping (patience 3) then ends near
#   200 trees instead of running all 1,000, so the fit and the 100,000 candidate predictions cost 5x less,
#   with the same validation error (MAE 0.136 vs 0.138, Spearman 0.967 vs 0.967) and an equally good θ*
#   (true loss 0.008 lower, paired standard error 0.020);
# - 63 feature bins instead of 255: 3x faster histograms on a few thousand rows, same validation error;
# - col-wise histograms forced (skips LightGBM's row/col probe).
# ``search.lightgbm: {learning_rate: 0.01, max_bin: 255}`` restores RegMix's.
DEFAULT_LIGHTGBM: dict[str, Any] = {**REGMIX_LIGHTGBM, "learning_rate": 0.1, "max_bin": 63, "force_col_wise": True}


class SearchConfig(Section):
    """One search = one MLflow parent run named by ``name``; its θ are drawn with Algorithm 1."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="search name (MLflow tag quadmix.search)")
    n_proposals: int = Field(64, gt=0, description="K θ proposed by `quadmix propose` (its -n overrides)")
    seed: int = Field(42, ge=0, description="seed of Algorithm 1 for the proposals (θ i uses (seed, i))")
    lambda_mode: Literal["log", "linear"] = Field("log", description="λ̃ = 10^{3u} (log) or 1000u (linear), spec §5-A2")
    shared_omega: float = Field(0.0, ge=0, le=1, description="share of proposals and candidates drawn with one ω̃ for "
                                "all domains (times exp(omega_spread·z)), which keeps the kept tokens' domain shares near the "
                                "pool's; 0 = Algorithm 1 exactly (not in the paper)")
    omega_spread: float = Field(0.25, ge=0, le=2, description="per-domain log-normal spread of ω̃ in the shared-ω̃ draws")
    criteria: list[str] | None = Field(None, description="criteria with non-zero weight (ablations); null = all")
    metric: str = Field("target_loss", description="the child-run metric the regression fits")
    min_runs: int = Field(32, ge=4, description="fewest finished proxy runs a fit accepts")
    features: Literal["theta", "mix", "both"] = Field(
        "both", description="what LightGBM sees: theta (the θ vector), mix (the domain shares, criterion weights and size "
                            "θ implies for the pool), both; mix needs the pool's domain tokens that propose records")
    cv_folds: int = Field(5, ge=2, description="K of the K-fold cross-validation over θ that gives the fit's out-of-sample MAE/Spearman")
    val_fraction: float = Field(200 / 3000, gt=0, lt=1, description="share of a fold's training runs held out for early stopping")
    early_stopping_rounds: int = Field(3, ge=1)
    lightgbm: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_LIGHTGBM), description="LGBMRegressor params over DEFAULT_LIGHTGBM")
    n_candidates: int = Field(100_000, gt=0, description="θ drawn from Algorithm 1 and scored by the regressor")
    top_k: int = Field(10, gt=0, description="θ* = element-wise mean of the k best candidates")
    theta_star: Literal["candidates", "trained"] = Field(
        "candidates", description="what θ* averages: candidates (the top_k of n_candidates Algorithm-1 draws the fit "
                                  "predicts best: the paper) or trained (the top_k trained θ by their measured metric: for "
                                  "a search whose θ are already another fit's best candidates, `propose --refine N --from`)")
    candidate_seed: int = Field(4242, ge=0)

    @field_validator("lightgbm")
    @classmethod
    def _merge_defaults(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {**DEFAULT_LIGHTGBM, **v}


class PoolConfig(Section):
    """The proxy pool: a fixed hash-chosen share of the corpus, tokenized once into packed shards."""

    fraction: float = Field(1.0, gt=0, le=1, description="share of documents in the pool (by a hash of doc_id)")
    seed: int = Field(0, description="seed of the pool's doc_id hash")
    shards: int = Field(16, gt=0, description="token shard files (one Spark task each)")
    tokenizer: str | None = Field(None, description="tokenizer.json; null = ingest.tokenizer")
    batch_size: int = Field(256, gt=0, description="texts per tokenizer call")


class ModelShapeConfig(Section):
    """The proxy model. ``transformer`` (default): a LLaMA-style LM (RMSNorm, RoPE, SwiGLU), RegMix
    tinyllama_1M by default. ``ngram``: a screening proxy, an interpolated Kneser–Ney n-gram LM of ``order``
    over the same compacted vocabulary, fitted on the same data stream (``quadmix_spark.search.ngram_lm``): hundreds of
    times cheaper, for screening thousands of θ on CPU; the layer settings are then unused."""

    kind: Literal["transformer", "ngram"] = Field("transformer", description="transformer | ngram (the screening proxy)")
    order: int = Field(3, ge=1, le=5, description="ngram: the n of the n-gram model")
    ngram_counts: Literal["unique", "repeated"] = Field(
        "unique", description="ngram: count each document read within the budget once (unique), or every instance "
                              "(repeated: Kneser-Ney's discounts degrade as documents repeat)")
    vocab_size: int = Field(50432, gt=1, description="below the tokenizer's vocab, ids are compacted by pool frequency")
    n_layer: int = Field(2, gt=0)
    n_head: int = Field(8, gt=0)
    d_model: int = Field(256, gt=0)
    ffn: int = Field(512, gt=0)
    seq_len: int = Field(2048, gt=1)
    rope_base: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)


class ProxyTrainConfig(Section):
    tokens: int = Field(1_000_000_000, gt=0, description="training tokens per proxy (spec: 1B)")
    batch_size: int = Field(512, gt=0, description="sequences per optimizer step")
    micro_batch_size: int = Field(16, gt=0, description="sequences per forward pass")
    lr: float = Field(4e-4, gt=0)
    min_lr: float = Field(4e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = Field(0, description="model init and data order")
    log_every: int = Field(50, gt=0, description="steps between train-loss metrics")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="autocast dtype on GPU (CPU always fp32)")


class TargetConfig(Section):
    """The proxy's target set: `bmk` (shared target validation tasks) or `oh` (reference assistant text)."""

    kind: Literal["bmk", "oh"] = "bmk"
    bmk_path: str = "${QUADMIX_SHARED:-../shared}/data/target/target_val_texts.jsonl.gz"
    oh_path: str = "${QUADMIX_SHARED:-../shared}/data/reference/alpaca_eval_outputs.jsonl.gz"
    tasks: list[str] | None = Field(None, description="bmk tasks used; null = all")
    task_weights: dict[str, float] | None = Field(None, description="bmk weights; null = equal-weight mean")
    max_examples_per_task: int = Field(1000, gt=0, description="examples per task (oh: in total)")
    seed: int = Field(0, description="which examples are drawn")
    max_len: int | None = Field(None, gt=1, description="tokens per example; null = model seq_len")
    holdout_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of target examples (by a hash of task and text) kept for `quadmix evaluate`: "
                                     "search proxies never see them"
    )


class ProxyConfig(Section):
    pool: PoolConfig = Field(default_factory=PoolConfig)
    model: ModelShapeConfig = Field(default_factory=ModelShapeConfig)
    train: ProxyTrainConfig = Field(default_factory=ProxyTrainConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    mode: Literal["spark", "local"] = Field("spark", description="one Spark task per θ, or in the driver process")
    submit_chunk: int = Field(256, gt=0, description="proxies per Spark job: thousands of θ go as several jobs, so "
                              "the driver holds one job's tasks and outcomes at a time")
    gpus_per_task: float = Field(0.0, ge=0, description="GPUs requested per proxy task (fractions pack several)")
    cpus_per_task: int = Field(1, gt=0, description="CPU cores per proxy task (torch threads)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the task's GPU if any, else CPU")
    fail_theta_ids: list[str] = Field(default_factory=list, description="fault injection for tests: these θ crash")
    fail_at_step: int = Field(1, ge=0, description="step at which fail_theta_ids crash")


class EvaluateConfig(Section):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1, description="proxy seeds per arm")
    baseline_fraction: float | Literal["match"] = Field(
        "match", description="share of the pool's tokens the baselines keep: match = the share θ* keeps (its documents "
                             "with S >= 1), so every arm selects as many unique tokens and only which ones differs "
                             "(the paper's comparison at equal selected tokens); or a number in (0, 1]")

    @field_validator("baseline_fraction")
    @classmethod
    def _fraction(cls, v):
        if v != "match" and not 0 < v <= 1:
            raise ValueError("must be 'match' or a number in (0, 1]")
        return v
    baselines: list[str] = Field(default_factory=lambda: ["random", "topk:*", "mix"],
                                 description="random | topk:<criterion> | topk:* (each criterion) | mix")
