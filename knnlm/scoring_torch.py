"""Eq. 5 of Xu et al. (2023) in torch, on the model's device: the twin of :mod:`knnlm.scoring`.

:mod:`knnlm.scoring` scores whole caches with numpy; these functions serve the
code that holds torch tensors already — the one-pass ``fairseq-eval-lm`` task,
generation, and training criteria — with the same conventions: neighbours with a
score of −inf or a value of −1 are missing, the kNN distribution is
``M · softmax(mask-to-k(scores) / τ)``, and interpolation is
``log((1 − λ)·p_LM + λ·p_kNN)`` in log space (λ = 0 and 1 return one side exactly).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _usable_log_weights(scores: Tensor, vals: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """log softmax(scores[:, :k] / τ) over the usable neighbours (−inf elsewhere), and their values."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise ValueError(f"the temperature τ must be positive and finite; got {temperature}")
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    s = scores[:, :k].double()
    v = vals[:, :k].long()
    usable = torch.isfinite(s) & (v >= 0)
    logits = torch.where(usable, s / temperature, torch.full_like(s, -math.inf))
    norm = torch.logsumexp(logits, dim=1, keepdim=True)
    # a row without any usable neighbour has no kNN mass: all −inf (not NaN)
    log_w = torch.where(torch.isfinite(norm), logits - norm, torch.full_like(logits, -math.inf))
    return log_w, torch.where(usable, v, torch.zeros_like(v))


def knn_target_logprob(scores: Tensor, vals: Tensor, targets: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """log p_kNN(target) per row, float64 [N]: a logsumexp over the neighbours whose value is the target.

    −inf where no kept neighbour carries the target. Never builds a [N, V] array.
    """
    log_w, v = _usable_log_weights(scores, vals, k, temperature)
    hits = torch.where(v == targets.long()[:, None], log_w, torch.full_like(log_w, -math.inf))
    return torch.logsumexp(hits, dim=1)


def knn_log_distribution(scores: Tensor, vals: Tensor, vocab_size: int, k: int, temperature: float = 1.0) -> Tensor:
    """log p_kNN over the whole vocabulary, float64 [N, V] (a scatter-add of the neighbour weights)."""
    log_w, v = _usable_log_weights(scores, vals, k, temperature)
    if v.numel() and int(v.max()) >= vocab_size:
        raise ValueError(f"neighbour values must be word ids in [0, {vocab_size})")
    probs = torch.zeros((len(v), vocab_size), dtype=torch.float64, device=v.device)
    probs.scatter_add_(1, v, log_w.exp())
    return probs.log()


def interpolate(lm_logprob: Tensor, knn_logprob: Tensor, lam: float) -> Tensor:
    """log((1 − λ)·p_LM + λ·p_kNN), elementwise, in the dtype of ``lm_logprob`` promoted with ``knn_logprob``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must be in [0, 1], got {lam}")
    if lam == 0.0:
        return lm_logprob.clone()
    if lam == 1.0:
        return knn_logprob.clone()
    return torch.logaddexp(lm_logprob + math.log1p(-lam), knn_logprob + math.log(lam))
