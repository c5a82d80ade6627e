"""The generalized kNN-LM of Xu, Alon & Neubig (2023), Eq. 5, as pure array functions.

    P(w) = (1 - λ) · softmax(W_sm · h_sm)[w]  +  λ · (M · softmax(mask-to-k(W_ds ⊗ h_ds) / τ))[w]

The LM part arrives as one log-probability per token (the target's), so only the
kNN part is computed here, from the ``k_max`` retrieved neighbours of each token:
their similarity scores (higher is better: inner product ``q·k``, or the negative
squared L2 distance ``-||q - k||²``) and their values (the next-token ids of the
datastore entries). ``M`` adds up the softmax mass of all neighbours that carry the
same word, so the kNN log-probability of the target is

    log Σ_{j kept, vals_j = target} exp(s_j / τ)  -  log Σ_{j kept} exp(s_j / τ)

which is ``-inf`` when no kept neighbour carries the target (zero mass).

Conventions shared by every function here:

- Columns are ranked by the mask source (FAISS's or the exact ranking), best first;
  ``mask-to-k`` keeps the first ``k`` usable columns. The scores of a column are
  whatever the score source gave (approximate FAISS or recomputed exact scores), so
  a "FAISS mask, real score" retrieval keeps FAISS's order even where the exact
  scores would rank the columns differently.
- A neighbour is unusable when its score is ``-inf`` or its id is negative (FAISS
  returns ``-1`` when it finds fewer than ``k_max`` entries). A token without any
  usable neighbour gets zero kNN mass (``-inf``).
- Score-time datastore subsampling (:class:`Subsample`) drops neighbours whose id is
  outside a seeded pseudo-random subset, then ``mask-to-k`` takes the first ``k`` of
  those left. It approximates searching a datastore rebuilt from that subset: the
  neighbours that such a search would find beyond column ``k_max`` of the full search
  are missing here, so fewer than ``k`` neighbours may remain. Rebuilding the
  datastore with ``--subsample`` is the exact path.
- Everything is computed in the score array's float precision (float16 is widened
  to float32) and returned as float64; large arrays (including memory maps) are
  processed in row chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

#: λ values tried by :func:`tune_lambda` unless told otherwise: 0, 0.01, ..., 1.
DEFAULT_LAMBDA_GRID: np.ndarray = np.round(np.linspace(0.0, 1.0, 101), 10)

#: rows processed at once; 4096 x 1024 float32 scores are 16 MiB per temporary.
DEFAULT_CHUNK_ROWS = 4096

_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer, in place on a uint64 array (wrap-around arithmetic is intended)."""
    tmp = np.empty_like(x)
    for shift, mul in ((30, _SPLITMIX_MUL1), (27, _SPLITMIX_MUL2), (31, None)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        if mul is not None:
            np.multiply(x, mul, out=x)
    return x


@dataclass(frozen=True)
class Subsample:
    """A seeded pseudo-random subset of datastore ids, of expected size ``ratio · N``.

    Membership is a hash of (id, seed), so an id is in or out for every token alike
    and the subset does not depend on the datastore size. It is *not* the subset the
    datastore builder's ``--subsample`` draws; score-time and build-time subsampling
    are two different approximations of a smaller datastore.
    """

    ratio: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 < self.ratio <= 1.0) or not math.isfinite(self.ratio):
            raise ValueError(f"subsample ratio must be in (0, 1], got {self.ratio}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"subsample seed must be an integer >= 0, got {self.seed}")

    def keep(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids that are in the subset (negative ids never are)."""
        ids = np.asarray(ids)
        if self.ratio >= 1.0:
            return ids >= 0
        salt = _mix64(np.array([int(self.seed)], dtype=np.uint64) * _SPLITMIX_GAMMA + _SPLITMIX_GAMMA)[0]
        hashed = ids.astype(np.int64).view(np.uint64)  # a copy: hashed in place below
        np.bitwise_xor(hashed, salt, out=hashed)
        _mix64(hashed)
        # the top 53 bits are a uniform number u in [0, 2^53): keep when u < ratio · 2^53
        np.right_shift(hashed, np.uint64(11), out=hashed)
        return (hashed < np.uint64(int(self.ratio * 2.0**53))) & (ids >= 0)


def subsample_keep(ids: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Which neighbour ids survive score-time subsampling with ``ratio`` and ``seed``."""
    return Subsample(ratio, seed).keep(ids)


class Perplexity(NamedTuple):
    """Perplexity over ``n_tokens`` tokens; ``inf`` when ``n_zero_mass`` tokens got probability 0."""

    ppl: float
    n_tokens: int
    n_zero_mass: int


def _compute_dtype(scores: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if scores.dtype == np.float64 else np.dtype(np.float32)


def _underflow_gap(dtype: np.dtype) -> float:
    """Largest log-space gap below the row maximum at which exp() keeps full precision."""
    return 0.45 * -math.log(float(np.finfo(dtype).tiny))


def _check_ks(ks: Sequence[int], width: int) -> list[int]:
    out = []
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        if k > width:
            raise ValueError(f"k={k} exceeds the {width} neighbours available (k_max)")
        out.append(int(k))
    return out


def _check_temperatures(temperatures: Sequence[float]) -> list[float]:
    out = []
    for tau in temperatures:
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"temperature must be a finite number > 0, got {tau}")
        out.append(float(tau))
    return out


def _mask_to_k(usable: np.ndarray | None, k: int, subsampling: bool) -> tuple[int, np.ndarray | None]:
    """Columns to read and the mask-to-k mask over them (None: all of the first k).

    Without subsampling mask-to-k is the first k columns (minus unusable ones); with
    it, the first k usable columns anywhere within k_max.
    """
    if usable is None:
        return k, None
    if not subsampling:
        return k, usable[:, :k]
    return usable.shape[1], usable & (np.cumsum(usable, axis=1, dtype=np.int32) <= k)


def _chunk_knn_logprob(
    s: np.ndarray, match: np.ndarray, kept: np.ndarray | None, temperatures: list[float], gap_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """kNN log-prob of the target for one chunk of rows and every temperature: [len(τ), rows].

    Also returns how many neighbours each row kept.
    """
    usable = np.isfinite(s) if kept is None else kept & np.isfinite(s)
    # plain reductions over -inf-masked copies are several times faster than reductions with where=
    masked = s if kept is None and usable.all() else np.where(usable, s, s.dtype.type(-np.inf))
    hit_mask = match & usable
    row_max = masked.max(axis=1)
    hit_max = np.where(hit_mask, masked, s.dtype.type(-np.inf)).max(axis=1)
    empty = row_max == -np.inf
    row_max[empty] = 0.0
    shifted = masked - row_max[:, None]
    hit_gap = (row_max - hit_max).astype(np.float64)  # ≥ 0, +inf without a hit
    hit_weights = hit_mask.astype(s.dtype)
    weights = np.empty_like(shifted)
    out = np.empty((len(temperatures), s.shape[0]), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, tau in enumerate(temperatures):
            np.multiply(shifted, s.dtype.type(1.0 / tau), out=weights)
            np.exp(weights, out=weights)
            # the best neighbour weighs exactly 1, so these sums are well conditioned
            log_total = np.log(weights.sum(axis=1).astype(np.float64))
            hit = np.einsum("ij,ij->i", weights, hit_weights).astype(np.float64)
            res = np.log(hit) - log_total
            # rows whose best matching neighbour is far below the best neighbour: the
            # shared shift would underflow their mass, so shift by their own maximum
            deep = np.flatnonzero(np.isfinite(hit_gap) & (hit_gap / tau > gap_limit))
            if deep.size:
                own = np.where(
                    hit_mask[deep],
                    (s[deep] - hit_max[deep, None].astype(s.dtype)) * s.dtype.type(1.0 / tau),
                    -np.inf,
                )
                own_log = np.log(np.sum(np.exp(own), axis=1, dtype=np.float64))
                res[deep] = own_log - hit_gap[deep] / tau - log_total[deep]
            res[empty] = -np.inf
            out[i] = res
    return out, np.count_nonzero(usable, axis=1)


def knn_logprob_grid(
    scores: np.ndarray,
    vals: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int],
    temperatures: Sequence[float],
    *,
    ids: np.ndarray | None = None,
    subsample: Subsample | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    used_out: np.ndarray | None = None,
) -> np.ndarray:
    """kNN log-probability of each target for every (k, τ): float64 ``[len(ks), len(τ), T]``.

    One pass over the rows serves the whole grid, so a temperature sweep reads the
    (memory-mapped) neighbours once. ``ids`` is needed only to drop negative ids and
    for ``subsample``. ``used_out`` (int ``[len(ks), T]``), if given, receives the
    number of neighbours mask-to-k kept per token (see :func:`neighbours_used`).
    """
    if scores.ndim != 2 or scores.shape != vals.shape:
        raise ValueError(f"scores {scores.shape} and vals {vals.shape} must both be [T, k_max]")
    n_rows, width = scores.shape
    if targets.shape != (n_rows,):
        raise ValueError(f"targets {targets.shape} must be [T] with T={n_rows}")
    if ids is not None and ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} must match scores {scores.shape}")
    if subsample is not None and ids is None:
        raise ValueError("subsampling needs the neighbour ids")
    ks = _check_ks(ks, width)
    temperatures = _check_temperatures(temperatures)
    if used_out is not None and used_out.shape != (len(ks), n_rows):
        raise ValueError(f"used_out {used_out.shape} must be [len(ks), T] = {(len(ks), n_rows)}")
    dtype = _compute_dtype(scores)
    gap_limit = _underflow_gap(dtype)
    subsampling = subsample is not None and subsample.ratio < 1.0
    out = np.empty((len(ks), len(temperatures), n_rows), dtype=np.float64)
    read_width = width if subsampling else max(ks)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        s_all = np.asarray(scores[rows, :read_width], dtype=dtype)
        match_all = np.asarray(vals[rows, :read_width]) == np.asarray(targets[rows])[:, None]
        usable_all = None
        if ids is not None:
            id_chunk = np.asarray(ids[rows, :read_width])
            usable_all = subsample.keep(id_chunk) if subsampling else id_chunk >= 0
            if subsampling:
                usable_all &= np.isfinite(s_all)
            elif usable_all.all():
                usable_all = None
        for ki, k in enumerate(ks):
            cols, kept = _mask_to_k(usable_all, k, subsampling)
            out[ki, :, rows], used = _chunk_knn_logprob(
                s_all[:, :cols], match_all[:, :cols], kept, temperatures, gap_limit
            )
            if used_out is not None:
                used_out[ki, rows] = used
    return out


def knn_logprob(
    scores: np.ndarray,
    vals: np.ndarray,
    targets: np.ndarray,
    k: int,
    temperature: float,
    *,
    ids: np.ndarray | None = None,
    subsample: Subsample | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> np.ndarray:
    """log (M · softmax(mask-to-k(scores) / τ))[target] per token, float64 ``[T]``."""
    return knn_logprob_grid(
        scores, vals, targets, [k], [temperature], ids=ids, subsample=subsample, chunk_rows=chunk_rows
    )[0, 0]


def neighbours_used(
    scores: np.ndarray,
    k: int,
    *,
    ids: np.ndarray | None = None,
    subsample: Subsample | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> np.ndarray:
    """How many neighbours mask-to-k actually keeps per token (< k after subsampling)."""
    n_rows, width = scores.shape
    (k,) = _check_ks([k], width)
    subsampling = subsample is not None and subsample.ratio < 1.0
    if subsampling and ids is None:
        raise ValueError("subsampling needs the neighbour ids")
    read_width = width if subsampling else k
    out = np.empty(n_rows, dtype=np.int64)
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_rows))
        usable = np.isfinite(np.asarray(scores[rows, :read_width]))
        if ids is not None:
            id_chunk = np.asarray(ids[rows, :read_width])
            usable &= subsample.keep(id_chunk) if subsampling else id_chunk >= 0
        out[rows] = np.minimum(usable.sum(axis=1), k)
    return out


def _kept_weights(
    scores: np.ndarray,
    k: int,
    temperature: float,
    ids: np.ndarray | None,
    subsample: Subsample | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(mask-to-k(scores) / τ)`` per neighbour (float64) and which neighbours mask-to-k kept."""
    n_rows, width = scores.shape
    (k,) = _check_ks([k], width)
    (tau,) = _check_temperatures([temperature])
    subsampling = subsample is not None and subsample.ratio < 1.0
    if subsampling and ids is None:
        raise ValueError("subsampling needs the neighbour ids")
    cols = width if subsampling else k
    s = np.asarray(scores[:, :cols], dtype=np.float64)
    usable = np.isfinite(s)
    if ids is not None:
        id_cols = np.asarray(ids[:, :cols])
        usable &= subsample.keep(id_cols) if subsampling else id_cols >= 0
    if subsampling:
        usable &= np.cumsum(usable, axis=1) <= k
    row_max = np.max(s, axis=1, where=usable, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(usable, np.exp((s - row_max[:, None]) / tau), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0), usable


def neighbour_weights(
    scores: np.ndarray,
    k: int,
    temperature: float,
    *,
    ids: np.ndarray | None = None,
    subsample: Subsample | None = None,
) -> np.ndarray:
    """Each neighbour's share of the kNN mass, ``softmax(mask-to-k(scores) / τ)``: float64 ``[T, cols]``.

    ``cols`` is ``k`` (``k_max`` with ``subsample``); neighbours mask-to-k drops weigh 0.
    What a viewer of single tokens shows per neighbour; ``M`` then sums them per value.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} must be [T, k_max]")
    return _kept_weights(scores, k, temperature, ids, subsample)[0]


def knn_distribution(
    scores: np.ndarray,
    vals: np.ndarray,
    k: int,
    temperature: float,
    vocab_size: int,
    *,
    ids: np.ndarray | None = None,
    subsample: Subsample | None = None,
) -> np.ndarray:
    """The whole kNN distribution ``M · softmax(mask-to-k(scores) / τ)``, float64 ``[T, V]``.

    Built by scatter-adding each kept neighbour's softmax weight onto its value. Rows
    without a usable neighbour are all zeros (zero mass everywhere). Meant for small
    batches (tests, per-batch evaluation), not for a whole cache.
    """
    if scores.ndim != 2 or scores.shape != vals.shape:
        raise ValueError(f"scores {scores.shape} and vals {vals.shape} must both be [T, k_max]")
    probs, usable = _kept_weights(scores, k, temperature, ids, subsample)
    n_rows = scores.shape[0]
    v = np.asarray(vals[:, : probs.shape[1]], dtype=np.int64)
    if np.any(usable & ((v < 0) | (v >= vocab_size))):
        raise ValueError(f"neighbour values must be word ids in [0, {vocab_size})")
    flat = (np.arange(n_rows, dtype=np.int64)[:, None] * vocab_size + np.where(usable, v, 0)).ravel()
    dist = np.bincount(flat, weights=probs.ravel(), minlength=n_rows * vocab_size)
    return dist.reshape(n_rows, vocab_size)


def interpolate(lm_logprob: np.ndarray, knn_logprob: np.ndarray, lam: float) -> np.ndarray:
    """log((1 - λ)·p_LM + λ·p_kNN) per token, in log space so -inf and tiny mass are exact.

    λ = 0 returns the LM log-probs and λ = 1 the kNN ones, bit for bit.
    """
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"λ must be in [0, 1], got {lam}")
    lm = np.asarray(lm_logprob, dtype=np.float64)
    knn = np.asarray(knn_logprob, dtype=np.float64)
    if lam == 0.0:
        return np.array(lm, copy=True)
    if lam == 1.0:
        return np.array(knn, copy=True)
    return np.logaddexp(lm + math.log1p(-lam), knn + math.log(lam))


_MAX_EXP = math.log(np.finfo(np.float64).max)


def perplexity(logprobs: np.ndarray) -> Perplexity:
    """exp(-mean log-prob); ``inf`` if any token has log-prob ``-inf`` (counted, not dropped).

    fairseq's eval_lm drops non-finite scores from its sum; here a zero-probability
    token makes the perplexity infinite and is reported in ``n_zero_mass``.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("perplexity of zero tokens")
    if np.isnan(lp).any():
        raise ValueError("log-probabilities contain NaN")
    zero = int(np.count_nonzero(lp == -np.inf))
    if zero:
        return Perplexity(math.inf, lp.size, zero)
    nll = -float(np.mean(lp))
    # tiny but non-zero probabilities (e.g. a very cold kNN distribution) can exceed the float range
    return Perplexity(math.exp(nll) if nll < _MAX_EXP else math.inf, lp.size, 0)


def _mean_nll_curve(lm: np.ndarray, knn: np.ndarray, grid: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """Mean negative log-likelihood for each λ of ``grid`` (inf where some token has zero mass).

    Per token, with m = max(lm, knn): log((1-λ)e^lm + λe^knn) = m + log((1-λ)e^(lm-m) + λe^(knn-m)),
    where one of the two exponentials is 1, so for 0 < λ < 1 the argument of the log is at least
    min(λ, 1-λ) and nothing that matters underflows; λ = 0 and λ = 1 are the parts' own means.
    One multiply-add and one log per (λ, token) instead of a logaddexp.
    """
    sums = np.zeros(grid.size, dtype=np.float64)
    inner = (grid > 0) & (grid < 1)
    lam = grid[inner][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, lm.size, chunk):
            a_log = lm[start : start + chunk]
            b_log = knn[start : start + chunk]
            top = np.maximum(a_log, b_log)
            finite_top = np.where(np.isfinite(top), top, 0.0)
            a = np.exp(a_log - finite_top)
            b = np.exp(b_log - finite_top)
            mix = (1.0 - lam) * a
            mix += lam * b
            np.log(mix, out=mix)
            sums[inner] -= mix.sum(axis=1) + np.sum(top)
    with np.errstate(invalid="ignore"):
        sums[grid == 0] = -np.sum(lm)
        sums[grid == 1] = -np.sum(knn)
    return sums / lm.size


def lambda_curve(valid_lm: np.ndarray, valid_knn: np.ndarray, grid: Sequence[float] | None = None) -> np.ndarray:
    """Perplexity at each λ of ``grid`` (``inf`` where some token gets zero mass)."""
    grid_arr = _check_grid(grid)
    lm = np.asarray(valid_lm, dtype=np.float64)
    knn = np.asarray(valid_knn, dtype=np.float64)
    if lm.shape != knn.shape or lm.ndim != 1 or lm.size == 0:
        raise ValueError(f"LM {lm.shape} and kNN {knn.shape} log-probs must be equal non-empty [T]")
    with np.errstate(over="ignore"):
        return np.exp(_mean_nll_curve(lm, knn, grid_arr))


def tune_lambda(valid_lm: np.ndarray, valid_knn: np.ndarray, grid: Sequence[float] | None = None) -> float:
    """The λ of ``grid`` (default 0, 0.01, ..., 1) with the lowest perplexity on the data given.

    Pass validation log-probs only: the λ it returns is then applied to the test
    split. Ties (equal up to float rounding, 1e-12 relative) go to the smallest λ.
    """
    grid_arr = _check_grid(grid)
    nll = _mean_nll_curve(np.asarray(valid_lm, dtype=np.float64), np.asarray(valid_knn, dtype=np.float64), grid_arr)
    best = float(np.min(nll))
    if not math.isfinite(best):
        return float(grid_arr[int(np.argmin(nll))])
    tied = np.flatnonzero(nll <= best + 1e-12 * max(1.0, abs(best)))
    return float(grid_arr[tied[np.argmin(grid_arr[tied])]])


def _check_grid(grid: Sequence[float] | None) -> np.ndarray:
    arr = DEFAULT_LAMBDA_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or np.any((arr < 0) | (arr > 1)) or np.isnan(arr).any():
        raise ValueError("λ grid must be a non-empty list of values in [0, 1]")
    return arr


def oracle_logprob(lm_logprob: np.ndarray, knn_logprob: np.ndarray) -> np.ndarray:
    """Per token, the better of the LM and the kNN log-probability (an upper bound on any λ)."""
    return np.maximum(np.asarray(lm_logprob, dtype=np.float64), np.asarray(knn_logprob, dtype=np.float64))
