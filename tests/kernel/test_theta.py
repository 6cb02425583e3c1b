import json

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

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
from tests.kernel._helpers import FAST, SLOW

DOMAINS = ("Health", "Science", "Sports", "News", "Finance")
CRITERIA = ("askllm", "fineweb_edu", "dclm")
modes = st.sampled_from(["log", "linear"])
seeds = st.integers(0, 2**32 - 1)


def one_theta(seed=0, mode="log"):
    return sample_thetas(DOMAINS, CRITERIA, 1, seed, mode)[0]


# -- Algorithm 1 ------------------------------------------------------------------------------
@FAST
@given(seeds, modes)
def test_algorithm1_alpha_on_simplex_and_ranges(seed, mode):
    b = sample_theta_matrix(300, len(DOMAINS), len(CRITERIA), seed, mode)
    assert b.alpha.shape == (300, 5, 3) and b.lam.shape == b.omega.shape == (300, 5)
    assert (b.alpha >= 0).all()
    np.testing.assert_allclose(b.alpha.sum(axis=2), 1.0, atol=1e-12)
    assert b.lam.min() >= (1.0 if mode == "log" else 0.0) and b.lam.max() <= 1000.0
    assert 0 <= b.omega.min() and b.omega.max() <= 0.1
    assert 0 <= b.eta.min() and b.eta.max() <= 1.0
    assert 0 <= b.eps.min() and b.eps.max() <= 1e-3


@FAST
@given(seeds, modes)
def test_same_seed_same_draws_and_thetas_match_matrix_rows(seed, mode):
    a = sample_theta_matrix(20, 5, 3, seed, mode)
    b = sample_theta_matrix(20, 5, 3, np.random.default_rng(seed), mode)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    thetas = sample_thetas(DOMAINS, CRITERIA, 20, seed, mode)
    np.testing.assert_array_equal(thetas[7].alpha, a.alpha[7])
    np.testing.assert_array_equal(thetas[7].lam, a.lam[7])
    assert not np.array_equal(a.lam, sample_theta_matrix(20, 5, 3, seed + 1, mode).lam)


def _ks_uniform(x):
    x = np.sort(x)
    n = x.size
    return max((np.arange(1, n + 1) / n - x).max(), (x - np.arange(n) / n).max())


@pytest.mark.parametrize("mode", ["log", "linear"])
def test_lambda_distribution_matches_its_mode(mode):
    lam = sample_theta_matrix(8000, 26, 3, 2024, mode).lam.ravel()  # 208,000 draws
    u = np.log10(lam) / 3 if mode == "log" else lam / 1000
    assert _ks_uniform(u) < 0.006  # KS 1% critical value at n = 208k is ~0.0036
    other = lam / 1000 if mode == "log" else np.log10(np.maximum(lam, 1)) / 3
    assert _ks_uniform(other) > 0.1  # and clearly not the other reading


def test_global_weights_couple_domains_and_ablation_zeroes_a_criterion():
    b = sample_theta_matrix(4000, 26, 3, 5)
    # with a shared global factor, a criterion's weights are correlated across domains
    corr = np.corrcoef(b.alpha[:, 0, 0], b.alpha[:, 1, 0])[0, 1]
    assert corr > 0.2
    ab = sample_theta_matrix(50, 26, 3, 5, active_criteria=[True, False, True])
    assert (ab.alpha[:, :, 1] == 0).all()
    np.testing.assert_allclose(ab.alpha.sum(axis=2), 1.0, atol=1e-12)


# -- features ---------------------------------------------------------------------------------
def test_feature_names_and_flatten_round_trip():
    names = feature_names(DOMAINS, CRITERIA)
    assert len(names) == len(set(names)) == (3 + 4) * 5
    assert names[0] == "quadmix.alpha.Health.askllm" and "quadmix.epsilon.Finance" in names
    b = sample_theta_matrix(40, 5, 3, 11)
    x = flatten(*b)
    assert x.shape == (40, len(names))
    np.testing.assert_array_equal(x[:, names.index("quadmix.lambda.Sports")], b.lam[:, 2])
    np.testing.assert_array_equal(x[:, names.index("quadmix.alpha.News.fineweb_edu")], b.alpha[:, 3, 1])
    np.testing.assert_array_equal(x[:, names.index("quadmix.omega.Science")], b.omega[:, 1])
    for got, want in zip(unflatten(x, 5, 3), b):
        np.testing.assert_array_equal(got, want)
    theta = sample_thetas(DOMAINS, CRITERIA, 40, 11)[3]
    np.testing.assert_array_equal(theta.to_vector(), x[3])
    assert Theta.from_vector(x[3], DOMAINS, CRITERIA) == theta


