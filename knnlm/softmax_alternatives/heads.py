"""Trainable replacements of the datastore (Xu et al. 2023, Section 4 and Appendix C).

Each head maps a frozen base LM's ``att`` or ``ffn`` representation ``h`` to word
log-probabilities ``[..., V]`` that play the role of the kNN distribution
``M·softmax(W_ds ⊗ h)`` in the interpolation with the base LM:

* :class:`LearnedDatastore` -- ``W_ds`` is a trainable ``R × D`` matrix (R = n·V rows,
  or adaptive per-word sizes); softmax over rows, M sums rows per word.
* :class:`MixtureOfSoftmaxes` -- Yang et al. (2018): R softmaxes over the (optionally
  frozen) base output embeddings, mixed by a context-dependent prior.
* :class:`ClusteredDatastore` -- the datastore compressed into k-means centroids; M is
  each cluster's distribution of next words; centroids optionally fine-tuned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnlm.softmax_alternatives.aggregation import WordRows, aggregate_log_softmax, target_log_probs, uniform_n

SIMILARITIES = ("ip", "l2")


def _at_least_fp32(h: Tensor) -> Tensor:
    """16-bit features (cached fp16 queries, AMP) are lifted to fp32; float64 tests stay float64."""
    return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h


class WordHead(nn.Module):
    """A head: ``forward(h)`` gives word log-probabilities ``[..., V]``; ``target_log_probs`` only
    the targets' (what training and evaluation need), which a head may compute more cheaply."""

    def target_log_probs(self, h: Tensor, target: Tensor) -> Tensor:
        return self(h).gather(-1, target.unsqueeze(-1)).squeeze(-1)


class LearnedDatastore(WordHead):
    """``log M·softmax(W_ds h + b)`` with ``W_ds`` of ``R`` rows and ``row_word`` the aggregation M."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        row_word: Tensor,
        init_weight: Tensor | None = None,
        init_bias: Tensor | None = None,
        init_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        """``init_weight``/``init_bias`` are per-word (``V × D``, ``V``) and copied to each word's rows.

        ``init_noise`` (std) breaks the symmetry between copies; without an init the
        rows are drawn from N(0, 1/D) and there is no bias.
        """
        super().__init__()
        row_word = torch.as_tensor(row_word, dtype=torch.long)
        if row_word.numel() == 0 or int(row_word.min()) < 0 or int(row_word.max()) >= vocab_size:
            raise ValueError(f"row_word must map every row to a word in [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.register_buffer("row_word", row_word, persistent=True)
        self._index_rows()
        generator = torch.Generator().manual_seed(seed)
        rows = row_word.numel()
        if init_weight is None:
            weight = torch.randn(rows, dim, generator=generator) / math.sqrt(dim)
        else:
            if tuple(init_weight.shape) != (vocab_size, dim):
                raise ValueError(f"init_weight must be {vocab_size} x {dim}, got {tuple(init_weight.shape)}")
            weight = init_weight.detach().float()[row_word].clone()
            if init_noise > 0:
                weight += init_noise * torch.randn(rows, dim, generator=generator)
        self.weight = nn.Parameter(weight)
        if init_bias is not None:
            self.bias: nn.Parameter | None = nn.Parameter(init_bias.detach().float()[row_word].clone())
        else:
            self.bias = None

    def _index_rows(self) -> None:
        """What is derived from ``row_word``: the aggregation's fast path and each word's rows."""
        self.uniform_n = uniform_n(self.row_word, self.vocab_size)
        self.word_rows = WordRows(self.row_word, self.vocab_size).to(self.row_word.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint's row_word (adaptive sizes) replaces the one built: derive again from it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._index_rows()

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    def logits(self, h: Tensor) -> Tensor:
        """Row logits ``[..., R]``: matmul in the weights' dtype (fp16 under --fp16), result in at least fp32."""
        return _at_least_fp32(F.linear(h.to(self.weight.dtype), self.weight, self.bias))

    def forward(self, h: Tensor) -> Tensor:
        return aggregate_log_softmax(self.logits(h), self.row_word, self.vocab_size, self.uniform_n)

    def target_log_probs(self, h: Tensor, target: Tensor) -> Tensor:
        return target_log_probs(self.logits(h), target, self.word_rows)


