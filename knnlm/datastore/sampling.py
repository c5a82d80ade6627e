"""Seeded uniform samples of row indices without holding a permutation of all N rows.

Used for ``--subsample`` (which training tokens enter the datastore) and for the
sample an index is trained on. A permutation of N = 10^8 rows would take 800 MB;
drawing block by block (a hypergeometric count per block, then a choice within
it) gives the same distribution — every k-subset equally likely — in O(k) memory.
"""

from __future__ import annotations

import numpy as np

from knnlm.errors import KnnlmError

_BLOCK = 1 << 20
# numpy's hypergeometric sampler accepts populations below 10**9.
_MAX_POPULATION = 10**9 - 1


def sample_sorted(n: int, k: int, seed: int, block: int = _BLOCK) -> np.ndarray:
    """``k`` distinct integers of ``range(n)``, uniformly at random, sorted (int64).

    Deterministic for a given ``(n, k, seed, block)``.
    """
    if not 0 <= k <= n:
        raise KnnlmError(f"cannot sample {k} rows out of {n}")
    if n > _MAX_POPULATION:
        raise KnnlmError(f"sampling supports at most {_MAX_POPULATION} rows, got {n}")
    rng = np.random.default_rng(seed)
    out = np.empty(k, dtype=np.int64)
    filled, pop_left, k_left = 0, n, k
    for start in range(0, n, block):
        if k_left == 0:
            break
        size = min(block, n - start)
        count = k_left if size == pop_left else int(rng.hypergeometric(size, pop_left - size, k_left))
        picks = np.sort(rng.choice(size, size=count, replace=False)) + start
        out[filled : filled + count] = picks
        filled += count
        pop_left -= size
        k_left -= count
    return out


def subsample_count(n: int, ratio: float) -> int:
    """Rows kept by ``--subsample ratio`` of ``n`` (rounded, at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise KnnlmError(f"--subsample must be in (0, 1], got {ratio}")
    return max(1, min(n, round(ratio * n)))
