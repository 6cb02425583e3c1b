"""Pure-numpy kernel of the QuaDMix mathematics (arXiv 2504.16511).

No Spark in here: every module imports numpy (and yaml/json for θ files) only, so the
same functions serve as the reference implementation the distributed stages are tested
against.

Modules, in pipeline order:

- :mod:`.sigma`       per-criterion normalization σ (flipped token-weighted percentile, or z-score)
- :mod:`.merge`       merged quality score q̄ (Eq. 1)
- :mod:`.rank`        token-weighted within-domain rank r̄ (Eq. 2)
- :mod:`.sampling_fn` sampling value S(r̄) (Eq. 3) and its expectation per domain
- :mod:`.theta`       the parameter set θ, Algorithm 1, top-k averaging, θ files
- :mod:`.copies`      deterministic realized copies from a Spark-compatible xxhash64 uniform

Conventions: raw scorer outputs are higher = better; σ, q̄ and r̄ are smaller = better.
"""

from quadmix_spark.kernel.copies import (
    hash_uniform,
    realized_copies,
    spark_uniform_expr_sql,
    xxhash64_bytes,
    xxhash64_long,
)
from quadmix_spark.kernel.merge import merged_score
from quadmix_spark.kernel.rank import within_domain_rank
from quadmix_spark.kernel.sampling_fn import (
    expected_from_rank_knots,
    expected_sampling_value,
    expected_tokens_per_domain,
    sampling_value,
)
from quadmix_spark.kernel.sigma import (
    Knots,
    flipped_percentile,
    map_scores,
    percentile_knots,
    zscore_knots,
    zscore_map,
    zscore_params,
)
from quadmix_spark.kernel.theta import (
    Theta,
    ThetaMismatchError,
    average_top_k,
    feature_names,
    flatten,
    load_theta,
    sample_theta_matrix,
    sample_thetas,
    save_theta,
    unflatten,
)

__all__ = [
    "Knots",
    "Theta",
    "ThetaMismatchError",
    "average_top_k",
    "expected_from_rank_knots",
    "expected_sampling_value",
    "expected_tokens_per_domain",
    "feature_names",
    "flatten",
    "flipped_percentile",
    "hash_uniform",
    "load_theta",
    "map_scores",
    "merged_score",
    "percentile_knots",
    "realized_copies",
    "sample_theta_matrix",
    "sample_thetas",
    "sampling_value",
    "save_theta",
    "spark_uniform_expr_sql",
    "unflatten",
    "within_domain_rank",
    "xxhash64_bytes",
    "xxhash64_long",
    "zscore_knots",
    "zscore_map",
    "zscore_params",
]
