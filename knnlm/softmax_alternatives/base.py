"""The frozen base LM's output layer, seen from its ``ffn`` features.

The ``ffn`` key is exactly what the output layer (softmax or adaptive softmax)
receives, so the base LM's distribution can be recomputed from cached or
datastore ``ffn`` features without running the transformer again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from knnlm.models.fairseq_lm import output_logprobs


@torch.no_grad()
def _affine(module: nn.Module, dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(W [out, dim], b [out]) of an affine module, read off by probing it with 0 and the identity."""
    zero = like.new_zeros(1, dim)
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    bias = module(zero)[0]
    weight = (module(eye) - bias).t().contiguous()
    return weight, bias


def output_log_probs(decoder: nn.Module, features: Tensor) -> Tensor:
    """log P_LM(· | h) over the vocabulary for ``ffn`` features ``[..., D]`` (float32)."""
    features = features.float()
    adaptive = getattr(decoder, "adaptive_softmax", None)
    if adaptive is not None:
        flat = features.reshape(1, -1, features.shape[-1])
        return adaptive.get_log_prob(flat, None).reshape(*features.shape[:-1], -1).float()
    return torch.log_softmax(decoder.output_layer(features).float(), dim=-1)


def output_target_log_probs(decoder: nn.Module, features: Tensor, targets: Tensor) -> Tensor:
    """log P_LM(``targets`` | h) for ``ffn`` features ``[..., D]`` (float32, ``targets``' shape):
    ``output_log_probs`` at the targets without its ``[..., V]`` table (an adaptive softmax
    evaluates each tail cluster only for the positions whose target lies in it)."""
    flat = features.float().reshape(-1, features.shape[-1])
    output = flat if getattr(decoder, "adaptive_softmax", None) is not None else decoder.output_layer(flat)
    return output_logprobs(decoder, output, targets.reshape(-1)).reshape(targets.shape)


def output_linear_map(decoder: nn.Module) -> tuple[Tensor, Tensor, bool]:
    """The output layer as one ``V × D`` softmax: ``(W_sm, b_sm, exact)``.

    Exact for a plain output projection. An adaptive softmax is hierarchical
    (``log P(v) = log P_head(c) + log P_tail_c(v)``); its linear part
    ``z_v = head_c(h) + tail_c(h)_v − log |tail_c|`` replaces each tail's own
    normaliser by that of a uniform tail, so it is only an initialisation (``exact``
    is False; on the small WikiText-2 model it gives perplexity 327.8 vs 321.8).
    """
    was_training = decoder.training
    decoder.eval()
    try:
        like = next(decoder.parameters()).float()
        adaptive = getattr(decoder, "adaptive_softmax", None)
        if adaptive is None:
            dim = decoder.output_projection.in_features if hasattr(decoder, "output_projection") else None
            if dim is None:
                raise TypeError(f"{type(decoder).__name__} has neither an adaptive softmax nor an output_projection")
            weight, bias = _affine(decoder.output_layer, dim, like)
            return weight, bias, True
        dim = adaptive.input_dim if hasattr(adaptive, "input_dim") else decoder.output_embed_dim
        head_w, head_b = _affine(adaptive.head, dim, like)
        cutoff = list(adaptive.cutoff)
        rows_w, rows_b = [head_w[: cutoff[0]]], [head_b[: cutoff[0]]]
        for i, tail in enumerate(adaptive.tail):
            tail_w, tail_b = _affine(tail, dim, like)
            cluster = cutoff[0] + i
            rows_w.append(tail_w + head_w[cluster])
            rows_b.append(tail_b + head_b[cluster] - math.log(tail_w.shape[0]))
        return torch.cat(rows_w), torch.cat(rows_b), False
    finally:
        decoder.train(was_training)
