"""Small statistics the analyses share: bigram entropies, least-squares trends, separation of two samples.

Pure functions of arrays, tested against hand-computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse, stats

#: tokens per chunk when counting bigrams (two int64 index arrays of this length at a time)
BIGRAM_CHUNK = 1 << 22


def bigram_counts(stream: np.ndarray, vocab_size: int, chunk: int = BIGRAM_CHUNK) -> sparse.csr_matrix:
    """Sparse ``[V, V]`` counts of (token, next token) pairs of a token stream, counted chunk by chunk."""
    n = len(stream)
    total = sparse.csr_matrix((vocab_size, vocab_size), dtype=np.int64)
    for start in range(0, max(n - 1, 0), chunk):
        piece = np.asarray(stream[start : min(start + chunk + 1, n)], dtype=np.int64)
        left, right = piece[:-1], piece[1:]
        ones = np.ones(left.shape[0], dtype=np.int64)
        total = total + sparse.coo_matrix((ones, (left, right)), shape=(vocab_size, vocab_size)).tocsr()
    return total


def _row_entropy(counts: sparse.csr_matrix) -> np.ndarray:
    """Entropy (nats) of each row's normalized counts; NaN for empty rows."""
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    c = counts.data.astype(np.float64)
    plogp = counts.copy().astype(np.float64)
    plogp.data = c * np.log(c)
    weighted = np.asarray(plogp.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.log(totals) - weighted / totals, np.nan)


@dataclass
class BigramEntropy:
    """Per word id: entropy (nats) of the next token after it and of the token before it, and its count."""

    forward: np.ndarray  # [V] H(next | w); NaN if w is never followed
    backward: np.ndarray  # [V] H(previous | w); NaN if w is never preceded
    counts: np.ndarray  # [V] occurrences of w in the stream


def bigram_entropy(stream: np.ndarray, vocab_size: int, chunk: int = BIGRAM_CHUNK) -> BigramEntropy:
    """Forward and backward bigram entropy of every word of a token stream.

    Forward: ``H(X_{i+1} | X_i = w) = −Σ_u p(u|w) log p(u|w)`` with ``p(u|w)`` the share of
    the occurrences of ``w`` followed by ``u``; backward likewise with the preceding token.
    High forward entropy means many different continuations (hard to predict from ``w``).
    """
    pairs = bigram_counts(stream, vocab_size, chunk)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(stream), chunk):
        counts += np.bincount(np.asarray(stream[start : start + chunk], dtype=np.int64), minlength=vocab_size)
    return BigramEntropy(_row_entropy(pairs), _row_entropy(pairs.T.tocsr()), counts)


@dataclass
class Trend:
    """Least-squares line ``y = slope·x + intercept`` and the correlation of ``x`` and ``y``."""

    slope: float
    intercept: float
    pearson_r: float
    pearson_p: float
    spearman_rho: float
    n: int


def trend(x: np.ndarray, y: np.ndarray) -> Trend:
    """Fit a line by least squares over the finite pairs; NaN where fewer than 3 pairs or constant data."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = math.nan
    if n < 3 or np.ptp(x) == 0:
        return Trend(nan, nan, nan, nan, nan, n)
    slope, intercept = np.polyfit(x, y, 1)
    if np.ptp(y) == 0:
        return Trend(float(slope), float(intercept), nan, nan, nan, n)
    r = stats.pearsonr(x, y)
    rho = stats.spearmanr(x, y)
    return Trend(float(slope), float(intercept), float(r.statistic), float(r.pvalue), float(rho.statistic), n)


@dataclass
class Separation:
    """How far apart two samples are: ``a`` (expected higher) against ``b``."""

    mean_a: float
    mean_b: float
    cohens_d: float  # (mean_a − mean_b) / pooled standard deviation
    ks_statistic: float  # two-sample Kolmogorov–Smirnov distance of the distributions, in [0, 1]
    ks_pvalue: float
    auc: float  # P(a > b) + ½ P(a = b) for a random pair; 0.5 = no separation
    n_a: int
    n_b: int


def separation(a: np.ndarray, b: np.ndarray) -> Separation:
    """Difference of means in pooled-std units, KS statistic and AUC of ``a`` vs ``b``.

    Positive ``cohens_d`` and ``auc`` > 0.5 mean ``a`` tends to be larger.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size < 2 or b.size < 2:
        raise ValueError(f"separation needs at least 2 finite values per group, got {a.size} and {b.size}")
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    diff = float(a.mean() - b.mean())
    d = diff / pooled if pooled > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    ks = stats.ks_2samp(a, b)
    u = stats.mannwhitneyu(a, b, alternative="two-sided")
    return Separation(
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        cohens_d=float(d),
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        auc=float(u.statistic) / (a.size * b.size),
        n_a=int(a.size),
        n_b=int(b.size),
    )
