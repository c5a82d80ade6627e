"""The torch twin of Eq. 5 against a float64 brute force and against the numpy scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm import scoring, scoring_torch


def brute_force_target_logprob(scores, vals, target, k, tau):
    """log Σ_{j ≤ k usable, v_j = target} exp(s_j/τ) / Σ_{j ≤ k usable} exp(s_j/τ), one row, float64."""
    pairs = [(s / tau, v) for s, v in zip(scores[:k], vals[:k], strict=True) if math.isfinite(s) and v >= 0]
    if not pairs:
        return -math.inf
    top = max(s for s, _ in pairs)
    total = sum(math.exp(s - top) for s, _ in pairs)
    hit = sum(math.exp(s - top) for s, v in pairs if v == target)
    return math.log(hit / total) if hit > 0 else -math.inf


def random_neighbours(rng, rows=12, width=10, vocab=7):
    scores = np.sort(rng.normal(0, 4, (rows, width)), axis=1)[:, ::-1].copy()
    vals = rng.integers(0, vocab, (rows, width))
    scores[0, 6:] = -np.inf  # missing neighbours (FAISS returns fewer than k)
    vals[0, 6:] = -1
    scores[1, :] = -np.inf  # no neighbour at all
    vals[1, :] = -1
    scores[2, :3] = scores[2, 0]  # ties
    targets = rng.integers(0, vocab, rows)
    targets[3] = vals[3, 0]
    return scores, vals, targets


@pytest.mark.parametrize(("k", "tau"), [(1, 1.0), (4, 0.5), (10, 3.0)])
def test_target_logprob_equals_brute_force_and_numpy(k, tau):
    scores, vals, targets = random_neighbours(np.random.default_rng(k))
    got = scoring_torch.knn_target_logprob(torch.from_numpy(scores), torch.from_numpy(vals), torch.from_numpy(targets),
                                           k, tau).numpy()
    want = [brute_force_target_logprob(s, v, t, k, tau) for s, v, t in zip(scores, vals, targets, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got, scoring.knn_logprob(scores, vals, targets, k, tau), rtol=1e-10, atol=0)
    assert got.dtype == np.float64


def test_full_distribution_equals_numpy_and_agrees_with_target_logprobs():
    scores, vals, targets = random_neighbours(np.random.default_rng(0))
    s, v = torch.from_numpy(scores), torch.from_numpy(vals)
    log_dist = scoring_torch.knn_log_distribution(s, v, 7, 5, 2.0)
    np.testing.assert_allclose(log_dist.exp().numpy(), scoring.knn_distribution(scores, vals, 5, 2.0, 7),
                               rtol=1e-12, atol=1e-15)
    picked = log_dist.gather(1, torch.from_numpy(targets)[:, None]).squeeze(1)
    torch.testing.assert_close(picked, scoring_torch.knn_target_logprob(s, v, torch.from_numpy(targets), 5, 2.0))
    sums = log_dist.exp().sum(1).numpy()
    np.testing.assert_allclose(sums[[0, *range(2, len(sums))]], 1.0, rtol=1e-12)
    assert sums[1] == 0.0  # a row without neighbours carries no kNN mass


def test_out_of_vocabulary_values_are_refused():
    with pytest.raises(ValueError, match="word ids"):
        scoring_torch.knn_log_distribution(torch.zeros(1, 2), torch.tensor([[0, 9]]), 5, 2)


@given(lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_interpolation_equals_numpy_and_keeps_its_ends(lam, seed):
    rng = np.random.default_rng(seed)
    lm = np.log(rng.dirichlet(np.ones(5)))
    knn_p = rng.dirichlet(np.ones(5))
    knn_p[rng.integers(5)] = 0.0  # a word no neighbour carries
    with np.errstate(divide="ignore"):
        knn = np.log(knn_p / knn_p.sum())
    got = scoring_torch.interpolate(torch.from_numpy(lm), torch.from_numpy(knn), lam).numpy()
    np.testing.assert_allclose(got, scoring.interpolate(lm, knn, lam), rtol=1e-12, atol=0)
    if lam == 0.0:
        assert np.array_equal(got, lm)
    if lam == 1.0:
        assert np.array_equal(got, knn)
    # a mixture of two distributions is a distribution
    assert np.exp(got).sum() == pytest.approx(1.0, rel=1e-12)


def test_bad_temperature_and_lambda_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        scoring_torch.knn_target_logprob(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), 2, 0.0)
    with pytest.raises(ValueError, match="λ"):
        scoring_torch.interpolate(torch.zeros(2), torch.zeros(2), 1.5)
