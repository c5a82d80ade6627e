"""Adaptive numbers of embeddings per word (Xu et al. 2023, Table 6).

Word ``v`` gets ``1 + log_b f_v`` rows, where ``f_v`` is its training frequency or
its total training loss under the base LM, and the base ``b`` is chosen so that
the sizes add up to ``n·V``:

    Σ_v (1 + ln f_v / ln b) = n·V   ⇔   ln b = Σ_v ln f_v / ((n − 1)·V)

(``f_v`` is clamped to at least 1, so rare or unseen words get one row). Integer
sizes are the real ones rounded by largest remainder, so they still sum to n·V.
"""

from __future__ import annotations

import math

import numpy as np

from knnlm.errors import KnnlmError


def _log_weights(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise KnnlmError("adaptive sizes need a 1-d array of per-word weights (frequency or loss)")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise KnnlmError("per-word weights must be finite and >= 0")
    return np.log(np.maximum(weights, 1.0))


def solve_base(weights: np.ndarray, n: float) -> float:
    """The base ``b`` with ``Σ_v (1 + log_b max(f_v, 1)) = n·V``; ``inf`` for n = 1 (one row per word)."""
    logs = _log_weights(weights)
    if n < 1:
        raise KnnlmError(f"--n must be >= 1 (rows per word on average), got {n}")
    if n == 1:
        return math.inf
    total = float(logs.sum())
    if total <= 0:
        raise KnnlmError("every per-word weight is <= 1: no base b can give words more than one row")
    return math.exp(total / ((n - 1) * logs.size))


def real_sizes(weights: np.ndarray, n: float) -> np.ndarray:
    """``1 + log_b max(f_v, 1)`` per word, before rounding."""
    base = solve_base(weights, n)
    logs = _log_weights(weights)
    if math.isinf(base):
        return np.ones_like(logs)
    return 1.0 + logs / math.log(base)


def adaptive_sizes(weights: np.ndarray, n: int) -> np.ndarray:
    """Integer rows per word (each >= 1) summing exactly to ``n·V``, by largest-remainder rounding."""
    if int(n) != n:
        raise KnnlmError(f"--n must be an integer for integer sizes, got {n}")
    real = real_sizes(weights, n)
    sizes = np.floor(real).astype(np.int64)
    short = int(n) * real.size - int(sizes.sum())
    if short > 0:
        remainder = real - sizes
        order = np.argsort(-remainder, kind="stable")
        sizes[order[:short]] += 1
    return sizes


def frequencies(values: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each word is a training target (the datastore's values)."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise KnnlmError(f"datastore values fall outside the vocabulary [0, {vocab_size})")
    return np.bincount(values, minlength=vocab_size).astype(np.float64)


def total_losses(values: np.ndarray, nll: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each word's summed training loss (natural-log NLL of the base LM where it is the target)."""
    return np.bincount(np.asarray(values), weights=np.asarray(nll, dtype=np.float64), minlength=vocab_size)
