"""The aggregation M of Xu et al. (2023): from a softmax over R rows to a distribution over V words.

A row-to-word map ``row_word`` (length R, values in [0, V)) says which word each
embedding row stands for. The probability of a word is the sum of the softmax
probabilities of its rows, ``P(w) = Σ_{r: row_word[r]=w} softmax(z)_r``, computed
here in log space (``log P(w) = logsumexp_{r∈w} z_r − logsumexp_r z_r``) so that
words whose rows all have tiny logits do not underflow.

Two layouts exist: ``n`` rows per word (rows ``j·V + v`` for copy ``j`` of word
``v``, a reshape does the sum) and per-word sizes (adaptive, rows grouped word by
word, a scatter does the sum).

Training needs only the target's probability, ``log P(y) = logsumexp_{r∈y}
log_softmax(z)_r`` (:func:`target_log_probs`): one fused log-softmax over the rows
and a gather of the target's few rows, instead of a ``[..., V]`` table built and
differentiated through every word's group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def uniform_row_word(vocab_size: int, n: int) -> Tensor:
    """Row ``j·V + v`` belongs to word ``v``: ``n`` copies of the vocabulary, one after the other."""
    if vocab_size < 1 or n < 1:
        raise ValueError(f"vocab_size and n must be >= 1, got {vocab_size}, {n}")
    return torch.arange(vocab_size, dtype=torch.long).repeat(n)


def sized_row_word(sizes: Tensor) -> Tensor:
    """Rows grouped word by word: word ``v`` owns ``sizes[v]`` consecutive rows."""
    sizes = torch.as_tensor(sizes, dtype=torch.long)
    if sizes.dim() != 1 or bool((sizes < 1).any()):
        raise ValueError("sizes must be a 1-d tensor of positive row counts, one per word")
    return torch.repeat_interleave(torch.arange(sizes.numel(), dtype=torch.long), sizes)


def uniform_n(row_word: Tensor, vocab_size: int) -> int | None:
    """``n`` when ``row_word`` is the uniform layout of ``n`` copies, else None (so the fast path is safe)."""
    rows = row_word.numel()
    if rows % vocab_size:
        return None
    n = rows // vocab_size
    expected = torch.arange(vocab_size, device=row_word.device).repeat(n)
    return n if torch.equal(row_word, expected) else None


def grouped_logsumexp(logits: Tensor, row_word: Tensor, vocab_size: int, n: int | None = None) -> Tensor:
    """``out[..., w] = log Σ_{r: row_word[r]=w} exp(logits[..., r])``; ``-inf`` for a word without rows.

    ``n``: the layout's copies when known to be uniform (skips checking ``row_word``).
    """
    if n is None:
        n = uniform_n(row_word, vocab_size)
    if n is not None:
        return logits.unflatten(-1, (n, vocab_size)).logsumexp(dim=-2)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    index = row_word.to(flat.device).unsqueeze(0).expand_as(flat)
    group_max = flat.new_full((flat.shape[0], vocab_size), float("-inf"))
    group_max = group_max.scatter_reduce(1, index, flat.detach(), reduce="amax", include_self=True)
    shift = group_max.gather(1, index)
    sums = flat.new_zeros((flat.shape[0], vocab_size)).scatter_add(1, index, torch.exp(flat - shift))
    out = torch.log(sums) + torch.where(torch.isfinite(group_max), group_max, torch.zeros_like(group_max))
    return out.reshape(*lead, vocab_size)


def aggregate_log_softmax(logits: Tensor, row_word: Tensor, vocab_size: int, n: int | None = None) -> Tensor:
    """``log (M · softmax(logits))``: word log-probabilities from row logits (sums to one over words).

    The normaliser over all rows is the logsumexp of the per-word ones (every row
    belongs to a word), so it costs V, not R, operations; one row per word is a
    plain log-softmax.
    """
    if n is None:
        n = uniform_n(row_word, vocab_size)
    if n == 1:
        return torch.log_softmax(logits, dim=-1)
    words = grouped_logsumexp(logits, row_word, vocab_size, n)
    return words - words.logsumexp(dim=-1, keepdim=True)


class WordRows(nn.Module):
    """Each word's rows, the inverse of ``row_word``: word ``w``'s rows are ``order[start[w] :
    start[w] + count[w]]``. A module of non-persistent buffers, so it follows its head's device
    and adds nothing to checkpoints."""

    def __init__(self, row_word: Tensor, vocab_size: int) -> None:
        super().__init__()
        row_word = torch.as_tensor(row_word, dtype=torch.long)
        count = torch.bincount(row_word, minlength=vocab_size)
        self.register_buffer("order", torch.argsort(row_word, stable=True), persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)
        self.register_buffer("count", count, persistent=False)
        self.width = int(count.max())

    def forward(self, words: Tensor) -> tuple[Tensor, Tensor]:
        """``(rows, present)``, both ``[*words.shape, width]``: each word's rows, padded where
        ``present`` is false (there ``rows`` repeats a row of the word, or, for a word without
        rows, holds some valid row)."""
        slot = torch.arange(self.width, device=words.device)
        count = self.count[words].unsqueeze(-1)
        position = self.start[words].unsqueeze(-1) + torch.minimum(slot, (count - 1).clamp(min=0))
        return self.order[position.clamp(max=self.order.numel() - 1)], slot < count


def target_log_probs(logits: Tensor, target: Tensor, rows: WordRows) -> Tensor:
    """``aggregate_log_softmax(logits, ...)`` at ``target`` (``logits``' shape without its last
    dimension) from the target's rows alone; ``-inf`` for a word without rows, with no NaN in
    the gradient."""
    index, present = rows(target)
    has_rows = present[..., 0]
    # one fused log-softmax over the rows (a bare logsumexp costs more passes on a CPU), then the
    # target's few rows; a word without rows reads some valid row and is set to -inf after
    own = torch.log_softmax(logits, dim=-1).gather(-1, index)
    own = own.masked_fill(~present & has_rows.unsqueeze(-1), float("-inf")).logsumexp(dim=-1)
    return torch.where(has_rows, own, float("-inf"))
