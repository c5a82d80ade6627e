"""Property tests: the kNN and interpolated distributions are distributions, for any scores, k, τ, λ."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from knnlm import scoring

VOCAB = 6
PROFILE = settings(max_examples=60, deadline=None)


@st.composite
def retrievals(draw):
    """Scores ranked best first (some missing), values, targets, a k and a τ."""
    rows = draw(st.integers(1, 6))
    width = draw(st.integers(1, 10))
    scores = draw(
        hnp.arrays(np.float64, (rows, width), elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False))
    )
    scores = -np.sort(-scores, axis=1)
    missing = draw(st.integers(0, width - 1))  # FAISS's missing neighbours come last, at -inf
    if missing:
        scores[:, width - missing :] = -np.inf
    vals = draw(hnp.arrays(np.int64, (rows, width), elements=st.integers(0, VOCAB - 1)))
    targets = draw(hnp.arrays(np.int64, (rows,), elements=st.integers(0, VOCAB - 1)))
    k = draw(st.integers(1, width))
    tau = draw(st.floats(0.01, 100.0))
    return scores, vals, targets, k, tau


@PROFILE
@given(retrievals())
def test_knn_distribution_sums_to_one(data):
    scores, vals, _, k, tau = data
    dist = scoring.knn_distribution(scores, vals, k, tau, VOCAB)
    assert (dist >= 0).all()
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, rtol=1e-9)  # the first column is never missing


@PROFILE
@given(retrievals())
def test_knn_logprob_is_the_distribution_at_the_target(data):
    scores, vals, targets, k, tau = data
    got = scoring.knn_logprob(scores, vals, targets, k, tau)
    dist = scoring.knn_distribution(scores, vals, k, tau, VOCAB)
    at_target = dist[np.arange(len(targets)), targets]
    assert (got <= 1e-12).all()
    # zero mass in one is zero mass in the other (the log-space one can be finite where the
    # probability underflows to 0, e.g. -20000 at τ = 0.01)
    assert (at_target[got == -np.inf] == 0).all()
    finite = at_target > 1e-300
    np.testing.assert_allclose(got[finite], np.log(at_target[finite]), rtol=1e-7, atol=1e-9)


@PROFILE
@given(retrievals(), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_interpolated_distribution_sums_to_one(data, lam, seed):
    scores, vals, _, k, tau = data
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(scores.shape[0], VOCAB))
    lm_logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    knn = scoring.knn_distribution(scores, vals, k, tau, VOCAB)
    with np.errstate(divide="ignore"):
        log_knn = np.log(knn)
    mixed = scoring.interpolate(lm_logprobs.ravel(), log_knn.ravel(), lam).reshape(knn.shape)
    np.testing.assert_allclose(np.exp(mixed).sum(axis=1), 1.0, rtol=1e-9)


@PROFILE
@given(
    hnp.arrays(np.float64, 20, elements=st.floats(-30, 0)),
    hnp.arrays(np.float64, 20, elements=st.one_of(st.floats(-30, 0), st.just(-np.inf))),
)
def test_tuned_lambda_is_no_worse_than_any_grid_point(lm, knn):
    grid = np.linspace(0, 1, 11)
    lam = scoring.tune_lambda(lm, knn, grid)
    best = scoring.perplexity(scoring.interpolate(lm, knn, lam)).ppl
    for other in grid:
        assert best <= scoring.perplexity(scoring.interpolate(lm, knn, other)).ppl * (1 + 1e-12)
    oracle = scoring.perplexity(scoring.oracle_logprob(lm, knn)).ppl
    assert oracle <= best * (1 + 1e-12)