# -- validation -------------------------------------------------------------------------------
def _arrays(theta):
    return dict(alpha=np.array(theta.alpha), lam=np.array(theta.lam), omega=np.array(theta.omega),
                eta=np.array(theta.eta), eps=np.array(theta.eps))


@pytest.mark.parametrize(
    "field,index,value,match",
    [
        ("alpha", (2, 1), 0.9, "alpha\\['Sports'\\] sums to"),
        ("alpha", (1, 2), -0.5, "alpha\\['Science'\\]\\['dclm'\\]"),
        ("omega", 3, 1.5, "omega\\['News'\\]"),
        ("lam", 0, -1.0, "lambda\\['Health'\\]"),
        ("eta", 4, -0.1, "eta\\['Finance'\\]"),
        ("eps", 1, np.nan, "epsilon\\['Science'\\]"),
    ],
)
def test_validation_names_the_offending_domain_and_criterion(field, index, value, match):
    arrays = _arrays(one_theta())
    arrays[field][index] = value
    with pytest.raises(ValueError, match=match):
        Theta(DOMAINS, CRITERIA, **arrays)


def test_validation_of_names_and_shapes():
    arrays = _arrays(one_theta())
    with pytest.raises(ValueError, match="duplicate domain"):
        Theta(("a", "a", "b", "c", "d"), CRITERIA, **arrays)
    with pytest.raises(ValueError, match="non-empty"):
        Theta(DOMAINS, ("", "x", "y"), **arrays)
    with pytest.raises(ValueError, match="shape"):
        Theta(DOMAINS[:4], CRITERIA, **arrays)


# -- identity ---------------------------------------------------------------------------------
def test_theta_id_is_stable_order_free_and_changes_with_every_value():
    theta = one_theta(3)
    assert theta.theta_id == one_theta(3).theta_id and len(theta.theta_id) == 16
    assert -(2**63) <= theta.theta_key < 2**63
    assert theta.theta_key != one_theta(4).theta_key
    rev = theta.reindex(domains=DOMAINS[::-1], criteria=CRITERIA[::-1])
    assert rev.theta_id == theta.theta_id and rev != theta
    ids = {theta.theta_id}
    for field in ("lam", "omega", "eta", "eps"):
        for i in range(len(DOMAINS)):
            arrays = _arrays(theta)
            arrays[field][i] = arrays[field][i] * 0.5 + 1e-4
            ids.add(Theta(DOMAINS, CRITERIA, **arrays).theta_id)
    for i in range(len(DOMAINS)):
        for j in range(len(CRITERIA)):
            arrays = _arrays(theta)
            k = (j + 1) % len(CRITERIA)
            delta = min(arrays["alpha"][i, k], 1e-3)
            arrays["alpha"][i, j] += delta
            arrays["alpha"][i, k] -= delta
            ids.add(Theta(DOMAINS, CRITERIA, **arrays).theta_id)
    assert len(ids) == 1 + 4 * len(DOMAINS) + len(DOMAINS) * len(CRITERIA)


# -- files ------------------------------------------------------------------------------------
@SLOW
@given(seeds, modes, st.sampled_from([".yaml", ".yml", ".json"]))
def test_file_round_trip_preserves_values_and_id(tmp_path_factory, seed, mode, ext):
    theta = one_theta(seed, mode)
    path = save_theta(theta, tmp_path_factory.mktemp("theta") / f"theta{ext}")
    back = load_theta(path, domains=DOMAINS, criteria=CRITERIA)
    assert back == theta and back.theta_id == theta.theta_id
    assert load_theta(path) == theta


def _shuffled_dict(theta):
    d = theta.to_dict()
    d["domains"] = {dom: d["domains"][dom] for dom in reversed(list(d["domains"]))}
    for entry in d["domains"].values():
        entry["alpha"] = {c: entry["alpha"][c] for c in ["dclm", "askllm", "fineweb_edu"]}
    d["criteria"] = ["fineweb_edu", "dclm", "askllm"]
    return d


