"""knnlm.scoring against a brute-force float64 implementation of Eq. 5 written here with loops.

The reference never sees the scoring module's conventions: it gets raw keys,
queries and values, computes ⊗ itself, masks to the top k, applies the softmax
with temperature τ, aggregates per word with M, and interpolates with the LM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from knnlm import scoring

V, N, D, T = 7, 12, 3, 6


def similarity(q: list[float], key: list[float], kind: str) -> float:
    """W_ds ⊗ h_ds for one datastore row: inner product, or negative squared L2 distance."""
    if kind == "ip":
        return sum(a * b for a, b in zip(q, key, strict=True))
    return -sum((a - b) ** 2 for a, b in zip(q, key, strict=True))


def log_sum_exp(xs: list[float]) -> float:
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_knn_logprobs(q, keys, vals, k, tau, kind, allowed=None) -> list[float]:
    """log P_kNN(w) for every word w of the vocabulary (Eq. 5's second term, without λ)."""
    rows = [i for i in range(len(keys)) if allowed is None or i in allowed]
    s = {i: similarity(q, keys[i], kind) for i in rows}
    top = sorted(rows, key=lambda i: -s[i])[:k]  # mask-to-k
    total = log_sum_exp([s[i] / tau for i in top])
    out = []
    for w in range(V):  # M: sum the softmax mass of the neighbours whose value is w
        out.append(log_sum_exp([s[i] / tau for i in top if vals[i] == w]) - total)
    return out


def ref_interpolated(lm_probs, knn_logprobs, lam) -> list[float]:
    return [(1 - lam) * p + lam * math.exp(lk) for p, lk in zip(lm_probs, knn_logprobs, strict=True)]


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((N, D))
    queries = rng.standard_normal((T, D))
    vals = rng.integers(0, V, N)
    targets = np.array([vals[0], vals[5], 1, 2, vals[7], 3])
    logits = rng.standard_normal((T, V))
    lm_probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return keys, queries, vals, targets, lm_probs


def retrieve(queries, keys, vals, kind):
    """What the dump writes: all N neighbours ranked best first, as scores (higher is better)."""
    if kind == "ip":
        scores = queries @ keys.T
    else:
        scores = -((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    ids = np.argsort(-scores, axis=1, kind="stable")
    return ids, np.take_along_axis(scores, ids, 1), vals[ids]


@pytest.mark.parametrize("kind", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 4, N])
@pytest.mark.parametrize("tau", [0.3, 1.0, 5.0])
def test_knn_part_matches_bruteforce(world, kind, k, tau):
    keys, queries, vals, targets, _ = world
    ids, scores, nvals = retrieve(queries, keys, vals, kind)
    got = scoring.knn_logprob(scores, nvals, targets, k, tau)
    dist = scoring.knn_distribution(scores, nvals, k, tau, V)
    for t in range(T):
        ref = ref_knn_logprobs(queries[t].tolist(), keys.tolist(), vals.tolist(), k, tau, kind)
        assert got[t] == pytest.approx(ref[targets[t]], rel=1e-10, abs=1e-12) or (
            got[t] == -np.inf and ref[targets[t]] == -np.inf
        )
        np.testing.assert_allclose(dist[t], np.exp(ref), rtol=1e-10, atol=1e-15)


def test_k_equal_n_is_the_full_softmax_over_the_datastore_per_word(world):
    keys, queries, vals, targets, _ = world
    _, scores, nvals = retrieve(queries, keys, vals, "l2")
    dist = scoring.knn_distribution(scores, nvals, N, 1.0, V)
    for t in range(T):
        s = [similarity(queries[t].tolist(), keys[i].tolist(), "l2") for i in range(N)]
        z = sum(math.exp(x) for x in s)
        per_word = [sum(math.exp(s[i]) / z for i in range(N) if vals[i] == w) for w in range(V)]
        np.testing.assert_allclose(dist[t], per_word, rtol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_interpolation_matches_eq5(world, lam):
    keys, queries, vals, targets, lm_probs = world
    _, scores, nvals = retrieve(queries, keys, vals, "l2")
    lm = np.log(lm_probs[np.arange(T), targets])
    knn = scoring.knn_logprob(scores, nvals, targets, 4, 1.0)
    got = scoring.interpolate(lm, knn, lam)
    for t in range(T):
        ref_knn = ref_knn_logprobs(queries[t].tolist(), keys.tolist(), vals.tolist(), 4, 1.0, "l2")
        ref = ref_interpolated(lm_probs[t].tolist(), ref_knn, lam)
        assert sum(ref) == pytest.approx(1.0)
        assert math.exp(got[t]) == pytest.approx(ref[targets[t]], rel=1e-10, abs=1e-300)


def test_lambda_zero_and_one_are_exact(world):
    lm = np.array([-1.5, -0.1, -7.25, -3.0])
    knn = np.array([-0.5, -np.inf, -2.0, -40.0])
    assert np.array_equal(scoring.interpolate(lm, knn, 0.0), lm)
    assert np.array_equal(scoring.interpolate(lm, knn, 1.0), knn)
    mixed = scoring.interpolate(lm, knn, 0.3)
    assert mixed[1] == pytest.approx(lm[1] + math.log(0.7))  # zero kNN mass: LM part only
    assert np.all(mixed <= np.maximum(lm, knn)) and np.all(mixed >= np.minimum(lm, knn))
    with pytest.raises(ValueError):
        scoring.interpolate(lm, knn, 1.5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("tau", [0.01, 1.0, 100.0])
def test_stable_at_extreme_temperatures(dtype, tau):
    """τ=0.01 turns score gaps of ~10 into log-space gaps of ~1000: still exact, never NaN."""
    rng = np.random.default_rng(5)
    scores = np.sort(rng.uniform(-60, -40, (40, 16)), axis=1)[:, ::-1].astype(dtype)
    vals = rng.integers(0, 4, (40, 16))
    targets = rng.integers(0, 5, 40)  # word 4 never occurs: zero mass rows
    got = scoring.knn_logprob(scores, vals, targets, 16, tau)
    for t in range(40):
        s = [float(x) / tau for x in scores[t]]  # the reference sees the same rounded scores
        ref = log_sum_exp([x for x, v in zip(s, vals[t], strict=True) if v == targets[t]]) - log_sum_exp(s)
        if ref == -math.inf:
            assert got[t] == -np.inf
        else:
            tol = 1e-9 if dtype == np.float64 else 2e-5
            assert got[t] == pytest.approx(ref, rel=tol, abs=tol)
    assert not np.isnan(got).any()
    assert (got[targets == 4] == -np.inf).all()


def test_temperature_scales_scores():
    rng = np.random.default_rng(6)
    scores = np.sort(rng.normal(size=(20, 10)), axis=1)[:, ::-1]
    vals = rng.integers(0, 3, (20, 10))
    targets = rng.integers(0, 3, 20)
    a = scoring.knn_logprob(scores, vals, targets, 10, 2.5)
    b = scoring.knn_logprob(scores / 2.5, vals, targets, 10, 1.0)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    # τ → ∞: uniform over the k kept neighbours, i.e. the share of neighbours carrying the word
    flat = scoring.knn_logprob(scores, vals, targets, 4, 1e9)
    share = (vals[:, :4] == targets[:, None]).mean(1)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(flat, np.log(share), rtol=1e-6)


def test_ip_and_l2_differ_only_through_the_score_convention(world):
    """Ranking by -||q-k||² is ranking by q·k - ||k||²/2: the conventions are consistent."""
    keys, queries, vals, targets, _ = world
    _, l2_scores, l2_vals = retrieve(queries, keys, vals, "l2")
    norms = (keys**2).sum(1)
    ids = np.argsort(-(queries @ keys.T - norms / 2), axis=1, kind="stable")
    shifted = np.take_along_axis(queries @ keys.T - norms / 2, ids, 1)
    # -||q-k||² = 2(q·k - ||k||²/2) - ||q||², and the per-query constant cancels in the softmax
    got = scoring.knn_logprob(2 * shifted, vals[ids], targets, 5, 1.0)
    np.testing.assert_allclose(got, scoring.knn_logprob(l2_scores, l2_vals, targets, 5, 1.0), rtol=1e-10)


def test_perplexity_counts_zero_mass_tokens():
    ppl = scoring.perplexity(np.log([0.5, 0.25]))
    assert ppl.ppl == pytest.approx(math.sqrt(8)) and ppl.n_tokens == 2 and ppl.n_zero_mass == 0
    inf = scoring.perplexity(np.array([-1.0, -np.inf, -np.inf]))
    assert inf == scoring.Perplexity(math.inf, 3, 2)
    with pytest.raises(ValueError):
        scoring.perplexity(np.array([np.nan]))
    # probabilities too small for exp(−mean log p) to be a float: infinite, but no token has zero mass
    assert scoring.perplexity(np.array([-800.0, -900.0])) == scoring.Perplexity(math.inf, 2, 0)
    assert scoring.perplexity(np.array([-700.0])).ppl == pytest.approx(math.exp(700.0))


def test_tune_lambda_is_the_grid_argmin():
    rng = np.random.default_rng(7)
    lm = np.log(rng.uniform(0.01, 1, 300))
    knn = np.where(rng.random(300) < 0.3, -np.inf, np.log(rng.uniform(0.001, 1, 300)))
    grid = [i / 20 for i in range(21)]
    ppls = []
    for lam in grid:  # brute force: probability space, explicit mixture
        p = (1 - lam) * np.exp(lm) + lam * np.exp(knn)
        ppls.append(math.inf if (p == 0).any() else math.exp(-np.log(p).mean()))
    best = grid[int(np.argmin(ppls))]
    assert 0 < best < 1
    assert scoring.tune_lambda(lm, knn, grid) == best
    np.testing.assert_allclose(scoring.lambda_curve(lm, knn, grid), ppls, rtol=1e-10)
    assert scoring.tune_lambda(lm, knn) == pytest.approx(
        scoring.DEFAULT_LAMBDA_GRID[np.argmin(scoring.lambda_curve(lm, knn))]
    )
    # ties go to the smallest λ: identical parts make every λ equal
    assert scoring.tune_lambda(lm, lm, grid) == 0.0


def test_oracle_takes_the_better_part_per_token():
    lm = np.array([-1.0, -3.0, -2.0])
    knn = np.array([-2.0, -np.inf, -0.5])
    assert np.array_equal(scoring.oracle_logprob(lm, knn), [-1.0, -3.0, -0.5])
    assert scoring.perplexity(scoring.oracle_logprob(lm, knn)).ppl <= min(
        scoring.perplexity(scoring.interpolate(lm, knn, lam)).ppl for lam in (0.1, 0.5, 0.9)
    )


def test_subsample_ratio_and_determinism():
    ids = np.arange(200_000)
    for ratio in (0.05, 0.3, 0.9):
        keep = scoring.subsample_keep(ids, ratio, seed=1)
        assert keep.mean() == pytest.approx(ratio, abs=0.005)
    a = scoring.subsample_keep(ids, 0.3, seed=1)
    assert np.array_equal(a, scoring.subsample_keep(ids, 0.3, seed=1))
    assert not np.array_equal(a, scoring.subsample_keep(ids, 0.3, seed=2))
    # nested: a smaller ratio with the same seed keeps a subset of a larger one
    assert not (scoring.subsample_keep(ids, 0.1, seed=1) & ~a).any()
    # the same id gets the same decision wherever it appears (any token, any column)
    grid = np.random.default_rng(0).integers(0, 1000, (50, 40))
    keep_grid = scoring.subsample_keep(grid, 0.5, seed=3)
    keep_ids = scoring.subsample_keep(np.arange(1000), 0.5, seed=3)
    assert np.array_equal(keep_grid, keep_ids[grid])
    assert not scoring.subsample_keep(np.array([-1, -1]), 1.0).any()
    with pytest.raises(ValueError):
        scoring.Subsample(0.0)


def test_subsampled_knn_is_top_k_of_the_kept_neighbours(world):
    keys, queries, vals, targets, _ = world
    ids, scores, nvals = retrieve(queries, keys, vals, "l2")
    sub = scoring.Subsample(0.5, seed=4)
    allowed = set(np.flatnonzero(sub.keep(np.arange(N))).tolist())
    got = scoring.knn_logprob(scores, nvals, targets, 3, 1.0, ids=ids, subsample=sub)
    dist = scoring.knn_distribution(scores, nvals, 3, 1.0, V, ids=ids, subsample=sub)
    for t in range(T):
        ref = ref_knn_logprobs(queries[t].tolist(), keys.tolist(), vals.tolist(), 3, 1.0, "l2", allowed)
        assert got[t] == pytest.approx(ref[targets[t]], rel=1e-10) or got[t] == ref[targets[t]] == -np.inf
        np.testing.assert_allclose(dist[t], np.exp(ref), rtol=1e-10, atol=1e-15)
    used = scoring.neighbours_used(scores, 3, ids=ids, subsample=sub)
    assert np.array_equal(used, np.minimum(3, np.isin(ids, list(allowed)).sum(1)))
    used_out = np.zeros((2, T), dtype=np.int64)
    scoring.knn_logprob_grid(scores, nvals, targets, [3, N], [1.0], ids=ids, subsample=sub, used_out=used_out)
    assert np.array_equal(used_out[0], used) and np.array_equal(used_out[1], np.isin(ids, list(allowed)).sum(1))


def test_missing_neighbours_and_empty_rows():
    scores = np.array([[3.0, 1.0, -np.inf], [-np.inf, -np.inf, -np.inf], [2.0, 2.0, 1.0]])
    vals = np.array([[1, 2, 1], [1, 1, 1], [0, 1, -1]])
    ids = np.array([[5, 6, -1], [-1, -1, -1], [1, 2, -1]])
    targets = np.array([1, 1, 1])
    got = scoring.knn_logprob(scores, vals, targets, 3, 1.0, ids=ids)
    assert got[0] == pytest.approx(3 - np.logaddexp(3, 1))
    assert got[1] == -np.inf
    assert got[2] == pytest.approx(-math.log(2))  # id -1 is ignored even with a finite score
    dist = scoring.knn_distribution(scores, vals, 3, 1.0, 3, ids=ids)
    np.testing.assert_allclose(dist.sum(1), [1.0, 0.0, 1.0])
    assert np.array_equal(scoring.neighbours_used(scores, 3, ids=ids), [2, 0, 2])


def test_grid_chunks_and_dtypes_agree():
    rng = np.random.default_rng(8)
    scores = np.sort(rng.normal(size=(50, 12)), axis=1)[:, ::-1].astype(np.float32)
    vals = rng.integers(0, 4, (50, 12))
    targets = rng.integers(0, 4, 50)
    grid = scoring.knn_logprob_grid(scores, vals, targets, [2, 12], [0.5, 2.0], chunk_rows=7)
    assert grid.shape == (2, 2, 50) and grid.dtype == np.float64
    for ki, k in enumerate([2, 12]):
        for ti, tau in enumerate([0.5, 2.0]):
            single = scoring.knn_logprob(scores.astype(np.float64), vals, targets, k, tau)
            np.testing.assert_allclose(grid[ki, ti], single, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        scoring.knn_logprob(scores, vals, targets, 13, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        scoring.knn_logprob(scores, vals, targets, 2, 0.0)