class MixtureOfSoftmaxes(WordHead):
    """``log Σ_r π_r(h) softmax(W tanh(P_r h) + b)`` (Yang et al. 2018) over the output embeddings ``W``."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        components: int,
        output_weight: Tensor,
        output_bias: Tensor | None = None,
        train_output: bool = False,
    ) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"a mixture needs at least one component, got {components}")
        if tuple(output_weight.shape) != (vocab_size, dim):
            raise ValueError(f"output_weight must be {vocab_size} x {dim}, got {tuple(output_weight.shape)}")
        self.components, self.dim = components, dim
        self.prior = nn.Linear(dim, components, bias=False)
        self.latent = nn.Linear(dim, components * dim)
        self.output_weight = nn.Parameter(output_weight.detach().float().clone(), requires_grad=train_output)
        bias = torch.zeros(vocab_size) if output_bias is None else output_bias.detach().float().clone()
        self.output_bias = nn.Parameter(bias, requires_grad=train_output)

    def mixture_log_weights(self, h: Tensor) -> Tensor:
        """log π(h) ``[..., R]``: the context-dependent mixture weights (they sum to one)."""
        return torch.log_softmax(_at_least_fp32(self.prior(h.to(self.prior.weight.dtype))), dim=-1)

    def component_log_probs(self, h: Tensor) -> Tensor:
        """Each component's word log-probabilities ``[..., R, V]``."""
        contexts = torch.tanh(self.latent(h.to(self.prior.weight.dtype))).unflatten(-1, (self.components, self.dim))
        return torch.log_softmax(_at_least_fp32(F.linear(contexts, self.output_weight, self.output_bias)), dim=-1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.logsumexp(self.mixture_log_weights(h).unsqueeze(-1) + self.component_log_probs(h), dim=-2)

    def target_log_probs(self, h: Tensor, target: Tensor) -> Tensor:
        index = target.unsqueeze(-1).unsqueeze(-1).expand(*target.shape, self.components, 1)
        at_target = self.component_log_probs(h).gather(-1, index).squeeze(-1)
        return torch.logsumexp(self.mixture_log_weights(h) + at_target, dim=-1)


class ClusteredDatastore(WordHead):
    """``log M·softmax(sim(h, centroids))``: M[c, w] is the share of word w among cluster c's entries.

    ``cluster_word`` is a sparse ``C × V`` matrix whose rows sum to one. Words no
    cluster ever saw get probability zero (log-prob ``-inf``), as in a kNN-LM.
    """

    def __init__(
        self,
        centroids: Tensor,
        cluster_word: Tensor,
        similarity: str = "l2",
        train_centroids: bool = False,
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if not cluster_word.is_sparse or cluster_word.shape[0] != centroids.shape[0]:
            raise ValueError("cluster_word must be a sparse (clusters x vocabulary) matrix, one row per centroid")
        self.similarity = similarity
        self.vocab_size = cluster_word.shape[1]
        self.centroids = nn.Parameter(centroids.detach().float().clone(), requires_grad=train_centroids)
        # stored transposed (V x C) so that one sparse @ dense product aggregates a batch
        self.register_buffer("word_cluster", cluster_word.detach().float().t().coalesce(), persistent=False)

    def scores(self, h: Tensor) -> Tensor:
        h = h.to(self.centroids.dtype)
        if self.similarity == "ip":
            return h @ self.centroids.t()
        sq = (h * h).sum(-1, keepdim=True) - 2 * h @ self.centroids.t() + (self.centroids**2).sum(-1)
        return -sq

    def forward(self, h: Tensor) -> Tensor:
        lead = h.shape[:-1]
        probs = torch.softmax(_at_least_fp32(self.scores(h.reshape(-1, h.shape[-1]))), dim=-1)
        word_probs = torch.sparse.mm(self.word_cluster.to(probs.dtype), probs.t()).t()
        return torch.log(word_probs).reshape(*lead, self.vocab_size)


def topk_sparsify(log_probs: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """log softmax(mask-to-k(log P)/τ): the LM's own distribution cut to its top k words (Appendix E).

    Log-probabilities are logits up to a constant, so dividing them by τ and
    renormalising over the kept words is the tempered top-k softmax.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(k, log_probs.shape[-1])
    top, idx = log_probs.float().topk(k, dim=-1)
    kept = torch.log_softmax(top / temperature, dim=-1)
    return torch.full_like(log_probs, float("-inf"), dtype=torch.float32).scatter(-1, idx, kept)


def topk_target_logprobs(
    log_probs: Tensor, target: Tensor, ks: list[int], temperatures: list[float]
) -> dict[tuple[int, float], Tensor]:
    """``topk_sparsify(log_probs, k, τ)[target]`` for every (k, τ) from one sort.

    Sorted descending, the kept words of top-k are the first k; the normaliser of
    each k is a running logsumexp of the sorted values divided by τ. A target is
    kept when fewer than k words have a larger log-probability.
    """
    lp = log_probs.float()
    width = lp.shape[-1]
    sorted_lp = lp.sort(dim=-1, descending=True).values
    target_lp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    rank = (lp > target_lp.unsqueeze(-1)).sum(-1)
    out: dict[tuple[int, float], Tensor] = {}
    for t in temperatures:
        if not t > 0:
            raise ValueError(f"temperature must be > 0, got {t}")
        running = torch.logcumsumexp(sorted_lp / t, dim=-1)
        for k in ks:
            if k < 1:
                raise ValueError(f"k must be >= 1, got {k}")
            kk = min(k, width)
            kept = target_lp / t - running[..., kk - 1]
            out[(k, t)] = torch.where(rank < kk, kept, torch.full_like(kept, float("-inf")))
    return out
