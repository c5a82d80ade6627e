"""The datastore replacements' math against brute-force float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm.errors import KnnlmError
from knnlm.softmax_alternatives.aggregation import (
    WordRows,
    aggregate_log_softmax,
    grouped_logsumexp,
    sized_row_word,
    target_log_probs,
    uniform_n,
    uniform_row_word,
)
from knnlm.softmax_alternatives.heads import ClusteredDatastore, LearnedDatastore, MixtureOfSoftmaxes, topk_sparsify
from knnlm.softmax_alternatives.sizes import adaptive_sizes, real_sizes, solve_base


def _hand_word_probs(logits: np.ndarray, row_word: np.ndarray, vocab: int) -> np.ndarray:
    """P(w) = Σ_{rows of w} softmax(logits)_r, one loop over rows."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    out = np.zeros((logits.shape[0], vocab))
    for r, w in enumerate(row_word):
        out[:, w] += p[:, r]
    return out


@pytest.mark.parametrize("layout", ["uniform", "sized"])
def test_aggregation_equals_per_word_sum_by_hand(layout):
    rng = np.random.default_rng(0)
    vocab = 7
    if layout == "uniform":
        row_word = uniform_row_word(vocab, 3)
        assert uniform_n(row_word, vocab) == 3
    else:
        row_word = sized_row_word(torch.tensor([1, 4, 2, 1, 3, 1, 2]))
        assert uniform_n(row_word, vocab) is None
    logits = rng.normal(scale=3.0, size=(5, row_word.numel()))
    got = aggregate_log_softmax(torch.from_numpy(logits), row_word, vocab).numpy()
    np.testing.assert_allclose(np.exp(got), _hand_word_probs(logits, row_word.numpy(), vocab), rtol=1e-12, atol=0)


def test_uniform_layout_rows_are_copies_of_the_vocabulary():
    assert uniform_row_word(4, 2).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert sized_row_word(torch.tensor([2, 1])).tolist() == [0, 0, 1]
    with pytest.raises(ValueError):
        sized_row_word(torch.tensor([1, 0]))


def test_grouped_logsumexp_scatter_path_equals_reshape_path_and_survives_huge_logits():
    rng = np.random.default_rng(1)
    vocab, n = 6, 4
    logits = torch.from_numpy(rng.normal(size=(3, 2, n * vocab)) * 400)  # exp() alone would overflow
    fast = grouped_logsumexp(logits, uniform_row_word(vocab, n), vocab)
    perm = torch.randperm(n * vocab, generator=torch.Generator().manual_seed(0))
    slow = grouped_logsumexp(logits[..., perm], uniform_row_word(vocab, n)[perm], vocab)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-9)


def test_word_without_rows_gets_minus_infinity():
    out = grouped_logsumexp(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0, 0, 2]), 4)
    assert out[0, 1] == -math.inf and out[0, 3] == -math.inf
    assert out[0, 0] == pytest.approx(math.log(2))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=14), st.integers(0, 10_000))
def test_target_log_probs_equal_the_hand_sum_at_the_target_and_its_gradient(row_list, seed):
    """Any row-to-word map (unsorted, words without rows), against the hand sum and against the
    gradient of the whole aggregated distribution gathered at the target."""
    vocab = 6
    row_word = torch.tensor(row_list)
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 4, len(row_list), generator=gen, dtype=torch.float64) * 3).requires_grad_()
    target = torch.randint(0, vocab, (3, 4), generator=gen)
    got = target_log_probs(logits, target, WordRows(row_word, vocab))
    hand = _hand_word_probs(logits.detach().reshape(12, -1).numpy(), row_word.numpy(), vocab)
    expected = hand[np.arange(12), target.reshape(-1).numpy()].reshape(3, 4)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(got.detach().numpy(), np.log(expected), rtol=1e-12, atol=1e-12)
    has_rows = torch.isfinite(got)
    (grad,) = torch.autograd.grad(got[has_rows].sum(), logits)
    full = aggregate_log_softmax(logits, row_word, vocab).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    (full_grad,) = torch.autograd.grad(full[has_rows].sum(), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-12)