def test_loading_a_reordered_file_reindexes_to_expected_names(tmp_path):
    theta = one_theta(8)
    (tmp_path / "t.json").write_text(json.dumps(_shuffled_dict(theta)))
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(_shuffled_dict(theta), sort_keys=False))
    for name in ("t.json", "t.yaml"):
        assert load_theta(tmp_path / name, domains=DOMAINS, criteria=CRITERIA) == theta
    unordered = load_theta(tmp_path / "t.json")
    assert unordered.domains == DOMAINS[::-1] and unordered.theta_id == theta.theta_id


@pytest.mark.parametrize(
    "domains,criteria,match",
    [
        (DOMAINS + ("Travel",), CRITERIA, "missing \\['Travel'\\], extra \\[\\]"),
        (DOMAINS[1:], CRITERIA, "missing \\[\\], extra \\['Health'\\]"),
        (DOMAINS, ("askllm", "dclm", "perplexity"), "missing \\['perplexity'\\], extra \\['fineweb_edu'\\]"),
    ],
)
def test_missing_or_extra_names_raise_theta_mismatch(domains, criteria, match):
    with pytest.raises(ThetaMismatchError, match=match):
        Theta.from_dict(one_theta().to_dict(), domains=domains, criteria=criteria)


def test_inconsistent_or_edited_files_are_rejected(tmp_path):
    d = one_theta().to_dict()
    del d["domains"]["News"]["alpha"]["dclm"]
    with pytest.raises(ThetaMismatchError, match="domain 'News'.*missing \\['dclm'\\]"):
        Theta.from_dict(d)
    d = one_theta().to_dict()
    d["domains"]["News"]["omega"] = 0.01234
    with pytest.raises(ValueError, match="theta_id"):
        Theta.from_dict(d)
    del d["theta_id"]
    assert Theta.from_dict(d).omega[3] == 0.01234
    with pytest.raises(ValueError, match="yaml"):
        save_theta(one_theta(), tmp_path / "theta.txt")


# -- top-k ------------------------------------------------------------------------------------
@FAST
@given(seeds, st.integers(1, 15))
def test_average_top_k_picks_lowest_scores_and_stays_on_simplex(seed, k):
    rng = np.random.default_rng(seed)
    b = sample_theta_matrix(60, 5, 3, rng)
    scores = rng.permutation(60).astype(float)  # distinct
    theta = average_top_k(*b, scores, k=k, domains=DOMAINS, criteria=CRITERIA)
    best = scores < k
    np.testing.assert_allclose(theta.lam, b.lam[best].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(theta.alpha, b.alpha[best].mean(axis=0), rtol=1e-12)
    assert (theta.alpha >= 0).all() and np.allclose(theta.alpha.sum(axis=1), 1.0, atol=1e-12)
    # candidates outside the top k do not matter
    b.lam[~best] = 999.0
    assert average_top_k(*b, scores, k=k, domains=DOMAINS, criteria=CRITERIA) == theta


def test_average_top_1_is_the_best_candidate():
    b = sample_theta_matrix(10, 5, 3, 1)
    scores = np.arange(10.0)[::-1]
    best = average_top_k(*b, scores, k=1, domains=DOMAINS, criteria=CRITERIA)
    np.testing.assert_array_equal(best.omega, b.omega[9])
    with pytest.raises(ValueError):
        average_top_k(*b, scores, k=11, domains=DOMAINS, criteria=CRITERIA)


def test_shared_omega_rows_change_only_omega_and_keep_the_pools_domain_shares():
    m, n = 12, 4000
    plain = sample_theta_matrix(n, m, 3, 5)
    mixed = sample_theta_matrix(n, m, 3, 5, shared_omega=0.5, omega_spread=0.25)
    for name in ("alpha", "lam", "eta", "eps"):  # drawn first, as without the option
        np.testing.assert_array_equal(getattr(mixed, name), getattr(plain, name))
    changed = (mixed.omega != plain.omega).any(axis=1)
    assert 0.45 < changed.mean() < 0.55
    assert 0 <= mixed.omega.min() and mixed.omega.max() <= 0.1
    tokens = np.random.default_rng(1).pareto(1.0, m) + 1.0  # a skewed pool: one domain far larger
    pool = tokens / tokens.sum()

    def tv(omega):
        kept = omega * tokens
        return 0.5 * np.abs(kept / kept.sum(axis=1, keepdims=True) - pool).sum(axis=1)

    near, far = np.median(tv(mixed.omega[changed])), np.median(tv(plain.omega[changed]))
    assert near < 0.5 * far, (near, far)
    with pytest.raises(ValueError, match="shared_omega"):
        sample_theta_matrix(3, m, 3, 5, shared_omega=1.5)
