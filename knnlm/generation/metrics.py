"""Measures of generated text: repetition, copying of training n-grams, perplexity under the base LM.

What a kNN-LM might change in open-ended generation: the datastore holds the training set's
next words, so decoding from it may copy training text (long n-grams found verbatim in the
training split), repeat itself more or less, and drift towards text the LM alone finds more or
less likely. All measures take token ids (lists or 1-D arrays of one continuation each).

- :func:`distinct_n`: unique n-grams over all n-grams, pooled over the continuations;
- :func:`has_repeated_ngram`: whether one continuation holds some n-gram twice;
- :class:`TrainingNgrams`: the set of a token stream's n-grams as sorted 64-bit hashes (2M
  training tokens are 16 MB and a binary search away), and which tokens of a continuation an
  n-gram of that set covers;
- :func:`continuation_logprobs`: log p_LM of each continuation token given its prompt;
- :func:`bootstrap_ratio_ci`: a percentile bootstrap over continuations of ``Σ num / Σ den``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Tokens = Sequence[int] | np.ndarray

# odd multiplier of the polynomial hash (mod 2^64): n-grams of ids below 2^16 collide only by chance
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def ngrams(tokens: Tokens, n: int) -> list[tuple[int, ...]]:
    """The ``len(tokens) - n + 1`` n-grams of one sequence, in order (none if it is shorter than n)."""
    ids = [int(t) for t in tokens]
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(sequences: Sequence[Tokens], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams, pooled over ``sequences`` (n-grams never cross two of them)."""
    grams = [gram for tokens in sequences for gram in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def has_repeated_ngram(tokens: Tokens, n: int) -> bool:
    """Whether some n-gram occurs at least twice in ``tokens`` (overlapping occurrences count)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) < len(grams)


def ngram_hashes(tokens: Tokens, n: int) -> np.ndarray:
    """uint64 hash of each n-gram window of ``tokens`` (``Σ_j t[i+j]·B^(n-1-j)`` mod 2^64), in order."""
    ids = np.asarray(tokens, dtype=np.uint64)
    windows = len(ids) - n + 1
    if windows <= 0:
        return np.empty(0, dtype=np.uint64)
    hashes = np.zeros(windows, dtype=np.uint64)
    for j in range(n):
        hashes = hashes * _HASH_BASE + ids[j : j + windows]  # uint64 arithmetic wraps: mod 2^64
    return hashes


class TrainingNgrams:
    """The n-grams of a token stream (the training split), to look up continuation n-grams in."""

    def __init__(self, hashes: np.ndarray, n: int) -> None:
        self.hashes = np.unique(np.asarray(hashes, dtype=np.uint64))  # sorted, for searchsorted
        self.n = n

    @classmethod
    def from_stream(cls, stream: Tokens, n: int) -> TrainingNgrams:
        """Every window of ``stream`` (n-grams across line ends hold ``</s>`` and stay in the set)."""
        return cls(ngram_hashes(stream, n), n)

    def __len__(self) -> int:
        return len(self.hashes)

    def found(self, tokens: Tokens, skip: int | None = None) -> np.ndarray:
        """Per n-gram window of ``tokens``: whether the stream holds it (never, if it holds the id ``skip``)."""
        query = ngram_hashes(tokens, self.n)
        if not len(self.hashes) or not len(query):
            return np.zeros(len(query), dtype=bool)
        at = np.minimum(np.searchsorted(self.hashes, query), len(self.hashes) - 1)
        hits = self.hashes[at] == query
        if skip is not None:
            holds = (np.asarray(tokens) == skip).astype(np.int64)
            hits &= np.convolve(holds, np.ones(self.n, dtype=np.int64), mode="valid") == 0
        return hits

    def covered(self, tokens: Tokens, skip: int | None = None) -> np.ndarray:
        """Per token of ``tokens``: whether it lies inside some window the stream holds (a copied span).

        ``skip`` (``<unk>``) leaves out the windows that hold it: runs of unknown words and lists of
        them ("<unk> , <unk> , ...") are in the training split too, but copy nothing.
        """
        hits = self.found(tokens, skip)
        mask = np.zeros(len(tokens), dtype=bool)
        for start in np.flatnonzero(hits):
            mask[start : start + self.n] = True
        return mask


def continuation_logprobs(
    lm: Any, prompts: Sequence[Tokens], continuations: Sequence[Tokens], *, eos: int, pad: int, batch_size: int = 8
) -> list[np.ndarray]:
    """Natural-log p_LM of each continuation token, given ``</s>``, its prompt and the continuation so far.

    ``lm`` is a fairseq LM; rows are right-padded, which a causal decoder never attends to from
    the positions that are read. Only the continuation targets are scored
    (:func:`~knnlm.models.fairseq_lm.output_logprobs`, as the dump does), never the whole vocabulary.
    """
    import torch

    from knnlm.models.fairseq_lm import output_logprobs

    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            ([int(t) for t in p], [int(t) for t in c])
            for p, c in zip(prompts[start : start + batch_size], continuations[start : start + batch_size], strict=True)
        ]
        width = max(len(p) + len(c) for p, c in rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            sequence = [eos, *p, *c][:-1]  # input i predicts target i: [*p, *c]
            tokens[i, : len(sequence)] = torch.tensor(sequence)
        row = torch.cat([torch.full((len(c),), i) for i, (_, c) in enumerate(rows)])
        col = torch.cat([torch.arange(len(p), len(p) + len(c)) for p, c in rows])
        targets = torch.tensor([t for _, c in rows for t in c], dtype=torch.long)
        with torch.no_grad():
            output, _ = lm(tokens)
            scored = output_logprobs(lm.decoder, output[row, col], targets).double().numpy()
        out.extend(np.split(scored, np.cumsum([len(c) for _, c in rows])[:-1]))
    return out


def bootstrap_ratio_ci(
    numerators: np.ndarray, denominators: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``Σ num / Σ den``, resampling the items (continuations) with replacement.

    Items, not tokens, are the unit: tokens of one continuation depend on each other.
    """
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = num[picks].sum(axis=1) / den[picks].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)