def test_target_log_probs_of_the_uniform_layout_survive_huge_logits():
    vocab, n = 5, 3
    logits = torch.randn(2, 7, n * vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 500
    target = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    row_word = uniform_row_word(vocab, n)
    full = aggregate_log_softmax(logits, row_word, vocab).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    got = target_log_probs(logits, target, WordRows(row_word, vocab))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-9)


def test_a_target_without_rows_has_a_finite_zero_gradient_under_the_training_floor():
    logits = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    got = target_log_probs(logits, torch.tensor([1, 2]), WordRows(torch.tensor([0, 0, 2, 2]), 3))
    assert got[0] == -math.inf and math.isfinite(float(got[1]))
    (grad,) = torch.autograd.grad(got.clamp(min=-50.0).sum(), logits)
    assert torch.isfinite(grad).all() and torch.equal(grad[0], torch.zeros(4, dtype=torch.float64))


def test_a_loaded_row_layout_replaces_the_built_one():
    """An adaptive head loaded from a checkpoint answers with the checkpoint's rows, not its build's."""
    trained = LearnedDatastore(3, 6, sized_row_word(torch.tensor([1, 2, 3, 1, 1, 4])), seed=1)
    built = LearnedDatastore(3, 6, sized_row_word(torch.tensor([4, 1, 3, 1, 1, 2])), seed=2)
    built.load_state_dict(trained.state_dict())
    h, target = torch.randn(5, 3), torch.randint(0, 6, (5,))
    torch.testing.assert_close(built.target_log_probs(h, target), trained.target_log_probs(h, target))
    torch.testing.assert_close(built(h), trained(h))
    assert sorted(built.state_dict()) == ["row_word", "weight"]


def test_every_head_s_target_log_probs_are_its_distribution_at_the_target():
    torch.manual_seed(0)
    vocab, dim = 11, 4
    h, target = torch.randn(2, 5, dim), torch.randint(0, vocab, (2, 5))
    cluster_word = torch.rand(3, vocab).to_sparse()
    cluster_word = (cluster_word.to_dense() / cluster_word.to_dense().sum(1, keepdim=True)).to_sparse()
    heads = [
        LearnedDatastore(dim, vocab, uniform_row_word(vocab, 3)),
        LearnedDatastore(dim, vocab, sized_row_word(torch.arange(vocab) % 3 + 1)),
        MixtureOfSoftmaxes(dim, vocab, 2, torch.randn(vocab, dim)),
        ClusteredDatastore(torch.randn(3, dim), cluster_word),
    ]
    for head in heads:
        full = head(h).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(head.target_log_probs(h, target), full, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_learned_datastore_is_a_distribution(vocab, n, seed):
    torch.manual_seed(seed)
    head = LearnedDatastore(5, vocab, uniform_row_word(vocab, n)).double()
    lp = head(torch.randn(4, 5, dtype=torch.float64) * 3)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, dtype=torch.float64))


def test_learned_datastore_n1_initialised_from_w_sm_is_that_softmax():
    torch.manual_seed(0)
    weight, bias = torch.randn(9, 4), torch.randn(9)
    h = torch.randn(3, 4)
    head = LearnedDatastore(4, 9, uniform_row_word(9, 1), weight, bias, init_noise=0.0)
    torch.testing.assert_close(head(h), torch.log_softmax(h @ weight.t() + bias, -1))
    # n identical copies give the same distribution as one
    copies = LearnedDatastore(4, 9, uniform_row_word(9, 3), weight, bias, init_noise=0.0)
    torch.testing.assert_close(copies(h), head(h), rtol=1e-5, atol=1e-5)
    assert copies.rows == 27


def test_solve_base_makes_real_sizes_sum_to_n_v():
    rng = np.random.default_rng(0)
    freq = rng.zipf(1.3, size=500).astype(float)
    freq[:20] = 0  # unseen words: one row each
    for n in (2, 3, 6):
        b = solve_base(freq, n)
        total = sum(1 + math.log(max(f, 1.0)) / math.log(b) for f in freq)
        assert total == pytest.approx(n * len(freq), rel=1e-12)
        assert real_sizes(freq, n).sum() == pytest.approx(n * len(freq), rel=1e-12)
        sizes = adaptive_sizes(freq, n)
        assert sizes.sum() == n * len(freq) and sizes.min() >= 1 and (sizes[:20] == 1).all()
        assert np.all(np.abs(sizes - real_sizes(freq, n)) < 1)
        order = np.argsort(freq, kind="stable")
        assert np.all(np.diff(real_sizes(freq, n)[order]) >= 0)  # more frequent, more rows
    assert math.isinf(solve_base(freq, 1)) and (adaptive_sizes(freq, 1) == 1).all()
    with pytest.raises(KnnlmError, match="<= 1"):
        solve_base(np.ones(5), 2)
    with pytest.raises(KnnlmError):
        solve_base(np.array([1.0, -2.0]), 2)


