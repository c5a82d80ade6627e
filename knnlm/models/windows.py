"""Which input window computes the key of each target token: fairseq's eval_lm contexts.

fairseq 0.12 ``eval_lm --tokens-per-sample T --context-window C`` (with
``--sample-break-mode none``) cuts the split's token stream into blocks of
``L = T − C`` targets; ``LMContextWindowDataset`` prepends the last ``C``
tokens seen before each block. The model input of a block is a slice of the
*source* stream ``S`` (targets shifted right by one, ``S[0]`` = ``</s>``, as in
``TokenBlockDataset``)::

    targets  stream[s : e]            s = b·L, e = min(s + L, n)
    input    S[max(0, s − C) : e]     S[j] = stream[j − 1], S[0] = </s>

so target ``p`` is predicted from ``S[max(0, s − C) : p + 1]``: at least
``min(C, p) + 1`` tokens, at most ``C + L``. The first block has no carried
context: its first target (the split's first token) is predicted from the
single ``</s>`` that fairseq prepends, the next from ``</s>`` and one token,
and so on. Every token of the split is a target exactly once, so the number of
keys is the number of tokens of the split (end-of-line ``</s>`` included),
which is also the token count eval_lm reports.

Batches are groups of consecutive windows; the grouping depends only on the
plan, so a resumed or sharded build computes every batch exactly as a one-shot
build does (same padding, same kernels, same bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from knnlm.errors import KnnlmError


@dataclass(frozen=True)
class ContextPlan:
    """Windows and batches over a stream of ``num_tokens`` target tokens."""

    num_tokens: int
    tokens_per_sample: int
    context_window: int
    max_tokens: int

    def __post_init__(self) -> None:
        if self.num_tokens <= 0:
            raise KnnlmError("the split has no tokens: check the data folder and --split")
        if not 0 <= self.context_window < self.tokens_per_sample:
            raise KnnlmError(
                f"--context-window must be in [0, --tokens-per-sample); got {self.context_window} "
                f"with tokens_per_sample {self.tokens_per_sample}"
            )

    @property
    def block(self) -> int:
        """New targets per window (fairseq's reduced ``tokens_per_sample``)."""
        return self.tokens_per_sample - self.context_window

    @property
    def num_windows(self) -> int:
        return -(-self.num_tokens // self.block)

    @property
    def windows_per_batch(self) -> int:
        return max(1, self.max_tokens // self.tokens_per_sample)

    @property
    def num_batches(self) -> int:
        return -(-self.num_windows // self.windows_per_batch)

    def window(self, w: int) -> tuple[int, int, int]:
        """``(a, s, e)``: input is ``S[a:e]``, targets are ``stream[s:e]``."""
        s = w * self.block
        e = min(s + self.block, self.num_tokens)
        return max(0, s - self.context_window), s, e

    def batch_windows(self, b: int) -> range:
        first = b * self.windows_per_batch
        return range(first, min(first + self.windows_per_batch, self.num_windows))

    def batch_targets(self, b: int) -> tuple[int, int]:
        """Target range ``[s, e)`` covered by batch ``b``."""
        windows = self.batch_windows(b)
        return self.window(windows[0])[1], self.window(windows[-1])[2]

    def shard_batches(self, shard_id: int, num_shards: int) -> range:
        """The contiguous batches of shard ``shard_id``: batch-aligned, so shards merge byte-identically."""
        if not 0 <= shard_id < num_shards:
            raise KnnlmError(f"--shard-id must be in [0, --num-shards); got {shard_id} of {num_shards}")
        if num_shards > self.num_batches:
            raise KnnlmError(
                f"--num-shards {num_shards} exceeds the {self.num_batches} batches of this split; "
                f"use at most {self.num_batches} shards or lower --max-tokens"
            )
        return range(self.num_batches * shard_id // num_shards, self.num_batches * (shard_id + 1) // num_shards)

    def settings(self) -> dict[str, Any]:
        """The settings that determine every key (recorded in the datastore's meta.json)."""
        return {
            "tokens_per_sample": self.tokens_per_sample,
            "context_window": self.context_window,
            "sample_break_mode": "none",
            "source_shift": "targets shifted right by one; </s> before the first token",
        }


class TokenStream:
    """The split's lines concatenated into one target stream, read slice by slice.

    ``lines`` is any sequence of 1-D integer arrays/tensors with a ``sizes``
    array (a fairseq indexed dataset); only the lines a slice touches are read.
    """

    def __init__(self, lines: Sequence[Any], sizes: np.ndarray, eos: int) -> None:
        self._lines = lines
        self._offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
        self.eos = eos

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def targets(self, s: int, e: int) -> np.ndarray:
        """``stream[s:e]`` as int64."""
        if not 0 <= s <= e <= len(self):
            raise IndexError(f"slice [{s}, {e}) outside the stream of {len(self)} tokens")
        if s == e:
            return np.empty(0, dtype=np.int64)
        first = int(np.searchsorted(self._offsets, s, side="right")) - 1
        last = int(np.searchsorted(self._offsets, e, side="left"))
        parts = [np.asarray(self._lines[i], dtype=np.int64) for i in range(first, last)]
        joined = np.concatenate(parts)
        base = int(self._offsets[first])
        return joined[s - base : e - base]

    def sources(self, a: int, e: int) -> np.ndarray:
        """``S[a:e]``: the stream shifted right by one, ``</s>`` at position 0."""
        if a == e:
            return np.empty(0, dtype=np.int64)
        if a == 0:
            return np.concatenate([[self.eos], self.targets(0, max(e - 1, 0))]).astype(np.int64)
        return self.targets(a - 1, e - 1)


def batch_inputs(plan: ContextPlan, stream: TokenStream, b: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model input of batch ``b`` and where its targets sit in it.

    Returns ``(tokens [windows, width] padded with pad, rows, cols)``: target
    ``stream[s_b + i]`` is predicted at ``tokens[rows[i], cols[i]]``, for the batch's
    target range ``plan.batch_targets(b) = (s_b, e_b)``, in stream order. ``cols`` is
    also the number of tokens of context before each target in its window.
    """
    windows = [plan.window(w) for w in plan.batch_windows(b)]
    width = max(e - a for a, _s, e in windows)
    tokens = np.full((len(windows), width), pad, dtype=np.int64)
    rows, cols = [], []
    for i, (a, s, e) in enumerate(windows):
        tokens[i, : e - a] = stream.sources(a, e)
        rows.append(np.full(e - s, i))
        cols.append((s - a) + np.arange(e - s))
    return tokens, np.concatenate(rows), np.concatenate(cols)
