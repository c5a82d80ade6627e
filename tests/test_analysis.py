"""Analyses on synthetic inputs with known answers: binning, clustering, entropies, positions, argmaxable words."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import linprog

from knnlm.analysis import (
    argmaxable_words,
    bigram_entropy,
    frequency_loss,
    gmm_loglik,
    knn_win_shares,
    load_output_embedding,
    log_bins,
    loss_split,
    position_perplexity,
    read_dictionary,
    separation,
    trend,
)
from knnlm.analysis.plots import check_figure, new_figure, paper_style
from knnlm.analysis.stolen import STAGES, lp_margin
from knnlm.analysis.vocab import encode_text, word_length
from knnlm.errors import KnnlmError


def test_dictionary_ids_match_fairseq(tmp_path):
    from fairseq.data import Dictionary

    from knnlm.io import dictionary_fingerprint

    path = tmp_path / "dict.txt"
    path.write_text("the 120\n, 80\nof 80\n▁New 3\n<unk> 7 #fairseq:overwrite\nmadeupword0000 0\n", encoding="utf-8")
    vocab = read_dictionary(path)
    reference = Dictionary.load(str(path))
    assert list(vocab.symbols) == reference.symbols
    assert vocab.counts[4:].tolist() == reference.count[4:]
    assert vocab.fingerprint == dictionary_fingerprint(reference)  # what `knnlm eval` writes into a cache
    assert vocab.is_word.tolist() == [False] * 4 + [True] * 6
    assert word_length("▁New") == 3 and word_length("runn@@") == 4
    # whitespace tokens and </s> per line, unknown words -> <unk>: as fairseq binarizes
    lines = ["the of", "zzz <unk>", ""]
    expected = [t for line in lines for t in reference.encode_line(line, add_if_not_exist=False).tolist()]
    assert encode_text(lines, vocab).tolist() == expected == [4, 6, 2, 3, 8, 2, 2]


def test_dictionary_errors_name_the_file(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("the 1\nthe 2\n", encoding="utf-8")
    with pytest.raises(KnnlmError, match="duplicate word 'the'"):
        read_dictionary(path)
    with pytest.raises(KnnlmError, match="does not exist"):
        read_dictionary(tmp_path / "missing.txt")


def test_log_bins_cover_counts():
    assert log_bins(999).tolist() == [1.0, 10.0, 100.0, 1000.0]
    assert log_bins(1000).tolist() == [1.0, 10.0, 100.0, 1000.0, 10000.0]
    edges = log_bins(50, bins_per_decade=2)
    assert edges[0] == 1.0 and edges[-1] > 50 and np.allclose(np.diff(np.log10(edges)), 0.5)


def test_frequency_binning_counts_and_loss():
    # ids 0-1 special; words 2..7 with training counts 5, 7, 50, 0, 300, 9
    counts = np.array([0, 0, 5, 7, 50, 0, 300, 9])
    is_word = np.array([False, False, True, True, True, True, True, True])
    edges = log_bins(300)  # [1, 10, 100, 1000]
    targets = np.array([2, 2, 3, 4, 6, 6, 6, 1, 5])
    losses = np.array([1.0, 2.0, 0.5, 3.0, 0.1, 0.2, 0.3, 4.0, 9.0])
    r = frequency_loss(counts, is_word, targets, losses, edges)
    assert r.n_words.tolist() == [3, 1, 1]  # {5, 7, 9}, {50}, {300}; count 0 and specials not binned
    assert r.n_words_seen.tolist() == [2, 1, 1]  # word 7 (count 9) never occurs
    assert r.n_tokens.tolist() == [3, 1, 3]
    assert np.allclose(r.loss_sum, [3.5, 3.0, 0.6])
    assert np.allclose(r.loss_mean, [3.5 / 3, 3.0, 0.2])
    assert r.excluded_tokens == 2 and r.excluded_loss == pytest.approx(13.0)
    # a zero-probability token makes its bin's loss infinite (counted, not dropped)
    r = frequency_loss(counts, is_word, targets, np.where(targets == 4, np.inf, losses), edges)
    assert r.loss_sum[1] == np.inf and r.n_zero_mass.tolist() == [0, 1, 0]


def _clustered_and_scattered(rng: np.random.Generator, n: int = 150, dim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(0.0, 5.0, size=(3, dim))
    clustered = centres[rng.integers(0, 3, n)] + rng.normal(0.0, 0.2, size=(n, dim))
    scattered = rng.uniform(-10.0, 10.0, size=(n, dim))
    return clustered, scattered


def test_gmm_gives_clustered_points_higher_likelihood():
    clustered, scattered = _clustered_and_scattered(np.random.default_rng(0))
    x = np.concatenate([clustered, scattered])
    ll, fit = gmm_loglik(x, components=4, covariance="full", seed=0, standardize=False)
    a, b = ll[: len(clustered)], ll[len(clustered) :]
    assert a.mean() > b.mean() + 2.0
    sep = separation(a, b)
    assert sep.cohens_d > 1.0 and sep.auc > 0.9 and sep.ks_statistic > 0.7
    flipped = separation(b, a)
    assert flipped.cohens_d == pytest.approx(-sep.cohens_d) and flipped.auc == pytest.approx(1.0 - sep.auc)
    # same seed, same numbers
    assert np.array_equal(ll, gmm_loglik(x, components=4, covariance="full", seed=0, standardize=False)[0])
    assert fit["n_mixtures"] == 1


def test_gmm_per_group_skips_small_groups():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    groups = np.array([0] * 45 + [1] * 5)  # a 3-component mixture needs 6 rows
    ll, fit = gmm_loglik(x, components=3, groups=groups)
    assert np.isfinite(ll[:45]).all() and np.isnan(ll[45:]).all()
    assert fit["groups_skipped"] == [1] and fit["n_mixtures"] == 1


def test_separation_hand_computed():
    a, b = np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0])
    sep = separation(a, b)
    assert sep.cohens_d == pytest.approx(1.0)  # means differ by 1, both variances 1
    # pairs (a, b): a > b in 6 of 9, ties in 2
    assert sep.auc == pytest.approx((6 + 0.5 * 2) / 9)
    assert sep.ks_statistic == pytest.approx(1 / 3)


def test_loss_split_by_quantile_or_threshold():
    loss = np.array([0.1, 0.5, 2.0, 3.0, np.inf])
    high, thr = loss_split(loss, quantile=0.5)
    assert thr == 2.0 and high.tolist() == [False, False, False, True, True]
    high, thr = loss_split(loss, threshold=0.3)
    assert thr == 0.3 and high.sum() == 4


def test_bigram_entropy_of_a_known_sequence():
    stream = np.array([1, 2, 1, 3, 1, 2])
    h = bigram_entropy(stream, 5)
    # 1 is followed by 2, 3, 2; the last 2 has no successor; 2 and 3 are always followed by 1
    assert h.forward[1] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert h.forward[2] == 0.0 and h.forward[3] == 0.0
    # 1 is preceded by 2 and 3 (the first 1 has no predecessor); 2 always by 1
    assert h.backward[1] == pytest.approx(math.log(2))
    assert h.backward[2] == 0.0 and h.backward[3] == 0.0
    assert np.isnan(h.forward[0]) and np.isnan(h.backward[4])
    assert h.counts.tolist() == [0, 3, 2, 1, 0]
    chunked = bigram_entropy(stream, 5, chunk=2)
    assert np.allclose(chunked.forward, h.forward, equal_nan=True)
    assert np.allclose(chunked.backward, h.backward, equal_nan=True)


def test_trend_fits_a_line():
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    t = trend(x, 2 * x + 1)
    assert t.slope == pytest.approx(2.0) and t.intercept == pytest.approx(1.0)
    assert t.pearson_r == pytest.approx(1.0) and t.spearman_rho == pytest.approx(1.0) and t.n == 4
    assert math.isnan(trend(x, np.ones(5)).pearson_r)
    assert math.isnan(trend(np.ones(4), x[:4]).slope)


def test_knn_win_shares_per_word():
    targets = np.array([4, 4, 4, 5, 5, 6])
    lm = np.log([0.5, 0.5, 0.5, 0.1, 0.1, 0.3])
    faiss = np.log([0.6, 0.4, 0.7, 0.2, 0.05, 0.9])
    real = np.array([-np.inf, -0.1, -0.1, -np.inf, -np.inf, 0.0])
    is_word = np.array([False] * 4 + [True] * 3)
    s = knn_win_shares(targets, lm, {"faiss": faiss, "real": real}, min_count=2, is_word=is_word)
    assert s.words.tolist() == [4, 5] and s.occurrences.tolist() == [3, 2]
    assert s.shares["faiss"].tolist() == pytest.approx([2 / 3, 1 / 2])
    assert s.shares["real"].tolist() == pytest.approx([2 / 3, 0.0])


def test_position_perplexity_by_hand():
    positions = np.array([0, 1, 2, 3, 4, 0, 5])
    lp = np.log([0.5, 0.25, 0.1, 0.2, 0.4, 0.5, 0.8])
    r = position_perplexity(positions, {"lm": lp}, bucket_size=2)
    assert r.starts.tolist() == [0, 2, 4] and r.n_tokens.tolist() == [3, 2, 2]
    assert r.ppl["lm"][0] == pytest.approx((0.5 * 0.25 * 0.5) ** (-1 / 3))
    assert r.ppl["lm"][1] == pytest.approx((0.1 * 0.2) ** (-1 / 2))
    assert r.ppl["lm"][2] == pytest.approx((0.4 * 0.8) ** (-1 / 2))
    gap = position_perplexity(np.array([0, 5]), {"lm": np.log([0.5, 0.5])}, bucket_size=2)
    assert gap.n_tokens.tolist() == [1, 0, 1] and np.isnan(gap.ppl["lm"][1])


def _brute_force_argmaxable(w: np.ndarray, b: np.ndarray, box: float, tol: float) -> np.ndarray:
    """Reference: the full LP (all V−1 constraints at once) for every word."""
    n, dim = w.shape
    out = np.zeros(n, dtype=bool)
    for v in range(n):
        others = np.delete(np.arange(n), v)
        a_ub = np.hstack([w[others] - w[v], np.ones((n - 1, 1))])
        cost = np.zeros(dim + 1)
        cost[-1] = -1.0
        res = linprog(cost, A_ub=a_ub, b_ub=b[v] - b[others], bounds=[(-box, box)] * dim + [(None, 1.0)])
        out[v] = res.x[-1] > tol
    return out


def test_hull_vertices_are_argmaxable_and_interior_points_are_not():
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    inside = np.array([[0.2, 0.1], [0.5, 0.5]])  # strictly inside; on the edge between two vertices
    w = np.concatenate([square, inside])
    r = argmaxable_words(w)
    assert r.argmaxable.tolist() == [True, True, True, True, False, False]
    assert (r.margin[:4] > 0).all() and (r.margin[4:] <= 1e-6).all()
    assert r.n_lp == 2 and r.counts()["lp"] == 2
    # a bias can lift an interior word to the argmax
    r = argmaxable_words(w, np.array([0.0, 0.0, 0.0, 0.0, 0.5, 0.0]), box=10.0)
    assert r.argmaxable[4] and not r.argmaxable[5]
    # two equal rows: neither can win outright
    assert not argmaxable_words(np.concatenate([square, square[:1]])).argmaxable[[0, 4]].any()


def test_cheap_tests_agree_with_the_full_lp():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(60, 3))
    w[:4] = 0.4 * (w[10:14] + w[20:24] + w[30:34]) / 3  # strictly inside the hull
    b = rng.normal(scale=0.3, size=60)
    for bias in (None, b):
        reference = _brute_force_argmaxable(w, np.zeros(60) if bias is None else bias, 1.0, 1e-6)
        r = argmaxable_words(w, bias, n_random=64, greedy_steps=10, lp_constraints=8, chunk=16)
        assert r.argmaxable.tolist() == reference.tolist()
        if bias is None:
            assert not r.argmaxable[:4].any()
        assert (r.stage != STAGES.index("undecided")).all()
        assert 0 < r.n_lp < 60


def test_lp_margin_with_constraint_generation():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(200, 4))
    w[0] = w[1:].mean(axis=0)
    verdict, margin, solves = lp_margin(w, np.zeros(200), 0, w[0], box=1.0, tolerance=1e-6, n_constraints=4)
    assert verdict is False and margin <= 1e-6 and solves >= 1
    top = int(np.argmax(w[:, 0]))
    verdict, margin, _ = lp_margin(w, np.zeros(200), top, w[top], box=1.0, tolerance=1e-6, n_constraints=4)
    assert verdict is True and margin > 0


def test_output_embedding_from_checkpoints_and_npy(tmp_path):
    import torch

    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"decoder.output_projection.weight": torch.from_numpy(w)}, "cfg": None}, plain)
    got, bias, source = load_output_embedding(plain)
    assert np.array_equal(got, w) and bias is None and source.endswith("decoder.output_projection.weight")
    shared = tmp_path / "shared.pt"
    cfg = {"model": {"share_decoder_input_output_embed": True}}
    torch.save({"model": {"decoder.embed_tokens.weight": torch.from_numpy(w)}, "cfg": cfg}, shared)
    assert np.array_equal(load_output_embedding(shared)[0], w)
    adaptive = tmp_path / "adaptive.pt"
    torch.save({"model": {"decoder.adaptive_softmax.head.weight": torch.zeros(2, 3)}}, adaptive)
    with pytest.raises(KnnlmError, match="adaptive softmax"):
        load_output_embedding(adaptive)
    unshared = tmp_path / "unshared.pt"
    torch.save({"model": {"decoder.embed_tokens.weight": torch.from_numpy(w)}, "cfg": {"model": {}}}, unshared)
    with pytest.raises(KnnlmError, match="no output projection"):
        load_output_embedding(unshared)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "b.npy", np.ones(4, dtype=np.float32))
    got, bias, _ = load_output_embedding(tmp_path / "w.npy", tmp_path / "b.npy")
    assert np.array_equal(got, w) and bias.tolist() == [1.0] * 4
    np.save(tmp_path / "b5.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(KnnlmError, match="5 entries for the 4 rows"):
        load_output_embedding(tmp_path / "w.npy", tmp_path / "b5.npy")


def test_figures_must_be_labelled_and_readable():
    with paper_style():
        fig, (ax,) = new_figure(1)
        ax.plot([0, 1], [0, 1])
        with pytest.raises(ValueError, match="lacks an x or y label"):
            check_figure(fig)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        check_figure(fig)
        ax.text(0.5, 0.5, "tiny", fontsize=6)
        with pytest.raises(ValueError, match="below 8"):
            check_figure(fig)
    assert fig.get_figwidth() == pytest.approx(3.3)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_loaded_numbers_stay_in_tmp(tmp_path: Path):
    """Outputs are strict JSON: infinities as strings, NaN as null."""
    import json

    from knnlm.analysis.outputs import write_csv, write_json

    write_json(tmp_path / "x.json", {"a": np.float64(np.inf), "b": np.array([1.0, np.nan]), "p": tmp_path})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": "inf", "b": [1.0, None], "p": str(tmp_path)}
    write_csv(tmp_path / "x.csv", ["a", "b"], [[1, np.nan], ["w", 0.5]])
    assert (tmp_path / "x.csv").read_text().splitlines() == ["a,b", "1,", "w,0.5"]