def test_mixture_weights_sum_to_one_and_r1_is_one_softmax():
    torch.manual_seed(0)
    w = torch.randn(11, 6)
    mos = MixtureOfSoftmaxes(6, 11, 4, w).double()
    h = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(mos.mixture_log_weights(h).exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))
    lp = mos(h)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3, dtype=torch.float64))
    # brute force: Σ_r π_r softmax(W tanh(P_r h) + b)
    pi = torch.softmax(h @ mos.prior.weight.t(), -1)
    ctx = torch.tanh(h @ mos.latent.weight.t() + mos.latent.bias).unflatten(-1, (4, 6))
    expected = (pi.unsqueeze(-1) * torch.softmax(ctx @ mos.output_weight.t() + mos.output_bias, -1)).sum(-2)
    torch.testing.assert_close(lp.exp(), expected)
    assert not mos.output_weight.requires_grad
    assert MixtureOfSoftmaxes(6, 11, 1, w, train_output=True).output_weight.requires_grad


@pytest.mark.parametrize("similarity", ["l2", "ip"])
def test_clustered_datastore_equals_brute_force(similarity):
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(4, 3))
    m = np.zeros((4, 6))
    m[0, [1, 2]] = [0.25, 0.75]
    m[1, 0] = 1.0
    m[2, [0, 3, 4]] = [0.2, 0.3, 0.5]
    m[3, 4] = 1.0  # word 5: in no cluster
    head = ClusteredDatastore(torch.from_numpy(centroids), torch.from_numpy(m).to_sparse(), similarity)
    h = rng.normal(size=(5, 3))
    if similarity == "ip":
        s = h @ centroids.T
    else:
        s = -((h[:, None, :] - centroids[None]) ** 2).sum(-1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got = head(torch.from_numpy(h).float()).exp().double().numpy()
    np.testing.assert_allclose(got, p @ m, rtol=1e-5, atol=1e-7)
    assert np.all(got[:, 5] == 0)


def test_topk_sparsify_keeps_k_words_and_renormalises():
    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    torch.testing.assert_close(topk_sparsify(lp, 10).double(), lp, rtol=1e-6, atol=1e-6)
    out = topk_sparsify(lp, 3, temperature=2.0)
    assert (torch.isfinite(out).sum(-1) == 3).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3), rtol=1e-6, atol=1e-6)
    top, idx = lp.topk(3, -1)
    torch.testing.assert_close(out.gather(-1, idx).double(), torch.log_softmax(top / 2.0, -1), rtol=1e-5, atol=1e-6)


def test_half_precision_heads_return_fp32_distributions():
    """Under --fp16 the weights are half: matmuls run in half, softmax and aggregation in fp32."""
    torch.manual_seed(0)
    heads = [
        LearnedDatastore(8, 5, uniform_row_word(5, 2)).half(),
        MixtureOfSoftmaxes(8, 5, 2, torch.randn(5, 8)).half(),
    ]
    for head in heads:
        for h in (torch.randn(3, 8).half(), torch.randn(3, 8)):
            lp = head(h)
            assert lp.dtype == torch.float32
            torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3), rtol=1e-3, atol=1e-3)


def test_topk_for_many_settings_from_one_sort_equals_topk_sparsify():
    from knnlm.softmax_alternatives.heads import topk_target_logprobs

    torch.manual_seed(1)
    lp = torch.log_softmax(torch.randn(50, 40, dtype=torch.float64) * 2, -1)
    target = torch.randint(0, 40, (50,))
    ks, temps = [1, 3, 10, 40, 100], [1.0, 2.5]
    got = topk_target_logprobs(lp, target, ks, temps)
    for k in ks:
        for t in temps:
            expected = topk_sparsify(lp, k, t).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(got[(k, t)], expected.float(), rtol=1e-5, atol=1e-5)
